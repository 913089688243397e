"""CIFAR ResNets registered as timm models.

* ``resnet20_cifar`` .. ``resnet110_cifar``: the CIFAR ResNets of He et al. 2016, section 4.2: a 3x3 conv
  stem with 16 channels, three stages of ``n = (depth - 2) / 6`` BasicBlocks with 16/32/64 channels, stride 2
  at the first block of stages 2 and 3, global average pool and a linear classifier. Shortcuts that change
  shape are a 1x1 conv + BN projection (the paper's option B, as in RepDistiller), which adds ~3k
  parameters over the paper's parameter-free option A.
* ``resnet50_cifar``: the ImageNet ResNet-50 bottleneck layout (3, 4, 6, 3 blocks; 64..512 x4 channels) with
  a single 3x3 stride-1 stem conv and no max-pool, as commonly used on CIFAR (e.g. kuangliu/pytorch-cifar).

Both are one model class, ``CifarResNet``, built from timm's own ``BasicBlock`` / ``Bottleneck``; the head and
the rest of timm's model contract come from ``_CifarClassifier`` (``_cifar.py``), shared with ``CifarVgg``. timm's
``ResNet`` class is not reused: it hard-codes a 64-channel stride-2 stem followed by a stride-2 max-pool
(``make_blocks`` assumes a stride-4 stem in ``feature_info``) and exactly four stages ``layer1..layer4``.
Module names follow timm's ``ResNet`` (``conv1``, ``bn1``, ``layer1``.., ``fc``), so ``resnet50_cifar`` state
dicts line up with timm's ``resnet50`` except for the stem conv's shape.

No pretrained weights exist for these models; their pretrained cfgs carry no url or hub id, so timm never
tries to download anything.
"""
from typing import Any, Dict, List, Tuple, Type, Union

import torch
import torch.nn as nn
from timm.layers import DropPath, LayerType, get_act_layer, get_norm_layer
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck

from ._cifar import CIFAR10_MEAN, CIFAR10_STD, _cifar_cfg, _CifarClassifier

# CIFAR10_MEAN / CIFAR10_STD are re-exported for code that imported them from here.
__all__ = ['CifarResNet', 'CIFAR10_MEAN', 'CIFAR10_STD']  # register_model appends each entry point name


def _downsample(
        in_chs: int,
        out_chs: int,
        stride: int,
        norm_layer: Type[nn.Module],
        device=None,
        dtype=None,
) -> nn.Module:
    """Projection shortcut (option B): 1x1 conv with ``stride`` followed by a norm layer."""
    dd = {'device': device, 'dtype': dtype}
    return nn.Sequential(
        nn.Conv2d(in_chs, out_chs, kernel_size=1, stride=stride, bias=False, **dd),
        norm_layer(out_chs, **dd),
    )


class CifarResNet(_CifarClassifier):
    """ResNet for 32x32 inputs: a stride-1 3x3 stem, no max-pool, stride 2 at every stage after the first.

    With 32x32 inputs the last stage's map is ``32 / 2 ** (len(layers) - 1)`` pixels wide (8 for the
    3-stage CIFAR ResNets, 4 for ``resnet50_cifar``). Any input size works; the global pool absorbs it.

    Feature taps (``feature_info``): the stem (``act1``, reduction 1) and the output of every stage
    (``layer1`` .. ``layerN``, reduction ``2 ** (i - 1)``).
    """
    stem_is_tap = True

    def __init__(
            self,
            block: Type[Union[BasicBlock, Bottleneck]] = BasicBlock,
            layers: Tuple[int, ...] = (3, 3, 3),
            channels: Tuple[int, ...] = (16, 32, 64),
            stem_width: int = 16,
            num_classes: int = 10,
            in_chans: int = 3,
            global_pool: str = 'avg',
            act_layer: LayerType = nn.ReLU,
            norm_layer: LayerType = nn.BatchNorm2d,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            zero_init_last: bool = True,
            device=None,
            dtype=None,
    ):
        """
        Args:
            block: residual block class, timm's ``BasicBlock`` or ``Bottleneck``.
            layers: number of blocks in each stage.
            channels: base width of each stage (the block's output is ``channels[i] * block.expansion``).
            stem_width: output channels of the 3x3 stem conv.
            num_classes: classifier outputs; 0 removes the classifier (``forward`` returns pooled features).
            in_chans: input image channels.
            global_pool: pooling type of ``timm.layers.SelectAdaptivePool2d``; '' disables pooling (only
                with ``num_classes=0``).
            act_layer: activation layer.
            norm_layer: normalization layer.
            drop_rate: dropout before the classifier.
            drop_path_rate: stochastic depth rate, decayed linearly over the blocks.
            zero_init_last: zero-init the last norm of each residual branch.

        Raises:
            ValueError: if ``layers`` and ``channels`` differ in length or are empty.
        """
        super().__init__(num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate)
        dd = {'device': device, 'dtype': dtype}
        if len(layers) == 0 or len(layers) != len(channels):
            raise ValueError(
                f'layers and channels need one entry per stage, got layers={layers} and channels={channels}')
        act_layer = get_act_layer(act_layer)
        norm_layer = get_norm_layer(norm_layer)

        # Stem: one 3x3 stride-1 conv, no pooling.
        self.conv1 = nn.Conv2d(in_chans, stem_width, kernel_size=3, stride=1, padding=1, bias=False, **dd)
        self.bn1 = norm_layer(stem_width, **dd)
        self.act1 = act_layer(inplace=True)
        self.feature_info = [dict(num_chs=stem_width, reduction=1, module='act1')]

        # Stages, named layer1.. for weight compatibility with timm's ResNet.
        self.stage_names = [f'layer{i + 1}' for i in range(len(layers))]
        num_blocks_total = sum(layers)
        block_idx = 0
        in_chs = stem_width
        reduction = 1
        for stage_idx, (num_blocks, planes) in enumerate(zip(layers, channels)):
            stride = 1 if stage_idx == 0 else 2
            reduction *= stride
            out_chs = planes * block.expansion
            blocks = []
            for i in range(num_blocks):
                block_stride = stride if i == 0 else 1
                downsample = None
                if block_stride != 1 or in_chs != out_chs:
                    downsample = _downsample(in_chs, out_chs, block_stride, norm_layer, **dd)
                dpr = drop_path_rate * block_idx / max(num_blocks_total - 1, 1)
                blocks.append(block(
                    in_chs,
                    planes,
                    stride=block_stride,
                    downsample=downsample,
                    act_layer=act_layer,
                    norm_layer=norm_layer,
                    drop_path=DropPath(dpr) if dpr > 0. else None,
                    **dd,
                ))
                in_chs = out_chs
                block_idx += 1
            self.add_module(self.stage_names[stage_idx], nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=self.stage_names[stage_idx]))

        # Head: global pool + linear, the way timm's ResNet builds it.
        self.num_features = in_chs
        self._create_head(global_pool, **dd)

        self.init_weights(zero_init_last=zero_init_last)

    @torch.jit.ignore
    def init_weights(self, zero_init_last: bool = True) -> None:
        """Kaiming-normal (fan-out) conv weights, as in He et al.; optionally zero the last norm per block."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
        if zero_init_last:
            for m in self.modules():
                if hasattr(m, 'zero_init_last'):
                    m.zero_init_last()

    def _stages(self) -> List[nn.Module]:
        return [getattr(self, n) for n in self.stage_names]

    def _truncate_stages(self, num_stages: int) -> None:
        for name in self.stage_names[num_stages:]:
            setattr(self, name, nn.Sequential())  # empty, so forward_features still iterates it

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, str]:
        """Regexes grouping parameters into the stem and per-stage (coarse) or per-block blocks."""
        return dict(stem=r'^(?:conv1|bn1)\.', blocks=r'^layer(\d+)' if coarse else r'^layer(\d+)\.(\d+)')

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) images -> (B, stem_width, H, W) stem output."""
        return self.act1(self.bn1(self.conv1(x)))  # (B, C_in, H, W) -> (B, stem_width, H, W)


def _create_resnet_cifar(variant: str, pretrained: bool = False, **kwargs) -> CifarResNet:
    num_taps = len(kwargs['layers']) + 1  # stem + one per stage
    return build_model_with_cfg(
        CifarResNet,
        variant,
        pretrained,
        feature_cfg=dict(out_indices=tuple(range(num_taps))),
        **kwargs,
    )


def _cfg(pool_size: Tuple[int, int] = (8, 8), **kwargs) -> Dict[str, Any]:
    return _cifar_cfg(pool_size=pool_size, first_conv='conv1', paper_ids='arXiv:1512.03385', **kwargs)


default_cfgs = generate_default_cfgs({
    'resnet20_cifar': _cfg(),
    'resnet32_cifar': _cfg(),
    'resnet56_cifar': _cfg(),
    'resnet110_cifar': _cfg(),
    'resnet50_cifar': _cfg(pool_size=(4, 4)),
})


@register_model
def resnet20_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-20 for CIFAR (He et al. 2016): 3 stages x 3 BasicBlocks, 16/32/64 channels, ~0.27M params."""
    model_args = dict(block=BasicBlock, layers=(3, 3, 3), channels=(16, 32, 64), stem_width=16)
    return _create_resnet_cifar('resnet20_cifar', pretrained, **dict(model_args, **kwargs))


@register_model
def resnet32_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-32 for CIFAR (He et al. 2016): 3 stages x 5 BasicBlocks, 16/32/64 channels, ~0.46M params."""
    model_args = dict(block=BasicBlock, layers=(5, 5, 5), channels=(16, 32, 64), stem_width=16)
    return _create_resnet_cifar('resnet32_cifar', pretrained, **dict(model_args, **kwargs))


@register_model
def resnet56_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-56 for CIFAR (He et al. 2016): 3 stages x 9 BasicBlocks, 16/32/64 channels, ~0.85M params."""
    model_args = dict(block=BasicBlock, layers=(9, 9, 9), channels=(16, 32, 64), stem_width=16)
    return _create_resnet_cifar('resnet56_cifar', pretrained, **dict(model_args, **kwargs))


@register_model
def resnet110_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-110 for CIFAR (He et al. 2016): 3 stages x 18 BasicBlocks, 16/32/64 channels, ~1.7M params."""
    model_args = dict(block=BasicBlock, layers=(18, 18, 18), channels=(16, 32, 64), stem_width=16)
    return _create_resnet_cifar('resnet110_cifar', pretrained, **dict(model_args, **kwargs))


@register_model
def resnet50_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-50 bottleneck layout with a 3x3 stride-1 stem and no max-pool, ~23.5M params."""
    model_args = dict(block=Bottleneck, layers=(3, 4, 6, 3), channels=(64, 128, 256, 512), stem_width=64)
    return _create_resnet_cifar('resnet50_cifar', pretrained, **dict(model_args, **kwargs))
