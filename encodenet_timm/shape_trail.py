"""The encoder's shape trail: what the mirrored decoder must walk back.

The encoder (``model.forward_features``) is traced with torch.fx using timm's own leaf modules and
autowrapped functions (the settings of ``timm.models._features_fx``); shapes are propagated with
``torch.fx.passes.shape_prop.ShapeProp``. Where tracing fails, forward hooks on every submodule
record the same shapes. The outputs of its layers (module calls; dropouts and softmax excepted, as they
also run on attention maps) that read as a downsampled image map, no larger than the first such map (the
stem; a larger one is an attention map), give the trail: one entry ``(C, H, W)`` per resolution, with the
channels of the last layer at that resolution; the decoder has one upsampling block per entry, from the
deepest back to the input size.

An encoder that returns a list of tensors (CoaT, CrossViT, EfficientViM) passes the whole list to
``forward_head``, which uses every element; the decoder mirrors one of them (`ShapeTrail.output_index`):
the element that reads as the largest map of the image (most spatial positions; the first on a tie).
It carries the most spatial information to rebuild an image from, and its trail is the longest stretch
of the encoder's downsampling path. Elements that read as no map of the input (EfficientViM's state-space
hidden states, whose size does not follow the image) are never chosen.
"""
import logging
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from .errors import UnsupportedModelError

__all__ = ["ShapeTrail", "trace_shape_trail"]

_logger = logging.getLogger(__name__)

_PROBE_BATCH = 3  # odd, so windowed tensors (B * num_windows, ...) are told apart from maps
_MAX_PREFIX = 16  # class/distillation/register tokens a token element of a list output may lead with


@dataclass
class ShapeTrail:
    """What the decoder needs to know about the encoder.

    Attributes:
        input_size: (C, H, W) of the images.
        layout: encoder output layout: "NCHW", "NHWC" (Swin-like), "NLC" (tokens), "NCL" (a flattened
            NCHW map; list elements only) or "NC" (vector).
        output_shape: encoder output shape without the batch dim (of the mirrored element, for a list).
        trail: (C, H, W) at every resolution the encoder passes through, largest first, deepest last;
            the deepest equals the encoder output seen as a map.
        num_prefix_tokens: class/register tokens dropped before tokens become a map ("NLC" only).
        trace: "fx" when read from the traced graph, "hooks" when from forward hooks.
        output_index: for an encoder that returns a list, the element the decoder mirrors; None otherwise.
    """
    input_size: Tuple[int, int, int]
    layout: str
    output_shape: Tuple[int, ...]
    trail: List[Tuple[int, int, int]]
    num_prefix_tokens: int = 0
    trace: str = "fx"
    output_index: Optional[int] = None


class _Features(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward_features(x)


class _TimmTracer(torch.fx.Tracer):
    """torch.fx tracer that honours timm's ``register_notrace_module`` / ``register_notrace_function``."""

    def __init__(self):
        from timm.layers import get_notrace_functions, get_notrace_modules
        super().__init__(autowrap_functions=tuple(f for f in get_notrace_functions() if callable(f)))
        self._leaf_types = tuple(get_notrace_modules())

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self._leaf_types and isinstance(m, self._leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _shapes_fx(model: nn.Module, x: torch.Tensor) -> List[Tuple[int, ...]]:
    root = _Features(model)
    graph = _TimmTracer().trace(root)
    gm = torch.fx.GraphModule(root, graph)
    ShapeProp(gm).propagate(x)
    modules = dict(gm.named_modules())
    shapes = []
    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta")
        if node.op == "call_module" and isinstance(meta, TensorMetadata) and _is_layer(modules[node.target]):
            shapes.append(tuple(meta.shape))
    return shapes


def _is_layer(m: nn.Module) -> bool:
    """Layers whose outputs are activations; softmax and dropout also run on attention maps, which are not."""
    skip = (nn.Dropout, nn.Identity, nn.Softmax, nn.Softmax2d, nn.LogSoftmax)
    return not isinstance(m, skip) and "Drop" not in type(m).__name__


def _shapes_hooks(model: nn.Module, x: torch.Tensor) -> List[Tuple[int, ...]]:
    shapes = []

    def hook(mod, inp, out):
        if isinstance(out, torch.Tensor):
            shapes.append(tuple(out.shape))

    handles = [m.register_forward_hook(hook) for name, m in model.named_modules() if name and _is_layer(m)]
    try:
        model.forward_features(x)
    finally:
        for h in handles:
            h.remove()
    return shapes


def _fits(size: int, full: int) -> bool:
    """True if `size` is `full` downsampled by some integer stride (floor or ceil)."""
    return 0 < size <= full and any(size in (full // s, -(-full // s)) for s in range(1, full + 1))


def _as_map(shape: Sequence[int], hw: Tuple[int, int], prefer_nhwc: bool) -> Optional[Tuple[int, int, int]]:
    """Read a 4-d activation as (C, H, W) if one layout gives a plausible downsampled map."""
    if len(shape) != 4 or shape[0] != _PROBE_BATCH:
        return None
    nchw, nhwc = (shape[1], shape[2], shape[3]), (shape[3], shape[1], shape[2])
    for c, h, w in ((nhwc, nchw) if prefer_nhwc else (nchw, nhwc)):
        if _fits(h, hw[0]) and _fits(w, hw[1]) and abs(h * hw[1] - w * hw[0]) <= max(hw):
            return c, h, w
    return None


def trace_shape_trail(model: nn.Module, input_size: Tuple[int, int, int]) -> ShapeTrail:
    """Trace `model.forward_features` at `input_size` (C, H, W) and read its shape trail.

    Raises:
        UnsupportedModelError: the encoder output cannot be read as a map, tokens or a vector.
    """
    c_in, h_in, w_in = input_size
    prefer_nhwc = getattr(model, "output_fmt", "NCHW") == "NHWC"
    was_training = model.training
    model.eval()
    device = next(iter(model.parameters())).device
    x = torch.randn(_PROBE_BATCH, c_in, h_in, w_in, device=device)
    try:
        with torch.no_grad():
            try:
                shapes, path = _shapes_fx(model, x), "fx"
            except Exception as e:  # FX cannot trace every model; hooks see the same activations
                _logger.info("FX tracing of %s failed (%s: %s); probing shapes with hooks",
                             type(model).__name__, type(e).__name__, e)
                shapes, path = _shapes_hooks(model, x), "hooks"
            out = model.forward_features(x)
    finally:
        model.train(was_training)
    is_list = isinstance(out, (list, tuple)) and len(out) > 0 and all(isinstance(t, torch.Tensor) for t in out)
    if not is_list and (not isinstance(out, torch.Tensor) or out.shape[0] != _PROBE_BATCH):
        raise UnsupportedModelError(f"{type(model).__name__}.forward_features must return a (B, ...) tensor "
                                    f"or a list of them, got {type(out).__name__}")

    by_res: Dict[Tuple[int, int], int] = {}  # (H, W) -> channels of the last activation at that size
    first_area = None  # the first map (the stem): nothing on the downsampling path is larger
    for shape in shapes:
        m = _as_map(shape, (h_in, w_in), prefer_nhwc)
        if m is None:
            continue
        if first_area is None:
            first_area = m[1] * m[2]
        elif m[1] * m[2] > first_area:
            continue  # e.g. a (B, N, N, heads) attention map through a Linear (CaiT's talking heads)
        by_res[m[1:]] = m[0]

    prefix, index = 0, None
    if is_list:
        index, layout, m, prefix = _pick_output(model, out, by_res, (h_in, w_in), prefer_nhwc)
        out_shape = tuple(out[index].shape)
    elif len(out.shape) == 4:
        out_shape = tuple(out.shape)
        m = _as_map(out_shape, (h_in, w_in), prefer_nhwc)
        if m is None:
            raise UnsupportedModelError(
                f"{type(model).__name__}: cannot read encoder output {out_shape} as an NCHW or NHWC map "
                f"of a {h_in}x{w_in} input")
        layout = "NHWC" if (prefer_nhwc and m == (out_shape[3], out_shape[1], out_shape[2])) or (
            m != (out_shape[1], out_shape[2], out_shape[3])) else "NCHW"
    elif len(out.shape) == 3:
        out_shape = tuple(out.shape)
        layout, (n_tok, dim) = "NLC", out_shape[1:]
        m, prefix = _token_grid(model, n_tok, dim, by_res, (h_in, w_in))
    elif len(out.shape) == 2:
        out_shape = tuple(out.shape)
        layout, m = "NC", (out_shape[1], 1, 1)
    else:
        raise UnsupportedModelError(f"{type(model).__name__}: encoder output of shape {tuple(out.shape)} "
                                    f"is not supported")

    by_res[m[1:]] = m[0]
    deepest = m[1] * m[2]
    trail = sorted(((c, h, w) for (h, w), c in by_res.items() if h * w >= deepest), key=lambda t: -t[1] * t[2])
    trail = [t for t in trail if t[1:] != m[1:]] + [m]  # the encoder output is always the deepest entry
    return ShapeTrail(tuple(input_size), layout, out_shape[1:], trail, prefix, path, index)


def _pick_output(model, outs, by_res, hw, prefer_nhwc) -> Tuple[int, str, Tuple[int, int, int], int]:
    """(index, layout, (C, h, w), prefix tokens) of the list element the decoder mirrors: the one that reads
    as the largest map of the image, the first on a tie (see the module docstring for why)."""
    read = [(i, _read_element(t, by_res, hw, prefer_nhwc)) for i, t in enumerate(outs)]
    read = [(i, r) for i, r in read if r is not None]
    if not read:
        raise UnsupportedModelError(
            f"{type(model).__name__}.forward_features returned a list of shapes "
            f"{[tuple(t.shape) for t in outs]}; none reads as a map, tokens or a vector of the {hw[0]}x{hw[1]} input")
    i, (layout, m, prefix) = max(read, key=lambda ir: (ir[1][1][1] * ir[1][1][2], -ir[0]))
    return i, layout, m, prefix


def _read_element(t, by_res, hw, prefer_nhwc) -> Optional[Tuple[str, Tuple[int, int, int], int]]:
    """(layout, (C, h, w), prefix tokens) of one list element, or None if it is no map of the input.

    Strict, unlike a single output: a 3-d element must put its positions on a grid the encoder's own
    layers pass through, either as tokens (B, N, D) after at most `_MAX_PREFIX` leading tokens, or as a
    flattened map (B, C, h*w).
    """
    shape = tuple(t.shape)
    if shape[0] != _PROBE_BATCH:
        return None
    if len(shape) == 4:
        m = _as_map(shape, hw, prefer_nhwc)
        return None if m is None else ("NCHW" if m == shape[1:] else "NHWC", m, 0)
    if len(shape) == 3:
        grids = {h * w: (h, w) for (h, w) in sorted(by_res, key=lambda g: abs(g[0] * hw[1] - g[1] * hw[0]),
                                                    reverse=True)}  # area -> grid, the most input-like wins
        for prefix in range(min(_MAX_PREFIX, shape[1] - 1) + 1):  # (B, N, D): prefix + h*w tokens
            if shape[1] - prefix in grids:
                return "NLC", (shape[2], *grids[shape[1] - prefix]), prefix
        if shape[2] in grids:  # (B, C, h*w)
            return "NCL", (shape[1], *grids[shape[2]]), 0
        return None
    if len(shape) == 2:
        return "NC", (shape[1], 1, 1), 0
    return None


def _token_grid(model, n_tok, dim, by_res, hw) -> Tuple[Tuple[int, int, int], int]:
    """Grid (D, h, w) and prefix-token count of an (N, D) token output."""
    prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    n = n_tok - prefix
    h = math.isqrt(max(n * hw[0] // hw[1], 0))
    if h > 0 and n % h == 0 and _fits(h, hw[0]) and _fits(n // h, hw[1]):
        return (dim, h, n // h), prefix
    fitting = [(h * w, (h, w)) for (h, w) in by_res if h * w <= n_tok]
    if fitting:
        area, (h, w) = max(fitting)
        return (dim, h, w), n_tok - area
    raise UnsupportedModelError(
        f"{type(model).__name__}: cannot map {n_tok} output tokens onto a grid of the {hw[0]}x{hw[1]} input")
