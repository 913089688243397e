"""Every DataLoader the package builds: seeded re-orderings of a dataset, and the shards a rank reads.

A stage never iterates a loader the caller passed in a different order than the caller asked for, except
where it needs dataset order (the feature pass) or a rank's share (torchrun); these are built here.
The others keep the caller's loader but for one change each: a full last batch (`full_last_batch`), reads
that name their file (`named_reads`), unreadable files left out (`without`, `readable`).
"""
import logging
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import (BatchSampler, DataLoader, Dataset, DistributedSampler, IterableDataset, RandomSampler,
                              Sampler, SequentialSampler, Subset)

from . import distributed
from .checks import check_data, check_loader, check_plain_loader, check_run_options
from .config import EncodeNetConfig
from .file_checks import NamedReads, check_files, dataset_files

__all__ = ["make_loader", "seeded_loader", "reseed_loader", "train_loader", "set_epoch", "epoch_batches", "shard_batches",
           "batch_starts", "rebuild", "full_last_batch", "named_reads", "without", "readable"]

_logger = logging.getLogger(__name__)


def make_loader(dataset: Dataset, like: DataLoader, *, shuffle: bool, seed: int,
                batch_size: Optional[int] = None, drop_last: bool = False) -> DataLoader:
    """A DataLoader over `dataset` with the worker settings of `like` and a seeded shuffle."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size or like.batch_size or 1, shuffle=shuffle,
                      num_workers=like.num_workers, collate_fn=like.collate_fn, pin_memory=like.pin_memory,
                      drop_last=drop_last, generator=generator,
                      persistent_workers=like.persistent_workers and like.num_workers > 0)


def seeded_loader(dataset: Optional[Dataset], *, batch_size: int, shuffle: bool = False, seed: int = 0,
                  workers: int = 0, pin_memory: bool = False) -> Optional[DataLoader]:
    """A DataLoader over `dataset` (None for None), shuffled by a generator seeded with `seed` when `shuffle`."""
    if dataset is None:
        return None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                      pin_memory=pin_memory, generator=torch.Generator().manual_seed(seed) if shuffle else None)


def reseed_loader(loader: DataLoader, seed: int) -> None:
    """Re-seed the torch.Generators the loader shuffles with (its own and its sampler's), in place.

    A loader without one draws its order from the global torch RNG, which `seed_everything` covers.
    """
    sampler = getattr(loader.batch_sampler, "sampler", None)
    found = {id(g): g for g in (loader.generator, getattr(loader.sampler, "generator", None),
                                getattr(sampler, "generator", None)) if isinstance(g, torch.Generator)}
    for g in found.values():
        g.manual_seed(seed)


def train_loader(loader: DataLoader, seed: int) -> DataLoader:
    """The loader a training stage iterates: `loader` itself in one process; in a process group, the
    same dataset, batch size (per rank) and workers with a `DistributedSampler` (shuffled like `loader`,
    by `seed` and the epoch). A loader that already has a DistributedSampler is used as it is.

    The ranks' shards of one epoch are disjoint and cover the (padded) dataset; with ``N`` divisible
    by ``world_size x batch_size``, step s of all ranks together sees the samples that step s of a
    1-process group with ``world_size x batch_size`` sees.
    """
    if not distributed.is_distributed() or isinstance(loader.sampler, DistributedSampler):
        return loader
    if loader.batch_size is None:
        raise ValueError("under torch.distributed the training loader needs a batch_size (not a custom "
                         "batch_sampler); or give it a DistributedSampler yourself")
    sampler = DistributedSampler(loader.dataset, num_replicas=distributed.world_size(), rank=distributed.rank(),
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


class _SkipFirst(Sampler):
    """`inner` (a batch sampler, or a sampler) with its first `skip` items passed over: only indices are
    drawn for them, no image is read. The skip happens at `advance`, or at the first item asked for."""

    def __init__(self, inner: Sampler, skip: int):
        self.inner, self.skip = inner, skip
        self._it: Optional[Iterator] = None
        self._left = 0

    def __iter__(self):
        self._it, self._left = iter(self.inner), self.skip  # lazy, like the sampler it wraps: no draw yet
        return self

    def advance(self) -> None:
        while self._left:
            self._left -= 1
            next(self._it)

    def __next__(self):
        self.advance()
        return next(self._it)

    def __len__(self) -> int:
        return len(self.inner) - self.skip


def epoch_batches(loader: DataLoader, skip: int = 0) -> Iterator:
    """An iterator over one epoch of `loader` that starts at batch `skip` (a resume inside an epoch).

    ``skip=0``: ``iter(loader)``. Otherwise a DataLoader with `loader`'s settings whose sampler draws
    this epoch's order exactly as ``iter(loader)`` would (the same generators, in the same order: the
    loader's base seed, then the sampler's shuffle) and passes over the first `skip` batches' indices
    without reading them. With worker processes, random augmentation inside the workers does not
    continue where the interrupted epoch left it.
    """
    if skip == 0:
        return iter(loader)
    if isinstance(loader.dataset, IterableDataset):
        raise ValueError("a resume inside an epoch needs a map-style dataset (an IterableDataset has no sampler "
                         "to skip batches in)")
    batched = loader.batch_sampler is not None
    skipper = _SkipFirst(loader.batch_sampler if batched else loader.sampler, skip)
    workers = loader.num_workers
    rest = DataLoader(loader.dataset, **({"batch_sampler": skipper} if batched else {"sampler": skipper,
                                                                                     "batch_size": None}),
                      num_workers=workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                      timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                      multiprocessing_context=loader.multiprocessing_context if workers else None,
                      generator=loader.generator, prefetch_factor=loader.prefetch_factor if workers else None)
    batches = iter(rest)  # draws the base seed from loader.generator, as iter(loader) does
    skipper.advance()     # then the sampler's order, before any batch is read
    return batches


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
    if not distributed.is_distributed():
        return loader
    batches = list(loader.batch_sampler if loader.batch_sampler is not None
                   else BatchSampler(loader.sampler, loader.batch_size or 1, loader.drop_last))
    return DataLoader(loader.dataset, batch_sampler=_Batches(batches[distributed.rank()::distributed.world_size()]),
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory)


def batch_starts(loader: DataLoader) -> Optional[List[int]]:
    """First dataset index of each batch of a `shard_batches` loader, in order; None for other loaders."""
    sampler = loader.batch_sampler
    if isinstance(sampler, _Batches):
        return [b[0] for b in sampler.batches]
    return None


def rebuild(loader: DataLoader, dataset: Optional[Dataset] = None, *, drop_last: Optional[bool] = None) -> DataLoader:
    """`loader` over `dataset` and/or with `drop_last`, everything else kept: its sampler (so its order
    and seeded generator), batch size, workers and collate_fn.

    A `dataset` of another length gets a fresh sampler of the same kind: sequential, or random drawing
    from the same generator.

    Raises:
        ValueError: `dataset` has another length and `loader` has a custom sampler or batch_sampler.
    """
    dataset = loader.dataset if dataset is None else dataset
    drop_last = loader.drop_last if drop_last is None else drop_last
    kwargs = dict(num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                  timeout=loader.timeout, worker_init_fn=loader.worker_init_fn, generator=loader.generator,
                  multiprocessing_context=loader.multiprocessing_context, prefetch_factor=loader.prefetch_factor,
                  persistent_workers=loader.persistent_workers and loader.num_workers > 0)
    sampler = loader.sampler
    if len(dataset) != len(loader.dataset):
        if type(sampler) is SequentialSampler and loader.batch_size is not None:
            sampler = SequentialSampler(dataset)
        elif (type(sampler) is RandomSampler and loader.batch_size is not None and not sampler.replacement
              and sampler.num_samples == len(loader.dataset)):
            sampler = RandomSampler(dataset, generator=sampler.generator)
        else:
            raise ValueError(f"cannot leave samples out of a loader with a sampler of its own "
                             f"({type(sampler).__name__}, {type(loader.batch_sampler).__name__}); remove the "
                             f"unreadable files from the dataset instead")
    if loader.batch_size is None:  # a custom batch_sampler: its batches stay its own
        return DataLoader(dataset, batch_sampler=loader.batch_sampler, **kwargs)
    return DataLoader(dataset, batch_size=loader.batch_size, sampler=sampler, drop_last=drop_last, **kwargs)


def full_last_batch(loader: DataLoader) -> DataLoader:
    """The loader a training stage iterates: `loader`, or, when the last batch of an epoch would hold a
    single image, `loader` with ``drop_last=True``.

    A training batch of one breaks BatchNorm wherever the features are 1x1 (the last stage of most CNNs
    at CIFAR size: "Expected more than 1 value per channel when training"). Dropping that image, rather
    than padding the batch with images drawn twice, keeps the sampler, its seeded order and every
    other batch, so resume and the compute count are unchanged but for one image per epoch: a
    shuffled loader leaves out a different image each epoch, an unshuffled one its last image. The
    count is per rank (``len(loader.sampler)``, a DistributedSampler's share). A loader with
    ``drop_last`` already set, a batch size of 1 or a custom batch_sampler is returned as it is.
    """
    size = loader.batch_size
    if size is None or size < 2 or loader.drop_last:
        return loader
    try:
        n = len(loader.sampler)
    except TypeError:  # an IterableDataset's sampler has no length
        return loader
    if n % size != 1:
        return loader
    _logger.info("the last batch of each epoch would hold 1 image (%d images, batch_size=%d), which BatchNorm "
                 "cannot train on: it is left out (drop_last=True)", n, size)
    return rebuild(loader, drop_last=True)


def named_reads(loader: Optional[DataLoader]) -> Optional[DataLoader]:
    """`loader` whose dataset's read failures raise `DataError` naming the index and file
    (`file_checks.NamedReads`), when the dataset lists its image files; otherwise (or None) as it is."""
    if loader is None or isinstance(loader.dataset, NamedReads):
        return loader
    files = dataset_files(loader.dataset)
    if files is None:
        return loader
    return rebuild(loader, NamedReads(loader.dataset, files))


def without(loader: DataLoader, drop: Sequence[int]) -> DataLoader:
    """`loader` over its dataset less the indices `drop` (the rest in their order), sampled as before."""
    drop = set(drop)
    keep = [i for i in range(len(loader.dataset)) if i not in drop]
    dataset = loader.dataset
    if isinstance(dataset, NamedReads):  # still named by the index in the caller's dataset
        return rebuild(loader, NamedReads(dataset.dataset, dataset.files, [dataset.indices[i] for i in keep]))
    return rebuild(loader, Subset(dataset, keep))


def readable(train: DataLoader, val: Optional[DataLoader], plain: Optional[DataLoader], *, scan: str = "verify",
             skip: bool = False) -> Tuple[DataLoader, Optional[DataLoader], Optional[DataLoader], Dict[str, int]]:
    """The loaders `fit` reads, after scanning their image files (`file_checks.check_files`), and how many
    files were left out of train and val ({} when none).

    Each read failure names its file (`named_reads`). Unreadable files raise `DataError`, or with
    `skip` are left out (of `plain` as of `train`, so the two stay index-aligned; `plain` is scanned
    only when it lists other files than `train`). Loaders this returned are not scanned again.
    """
    train, val, plain = named_reads(train), named_reads(val), named_reads(plain)
    drop = check_files(train, "train_loader", scan=scan, skip=skip)
    if plain is not None and dataset_files(plain.dataset) != dataset_files(train.dataset):
        drop = sorted(set(drop) | set(check_files(plain, "plain_loader", scan=scan, skip=skip)))
    drop_val = check_files(val, "val_loader", scan=scan, skip=skip)
    if drop:
        train, plain = without(train, drop), plain if plain is None else without(plain, drop)
    if drop_val:
        val = without(val, drop_val)
    for loader in (train, val, plain):  # a later call (each row of compare) does not scan them again
        if loader is not None and isinstance(loader.dataset, NamedReads) and scan != "none":
            loader.dataset.scanned = scan
    return train, val, plain, ({"train": len(drop), "val": len(drop_val)} if drop or drop_val else {})


def fit_inputs(train: DataLoader, val: Optional[DataLoader], plain: Optional[DataLoader], *,
               config: EncodeNetConfig, model: torch.nn.Module, device: torch.device, in_chans: int,
               run_dir: Optional[Union[str, Path]], resume: bool, checkpoint_every: int
               ) -> Tuple[DataLoader, Optional[DataLoader], Optional[DataLoader], Dict[str, int]]:
    """`fit`'s loaders and run options checked before any stage, and its loaders made `readable` (image files
    scanned as ``config.data`` says): (train, val, plain, files left out). Raises as `EncodeNetWrapper.fit` says."""
    check_loader(train, "train_loader", map_style=True)
    check_plain_loader(plain, train)
    check_run_options(run_dir, resume, checkpoint_every)
    train, val, plain, skipped = readable(train, val, plain, scan=config.data.scan, skip=config.data.skip_unreadable)
    check_data(train, model, device, in_chans=in_chans, clusters_per_class=config.representatives.clusters_per_class,
               input_size=config.input_size)
    return train, val, plain, skipped
