"""torch.distributed glue: rank and world size, sharded loaders, reductions, broadcasts.

Every function is a no-op (or the identity) when no process group is initialised, so the
single-process code path is the same code. Under ``torchrun`` the caller initialises the group
(``torch.distributed.init_process_group``) before building the wrapper; see the README's "Scaling".
"""
import os
from typing import Any, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler, Sampler

__all__ = ["is_distributed", "rank", "world_size", "is_main", "barrier", "local_device", "train_loader",
           "shard_batches", "batch_starts", "all_reduce_sum", "broadcast_object", "gather_objects"]


def is_distributed() -> bool:
    """True inside an initialised process group (any world size, 1 included)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0, or the only process: the one that writes files and logs."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def local_device(name: str) -> str:
    """The device name a rank should use: "auto"/"cuda" -> ``cuda:$LOCAL_RANK`` under torchrun with CUDA."""
    if is_distributed() and name in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return name


def train_loader(loader: DataLoader, seed: int) -> DataLoader:
    """The loader a training stage iterates: `loader` itself in one process; in a process group, the
    same dataset, batch size (per rank) and workers with a `DistributedSampler` (shuffled like `loader`,
    by `seed` and the epoch). A loader that already has a DistributedSampler is used as it is.

    The ranks' shards of one epoch are disjoint and cover the (padded) dataset; with ``N`` divisible
    by ``world_size x batch_size``, step s of all ranks together sees the samples that step s of a
    1-process group with ``world_size x batch_size`` sees.
    """
    if not is_distributed() or isinstance(loader.sampler, DistributedSampler):
        return loader
    if loader.batch_size is None:
        raise ValueError("under torch.distributed the training loader needs a batch_size (not a custom "
                         "batch_sampler); or give it a DistributedSampler yourself")
    sampler = DistributedSampler(loader.dataset, num_replicas=world_size(), rank=rank(),
                                 shuffle=isinstance(loader.sampler, RandomSampler), seed=seed,
                                 drop_last=loader.drop_last)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                      pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                      persistent_workers=loader.persistent_workers and loader.num_workers > 0)


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Tell a DistributedSampler which epoch starts (it shuffles by seed + epoch)."""
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)


class _Batches(Sampler):
    """A fixed list of index batches."""

    def __init__(self, batches: Sequence[List[int]]):
        self.batches = [list(b) for b in batches]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def shard_batches(loader: DataLoader) -> DataLoader:
    """For evaluation passes: this rank's share of `loader`'s batches, batches kept whole.

    Batch b goes to rank ``b % world_size``, so every image is seen exactly once (no padding) and in
    the batch it would be in one process: per-image eval-mode outputs match a single-process pass.
    In one process, `loader` itself.
    """
    if not is_distributed():
        return loader
    batches = list(loader.batch_sampler if loader.batch_sampler is not None
                   else BatchSampler(loader.sampler, loader.batch_size or 1, loader.drop_last))
    return DataLoader(loader.dataset, batch_sampler=_Batches(batches[rank()::world_size()]),
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory)


def batch_starts(loader: DataLoader) -> Optional[List[int]]:
    """First dataset index of each batch of a `shard_batches` loader, in order; None for other loaders."""
    sampler = loader.batch_sampler
    if isinstance(sampler, _Batches):
        return [b[0] for b in sampler.batches]
    return None


def all_reduce_sum(values: Sequence[float], device: torch.device) -> List[float]:
    """Sum of `values` over all ranks (float64); `values` itself in one process. NaN/inf propagate."""
    if not is_distributed():
        return [float(v) for v in values]
    t = torch.tensor(list(values), dtype=torch.float64,
                     device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.cpu().tolist()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` of rank `src` on every rank (pickled between the job's own processes, never from a file)."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any, dst: int = 0) -> Optional[List[Any]]:
    """Every rank's `obj`, in rank order, on rank `dst` (None elsewhere); ``[obj]`` in one process."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size() if rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out
