"""The one training loop, evaluation and the feature pass; knows timm tasks, not EncodeNet stages.

Step order: to device -> autocast -> forward -> loss -> finite check -> backward -> clip -> step
-> schedule. Optimizers and schedules come from timm (`create_optimizer_v2`, `create_scheduler_v2`).
"""
import logging
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, TensorDataset
from tqdm.auto import tqdm

from . import distributed as dist_utils
from .clustering import check_class_counts
from .config import StageConfig
from .errors import NonFiniteLossError
from .representatives import softmax_entropy

__all__ = ["seed_everything", "epoch_seed", "resolve_device", "check_loader", "make_loader", "dataset_targets",
           "check_batch", "check_data", "TrainState", "train_stage", "evaluate", "extract_features"]

_logger = logging.getLogger(__name__)

BatchCheck = Callable[[torch.Tensor, torch.Tensor], None]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """A seed fixed by (seed, epoch) alone: a resumed epoch draws what the uninterrupted run drew."""
    return int(np.random.SeedSequence([seed % 2 ** 64, epoch]).generate_state(1, np.uint64)[0] % 2 ** 63)


def _reseed_loader(loader: DataLoader, seed: int) -> None:
    """Re-seed the torch.Generators the loader shuffles with (its own and its sampler's), in place.

    A loader without one draws its order from the global torch RNG, which `seed_everything` covers.
    """
    sampler = getattr(loader.batch_sampler, "sampler", None)
    found = {id(g): g for g in (loader.generator, getattr(loader.sampler, "generator", None),
                                getattr(sampler, "generator", None)) if isinstance(g, torch.Generator)}
    for g in found.values():
        g.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """"auto" -> CUDA when available, else CPU; anything else is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available; use device='auto' or 'cpu'")
    return device


def check_loader(loader: DataLoader, what: str = "loader", map_style: bool = False) -> DataLoader:
    """Raise a clear error for a non-DataLoader, an empty one, or (if `map_style`) an IterableDataset."""
    if not isinstance(loader, DataLoader):
        raise TypeError(f"{what} must be a torch.utils.data.DataLoader yielding (images, labels), "
                        f"got {type(loader).__name__}")
    if map_style and isinstance(loader.dataset, IterableDataset):
        raise TypeError(f"{what}: EncodeNet needs a map-style dataset (index -> (image, label)) to pair each "
                        f"image with its representative; {type(loader.dataset).__name__} is an IterableDataset")
    try:
        empty = len(loader) == 0
    except TypeError:  # an IterableDataset without __len__
        empty = False
    if empty:
        raise ValueError(f"{what} is empty: its dataset has no samples")
    return loader


def make_loader(dataset: Dataset, like: DataLoader, *, shuffle: bool, seed: int,
                batch_size: Optional[int] = None, drop_last: bool = False) -> DataLoader:
    """A DataLoader over `dataset` with the worker settings of `like` and a seeded shuffle."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size or like.batch_size or 1, shuffle=shuffle,
                      num_workers=like.num_workers, collate_fn=like.collate_fn, pin_memory=like.pin_memory,
                      drop_last=drop_last, generator=generator,
                      persistent_workers=like.persistent_workers and like.num_workers > 0)


def dataset_targets(dataset: Dataset) -> Optional[np.ndarray]:
    """The (N,) int64 labels of a map-style dataset without reading its images, when it exposes them.

    Read from ``.targets`` (torchvision ImageFolder, CIFAR, MNIST), the label tensor of a two-tensor
    `TensorDataset`, or through a `Subset`'s indices; None otherwise.
    """
    if isinstance(dataset, Subset):
        inner = dataset_targets(dataset.dataset)
        return None if inner is None else inner[np.asarray(dataset.indices, dtype=np.int64)]
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        labels = dataset.tensors[1]
    else:
        labels = getattr(dataset, "targets", None)
    if labels is None:
        return None
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        return None
    return labels.astype(np.int64)


def check_batch(x: torch.Tensor, y: torch.Tensor, *, num_classes: int, in_chans: int,
                image_size: Optional[Tuple[int, int]] = None) -> None:
    """Raise ValueError for a batch the model cannot train on: wrong shape, labels out of range, NaN/inf."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ValueError(f"images must be a (B, C, H, W) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.shape[1] != in_chans:
        raise ValueError(f"images have {x.shape[1]} channels but the model takes {in_chans} "
                         f"(timm.create_model(..., in_chans={x.shape[1]}) or convert the images)")
    if image_size is not None and tuple(x.shape[2:]) != tuple(image_size):
        raise ValueError(f"images are {tuple(x.shape[2:])} but the decoder was built for {tuple(image_size)}; "
                         f"resize the images or set config.input_size before the autoencoder stage")
    if not torch.isfinite(x).all():
        raise ValueError("images contain NaN or inf values; check the dataset and its transforms")
    if not isinstance(y, torch.Tensor) or y.ndim != 1 or y.dtype.is_floating_point:
        raise ValueError(f"labels must be a (B,) integer tensor of class indices, got "
                         f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}) (the model's num_classes), found "
                         f"{int(y.min())}..{int(y.max())}")


def check_data(loader: DataLoader, model: nn.Module, device: torch.device, *, in_chans: int,
               clusters_per_class: Union[int, str]) -> None:
    """Raise ValueError, before any training, for data `model` cannot be trained on with EncodeNet.

    Checks the dataset's class names (``.classes``) against ``model.num_classes``; its labels, when
    `dataset_targets` can read them, with `check_class_counts`; and the first sample (through the
    loader's collate_fn) with `check_batch` and one eval-mode forward of the model.
    """
    dataset, num_classes = loader.dataset, model.num_classes
    root = dataset
    while isinstance(root, Subset):
        root = root.dataset
    classes = getattr(root, "classes", None)
    if classes is not None and len(classes) != num_classes:
        raise ValueError(f"the dataset has {len(classes)} classes but the model has num_classes={num_classes}; "
                         f"create it with timm.create_model(name, num_classes={len(classes)})")
    targets = dataset_targets(dataset)
    if targets is not None:
        check_class_counts(targets, num_classes, clusters_per_class)
    x, y = next(iter(DataLoader(Subset(dataset, [0]), batch_size=1, collate_fn=loader.collate_fn)))
    check_batch(x, y, num_classes=num_classes, in_chans=in_chans)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x.to(device))
    except Exception as e:  # whatever the model raises for a size it cannot take
        raise ValueError(f"the model cannot take images of size {tuple(x.shape[1:])} ({type(e).__name__}: {e}); "
                         f"resize the images to the size the model was built for") from e
    finally:
        model.train(was_training)


def _autocast(device: torch.device, amp: str):
    if amp == "auto":  # bf16 where the GPU supports it, else none; CPU: none
        amp = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "none"
    if amp == "none" or device.type != "cuda":
        return nullcontext()
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if amp not in dtypes:
        raise ValueError(f"amp must be 'none', 'auto', 'bf16' or 'fp16', got {amp!r}")
    return torch.autocast(device_type="cuda", dtype=dtypes[amp])


@dataclass
class TrainState:
    """Where a stage stands after `epoch` complete epochs: what `train_stage` needs to go on exactly.

    Attributes:
        epoch: epochs complete; training goes on with epoch index `epoch`.
        num_updates: optimizer steps taken so far (drives the per-update schedule).
        history: the per-epoch records so far.
        optimizer, scheduler, scaler: their ``state_dict()`` (scheduler/scaler None when unused).
    """
    epoch: int
    num_updates: int
    history: List[Dict[str, float]]
    optimizer: Dict[str, Any]
    scheduler: Optional[Dict[str, Any]] = None
    scaler: Optional[Dict[str, Any]] = None


def train_stage(task: nn.Module, loader: DataLoader, cfg: StageConfig, *, stage: str, device: torch.device,
                amp: str = "none", channels_last: bool = False, progress: bool = True,
                target_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
                check: Optional[BatchCheck] = None,
                val_fn: Optional[Callable[[], Dict[str, float]]] = None,
                seed: Optional[int] = None, resume: Optional[TrainState] = None,
                on_epoch_end: Optional[Callable[[TrainState], None]] = None,
                compile: bool = False) -> List[Dict[str, float]]:
    """Train ``task.get_trainable_module()`` for ``cfg.epochs`` epochs; the loss is ``task(x, y)["loss"]``.

    Inside a torch.distributed process group (torchrun) the task is wrapped in DDP with its own
    ``prepare_distributed`` and `loader` is re-sampled with a `DistributedSampler`
    (`distributed.train_loader`): `loader`'s batch size is per rank. Losses and accuracies in the
    history are over all ranks; every rank raises together on a non-finite loss.

    Args:
        task: a timm `TrainingTask`.
        loader: yields (x (B, C, H, W), y (B,)) batches; `target_fn(y, x)` may map y to the task's target.
        check: called on every raw batch before compute (bad input -> ValueError).
        val_fn: called after each epoch; its metrics are added to the epoch record with a ``val_`` prefix.
        seed: when given, every epoch starts by re-seeding the global RNGs and the loader's shuffle
            generators from ``epoch_seed(seed, epoch)``, so an epoch's randomness does not depend on
            the epochs before it (exact resume).
        resume: continue after ``resume.epoch`` epochs; the module must already hold that epoch's weights.
        on_epoch_end: called with the `TrainState` after every epoch (to write a checkpoint).
        compile: ``task.compile()`` (torch.compile of the trainable module) before training.

    Returns:
        One dict per epoch: epoch, loss, accuracy (classification outputs only), lr, seconds, val_*.

    Raises:
        NonFiniteLossError: the loss became NaN/inf; the weights are those of the last finite step.
    """
    if cfg.epochs < 0:
        raise ValueError(f"{stage}: epochs must be >= 0, got {cfg.epochs}")
    if cfg.epochs == 0:  # the stage is skipped (timm's schedulers need at least one epoch)
        return []
    if not any(p.requires_grad for p in task.get_trainable_module().parameters()):
        raise ValueError(f"{stage}: nothing to train (every parameter is frozen)")
    if compile:
        task.compile()
    distributed = dist_utils.is_distributed()
    if distributed:
        loader = dist_utils.train_loader(loader, seed if seed is not None else 0)
        task.prepare_distributed(device_ids=[device.index] if device.type == "cuda" else None)
    try:
        return _train_epochs(task, loader, cfg, stage=stage, device=device, amp=amp, channels_last=channels_last,
                             progress=progress and dist_utils.is_main(), target_fn=target_fn, check=check,
                             val_fn=val_fn, seed=seed, resume=resume, on_epoch_end=on_epoch_end)
    finally:
        if distributed:  # drop the DDP wrapper: a later stage wraps the same modules anew
            task.trainable_module = task.trainable_module.module


def _train_epochs(task, loader, cfg, *, stage, device, amp, channels_last, progress, target_fn, check, val_fn,
                  seed, resume, on_epoch_end) -> List[Dict[str, float]]:
    module = task.get_trainable_module()
    distributed, world = dist_utils.is_distributed(), dist_utils.world_size()
    optimizer = create_optimizer_v2(module, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                    momentum=cfg.momentum)
    steps_per_epoch = len(loader)
    scheduler = None
    if cfg.sched != "none":
        scheduler, _ = create_scheduler_v2(optimizer, sched=cfg.sched, num_epochs=cfg.epochs,
                                           warmup_epochs=cfg.warmup_epochs, step_on_epochs=False,
                                           updates_per_epoch=steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" and device.type == "cuda" else None
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    history: List[Dict[str, float]] = []
    num_updates = 0
    if resume is not None:
        optimizer.load_state_dict(resume.optimizer)
        if scheduler is not None and resume.scheduler is not None:
            scheduler.load_state_dict(resume.scheduler)
        if scaler is not None and resume.scaler is not None:
            scaler.load_state_dict(resume.scaler)
        history, num_updates = [dict(r) for r in resume.history], resume.num_updates
        _logger.info("%s: resuming after epoch %d/%d (%d updates)", stage, resume.epoch, cfg.epochs, num_updates)
    for epoch in range(resume.epoch if resume is not None else 0, cfg.epochs):
        if seed is not None:
            seed_everything(epoch_seed(seed, epoch))
            _reseed_loader(loader, epoch_seed(seed, epoch))
        dist_utils.set_epoch(loader, epoch)
        task.train()
        start = time.perf_counter()
        loss_sum, correct, seen, classifies = 0.0, 0, 0, False
        bar = tqdm(loader, desc=f"{stage} {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False)
        for step, (x, y) in enumerate(bar):
            if check is not None:
                check(x, y)
            x = x.to(device, non_blocking=True, memory_format=memory_format)
            y = y.to(device, non_blocking=True)
            target = target_fn(y, x) if target_fn is not None else y
            with _autocast(device, amp):
                out = task(x, target)
            loss = out["loss"]
            loss_value = float(loss.detach())
            if distributed:  # the mean over ranks: a NaN on any rank stops every rank at the same step
                loss_value = dist_utils.all_reduce_sum([loss_value], device)[0] / world
            if not np.isfinite(loss_value):
                raise NonFiniteLossError(stage, epoch, step, loss_value)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if cfg.clip_grad is not None:
                torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.clip_grad)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            num_updates += 1
            if getattr(task, "has_ema", None) is not None and task.has_ema():  # timm's ModelEmaV3, when set up
                task.update_ema(step=num_updates)
            if scheduler is not None:
                scheduler.step_update(num_updates=num_updates)
            n = x.shape[0]
            loss_sum += loss_value * n
            seen += n
            logits = out.get("output")
            if logits is not None and logits.ndim == 2 and target.ndim == 1:
                classifies = True
                correct += int((logits.argmax(1) == target).sum())
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
        if scheduler is not None:
            scheduler.step(epoch + 1)
        if distributed:
            loss_sum, correct, seen, classifies = dist_utils.all_reduce_sum([loss_sum, correct, seen, classifies],
                                                                            device)
        record = {"epoch": epoch, "loss": loss_sum / max(seen, 1),
                  "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - start}
        if classifies:
            record["accuracy"] = correct / max(seen, 1)
        if val_fn is not None:
            record.update({f"val_{k}": v for k, v in val_fn().items()})
        history.append(record)
        _logger.info("%s epoch %d/%d: %s", stage, epoch + 1, cfg.epochs,
                     ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "epoch"))
        if on_epoch_end is not None:
            on_epoch_end(TrainState(epoch + 1, num_updates, history, optimizer.state_dict(),
                                    scheduler.state_dict() if scheduler is not None else None,
                                    scaler.state_dict() if scaler is not None else None))
    return history


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, *, check: Optional[BatchCheck] = None,
             channels_last: bool = False, progress: bool = False) -> Dict[str, float]:
    """Top-1 accuracy in [0, 1] and mean cross-entropy of `model` over `loader`.

    In a process group each rank evaluates its share of the batches (`distributed.shard_batches`) and
    the sums are reduced: every rank must call it, and every rank gets the whole set's metrics.
    """
    was_training = model.training
    model.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    try:
        for x, y in tqdm(dist_utils.shard_batches(loader), desc="evaluate",
                         disable=not progress or not dist_utils.is_main(), leave=False):
            if check is not None:
                check(x, y)
            x, y = x.to(device, memory_format=memory_format), y.to(device)
            logits = model(x).float()
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            seen += y.numel()
    finally:
        model.train(was_training)
    loss_sum, correct, seen = dist_utils.all_reduce_sum([loss_sum, correct, seen], device)
    if seen == 0:
        raise ValueError("evaluation loader is empty")
    return {"accuracy": correct / seen, "loss": loss_sum / seen}


@torch.no_grad()
def extract_features(model: nn.Module, loader: DataLoader, device: torch.device,
                     write: Callable[[int, np.ndarray], None], *, check: Optional[BatchCheck] = None,
                     channels_last: bool = False, progress: bool = False) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Eval-mode feature pass that streams pre-logits features out instead of holding them.

    `loader` must iterate the dataset in order, unshuffled (`make_loader(..., shuffle=False)`). In a
    process group each rank runs its share of the batches (`distributed.shard_batches`); the features of
    the batch starting at dataset index i go to ``write(i, feats (B, D) float32)``.

    Returns:
        this rank's rows: dataset indices (n,) int64, softmax entropy (n,) float32, labels (n,) int64.
    """
    loader = dist_utils.shard_batches(loader)
    starts = dist_utils.batch_starts(loader)
    was_training = model.training
    model.eval()
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    indices, entropy, labels = [], [], []
    start = 0
    try:
        bar = tqdm(loader, desc="features", disable=not progress or not dist_utils.is_main(), leave=False)
        for b, (x, y) in enumerate(bar):
            if check is not None:
                check(x, y)
            if starts is not None:
                start = starts[b]
            z = model.forward_features(x.to(device, memory_format=memory_format))
            write(start, model.forward_head(z, pre_logits=True).flatten(1).float().cpu().numpy())
            entropy.append(softmax_entropy(model.forward_head(z)).cpu().numpy())
            labels.append(y.long().cpu().numpy())
            indices.append(np.arange(start, start + len(y), dtype=np.int64))
            start += len(y)
    finally:
        model.train(was_training)
    if not indices:  # a rank with no batch (more ranks than batches)
        return np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64)
    return np.concatenate(indices), np.concatenate(entropy).astype(np.float32), np.concatenate(labels)
