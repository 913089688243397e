"""Per-class k-means on feature vectors with FAISS (GPU when available), and each sample's distance to its
cluster's centroid; the one module importing faiss."""
import logging
import math
from dataclasses import dataclass
from typing import List, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from .checks import check_class_counts
from .feature_store import FeatureStore

__all__ = ["ClassClusters", "cluster_per_class", "centroid_distance", "silhouette_score"]

_logger = logging.getLogger(__name__)

_SILHOUETTE_SAMPLE = 2000  # points per class used to score k when clusters_per_class="auto"


@dataclass
class ClassClusters:
    """Result of `cluster_per_class`.

    Attributes:
        cluster_ids: (N,) int64, global cluster id of every sample; cluster ids of class c are
            contiguous and never shared with another class.
        cluster_labels: (M,) int64, the class of each of the M clusters.
        k_per_class: (num_classes,) int64, clusters used for each class.
        centroid_dist: (N,) float64, squared Euclidean distance of every sample to the mean of its
            cluster's members (`centroid_distance`, computed one class at a time).
    """
    cluster_ids: np.ndarray
    cluster_labels: np.ndarray
    k_per_class: np.ndarray
    centroid_dist: np.ndarray


def _import_faiss():
    try:
        import faiss
    except ImportError as e:
        raise ImportError(
            "encodenet_timm clusters with FAISS: `pip install faiss-cpu` (or a faiss-gpu build for CUDA); "
            "see docs/scaling.md, GPU paths") from e
    return faiss


def _use_gpu(faiss, mode: str) -> bool:
    if mode not in ("auto", "never", "always"):
        raise ValueError(f"representatives.faiss_gpu must be 'auto', 'never' or 'always', got {mode!r}")
    n_gpu = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if mode == "always" and n_gpu == 0:
        raise RuntimeError("representatives.faiss_gpu='always' but this FAISS build sees no GPU "
                           "(install a faiss-gpu build, or set faiss_gpu='auto')")
    return mode != "never" and n_gpu > 0


def _kmeans(faiss, x: np.ndarray, k: int, niter: int, seed: int, gpu: bool, nredo: int = 1) -> np.ndarray:
    """Assignments (n,) of FAISS k-means on x (n, d); every point is used (no subsampling); the best
    of `nredo` random initialisations is kept."""
    if k == 1:
        return np.zeros(len(x), dtype=np.int64)
    if k >= len(x):
        return np.arange(len(x), dtype=np.int64)
    km = faiss.Kmeans(x.shape[1], k, niter=niter, nredo=nredo, seed=seed, gpu=gpu, verbose=False,
                      max_points_per_centroid=math.ceil(len(x) / k) + 1,  # FAISS would subsample beyond
                      min_points_per_centroid=1)
    km.train(x)
    _, assign = km.index.search(x, 1)
    return assign[:, 0].astype(np.int64)


def silhouette_score(x: np.ndarray, assign: np.ndarray) -> float:
    """Mean silhouette (Euclidean) of points x (n, d) with cluster assignment (n,); O(n^2) memory."""
    sq = (x * x).sum(1)
    dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0))  # (n, n)
    labels = np.unique(assign)
    if len(labels) < 2:
        return 0.0
    member = assign[:, None] == labels[None, :]  # (n, k)
    sums = dist @ member  # (n, k) summed distance to each cluster
    counts = member.sum(0).astype(np.float64)
    own = member.argmax(1)
    own_count = counts[own] - 1
    a = np.where(own_count > 0, sums[np.arange(len(x)), own] / np.maximum(own_count, 1), 0.0)
    mean_other = sums / counts[None, :]
    mean_other[np.arange(len(x)), own] = np.inf
    b = mean_other.min(1)
    s = np.where(own_count > 0, (b - a) / np.maximum(np.maximum(a, b), 1e-12), 0.0)
    return float(s.mean())


def cluster_per_class(features: Union[np.ndarray, FeatureStore], labels: np.ndarray, num_classes: int,
                      clusters_per_class: Union[int, str] = 5, *, max_auto_clusters: int = 10,
                      niter: int = 25, nredo: int = 3, seed: int = 0, faiss_gpu: str = "auto",
                      progress: bool = False) -> ClassClusters:
    """k-means inside each class separately, so no cluster ever mixes classes.

    Args:
        features: (N, D) float32 feature vectors, as an array or a `FeatureStore`; from a store only one
            class's rows are read at a time, so memory peaks at about one class's (n_c, D) float32 rows.
        labels: (N,) int class of each vector, in [0, num_classes).
        clusters_per_class: k for every class, or "auto": per class, the k in [2, max_auto_clusters]
            with the highest mean silhouette (on at most 2,000 points of the class, seeded).
        niter, nredo, seed: k-means iterations, restarts (the lowest objective is kept) and seed (FAISS).
        faiss_gpu: "auto", "never" or "always".
        progress: show a tqdm bar over the classes.

    Raises:
        ValueError: a class has no sample or fewer samples than `clusters_per_class` (`check_class_counts`),
            bad k, or shapes that disagree.
    """
    if isinstance(features, FeatureStore):
        read, shape = features.rows, features.shape
    else:
        features = np.ascontiguousarray(features, dtype=np.float32)
        read, shape = features.__getitem__, features.shape
    labels = np.asarray(labels, dtype=np.int64)
    if len(shape) != 2 or labels.shape != (shape[0],):
        raise ValueError(f"features must be (N, D) and labels (N,), got {shape} and {labels.shape}")
    auto = clusters_per_class == "auto"
    if auto and max_auto_clusters < 2:
        raise ValueError(f"max_auto_clusters must be >= 2, got {max_auto_clusters}")
    check_class_counts(labels, num_classes, clusters_per_class)
    faiss = _import_faiss()
    gpu = _use_gpu(faiss, faiss_gpu)
    rng = np.random.default_rng(seed)
    cluster_ids = np.empty(len(labels), dtype=np.int64)
    centroid_dist = np.empty(len(labels), dtype=np.float64)
    k_per_class: List[int] = []
    bar = tqdm(range(num_classes), desc="clustering", unit="class", disable=(not progress) or None, leave=False)
    for c in bar:  # a bar in a terminal only (disable=None: tqdm's own TTY check)
        idx = np.flatnonzero(labels == c)
        x = read(idx)  # (n_c, D) float32
        if auto:
            k, assign = _auto_k(faiss, x, max_auto_clusters, niter, nredo, seed + c, gpu, rng)
        else:
            assign = _kmeans(faiss, x, clusters_per_class, niter, seed + c, gpu, nredo)
        # k-means may leave a cluster empty; renumber so ids are dense within the class
        _, assign = np.unique(assign, return_inverse=True)
        k = int(assign.max()) + 1
        cluster_ids[idx] = sum(k_per_class) + assign
        centroid_dist[idx] = centroid_distance(torch.from_numpy(x), torch.from_numpy(assign), k).numpy()
        k_per_class.append(k)
    cluster_labels = np.repeat(np.arange(num_classes), k_per_class)
    return ClassClusters(cluster_ids, cluster_labels, np.asarray(k_per_class, dtype=np.int64), centroid_dist)


def centroid_distance(features: torch.Tensor, cluster_ids: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """Squared Euclidean distance of every sample to the mean of its cluster: (N, D), (N,) -> (N,) float64.

    With it as the score, `pick_representatives` returns each cluster's member nearest its centroid.
    """
    x = features.double().flatten(1)
    ids = cluster_ids.long()
    sums = torch.zeros(num_clusters, x.shape[1], dtype=x.dtype).index_add_(0, ids, x)
    counts = torch.bincount(ids, minlength=num_clusters).clamp_min(1).to(x.dtype)
    return (x - (sums / counts[:, None])[ids]).square().sum(1)


def _auto_k(faiss, x, max_k, niter, nredo, seed, gpu, rng):
    n = len(x)
    if n < 3:
        return 1, np.zeros(n, dtype=np.int64)
    sample = rng.choice(n, size=min(n, _SILHOUETTE_SAMPLE), replace=False)
    best = None
    for k in range(2, min(max_k, n - 1) + 1):
        assign = _kmeans(faiss, x, k, niter, seed, gpu, nredo)
        score = silhouette_score(x[sample], assign[sample])
        if best is None or score > best[0]:
            best = (score, k, assign)
    return best[1], best[2]
