"""CIFAR VGGs with BatchNorm, registered as timm models.

The layout of RepDistiller's ``models/vgg.py`` (Tian et al., "Contrastive Representation Distillation"),
the usual CIFAR VGG of the distillation literature: five stages of 3x3 conv + BN + ReLU, a 2x2 max-pool
before stages 2, 3 and 4 (32 -> 16 -> 8 -> 4), stage 5 at the same 4x4 resolution, then a global average
pool and a single linear classifier on 512 features. (RepDistiller adds a fourth max-pool only for 64x64
inputs, chosen at run time from the input size; here the layout is fixed, so larger inputs give larger
final maps, which the global pool absorbs.) Convs keep their bias, as in RepDistiller, so parameter counts
match it: ``vgg16_bn_cifar`` has ~14.7M parameters for 10 classes.

Variants differ only in the per-stage conv widths in ``cfgs``. No pretrained weights exist; the pretrained
cfgs carry no url or hub id, so timm never tries to download anything.
"""
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import ConvNormAct, LayerType, create_classifier, get_act_layer, get_device_dtype, get_norm_layer
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices  # not re-exported by timm.models; timm's own files use it

from .resnet_cifar import CIFAR10_MEAN, CIFAR10_STD

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


class CifarVgg(nn.Module):
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
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if len(cfg) != 5 or any(len(stage) == 0 for stage in cfg):
            raise ValueError(f'cfg needs 5 non-empty stages of conv widths (see cfgs), got {cfg}')
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
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
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool, **dd)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()

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

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, str]:
        """Regexes grouping parameters into the first conv (stem) and per-stage (coarse) or per-conv blocks."""
        return dict(stem=r'^stages\.0\.0\.', blocks=r'^stages\.(\d+)' if coarse else r'^stages\.(\d+)\.(\d+)')

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint every conv-BN-ReLU in ``forward_features`` when ``enable``."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        """The classifier module, or its attribute name ``'fc'`` when ``name_only``."""
        return 'fc' if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the head with a fresh one.

        Args:
            num_classes: classifier outputs; 0 removes the classifier.
            global_pool: new pooling type; None keeps the current one, '' disables pooling.
        """
        dd = get_device_dtype(self)
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool, **dd)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.global_pool.train(self.training)
        self.fc.train(self.training)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward through the stages, also returning the maps at the ``feature_info`` taps.

        Args:
            x: (B, C_in, H, W) images.
            indices: stages to return: last n if int, all if None, else the listed ones.
            norm: unused (no final norm); kept for timm's interface.
            stop_early: stop after the last requested stage.
            output_fmt: only 'NCHW'.
            intermediates_only: return only the list of intermediate maps.

        Returns:
            ``(features, intermediates)``: features (B, 512, H / 8, W / 8) as ``forward_features``,
            intermediates a list of (B, C_i, H / r_i, W / r_i) maps; or only the list.

        Raises:
            ValueError: if ``output_fmt`` is not 'NCHW'.
        """
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages if not stop_early else self.stages[:max_index + 1]
        for feat_idx, stage in enumerate(stages):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint_seq(stage, x)
            else:
                x = stage(x)
            if feat_idx in take_indices:
                intermediates.append(x)

        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages (and head) that the requested taps do not need.

        Args:
            indices: taps to keep, as in ``forward_intermediates``.
            prune_norm: unused (no final norm).
            prune_head: remove the classifier and pooling.

        Returns:
            The absolute indices of the kept taps.
        """
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        prune_end = max_index < len(self.feature_info) - 1
        if prune_end:
            # features now end at the last kept tap; the head was sized for the final features
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stages without the head.

        Args:
            x: (B, C_in, H, W) images.

        Returns:
            (B, 512, H / 8, W / 8) feature map.
        """
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stages, x, flatten=True)
        else:
            x = self.stages(x)  # (B, C_in, H, W) -> (B, 512, H / 8, W / 8)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global pool, dropout and classifier.

        Args:
            x: (B, num_features, H', W') map from ``forward_features``.
            pre_logits: stop before the classifier.

        Returns:
            (B, num_classes) logits, or (B, head_hidden_size) pooled features when ``pre_logits``.
        """
        x = self.global_pool(x)  # (B, C, H', W') -> (B, C)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) images -> (B, num_classes) logits."""
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


def _create_vgg_cifar(variant: str, pretrained: bool = False, **kwargs) -> CifarVgg:
    return build_model_with_cfg(
        CifarVgg,
        variant,
        pretrained,
        feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2, 3, 4)),
        **kwargs,
    )


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        'url': '', 'num_classes': 10, 'input_size': (3, 32, 32), 'pool_size': (4, 4),
        'crop_pct': 1.0, 'interpolation': 'bilinear',
        'mean': CIFAR10_MEAN, 'std': CIFAR10_STD,
        'first_conv': 'stages.0.0.conv', 'classifier': 'fc',
        'paper_ids': 'arXiv:1409.1556',
        **kwargs,
    }


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
