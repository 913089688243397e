"""Small real datasets that need no download (scikit-learn's digits), for examples and tests."""
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

__all__ = ["digits_images", "digits_splits", "digits_datasets"]


def digits_images(test_fraction: float = 0.25, seed: int = 0) -> Tuple[Tuple[np.ndarray, np.ndarray],
                                                                        Tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's 1,797 handwritten digits as they come, split into ((train images, labels), (test
    images, labels)): images (N, 8, 8) float32 with pixel values in [0, 1], labels (N,) int64.

    The split is stratified by class and fixed by `seed`.
    """
    from sklearn.datasets import load_digits  # scikit-learn ships the data; nothing is downloaded
    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0  # (N, 8, 8) in [0, 1]
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), dtype=bool)
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        test[rng.choice(idx, size=int(round(len(idx) * test_fraction)), replace=False)] = True
    return (images[~test], labels[~test]), (images[test], labels[test])


def digits_splits(size: int = 32, in_chans: int = 3, test_fraction: float = 0.25, seed: int = 0
                  ) -> Tuple[TensorDataset, TensorDataset, Tuple[float, ...], Tuple[float, ...]]:
    """(train, test, mean, std): `digits_images` resized (bilinear) to `size` x `size`, as TensorDatasets of
    (images (N, in_chans, size, size) float32 normalised, labels (N,) int64), and the per-channel mean and
    std (pixel values in [0, 1], the training images' own; every channel holds the same grey image)."""
    (train_x, train_y), (test_x, test_y) = digits_images(test_fraction, seed)

    def resized(x: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(x)[:, None]  # (N, 8, 8) -> (N, 1, 8, 8)
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)  # (N, 1, size, size)
        return x.expand(-1, in_chans, -1, -1).contiguous()  # (N, in_chans, size, size)

    train_x, test_x = resized(train_x), resized(test_x)
    mean, std = train_x.mean(), train_x.std()
    return (TensorDataset((train_x - mean) / std, torch.from_numpy(train_y)),
            TensorDataset((test_x - mean) / std, torch.from_numpy(test_y)),
            (float(mean),) * in_chans, (float(std),) * in_chans)


def digits_datasets(size: int = 32, in_chans: int = 3, test_fraction: float = 0.25,
                    seed: int = 0) -> Tuple[TensorDataset, TensorDataset]:
    """scikit-learn's 1,797 8x8 handwritten digits as (train, test) TensorDatasets of
    (images (N, in_chans, size, size) float32, normalised to mean 0 / std 1; labels (N,) int64).

    The split is stratified by class and fixed by `seed`; normalisation uses train statistics
    (`digits_splits` also returns them).
    """
    train, test, _, _ = digits_splits(size, in_chans, test_fraction, seed)
    return train, test
