import numpy as np
import pytest

from encodenet_timm import clustering
from encodenet_timm.clustering import cluster_per_class, silhouette_score


def _blobs(num_classes=3, blobs=3, per_blob=40, dim=8, seed=0, spread=0.05):
    rng = np.random.default_rng(seed)
    feats, labels, blob_ids = [], [], []
    for c in range(num_classes):
        for b in range(blobs):
            center = rng.normal(size=dim) * 10
            feats.append(center + spread * rng.normal(size=(per_blob, dim)))
            labels += [c] * per_blob
            blob_ids += [c * blobs + b] * per_blob
    return np.concatenate(feats).astype(np.float32), np.array(labels), np.array(blob_ids)


def test_clusters_never_mix_classes_and_recover_blobs():
    feats, labels, blob_ids = _blobs()
    res = cluster_per_class(feats, labels, 3, 3, seed=0)
    assert res.k_per_class.tolist() == [3, 3, 3]
    assert res.cluster_labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for cid in np.unique(res.cluster_ids):  # one class per cluster, and it is the cluster's label
        assert set(labels[res.cluster_ids == cid]) == {res.cluster_labels[cid]}
    # well separated blobs are found exactly (same partition up to renaming)
    pairs = set(zip(res.cluster_ids.tolist(), blob_ids.tolist()))
    assert len(pairs) == 9


def test_mixed_class_features_still_split_by_class():
    # the two classes share the same feature distribution: only the labels separate them
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(200, 4)).astype(np.float32)
    labels = np.tile([0, 1], 100)
    res = cluster_per_class(feats, labels, 2, 4, seed=0)
    for cid in range(len(res.cluster_labels)):
        assert (labels[res.cluster_ids == cid] == res.cluster_labels[cid]).all()


def test_fewer_images_than_clusters_is_an_error_naming_the_classes():
    feats, labels, _ = _blobs(num_classes=3, blobs=1, per_blob=4)
    keep = ~((labels == 1) & (np.arange(len(labels)) % 4 > 1))  # class 1 keeps 2 of its 4 images
    with pytest.raises(ValueError, match=r"clusters_per_class=3 needs .* class 1 has 2; lower .* at most 2.*'auto'"):
        cluster_per_class(feats[keep], labels[keep], 3, 3, seed=0)
    res = cluster_per_class(feats, labels, 3, 4, seed=0)  # exactly as many images as clusters is fine
    assert res.k_per_class.tolist() == [4, 4, 4]


def test_auto_k_handles_classes_with_one_or_two_images():
    feats, labels, _ = _blobs(num_classes=2, blobs=1, per_blob=2)
    res = cluster_per_class(feats, labels, 2, "auto", seed=0)
    assert res.k_per_class.tolist() == [1, 1]


def test_class_without_images_is_an_error():
    feats, labels, _ = _blobs(num_classes=2)
    with pytest.raises(ValueError, match=r"classes \[2\] have no images"):
        cluster_per_class(feats, labels, 3, 2)


def test_bad_arguments():
    feats, labels, _ = _blobs(num_classes=2)
    with pytest.raises(ValueError, match="clusters_per_class"):
        cluster_per_class(feats, labels, 2, 0)
    with pytest.raises(ValueError, match="clusters_per_class"):
        cluster_per_class(feats, labels, 2, "many")
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        cluster_per_class(feats, labels + 1, 2, 2)
    with pytest.raises(ValueError, match="faiss_gpu"):
        cluster_per_class(feats, labels, 2, 2, faiss_gpu="maybe")


def test_faiss_never_subsamples(monkeypatch):
    import faiss
    seen = {}
    real = faiss.Kmeans

    def spy(d, k, **kw):
        seen.update(k=k, **kw)
        return real(d, k, **kw)

    monkeypatch.setattr(faiss, "Kmeans", spy)
    feats, labels, _ = _blobs(num_classes=1, blobs=2, per_blob=1000)  # 1,000 points per centroid > 256
    cluster_per_class(feats, labels, 1, 2, seed=0)
    assert seen["k"] * seen["max_points_per_centroid"] >= 2000


def test_silhouette_matches_brute_force():
    feats, _, blob_ids = _blobs(num_classes=1, blobs=3, per_blob=15, spread=3.0)
    x = feats.astype(np.float64)
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    expected = []
    for i in range(len(x)):
        own = blob_ids == blob_ids[i]
        a = d[i, own & (np.arange(len(x)) != i)].mean()
        b = min(d[i, blob_ids == o].mean() for o in np.unique(blob_ids) if o != blob_ids[i])
        expected.append((b - a) / max(a, b))
    assert silhouette_score(x, blob_ids) == pytest.approx(np.mean(expected), rel=1e-6)


def test_auto_k_finds_the_number_of_blobs():
    feats, labels, _ = _blobs(num_classes=2, blobs=4, per_blob=30)
    res = cluster_per_class(feats, labels, 2, "auto", max_auto_clusters=8, seed=0)
    assert res.k_per_class.tolist() == [4, 4]


def test_seeded_runs_repeat():
    feats, labels, _ = _blobs(spread=5.0)
    a = cluster_per_class(feats, labels, 3, 4, seed=3)
    b = cluster_per_class(feats, labels, 3, 4, seed=3)
    np.testing.assert_array_equal(a.cluster_ids, b.cluster_ids)


def test_missing_faiss_says_what_to_install(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "faiss":
            raise ImportError("no faiss")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        clustering._import_faiss()


def _faiss_gpus() -> int:
    import faiss
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


@pytest.mark.gpu
@pytest.mark.skipif(_faiss_gpus() == 0, reason="needs a FAISS build that sees a GPU")
def test_gpu_clustering_matches_cpu_partition():
    feats, labels, blob_ids = _blobs(num_classes=3, blobs=3, per_blob=200)
    gpu = cluster_per_class(feats, labels, 3, 3, seed=0, faiss_gpu="always")
    cpu = cluster_per_class(feats, labels, 3, 3, seed=0, faiss_gpu="never")
    for res in (gpu, cpu):
        assert len(set(zip(res.cluster_ids.tolist(), blob_ids.tolist()))) == 9


@pytest.mark.skipif(_faiss_gpus() > 0, reason="this FAISS build has a GPU")
def test_faiss_gpu_always_without_gpu_is_a_clear_error():
    feats, labels, _ = _blobs(num_classes=1)
    with pytest.raises(RuntimeError, match="sees no GPU"):
        cluster_per_class(feats, labels, 1, 2, faiss_gpu="always")


@pytest.mark.parametrize("k", [4, "auto"])
def test_centroid_dist_equals_centroid_distance(k):
    import torch

    from encodenet_timm.clustering import centroid_distance
    rng = np.random.default_rng(0)
    feats = (rng.normal(size=(300, 16)) * rng.uniform(0.1, 5, size=16)).astype(np.float32)
    labels = rng.integers(0, 3, size=300)
    res = cluster_per_class(feats, labels, 3, k, max_auto_clusters=5, seed=0)
    expected = centroid_distance(torch.from_numpy(feats), torch.from_numpy(res.cluster_ids), len(res.cluster_labels))
    assert res.centroid_dist.dtype == np.float64 and res.centroid_dist.shape == (300,)
    np.testing.assert_allclose(res.centroid_dist, expected.numpy(), rtol=1e-10)


def test_a_store_is_read_one_class_at_a_time(tmp_path, monkeypatch):
    import io
    import sys

    class _Terminal(io.StringIO):
        def isatty(self) -> bool:  # progress bars show in a terminal only (issue #13.4)
            return True
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    from encodenet_timm.feature_store import FeatureStore
    feats, labels, _ = _blobs(num_classes=3, blobs=2, per_blob=20)
    order = np.random.default_rng(0).permutation(len(labels))  # classes scattered over the rows
    feats, labels = feats[order], labels[order]
    store = FeatureStore(len(feats), feats.shape[1], tmp_path / "s")
    store.write(0, feats)
    reads = []
    real = store.rows
    store.rows = lambda idx: reads.append(idx) or real(idx)
    res = cluster_per_class(store, labels, 3, 2, seed=0, progress=True)
    assert [sorted(set(labels[i])) for i in reads] == [[0], [1], [2]]
    assert sorted(np.concatenate(reads).tolist()) == list(range(len(labels)))  # every row read exactly once
    np.testing.assert_array_equal(res.cluster_ids, cluster_per_class(feats, labels, 3, 2, seed=0).cluster_ids)
    assert "clustering" in terminal.getvalue()  # the tqdm bar


def test_store_and_labels_must_agree(tmp_path):
    from encodenet_timm.feature_store import FeatureStore
    with pytest.raises(ValueError, match=r"labels \(N,\), got \(10, 4\) and \(9,\)"):
        cluster_per_class(FeatureStore(10, 4), np.zeros(9, dtype=np.int64), 1, 1)
