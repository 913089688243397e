"""Small real datasets that need no download (scikit-learn's digits), for examples and tests."""
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

__all__ = ["digits_datasets"]


def digits_datasets(size: int = 32, in_chans: int = 3, test_fraction: float = 0.25,
                    seed: int = 0) -> Tuple[TensorDataset, TensorDataset]:
    """scikit-learn's 1,797 8x8 handwritten digits as (train, test) TensorDatasets of
    (images (N, in_chans, size, size) float32, normalised to mean 0 / std 1; labels (N,) int64).

    The split is stratified by class and fixed by `seed`; normalisation uses train statistics.
    """
    from sklearn.datasets import load_digits  # scikit-learn ships the data; nothing is downloaded
    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)  # (N, 1, size, size)
    x = x.expand(-1, in_chans, -1, -1).contiguous()  # (N, in_chans, size, size)
    y = torch.from_numpy(digits.target.astype(np.int64))
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), dtype=bool)
    for c in range(10):
        idx = np.flatnonzero(digits.target == c)
        test[rng.choice(idx, size=int(round(len(idx) * test_fraction)), replace=False)] = True
    train_x, test_x = x[~test], x[test]
    mean, std = train_x.mean(), train_x.std()
    return (TensorDataset((train_x - mean) / std, y[~test]),
            TensorDataset((test_x - mean) / std, y[test]))
