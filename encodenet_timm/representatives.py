"""Softmax entropy and the representative of each cluster: pure tensor functions and their result type."""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import torch
from safetensors.torch import load_file, save_file

__all__ = ["softmax_entropy", "centroid_distance", "pick_representatives", "Representatives"]


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of softmax(logits): (N, K) -> (N,) float32."""
    logp = torch.log_softmax(logits.float(), dim=1)
    return -(logp.exp() * logp).sum(1)


def centroid_distance(features: torch.Tensor, cluster_ids: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """Squared Euclidean distance of every sample to the mean of its cluster: (N, D), (N,) -> (N,) float64.

    With it as the score, `pick_representatives` returns each cluster's member nearest its centroid.
    """
    x = features.double().flatten(1)
    ids = cluster_ids.long()
    sums = torch.zeros(num_clusters, x.shape[1], dtype=x.dtype).index_add_(0, ids, x)
    counts = torch.bincount(ids, minlength=num_clusters).clamp_min(1).to(x.dtype)
    return (x - (sums / counts[:, None])[ids]).square().sum(1)


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
        """Write to a safetensors file."""
        tensors = {k: getattr(self, k).contiguous().cpu() for k in self.__dataclass_fields__}
        save_file(tensors, str(path), metadata={"format": "encodenet_timm.Representatives",
                                                "num_clusters": json.dumps(self.num_clusters)})

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Representatives":
        """Read a file written by `save` (safetensors: no code is unpickled)."""
        tensors = load_file(str(path))
        missing = set(cls.__dataclass_fields__) - set(tensors)
        if missing:
            raise ValueError(f"{path} is not a Representatives file: missing {sorted(missing)}")
        return cls(**{k: tensors[k] for k in cls.__dataclass_fields__})
