"""The representatives step: feature pass -> per-class k-means -> one image per cluster -> `Representatives`.

`select_representatives` runs the model in eval mode over the training set in dataset order
(`extract_features`), streaming its pre-logits features into a `FeatureStore` (RAM, or a file on disk
read one class at a time) and keeping each image's softmax entropy. `clustering.cluster_per_class` then
clusters each class, and `pick_representatives` takes the lowest-scoring member of every cluster: lowest
entropy (the paper) or nearest the centroid. Under torchrun each rank runs its share of the batches;
rank 0 clusters and picks; every rank receives the result and reads the representative images itself.
"""
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from . import distributed
from .checks import BatchCheck, eval_mode, first_sample
from .clustering import cluster_per_class
from .config import RepresentativesConfig
from .feature_store import FeatureStore
from .env import autocast
from .files import save_tensors
from .loaders import batch_starts, make_loader, shard_batches

__all__ = ["Representatives", "select_representatives", "extract_features", "pick_representatives",
           "softmax_entropy"]

_logger = logging.getLogger(__name__)


@dataclass
class Representatives:
    """Clusters and their representatives over a training set of N images (M clusters in all).

    Attributes:
        labels: (N,) int64 class of every image, in dataset order.
        cluster_ids: (N,) int64 cluster of every image; clusters never span two classes.
        entropy: (N,) float32 softmax entropy of the baseline's prediction for every image.
        rep_indices: (M,) int64 dataset index of each cluster's representative.
        cluster_labels: (M,) int64 class of each cluster.
        images: (M, C, H, W) float32 the representative images as the model sees them (normalised).
    """
    labels: torch.Tensor
    cluster_ids: torch.Tensor
    entropy: torch.Tensor
    rep_indices: torch.Tensor
    cluster_labels: torch.Tensor
    images: torch.Tensor

    @property
    def num_clusters(self) -> int:
        return int(self.rep_indices.numel())

    @property
    def target_indices(self) -> torch.Tensor:
        """(N,) dataset index of every image's representative."""
        return self.rep_indices[self.cluster_ids]

    def save(self, path: Union[str, Path]) -> None:
        """Write to a safetensors file (atomically, its mode following the umask)."""
        tensors = {k: getattr(self, k) for k in self.__dataclass_fields__}
        save_tensors(path, tensors, metadata={"format": "encodenet_timm.Representatives",
                                              "num_clusters": json.dumps(self.num_clusters)})

    def check_covers(self, dataset: Dataset) -> None:
        """Raise ValueError unless these representatives index exactly `dataset` (one cluster id per image)."""
        if self.cluster_ids.numel() != len(dataset):
            raise ValueError(f"representatives cover {self.cluster_ids.numel()} images but the training set "
                             f"has {len(dataset)}; select them on this training set")

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Representatives":
        """Read a file written by `save` (safetensors: no code is unpickled)."""
        tensors = load_file(str(path))
        missing = set(cls.__dataclass_fields__) - set(tensors)
        if missing:
            raise ValueError(f"{path} is not a Representatives file: missing {sorted(missing)}")
        return cls(**{k: tensors[k] for k in cls.__dataclass_fields__})


def select_representatives(model: nn.Module, loader: DataLoader, cfg: RepresentativesConfig,
                           device: torch.device, *, num_classes: int, seed: int,
                           check: Optional[BatchCheck] = None, channels_last: bool = False,
                           progress: bool = False, amp: str = "none") -> Tuple[Representatives, np.ndarray]:
    """Representatives of ``loader.dataset`` under `model` (eval mode, dataset order).

    Args:
        loader: its dataset, workers and collate_fn are used (not its order or batch size).
        cfg: k per class, k-means settings, the rule, the feature store.
        seed: the k-means seed.
        amp: the feature pass's autocast (`training.autocast_dtype`); features are stored in float32.

    Returns:
        The `Representatives` (images read through `loader`'s collate_fn) and k per class (num_classes,).
    """
    dataset = loader.dataset
    _warn_if_random_transform(dataset)
    ordered = make_loader(dataset, loader, shuffle=False, seed=seed, batch_size=cfg.batch_size)
    store = _open_store(cfg, len(dataset), _pre_logits_dim(model, loader, device, check))
    gather_rows = store is None or (store.path is None and distributed.is_distributed())  # RAM store: rank 0 only
    blocks: List[Tuple[int, np.ndarray]] = []
    try:
        rows = extract_features(model, ordered, device,
                                (lambda i, f: blocks.append((i, f))) if gather_rows else store.write,
                                check=check, channels_last=channels_last, progress=progress, amp=amp)
        if gather_rows:
            for rank_blocks in distributed.gather_objects(blocks) or []:
                for i, f in rank_blocks:
                    store.write(i, f)
        elif store.path is not None:
            store.flush()
        distributed.barrier()  # every rank's rows are in the store
        gathered = distributed.gather_objects(rows)
        picked = _cluster_and_pick(store, gathered, cfg, num_classes, seed, progress) if distributed.is_main() else None
    finally:
        if store is not None:
            store.close()
        distributed.barrier()
        if store is not None and store.path is not None and distributed.is_main():
            shutil.rmtree(store.path, ignore_errors=True)
    labels, cluster_ids, entropy, rep_indices, cluster_labels, k_per_class = distributed.broadcast_object(picked)
    # read through the loader's collate_fn, so the targets are exactly what the model is fed
    rep_loader = make_loader(Subset(dataset, rep_indices.tolist()), loader, shuffle=False, seed=seed,
                             batch_size=cfg.batch_size)
    images = torch.cat([x for x, _ in rep_loader]).float().contiguous()  # (M, C, H, W)
    reps = Representatives(labels=torch.from_numpy(labels), cluster_ids=torch.from_numpy(cluster_ids),
                           entropy=torch.from_numpy(entropy), rep_indices=torch.from_numpy(rep_indices),
                           cluster_labels=torch.from_numpy(cluster_labels), images=images)
    return reps, k_per_class


def _pre_logits_dim(model: nn.Module, loader: DataLoader, device: torch.device,
                    check: Optional[BatchCheck] = None) -> int:
    """D of ``forward_head(..., pre_logits=True)``, from one image of `loader`'s dataset (checked first)."""
    x, y = first_sample(loader)
    if check is not None:
        check(x, y)
    with eval_mode(model), torch.no_grad():
        z = model.forward_features(x.to(device))
        return int(model.forward_head(z, pre_logits=True).flatten(1).shape[1])


def _open_store(cfg: RepresentativesConfig, num_rows: int, dim: int) -> Optional[FeatureStore]:
    """A new (num_rows, dim) store: in RAM (rank 0 only: the other ranks send it their rows), or on disk
    in a directory of its own inside ``cfg.feature_store`` (created by rank 0, opened by the others)."""
    if cfg.feature_store is None:
        return FeatureStore(num_rows, dim) if distributed.is_main() else None
    path = Path(cfg.feature_store) / distributed.broadcast_object(f"encodenet-features-{os.getpid()}")
    store = FeatureStore(num_rows, dim, path=path, dtype=cfg.store_dtype) if distributed.is_main() else None
    distributed.barrier()
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


@torch.no_grad()
def extract_features(model: nn.Module, loader: DataLoader, device: torch.device,
                     write: Callable[[int, np.ndarray], None], *, check: Optional[BatchCheck] = None,
                     channels_last: bool = False, progress: bool = False,
                     amp: str = "none") -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Eval-mode feature pass that streams pre-logits features out instead of holding them, under `amp`'s
    autocast (features and entropies are computed from float32 copies of the outputs).

    `loader` must iterate the dataset in order, unshuffled (`make_loader(..., shuffle=False)`). In a
    process group each rank runs its share of the batches (`loaders.shard_batches`); the features of
    the batch starting at dataset index i go to ``write(i, feats (B, D) float32)``.

    Returns:
        this rank's rows: dataset indices (n,) int64, softmax entropy (n,) float32, labels (n,) int64.
    """
    loader = shard_batches(loader)
    starts = batch_starts(loader)
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    indices, entropy, labels = [], [], []
    start = 0
    with eval_mode(model):
        bar = tqdm(loader, desc="features", leave=False,
                   disable=(not progress or not distributed.is_main()) or None)  # None: a terminal only
        for b, (x, y) in enumerate(bar):
            if check is not None:
                check(x, y)
            if starts is not None:
                start = starts[b]
            with autocast(device, amp):
                z = model.forward_features(x.to(device, memory_format=memory_format))
                feats, logits = model.forward_head(z, pre_logits=True), model.forward_head(z)
            write(start, feats.flatten(1).float().cpu().numpy())
            entropy.append(softmax_entropy(logits.float()).cpu().numpy())
            labels.append(y.long().cpu().numpy())
            indices.append(np.arange(start, start + len(y), dtype=np.int64))
            start += len(y)
    if not indices:  # a rank with no batch (more ranks than batches)
        return np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64)
    return np.concatenate(indices), np.concatenate(entropy).astype(np.float32), np.concatenate(labels)


def pick_representatives(cluster_ids: torch.Tensor, entropy: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """Index of the lowest-scoring member of every cluster (ties: the lowest index).

    Args:
        cluster_ids: (N,) int64 cluster of each sample, in [0, num_clusters).
        entropy: (N,) float score of each sample: softmax entropy (the paper's rule), or
            `centroid_distance` (the member nearest the cluster mean).

    Returns:
        (num_clusters,) int64 sample indices.

    Raises:
        ValueError: a cluster has no member.
    """
    n = cluster_ids.numel()
    # sort by entropy, stable so that equal entropies keep index order; the first hit per cluster wins
    order = torch.sort(entropy.double(), stable=True).indices
    first = torch.full((num_clusters,), n, dtype=torch.int64)
    rank = torch.empty(n, dtype=torch.int64)
    rank[order] = torch.arange(n)
    first.scatter_reduce_(0, cluster_ids.long(), rank, reduce="amin")
    if (first == n).any():
        raise ValueError(f"clusters {torch.nonzero(first == n).flatten().tolist()} have no member")
    return order[first]


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of softmax(logits): (N, K) -> (N,) float32."""
    logp = torch.log_softmax(logits.float(), dim=1)
    return -(logp.exp() * logp).sum(1)
