"""What every dataset of the command line shares: stratified subsets, validation hold-outs, and undoing
the normalisation for display."""
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = ["stratified_subset", "train_val_split", "denormalize"]


def stratified_subset(labels: np.ndarray, per_class: Optional[int], seed: int) -> np.ndarray:
    """Sorted indices of `per_class` random samples of every class (all of a smaller class); None: all."""
    labels = np.asarray(labels)
    if per_class is None:
        return np.arange(len(labels))
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1 or None, got {per_class}")
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(picks))


def train_val_split(labels: np.ndarray, val_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Stratified (train indices, validation indices), both sorted; `val_fraction` of each class is held out."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        val.append(idx[:int(round(len(idx) * val_fraction))])
    val = np.sort(np.concatenate(val))
    return np.setdiff1d(np.arange(len(labels)), val), val


def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalised images (..., C, H, W) -> pixel values in [0, 1] (clamped), for display."""
    mean_ = torch.tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    std_ = torch.tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x * std_ + mean_).clamp(0.0, 1.0)
