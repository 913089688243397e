"""Representative selection over a training set: feature pass -> per-class k-means -> one image per cluster.

Features stream into a `FeatureStore` (RAM, or a file on disk read one class at a time). Under
torchrun each rank runs its share of the batches; rank 0 clusters and picks; every rank receives the
result and reads the representative images itself.
"""
import logging
import os
import shutil
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Subset

from . import distributed as dist
from .clustering import cluster_per_class
from .config import RepresentativesConfig
from .feature_store import FeatureStore
from .representatives import Representatives, pick_representatives
from .training import BatchCheck, extract_features, make_loader

__all__ = ["select_representatives"]

_logger = logging.getLogger(__name__)


def select_representatives(model: nn.Module, loader: DataLoader, cfg: RepresentativesConfig,
                           device: torch.device, *, num_classes: int, seed: int,
                           check: Optional[BatchCheck] = None, channels_last: bool = False,
                           progress: bool = False) -> Tuple[Representatives, np.ndarray]:
    """Representatives of ``loader.dataset`` under `model` (eval mode, dataset order).

    Args:
        loader: its dataset, workers and collate_fn are used (not its order or batch size).
        cfg: k per class, k-means settings, the rule, the feature store.
        seed: the k-means seed.

    Returns:
        The `Representatives` (images read through `loader`'s collate_fn) and k per class (num_classes,).
    """
    dataset = loader.dataset
    _warn_if_random_transform(dataset)
    ordered = make_loader(dataset, loader, shuffle=False, seed=seed, batch_size=cfg.batch_size)
    store = _open_store(cfg, len(dataset), _pre_logits_dim(model, loader, device))
    gather_rows = store is None or (store.path is None and dist.is_distributed())  # RAM store: rank 0 only
    blocks: List[Tuple[int, np.ndarray]] = []
    try:
        rows = extract_features(model, ordered, device,
                                (lambda i, f: blocks.append((i, f))) if gather_rows else store.write,
                                check=check, channels_last=channels_last, progress=progress)
        if gather_rows:
            for rank_blocks in dist.gather_objects(blocks) or []:
                for i, f in rank_blocks:
                    store.write(i, f)
        elif store.path is not None:
            store.flush()
        dist.barrier()  # every rank's rows are in the store
        gathered = dist.gather_objects(rows)
        picked = _cluster_and_pick(store, gathered, cfg, num_classes, seed, progress) if dist.is_main() else None
    finally:
        if store is not None:
            store.close()
        dist.barrier()
        if store is not None and store.path is not None and dist.is_main():
            shutil.rmtree(store.path, ignore_errors=True)
    labels, cluster_ids, entropy, rep_indices, cluster_labels, k_per_class = dist.broadcast_object(picked)
    # read through the loader's collate_fn, so the targets are exactly what the model is fed
    rep_loader = make_loader(Subset(dataset, rep_indices.tolist()), loader, shuffle=False, seed=seed,
                             batch_size=cfg.batch_size)
    images = torch.cat([x for x, _ in rep_loader]).float().contiguous()  # (M, C, H, W)
    reps = Representatives(labels=torch.from_numpy(labels), cluster_ids=torch.from_numpy(cluster_ids),
                           entropy=torch.from_numpy(entropy), rep_indices=torch.from_numpy(rep_indices),
                           cluster_labels=torch.from_numpy(cluster_labels), images=images)
    return reps, k_per_class


def _pre_logits_dim(model: nn.Module, loader: DataLoader, device: torch.device) -> int:
    """D of ``forward_head(..., pre_logits=True)``, from one image of `loader`'s dataset."""
    x, _ = next(iter(DataLoader(Subset(loader.dataset, [0]), batch_size=1, collate_fn=loader.collate_fn)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            z = model.forward_features(x.to(device))
            return int(model.forward_head(z, pre_logits=True).flatten(1).shape[1])
    finally:
        model.train(was_training)


def _open_store(cfg: RepresentativesConfig, num_rows: int, dim: int) -> Optional[FeatureStore]:
    """A new (num_rows, dim) store: in RAM (rank 0 only: the other ranks send it their rows), or on disk
    in a directory of its own inside ``cfg.feature_store`` (created by rank 0, opened by the others)."""
    if cfg.feature_store is None:
        return FeatureStore(num_rows, dim) if dist.is_main() else None
    path = Path(cfg.feature_store) / dist.broadcast_object(f"encodenet-features-{os.getpid()}")
    store = FeatureStore(num_rows, dim, path=path, dtype=cfg.store_dtype) if dist.is_main() else None
    dist.barrier()
    return store if store is not None else FeatureStore.open(path)


def _cluster_and_pick(store: FeatureStore, gathered: List[Tuple[np.ndarray, ...]], cfg: RepresentativesConfig,
                      num_classes: int, seed: int, progress: bool) -> Tuple[np.ndarray, ...]:
    """Per-class k-means over the whole set and each cluster's representative (rank 0).

    `gathered` holds every rank's (indices, entropy, labels) from `extract_features`.
    """
    n = store.num_rows
    labels, entropy = np.full(n, -1, dtype=np.int64), np.zeros(n, dtype=np.float32)
    for idx, ent, lab in gathered:
        labels[idx], entropy[idx] = lab, ent
    if (labels < 0).any():
        raise RuntimeError(f"the feature pass missed {(labels < 0).sum()} of {n} images")
    clusters = cluster_per_class(store, labels, num_classes, cfg.clusters_per_class,
                                 max_auto_clusters=cfg.max_auto_clusters, niter=cfg.niter, nredo=cfg.nredo,
                                 seed=seed, faiss_gpu=cfg.faiss_gpu, progress=progress)
    score = entropy if cfg.rule == "min_entropy" else clusters.centroid_dist
    rep_indices = pick_representatives(torch.from_numpy(clusters.cluster_ids), torch.from_numpy(score),
                                       len(clusters.cluster_labels)).numpy()
    return labels, clusters.cluster_ids, entropy, rep_indices, clusters.cluster_labels, clusters.k_per_class


def _warn_if_random_transform(dataset: Dataset) -> None:
    transform = getattr(dataset, "transform", None)
    if transform is not None and "Random" in repr(transform):
        _logger.warning("the dataset's transform looks random (%s): features and representative images are "
                        "read through it. Pass a loader without augmentation (fit(..., plain_loader=...)).",
                        type(transform).__name__)
