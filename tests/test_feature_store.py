import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from encodenet_timm import feature_store as store_module
from encodenet_timm.clustering import cluster_per_class
from encodenet_timm.feature_store import FeatureStore


def _rows(n=50, d=12, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def test_ram_round_trip_is_exact_and_array_is_the_store():
    x = _rows()
    store = FeatureStore(50, 12)
    store.write(0, x[:20])
    store.write(20, torch.from_numpy(x[20:]))  # a tensor is accepted too
    assert store.path is None and store.nbytes == 50 * 12 * 4 and store.shape == (50, 12)
    np.testing.assert_array_equal(store.array(), x)
    assert store.array() is store.array()  # a float32 store in RAM hands back its own array
    np.testing.assert_array_equal(store.rows(np.array([3, 1])), x[[3, 1]])


def test_disk_round_trip_is_exact_and_reopens(tmp_path):
    x = _rows()
    with FeatureStore(50, 12, tmp_path / "s") as store:
        assert (tmp_path / "s" / "features.bin").stat().st_size == 50 * 12 * 4
        np.testing.assert_array_equal(store.rows(np.arange(50)), 0)  # sparse file: unwritten rows are zeros
        for start in range(0, 50, 16):  # block-wise, as a feature pass writes
            store.write(start, x[start:start + 16])
        store.flush()
        np.testing.assert_array_equal(store.array(), x)
    assert store.closed
    header = json.loads((tmp_path / "s" / "header.json").read_text())
    assert header["num_rows"] == 50 and header["dim"] == 12 and header["dtype"] == "float32"
    with FeatureStore.open(tmp_path / "s") as again:
        assert again.shape == (50, 12) and again.dtype == "float32" and again.path == tmp_path / "s"
        out = again.array()
        assert out.dtype == np.float32 and out.flags.c_contiguous
        np.testing.assert_array_equal(out, x)


@pytest.mark.parametrize("on_disk", [False, True])
def test_float16_stores_half_the_bytes_within_fp16_tolerance(tmp_path, on_disk):
    x = _rows() * 10
    store = FeatureStore(50, 12, tmp_path / "s" if on_disk else None, dtype="float16")
    store.write(0, torch.from_numpy(x).double())
    assert store.nbytes == 50 * 12 * 2
    if on_disk:
        assert (tmp_path / "s" / "features.bin").stat().st_size == 50 * 12 * 2
    out = store.array()
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, x.astype(np.float16).astype(np.float32))
    np.testing.assert_allclose(out, x, rtol=1e-3, atol=1e-3)


def test_bfloat16_tensors_are_written():
    store = FeatureStore(2, 3)
    store.write(0, torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 4.0]], dtype=torch.bfloat16))
    np.testing.assert_array_equal(store.array(), [[1, 2, 3], [0.5, -1, 4]])


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_rows_in_any_order_with_repeats(tmp_path, dtype):
    x = _rows(n=40).astype(dtype).astype(np.float32)
    ram, disk = FeatureStore(40, 12, dtype=dtype), FeatureStore(40, 12, tmp_path / "s", dtype=dtype)
    for store in (ram, disk):
        store.write(0, x)
    rng = np.random.default_rng(1)
    for idx in (rng.integers(0, 40, size=100), np.array([39, 0, 0, 5, 4, 3]), np.arange(40)[::-1], np.arange(3, 17),
                np.array([], dtype=np.int64), np.array([7], dtype=np.int32)):
        for store in (ram, disk):
            out = store.rows(idx)
            assert out.shape == (len(idx), 12) and out.dtype == np.float32 and out.flags.c_contiguous
            np.testing.assert_array_equal(out, x[idx])


def test_each_run_of_consecutive_rows_is_one_read(tmp_path, monkeypatch):
    x = _rows(n=60)
    store = FeatureStore(60, 12, tmp_path / "s")
    store.write(0, x)
    calls = []
    real = os.preadv

    def spy(fd, buffers, offset):
        calls.append((offset, sum(len(b) for b in buffers)))
        return real(fd, buffers, offset)

    monkeypatch.setattr(store_module.os, "preadv", spy)
    idx = np.r_[0:10, 20:30, 50]
    np.testing.assert_array_equal(store.rows(idx), x[idx])
    assert calls == [(0, 10 * 48), (20 * 48, 10 * 48), (50 * 48, 48)]
    calls.clear()
    np.testing.assert_array_equal(store.rows(np.r_[29:19:-1, 25]), x[np.r_[29:19:-1, 25]])  # unsorted, repeated
    assert calls == [(20 * 48, 10 * 48)]


# the child loads feature_store.py by path: importing the package would pull in timm (seconds per process)
_CHILD = textwrap.dedent("""
    import importlib.util, sys
    import numpy as np
    spec = importlib.util.spec_from_file_location("features", sys.argv[1])
    features = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(features)
    with features.FeatureStore.open(sys.argv[2]) as store:
        x = np.random.default_rng(0).normal(size=(store.num_rows, store.dim)).astype(np.float32)
        for start in range(store.num_rows // 2, store.num_rows, 7):
            store.write(start, x[start:min(start + 7, store.num_rows)])
        store.flush()
""")


def test_second_process_writes_disjoint_rows_of_an_open_store(tmp_path):
    x = _rows(n=64, d=12, seed=0)  # the child generates the same matrix and writes its second half
    store = FeatureStore(64, 12, tmp_path / "s")
    child = subprocess.Popen([sys.executable, "-c", _CHILD, store_module.__file__, str(tmp_path / "s")])
    for start in range(0, 32, 5):  # the first half, while the child writes the second
        store.write(start, x[start:min(start + 5, 32)])
    assert child.wait(timeout=60) == 0
    np.testing.assert_array_equal(store.array(), x)


def test_pickled_disk_store_reopens_its_file(tmp_path):
    x = _rows()
    store = FeatureStore(50, 12, tmp_path / "s")
    store.write(0, x)
    copy = pickle.loads(pickle.dumps(store))
    store.close()
    np.testing.assert_array_equal(copy.rows(np.array([4, 2])), x[[4, 2]])
    copy.close()


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="dtype must be one of"):
        FeatureStore(4, 3, dtype="float64")
    with pytest.raises(ValueError, match="num_rows >= 0 and dim >= 1"):
        FeatureStore(4, 0)
    for store in (FeatureStore(4, 3), FeatureStore(4, 3, tmp_path / "s")):
        with pytest.raises(ValueError, match=r"rows must be \(B, 3\).*\(2, 4\)"):
            store.write(0, np.zeros((2, 4)))
        with pytest.raises(ValueError, match=r"rows must be \(B, 3\)"):
            store.write(0, np.zeros(3))
        with pytest.raises(ValueError, match=r"cannot write rows \[3, 5\).*\[0, 4\)"):
            store.write(3, np.zeros((2, 3)))
        with pytest.raises(ValueError, match=r"cannot write rows \[-1, 0\)"):
            store.write(-1, np.zeros((1, 3)))
        with pytest.raises(ValueError, match=r"indices must lie in \[0, 4\), found -1\.\.2"):
            store.rows(np.array([2, -1]))
        with pytest.raises(ValueError, match=r"found 0\.\.4"):
            store.rows(np.array([0, 4]))
        with pytest.raises(ValueError, match="1-D integer"):
            store.rows(np.array([0.0, 1.0]))
        with pytest.raises(ValueError, match="1-D integer"):
            store.rows(np.zeros((2, 2), dtype=np.int64))
    store.close()
    with pytest.raises(ValueError, match="closed"):
        store.rows(np.array([0]))


def test_opening_something_that_is_not_a_store(tmp_path):
    with pytest.raises(ValueError, match="is not a FeatureStore: cannot read"):
        FeatureStore.open(tmp_path / "missing")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "header.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="is not a FeatureStore: .* has no format"):
        FeatureStore.open(tmp_path / "other")
    FeatureStore(10, 4, tmp_path / "s").close()
    os.truncate(tmp_path / "s" / "features.bin", 100)
    with pytest.raises(ValueError, match="holds 100 bytes .* needs 160: the file is truncated"):
        FeatureStore.open(tmp_path / "s")
    os.remove(tmp_path / "s" / "features.bin")
    with pytest.raises(ValueError, match="data file .* is missing"):
        FeatureStore.open(tmp_path / "s")


def _scattered_classes(num_classes=4, per_class=60, dim=16, seed=0):
    """Features of classes in shuffled order (not sorted by class): (N, D) float32, (N,) labels."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(num_classes), per_class))
    centres = rng.normal(size=(num_classes, 3, dim)) * 4
    x = centres[labels, rng.integers(0, 3, size=len(labels))] + rng.normal(size=(len(labels), dim))
    return x.astype(np.float32), labels


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_clustering_a_store_equals_clustering_the_array(tmp_path, dtype):
    x, labels = _scattered_classes()
    x = x.astype(dtype).astype(np.float32)  # what the store holds
    with FeatureStore(len(x), x.shape[1], Path(tmp_path) / "s", dtype=dtype) as store:
        store.write(0, x)
        from_store = cluster_per_class(store, labels, 4, 3, seed=0, faiss_gpu="never")
    from_array = cluster_per_class(x, labels, 4, 3, seed=0, faiss_gpu="never")
    np.testing.assert_array_equal(from_store.cluster_ids, from_array.cluster_ids)
    np.testing.assert_array_equal(from_store.cluster_labels, from_array.cluster_labels)
    np.testing.assert_array_equal(from_store.centroid_dist, from_array.centroid_dist)
