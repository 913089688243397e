"""What the CIFAR zoo families share: the CIFAR-10 statistics, the base pretrained cfg and the model contract.

``_CifarClassifier`` owns timm's model contract (head, ``reset_classifier``, ``forward_intermediates``,
``prune_intermediate_layers``, gradient checkpointing) for a trunk made of an optional stem followed by a list
of stages. A family (``CifarResNet``, ``CifarVgg``) builds its modules and supplies only what differs: the
stem, the stages, how to cut the stages short, and ``group_matcher``.
"""
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import create_classifier, get_device_dtype
from timm.models import checkpoint_seq
from timm.models._features import feature_take_indices  # not re-exported by timm.models; timm's own files use it

__all__ = ['CIFAR10_MEAN', 'CIFAR10_STD']

# Per-channel statistics of the CIFAR-10 training set (pixel values in [0, 1]).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def _cifar_cfg(*, pool_size: Tuple[int, int], first_conv: str, paper_ids: str, **kwargs) -> Dict[str, Any]:
    """Pretrained cfg of a CIFAR-10 zoo model; no url or hub id, so timm never tries to download weights.

    Args:
        pool_size: (H', W') of ``forward_features`` for a 32x32 input.
        first_conv: name of the first conv module.
        paper_ids: the paper, e.g. 'arXiv:1512.03385'.
        **kwargs: further keys, or overrides of the defaults below.
    """
    return {
        'url': '', 'num_classes': 10, 'input_size': (3, 32, 32), 'pool_size': pool_size,
        'crop_pct': 1.0, 'interpolation': 'bilinear',
        'mean': CIFAR10_MEAN, 'std': CIFAR10_STD,
        'first_conv': first_conv, 'classifier': 'fc',
        'paper_ids': paper_ids,
        **kwargs,
    }


class _CifarClassifier(nn.Module):
    """Base of the CIFAR zoo models: ``forward_stem`` -> stages -> global pool -> dropout -> ``fc``.

    A subclass builds its stem and stages, sets ``feature_info`` (one tap per stage, plus a first tap for the
    stem when ``stem_is_tap``) and ``num_features``, calls ``_create_head`` and implements ``_stages``,
    ``_truncate_stages`` and ``group_matcher``; it overrides ``forward_stem`` if it has a stem.
    """
    stem_is_tap: bool = False  # True: feature_info[0] taps the stem, [i] stage i - 1; False: [i] taps stage i

    def __init__(self, num_classes: int, in_chans: int, drop_rate: float):
        """
        Args:
            num_classes: classifier outputs; 0 removes the classifier (``forward`` returns pooled features).
            in_chans: input image channels.
            drop_rate: dropout before the classifier.
        """
        super().__init__()
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

    def _create_head(self, global_pool: str, device=None, dtype=None) -> None:
        """(Re)build ``global_pool`` and ``fc`` for ``num_features`` inputs and ``num_classes`` outputs."""
        self.global_pool, self.fc = create_classifier(
            self.num_features, self.num_classes, pool_type=global_pool, device=device, dtype=dtype)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()

    def _stages(self) -> List[nn.Module]:
        """The stages in order, each an ``nn.Sequential`` of blocks."""
        raise NotImplementedError

    def _truncate_stages(self, num_stages: int) -> None:
        """Keep only the first ``num_stages`` stages (``prune_intermediate_layers``)."""
        raise NotImplementedError

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint every block of the stages in ``forward_features`` when ``enable``."""
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
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self._create_head(global_pool, **get_device_dtype(self))
        self.global_pool.train(self.training)
        self.fc.train(self.training)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) images -> input of the first stage; the identity unless a subclass has a stem."""
        return x

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward through the trunk, also returning the maps at the ``feature_info`` taps.

        Args:
            x: (B, C_in, H, W) images.
            indices: taps to return (positions in ``feature_info``): last n if int, all if None, else the listed
                ones.
            norm: unused (the trunk has no final norm); kept for timm's interface.
            stop_early: stop after the last requested tap.
            output_fmt: only 'NCHW'.
            intermediates_only: return only the list of intermediate maps.

        Returns:
            ``(features, intermediates)``: features (B, num_features, H', W') as ``forward_features``,
            intermediates a list of (B, C_i, H / r_i, W / r_i) maps; or only the list.

        Raises:
            ValueError: if ``output_fmt`` is not 'NCHW'.
        """
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        intermediates = []
        first_stage_tap = int(self.stem_is_tap)
        stages = self._stages()
        take_indices, max_index = feature_take_indices(first_stage_tap + len(stages), indices)

        x = self.forward_stem(x)
        if self.stem_is_tap and 0 in take_indices:
            intermediates.append(x)
        if stop_early:
            stages = stages[:max_index + 1 - first_stage_tap]
        for feat_idx, stage in enumerate(stages, start=first_stage_tap):
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
        first_stage_tap = int(self.stem_is_tap)
        take_indices, max_index = feature_take_indices(first_stage_tap + len(self._stages()), indices)
        self._truncate_stages(max_index + 1 - first_stage_tap)
        prune_end = max_index < len(self.feature_info) - 1
        if prune_end:
            # features now end at the last kept tap; the head was sized for the final features
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Trunk without the head.

        Args:
            x: (B, C_in, H, W) images.

        Returns:
            (B, num_features, H / r, W / r) feature map, ``r = feature_info[-1]['reduction']``.
        """
        x = self.forward_stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self._stages(), x, flatten=True)
        else:
            for stage in self._stages():
                x = stage(x)
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
