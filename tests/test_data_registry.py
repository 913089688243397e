"""encodenet_timm.data.registry: build_datasets, DataSplits and make_loaders."""
import numpy as np
import pytest

from encodenet_timm.data import build_datasets


def _labels(dataset) -> list:
    return [int(dataset[i][1]) for i in range(len(dataset))]


def test_digits_subset_and_validation():
    data = build_datasets("digits", per_class=20, val_fraction=0.25, seed=1, img_size=16, in_chans=1)
    assert len(data.train) == 150 and len(data.val) == 50 and len(data.test) == 450
    assert data.input_size == (1, 16, 16) and data.mean is None
    assert np.bincount(_labels(data.val)).tolist() == [5] * 10
    with pytest.raises(ValueError, match="no mean/std"):
        data.denormalize(data.plain[0][0])


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="dataset must be one of"):
        build_datasets("mnist")
    with pytest.raises(ValueError, match="val_fraction"):
        build_datasets("digits", val_fraction=1.0)
    with pytest.raises(ValueError, match="3x32x32"):
        build_datasets("cifar10", tmp_path, img_size=64, download=False)
    with pytest.raises(FileNotFoundError, match="cifar10 is not in"):
        build_datasets("cifar10", tmp_path, download=False)
