"""The mirrored decoder: read the encoder's shape trail and walk it back to an image.

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
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata
from torch.utils.flop_counter import FlopCounterMode

from .config import DecoderConfig
from .errors import UnsupportedModelError

__all__ = ["ShapeTrail", "trace_shape_trail", "MirroredDecoder", "build_decoder", "count_flops"]

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


class _ToMap(nn.Module):
    """Encoder output -> (B, C, h, w) map, whatever its layout."""

    def __init__(self, layout: str, grid: Tuple[int, int], num_prefix_tokens: int = 0,
                 index: Optional[int] = None):
        super().__init__()
        self.layout, self.grid, self.num_prefix_tokens, self.index = layout, tuple(grid), num_prefix_tokens, index

    def forward(self, x) -> torch.Tensor:
        if self.index is not None:
            x = x[self.index]  # a list output: the element the decoder mirrors
        if self.layout == "NHWC":
            return x.permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)
        if self.layout == "NLC":
            x = x[:, self.num_prefix_tokens:]  # (B, N, D) -> (B, h*w, D)
            return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *self.grid)  # -> (B, D, h, w)
        if self.layout == "NCL":
            return x.reshape(x.shape[0], x.shape[1], *self.grid)  # (B, C, h*w) -> (B, C, h, w)
        if self.layout == "NC":
            return x[:, :, None, None]  # (B, D) -> (B, D, 1, 1)
        return x

    def extra_repr(self) -> str:
        text = f"layout={self.layout}, grid={self.grid}, num_prefix_tokens={self.num_prefix_tokens}"
        return text if self.index is None else f"{text}, index={self.index}"


def _norm(kind: str, channels: int) -> nn.Module:
    """BatchNorm2d ("batch") or GroupNorm with up to 8 groups ("group": no batch statistics)."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(channels, 8), channels)
    raise ValueError(f"decoder.norm must be 'batch' or 'group', got {kind!r}")


class _UpBlock(nn.Module):
    """(B, cin, h, w) -> (B, cout, *size): 1x1 channel change, nearest resize, 3x3 conv-norm-ReLU.

    ``light=True`` (for tiny encoders, at the highest resolutions) makes the 3x3 conv depthwise; the 1x1
    conv, always present then, mixes the channels at the lower input resolution.
    """

    def __init__(self, cin: int, cout: int, size: Tuple[int, int], norm: str = "batch", light: bool = False):
        super().__init__()
        self.size = tuple(size)
        self.reduce = nn.Conv2d(cin, cout, 1, bias=False) if cin != cout or light else nn.Identity()
        self.conv = nn.Conv2d(cout, cout, 3, padding=1, groups=cout if light else 1, bias=False)
        self.bn = _norm(norm, cout)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(self.reduce(x), size=self.size, mode="nearest")  # (B, cout, h, w) -> (B, cout, H, W)
        return self.act(self.bn(self.conv(x)))

    def extra_repr(self) -> str:
        return f"size={self.size}"


class MirroredDecoder(nn.Module):
    """Encoder output -> image (B, C, H, W), one upsampling block per step of the reversed shape trail.

    Attributes:
        shape_trail: the `ShapeTrail` it was built from (layout, trail, tracing path).
        plan: (C, H, W) produced by each block, in order.
        flops / encoder_flops: FLOPs of one image through the decoder / the encoder (FlopCounterMode).
        width: the channel multiplier actually used (after fitting the FLOPs cap).
        light_blocks: how many of the last (highest-resolution) blocks are light (depthwise 3x3).
        light_head: the output conv is 1x1 instead of 3x3.
    """

    def __init__(self, shape_trail: ShapeTrail, width: float = 1.0, min_channels: int = 8, norm: str = "batch",
                 light_blocks: int = 0, light_head: bool = False):
        super().__init__()
        self.shape_trail = shape_trail
        self.width = width
        self.light_blocks, self.light_head = light_blocks, light_head
        c_in, h_in, w_in = shape_trail.input_size
        start = shape_trail.trail[-1]
        self.to_map = _ToMap(shape_trail.layout, start[1:], shape_trail.num_prefix_tokens, shape_trail.output_index)

        def scaled(c: int) -> int:
            return max(min_channels, int(round(c * width)))

        self.plan = _plan(shape_trail.trail, (h_in, w_in))
        blocks, cin = [], start[0]  # the first block takes the encoder's own width
        first_light = len(self.plan) - light_blocks
        for i, (c, h, w) in enumerate(self.plan):
            blocks.append(_UpBlock(cin, scaled(c), (h, w), norm, light=i >= first_light))
            cin = scaled(c)
        self.blocks = nn.Sequential(*blocks)
        self.to_image = nn.Conv2d(cin, c_in, 1) if light_head else nn.Conv2d(cin, c_in, 3, padding=1)
        self.flops: int = 0
        self.encoder_flops: int = 0

    @property
    def trace_path(self) -> str:
        return self.shape_trail.trace

    def forward(self, z) -> torch.Tensor:
        """Encoder output (any supported layout, or the encoder's whole list) -> (B, C, H, W) in the
        model's normalised input space."""
        x = self.to_map(z)
        if x.shape[1:] != torch.Size(self.shape_trail.trail[-1]):
            got = z[self.shape_trail.output_index] if self.shape_trail.output_index is not None else z
            raise ValueError(f"decoder expects encoder output {self.shape_trail.output_shape}, "
                             f"got {tuple(got.shape[1:])}; the decoder was built for input size "
                             f"{self.shape_trail.input_size}")
        return self.to_image(self.blocks(x))


def _plan(trail: List[Tuple[int, int, int]], hw: Tuple[int, int]) -> List[Tuple[int, int, int]]:
    """Targets (C, H, W) of the decoder blocks: the trail reversed, steps above 2x split in 2x steps."""
    targets = list(reversed(trail[:-1]))
    if not targets or targets[-1][1:] != tuple(hw):
        c_last = targets[-1][0] if targets else trail[-1][0]
        targets.append((max(1, c_last // 2), *hw))
    plan, (c, h, w) = [], trail[-1]
    for ct, ht, wt in targets:
        steps = max(1, math.ceil(math.log2(max(ht / h, wt / w, 1.0)) - 1e-9))
        for i in range(1, steps):  # intermediate sizes, channels on a geometric path
            frac = i / steps
            plan.append((max(1, round(c ** (1 - frac) * ct ** frac)),
                         min(ht, h * 2 ** i), min(wt, w * 2 ** i)))
        plan.append((ct, ht, wt))
        c, h, w = ct, ht, wt
    return plan


def count_flops(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> int:
    """FLOPs of ``fn(x)`` (forward only) counted by ``torch.utils.flop_counter.FlopCounterMode``.

    Runs with grad enabled: under ``no_grad`` the mode's module tracker fails on a submodule whose
    input is a parameter (PiT and CaiT pass their class token to a submodule) with "Expected gradient
    function to be set". Nothing is backpropagated, so only forward FLOPs are counted.
    """
    with torch.enable_grad(), FlopCounterMode(display=False) as counter:
        fn(x)
    return int(counter.get_total_flops())


def build_decoder(model: nn.Module, input_size: Tuple[int, int, int],
                  cfg: Optional[DecoderConfig] = None) -> MirroredDecoder:
    """Trace `model`'s encoder at `input_size` and build the widest decoder under the FLOPs cap.

    The width starts at ``cfg.width`` and halves until decoder FLOPs <= ``cfg.max_flops_ratio`` x
    encoder FLOPs (both for one (1, C, H, W) image). If every block is at ``cfg.min_channels`` and the
    decoder is still over the cap (a tiny encoder, e.g. lcnet_035 at 32x32), its blocks turn light
    (depthwise 3x3) one at a time from the highest resolution down, and last its output conv turns
    1x1, until it fits. The block sizes, hence the output shape, never change.

    Raises:
        UnsupportedModelError: even the lightest decoder at ``cfg.min_channels`` is over the cap.
    """
    cfg = cfg or DecoderConfig()
    trail = trace_shape_trail(model, input_size)
    device = next(iter(model.parameters())).device
    x = torch.randn(1, *input_size, device=device)
    was_training = model.training
    model.eval()
    try:
        enc_flops = count_flops(model.forward_features, x)
        z = model.forward_features(x)
        z = [t.detach() for t in z] if isinstance(z, (list, tuple)) else z.detach()
    finally:
        model.train(was_training)
    width = cfg.width
    while True:
        decoder = MirroredDecoder(trail, width=width, min_channels=cfg.min_channels,
                                  norm=cfg.norm).to(device).eval()
        dec_flops = count_flops(decoder, z)
        at_floor = all(round(c * width) <= cfg.min_channels for c, _, _ in decoder.plan)  # every block at min
        if dec_flops <= cfg.max_flops_ratio * enc_flops or at_floor:
            break
        width /= 2
    light_blocks, light_head = 0, False
    while dec_flops > cfg.max_flops_ratio * enc_flops and not light_head:  # at the floor: cheaper blocks
        if light_blocks < len(decoder.plan):
            light_blocks += 1  # the highest-resolution full block left
        else:
            light_head = True
        decoder = MirroredDecoder(trail, width=width, min_channels=cfg.min_channels, norm=cfg.norm,
                                  light_blocks=light_blocks, light_head=light_head).to(device).eval()
        dec_flops = count_flops(decoder, z)
    if dec_flops > cfg.max_flops_ratio * enc_flops:
        raise UnsupportedModelError(
            f"{type(model).__name__}: the lightest mirrored decoder costs {dec_flops:,} FLOPs, over "
            f"{cfg.max_flops_ratio} x the encoder's {enc_flops:,} at input {tuple(input_size)}; lower "
            f"decoder.min_channels or raise decoder.max_flops_ratio")
    decoder.flops, decoder.encoder_flops = dec_flops, enc_flops
    _logger.info("decoder for %s: trail %s via %s, width x%.3g, %d light blocks%s, %.3g MFLOPs (encoder "
                 "%.3g MFLOPs)", type(model).__name__, trail.trail, trail.trace, width, light_blocks,
                 ", 1x1 output conv" if light_head else "", dec_flops / 1e6, enc_flops / 1e6)
    return decoder.train()
