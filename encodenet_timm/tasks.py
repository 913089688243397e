"""Stage modules and timm `TrainingTask`s: the converting autoencoder, and the frozen-encoder classifier.

Baseline and transfer use timm's own `ClassificationTask`; the converting autoencoder uses
`ConvertingAutoencoderTask` below. The training loop only calls ``task(x, y)["loss"]``.
"""
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.task import TrainingTask

__all__ = ["ConvertingAutoencoder", "ConvertingAutoencoderTask", "FrozenEncoderClassifier"]


class ConvertingAutoencoder(nn.Module):
    """Encoder + mirrored decoder: (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


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


class ConvertingAutoencoderTask(TrainingTask):
    """Train encoder + decoder to turn each image into its cluster's representative.

    The target passed to ``forward`` is the cluster id of each image; the task looks up the
    representative image in its `rep_images` buffer, so data loaders stay (image, int) pairs.

    Args:
        autoencoder: `ConvertingAutoencoder` (the trainable module).
        rep_images: (M, C, H, W) representative images, normalised as the model's inputs.
    """

    def __init__(self, autoencoder: nn.Module, rep_images: torch.Tensor,
                 device: Optional[torch.device] = None, verbose: bool = False):
        super().__init__(device=device, verbose=verbose)
        self.trainable_module = autoencoder
        self.register_buffer("rep_images", rep_images.to(self.device), persistent=False)

    def prepare_distributed(self, device_ids: Optional[list] = None, **ddp_kwargs) -> "ConvertingAutoencoderTask":
        from torch.nn.parallel import DistributedDataParallel as DDP
        self.trainable_module = DDP(self.trainable_module, device_ids=device_ids, **ddp_kwargs)
        return self

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        """input: (B, C, H, W) images; target: (B,) int64 cluster ids -> {"loss", "output": (B, C, H, W)}."""
        output = self.trainable_module(input)
        goal = self.rep_images[target].to(dtype=output.dtype, memory_format=torch.contiguous_format)
        loss = F.mse_loss(output.float(), goal.float())
        return {"loss": loss, "output": output}
