"""The mirrored decoder: one upsampling block per step of the encoder's shape trail (`shape_trail.py`),
from the deepest map back to an image at input resolution, as wide as the FLOPs cap allows.
"""
import logging
import math
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from .checks import check_input_size
from .config import DecoderConfig
from .errors import UnsupportedModelError
from .shape_trail import ShapeTrail, trace_shape_trail

__all__ = ["MirroredDecoder", "build_decoder", "count_flops", "size_for_data"]

_logger = logging.getLogger(__name__)


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


def size_for_data(x: torch.Tensor, input_size: Tuple[int, int, int], config_input_size: Optional[Tuple[int, int, int]],
                  *, trained: bool) -> Optional[Tuple[int, int, int]]:
    """The (C, H, W) to rebuild a decoder built at `input_size` for images `x` (B, C, H, W) of another (H, W), or
    None where it fits them (or their channels differ: the batch checks name that). A set ``config.input_size``
    is checked against the data; a `trained` decoder is never rebuilt (ValueError)."""
    size = (input_size[0], *x.shape[2:])
    if tuple(size) == tuple(input_size) or x.shape[1] != input_size[0]:
        return None
    check_input_size(x, config_input_size)
    if trained:
        raise ValueError(f"images are {tuple(x.shape[1:])} but the trained decoder expects {tuple(input_size)}")
    _logger.info("data is %s, not %s: building the decoder for the data's size", tuple(size), tuple(input_size))
    return tuple(size)
