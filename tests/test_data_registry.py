"""encodenet_timm.data.registry: build_datasets, DataSplits and make_loaders."""
import numpy as np
import pytest

from encodenet_timm.data import build_datasets


def _labels(dataset) -> list:
    return [int(dataset[i][1]) for i in range(len(dataset))]


def test_digits_subset_and_validation():
    data = build_datasets("digits", per_class=20, val_fraction=0.25, seed=1, img_size=16, in_chans=1)
    assert len(data.train) == 150 and len(data.val) == 50 and len(data.test) == 450
    assert data.input_size == (1, 16, 16) and np.bincount(_labels(data.val)).tolist() == [5] * 10


def test_digits_record_their_normalisation():
    """Issue #25.1: the digits' mean/std (their training images') and how they were resized are recorded,
    in timm's data-config keys, so an export can carry them."""
    data = build_datasets("digits", per_class=20, seed=1, img_size=16, in_chans=3)
    config = data.data_config
    assert config["input_size"] == (3, 16, 16) and (config["interpolation"], config["crop_pct"]) == ("bilinear", 1.0)
    assert len(set(config["mean"])) == 1 and len(config["mean"]) == len(config["std"]) == 3  # one grey image, 3x
    x = data.denormalize(data.test[0][0])  # back to pixel values in [0, 1]
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.max()) > 0.5


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="dataset must be one of"):
        build_datasets("mnist")
    with pytest.raises(ValueError, match="val_fraction"):
        build_datasets("digits", val_fraction=1.0)
    with pytest.raises(ValueError, match="3x32x32"):
        build_datasets("cifar10", tmp_path, img_size=64, download=False)
    with pytest.raises(FileNotFoundError, match="cifar10 is not in"):
        build_datasets("cifar10", tmp_path, download=False)
