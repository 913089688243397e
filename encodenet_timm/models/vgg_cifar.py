"""CIFAR VGGs with BatchNorm, registered as timm models.

The layout of RepDistiller's ``models/vgg.py`` (Tian et al., "Contrastive Representation Distillation"),
the usual CIFAR VGG of the distillation literature: five stages of 3x3 conv + BN + ReLU, a 2x2 max-pool
before stages 2, 3 and 4 (32 -> 16 -> 8 -> 4), stage 5 at the same 4x4 resolution, then a global average
pool and a single linear classifier on 512 features. (RepDistiller adds a fourth max-pool only for 64x64
inputs, chosen at run time from the input size; here the layout is fixed, so larger inputs give larger
final maps, which the global pool absorbs.) Convs keep their bias, as in RepDistiller, so parameter counts
match it: ``vgg16_bn_cifar`` has ~14.7M parameters for 10 classes.

Variants differ only in the per-stage conv widths in ``cfgs``. The head and the rest of timm's model contract
come from ``_CifarClassifier`` (``_cifar.py``), shared with ``CifarResNet``. No pretrained weights exist; the
pretrained cfgs carry no url or hub id, so timm never tries to download anything.
"""
from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch.nn as nn
from timm.layers import ConvNormAct, LayerType, get_act_layer, get_norm_layer
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from ._cifar import _cifar_cfg, _CifarClassifier

__all__ = ['CifarVgg']  # register_model appends each entry point name

# Output channels of each 3x3 conv, one tuple per stage (RepDistiller's cfg 'S', 'A', 'B', 'D').
cfgs: Dict[str, Tuple[Tuple[int, ...], ...]] = {
    'vgg8': ((64,), (128,), (256,), (512,), (512,)),
    'vgg11': ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    'vgg13': ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    'vgg16': ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
}

# Stages that open with a 2x2 stride-2 max-pool (32x32 input -> 4x4 final map).
_POOLED_STAGES = (1, 2, 3)


class CifarVgg(_CifarClassifier):
    """VGG-BN for 32x32 inputs: ``stages`` of conv-BN-ReLU, global average pool, linear classifier.

    Feature taps (``feature_info``): the output of each stage ``stages.i``, at reductions 1, 2, 4, 8, 8.
    """

    def __init__(
            self,
            cfg: Sequence[Sequence[int]],
            num_classes: int = 10,
            in_chans: int = 3,
            global_pool: str = 'avg',
            act_layer: LayerType = nn.ReLU,
            norm_layer: LayerType = nn.BatchNorm2d,
            drop_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        """
        Args:
            cfg: output channels of every 3x3 conv, one sequence per stage (5 stages), e.g. ``cfgs['vgg16']``.
            num_classes: classifier outputs; 0 removes the classifier (``forward`` returns pooled features).
            in_chans: input image channels.
            global_pool: pooling type of ``timm.layers.SelectAdaptivePool2d``; '' disables pooling (only
                with ``num_classes=0``).
            act_layer: activation layer.
            norm_layer: normalization layer.
            drop_rate: dropout before the classifier.

        Raises:
            ValueError: if ``cfg`` does not have 5 non-empty stages.
        """
        super().__init__(num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate)
        dd = {'device': device, 'dtype': dtype}
        if len(cfg) != 5 or any(len(stage) == 0 for stage in cfg):
            raise ValueError(f'cfg needs 5 non-empty stages of conv widths (see cfgs), got {cfg}')
        act_layer = get_act_layer(act_layer)
        norm_layer = get_norm_layer(norm_layer)

        self.feature_info = []
        stages = []
        in_chs = in_chans
        reduction = 1
        for stage_idx, widths in enumerate(cfg):
            layers: List[nn.Module] = []
            if stage_idx in _POOLED_STAGES:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                reduction *= 2
            for out_chs in widths:
                layers.append(ConvNormAct(
                    in_chs, out_chs, kernel_size=3, bias=True, norm_layer=norm_layer, act_layer=act_layer, **dd))
                in_chs = out_chs
            stages.append(nn.Sequential(*layers))
            self.feature_info.append(dict(num_chs=in_chs, reduction=reduction, module=f'stages.{stage_idx}'))
        self.stages = nn.Sequential(*stages)

        # Head: global pool + linear, the way timm's ResNet builds it.
        self.num_features = in_chs
        self._create_head(global_pool, **dd)

        self.init_weights()

    @torch.jit.ignore
    def init_weights(self) -> None:
        """RepDistiller's init: Kaiming-normal (fan-out) convs, zero biases, N(0, 0.01) classifier."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def _stages(self) -> List[nn.Module]:
        return list(self.stages)

    def _truncate_stages(self, num_stages: int) -> None:
        self.stages = self.stages[:num_stages]

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, str]:
        """Regexes grouping parameters into the first conv (stem) and per-stage (coarse) or per-conv blocks."""
        return dict(stem=r'^stages\.0\.0\.', blocks=r'^stages\.(\d+)' if coarse else r'^stages\.(\d+)\.(\d+)')


def _create_vgg_cifar(variant: str, pretrained: bool = False, **kwargs) -> CifarVgg:
    return build_model_with_cfg(
        CifarVgg,
        variant,
        pretrained,
        feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2, 3, 4)),
        **kwargs,
    )


def _cfg(pool_size: Tuple[int, int] = (4, 4), **kwargs) -> Dict[str, Any]:
    return _cifar_cfg(pool_size=pool_size, first_conv='stages.0.0.conv', paper_ids='arXiv:1409.1556', **kwargs)


default_cfgs = generate_default_cfgs({
    'vgg8_bn_cifar': _cfg(),
    'vgg11_bn_cifar': _cfg(),
    'vgg13_bn_cifar': _cfg(),
    'vgg16_bn_cifar': _cfg(),
})


@register_model
def vgg8_bn_cifar(pretrained: bool = False, **kwargs) -> CifarVgg:
    """VGG-8 with BatchNorm for CIFAR (RepDistiller), one conv per stage."""
    model_args = dict(cfg=cfgs['vgg8'])
    return _create_vgg_cifar('vgg8_bn_cifar', pretrained, **dict(model_args, **kwargs))


@register_model
def vgg11_bn_cifar(pretrained: bool = False, **kwargs) -> CifarVgg:
    """VGG-11 with BatchNorm for CIFAR (RepDistiller)."""
    model_args = dict(cfg=cfgs['vgg11'])
    return _create_vgg_cifar('vgg11_bn_cifar', pretrained, **dict(model_args, **kwargs))


@register_model
def vgg13_bn_cifar(pretrained: bool = False, **kwargs) -> CifarVgg:
    """VGG-13 with BatchNorm for CIFAR (RepDistiller)."""
    model_args = dict(cfg=cfgs['vgg13'])
    return _create_vgg_cifar('vgg13_bn_cifar', pretrained, **dict(model_args, **kwargs))


@register_model
def vgg16_bn_cifar(pretrained: bool = False, **kwargs) -> CifarVgg:
    """VGG-16 with BatchNorm for CIFAR (RepDistiller), ~14.7M params for 10 classes."""
    model_args = dict(cfg=cfgs['vgg16'])
    return _create_vgg_cifar('vgg16_bn_cifar', pretrained, **dict(model_args, **kwargs))
