"""encodenet_timm.data.splits: stratified subsets and validation hold-outs."""
import numpy as np
import pytest

from encodenet_timm.data import stratified_subset, train_val_split


def test_stratified_subset_is_balanced_and_seeded():
    labels = np.repeat(np.arange(4), 10)
    a = stratified_subset(labels, 3, seed=0)
    assert np.bincount(labels[a]).tolist() == [3, 3, 3, 3] and np.all(np.diff(a) > 0)
    assert np.array_equal(a, stratified_subset(labels, 3, seed=0))
    assert not np.array_equal(a, stratified_subset(labels, 3, seed=1))
    assert len(stratified_subset(labels, None, seed=0)) == 40
    assert len(stratified_subset(labels, 50, seed=0)) == 40  # a class smaller than per_class is kept whole
    with pytest.raises(ValueError):
        stratified_subset(labels, 0, seed=0)


def test_train_val_split_is_disjoint_and_stratified():
    labels = np.repeat(np.arange(5), 20)
    train, val = train_val_split(labels, 0.1, seed=3)
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == 100
    assert np.bincount(labels[val]).tolist() == [2] * 5
    with pytest.raises(ValueError):
        train_val_split(labels, 1.0, seed=0)
