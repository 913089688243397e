"""Stage modules and timm `TrainingTask`s: the converting autoencoder (its module, targets and task), and
the frozen-encoder classifiers of transfer.

Baseline and transfer use timm's own `ClassificationTask`; the converting autoencoder uses
`ConvertingAutoencoderTask` below. The training loop only calls ``task(x, y)["loss"]``.
"""
from itertools import chain
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.task import TrainingTask
from torch.utils.data import Dataset

from .device_data import DeviceBatch

__all__ = ["ConvertingAutoencoder", "ClusterTargets", "ConvertingAutoencoderTask", "FrozenEncoderClassifier",
           "PartlyFrozenClassifier", "transfer_module", "modules_state", "snapshot_modules", "restore_modules", "reconstruct_images"]


class ConvertingAutoencoder(nn.Module):
    """Encoder + mirrored decoder: (B, C, H, W) -> (B, C, H, W).

    With a `head`, ``forward(x, with_logits=True)`` also returns the head's logits on the same features
    (for the autoencoder objective with a classification term).
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, head: Optional[nn.Module] = None):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.head = head

    def forward(self, x: torch.Tensor, with_logits: bool = False):
        """(B, C, H, W) -> reconstruction (B, C, H, W), or (reconstruction, logits (B, K)) with_logits."""
        z = self.encoder(x)
        if with_logits:
            return self.decoder(z), self.head(z)
        return self.decoder(z)


class ClusterTargets(Dataset):
    """(image, label) dataset -> (image, cluster id of that index): what the autoencoder trains on."""

    def __init__(self, dataset: Dataset, cluster_ids: torch.Tensor):
        self.dataset, self.cluster_ids = dataset, cluster_ids

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return self.dataset[i][0], self.cluster_ids[i]

    def __getitems__(self, indices):  # a device dataset builds the whole batch at once (device_data.py)
        batch = self.dataset.__getitems__(indices) if hasattr(self.dataset, "__getitems__") else None
        if isinstance(batch, DeviceBatch):
            return DeviceBatch((batch[0], self.cluster_ids[torch.as_tensor(indices)]))
        return [(x, self.cluster_ids[i]) for (x, _), i in zip(batch or [self.dataset[i] for i in indices], indices)]


class FrozenEncoderClassifier(nn.Module):
    """``head(encoder(x))`` with the encoder frozen: no gradient, and kept in eval mode (BatchNorm
    statistics and dropout) even when this module is put in train mode."""

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder = encoder.requires_grad_(False)
        self.head = head

    def train(self, mode: bool = True) -> "FrozenEncoderClassifier":
        self.training = mode
        self.encoder.train(False)
        self.head.train(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            feats = self.encoder(x)
        return self.head(feats)


class PartlyFrozenClassifier(nn.Module):
    """The whole model, trained only in the modules named `trainable` (and their submodules).

    Every other parameter gets no gradient and every other module stays in eval mode (BatchNorm
    statistics, dropout) even when this module is put in train mode. Used when the split point lies
    inside ``forward_features``: the stages after it are retrained with the head.
    """

    def __init__(self, model: nn.Module, trainable: Sequence[str]):
        super().__init__()
        self.model = model
        names = list(trainable)

        def is_trainable(n: str) -> bool:
            return any(n == t or n.startswith(t + ".") for t in names)

        def is_ancestor(n: str) -> bool:
            return not n or any(t.startswith(n + ".") for t in names)

        self._frozen = [m for n, m in model.named_modules() if not is_trainable(n) and not is_ancestor(n)]
        model.requires_grad_(False)
        for n, m in model.named_modules():
            if is_trainable(n):
                m.requires_grad_(True)

    def train(self, mode: bool = True) -> "PartlyFrozenClassifier":
        self.training = mode
        self.model.train(mode)
        for m in self._frozen:
            m.training = False
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def transfer_module(model: nn.Module, encoder: nn.Module, head: nn.Module, after_split: Sequence[str]) -> nn.Module:
    """What transfer trains: the head on the frozen encoder, or with a split inside the encoder (`after_split`
    names its modules after the split) those modules and the head on the frozen rest."""
    if after_split:
        return PartlyFrozenClassifier(model, list(after_split) + head.part_names)
    return FrozenEncoderClassifier(encoder, head.requires_grad_(True))


def modules_state(model: nn.Module, names: Sequence[str]) -> Dict[str, torch.Tensor]:
    """The parameters and buffers of the modules `names` of `model` (the modules after the split), submodules
    included, by qualified name in `model` (live tensors). Recursive: a submodule whose weight is used
    functionally (beit's ``attn.qkv`` through ``F.linear``) is not among the traced modules itself, but it is
    trained with its parent."""
    prefixes = tuple(f"{name}." for name in names)
    named = chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False))
    return {key: t for key, t in named if key.startswith(prefixes)}


@torch.no_grad()
def reconstruct_images(model: nn.Module, encoder: nn.Module, decoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The converting autoencoder's output for images (B, C, H, W) -> (B, C, H, W), `encoder` (a view of
    `model`) and `decoder` in eval mode; their modes are put back afterwards."""
    ae = ConvertingAutoencoder(encoder, decoder)
    was_training = model.training, decoder.training
    ae.eval()
    try:
        return ae(x)
    finally:
        model.train(was_training[0])
        decoder.train(was_training[1])


def snapshot_modules(model: nn.Module, names: Sequence[str]) -> Dict[str, torch.Tensor]:
    """A detached copy of `modules_state(model, names)`."""
    return {k: t.detach().clone() for k, t in modules_state(model, names).items()}


@torch.no_grad()
def restore_modules(model: nn.Module, names: Sequence[str], snapshot: Dict[str, torch.Tensor]) -> None:
    """Copy `snapshot` (from `snapshot_modules`) back into the modules `names` of `model`, in place."""
    for key, t in modules_state(model, names).items():
        t.copy_(snapshot[key])


class ConvertingAutoencoderTask(TrainingTask):
    """Train encoder + decoder to turn each image into its cluster's representative.

    The target passed to ``forward`` is the cluster id of each image; the task looks up the
    representative image in its `rep_images` buffer, so data loaders stay (image, int) pairs.
    Loss: ``MSE(decoder(encoder(x)), representative)``, plus ``ce_weight x CE(head(encoder(x)), class)``
    when `ce_weight` > 0 (the class of an image is the class of its cluster).

    Args:
        autoencoder: `ConvertingAutoencoder` (the trainable module; with a head when ce_weight > 0).
        rep_images: (M, C, H, W) representative images, normalised as the model's inputs.
        cluster_labels: (M,) int64 class of each cluster; needed when ce_weight > 0.
        ce_weight: weight of the classification term (0: the paper's pure MSE).
    """

    def __init__(self, autoencoder: ConvertingAutoencoder, rep_images: torch.Tensor,
                 device: Optional[torch.device] = None, verbose: bool = False, *,
                 cluster_labels: Optional[torch.Tensor] = None, ce_weight: float = 0.0):
        super().__init__(device=device, verbose=verbose)
        if ce_weight < 0:
            raise ValueError(f"autoencoder.ce_weight must be >= 0, got {ce_weight}")
        if ce_weight > 0 and (autoencoder.head is None or cluster_labels is None):
            raise ValueError("ce_weight > 0 needs the autoencoder's head and the clusters' labels")
        self.trainable_module = autoencoder
        self.ce_weight = float(ce_weight)
        self.register_buffer("rep_images", rep_images.to(self.device), persistent=False)
        labels = cluster_labels if cluster_labels is not None else torch.zeros(0, dtype=torch.long)
        self.register_buffer("cluster_labels", labels.long().to(self.device), persistent=False)

    def compile(self, backend: str = "inductor", mode: Optional[str] = None, **compile_kwargs) -> nn.Module:
        """torch.compile the autoencoder (before `prepare_distributed`, as timm's tasks do)."""
        self.trainable_module = torch.compile(self.trainable_module, backend=backend, mode=mode, **compile_kwargs)
        return self.trainable_module

    def prepare_distributed(self, device_ids: Optional[list] = None, **ddp_kwargs) -> "ConvertingAutoencoderTask":
        from torch.nn.parallel import DistributedDataParallel as DDP
        self.trainable_module = DDP(self.trainable_module, device_ids=device_ids, **ddp_kwargs)
        return self

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        """input: (B, C, H, W) images; target: (B,) int64 cluster ids
        -> {"loss", "mse", "output": (B, C, H, W)} (+ "ce", "logits" (B, K) when ce_weight > 0)."""
        logits = None
        if self.ce_weight > 0:
            output, logits = self.trainable_module(input, with_logits=True)
        else:
            output = self.trainable_module(input)
        # the goal in the output's layout (channels_last decoders): no strided mixing in the loss or its gradient
        nhwc = output.ndim == 4 and not output.is_contiguous() and output.is_contiguous(memory_format=torch.channels_last)
        goal = self.rep_images[target].to(dtype=output.dtype,
                                          memory_format=torch.channels_last if nhwc else torch.contiguous_format)
        mse = F.mse_loss(output.float(), goal.float())
        result = {"loss": mse, "mse": mse.detach(), "output": output}
        if logits is not None:
            ce = F.cross_entropy(logits.float(), self.cluster_labels[target])
            result.update(loss=mse + self.ce_weight * ce, ce=ce.detach(), logits=logits)
        return result
