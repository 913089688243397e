"""The one training loop, evaluation and the feature pass; knows timm tasks, not EncodeNet stages.

Step order: to device -> autocast -> forward -> loss -> finite check -> backward -> clip -> step
-> schedule. Optimizers and schedules come from timm (`create_optimizer_v2`, `create_scheduler_v2`).
"""
import logging
import random
import time
from contextlib import nullcontext
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm.auto import tqdm

from .config import StageConfig
from .errors import NonFiniteLossError

__all__ = ["seed_everything", "resolve_device", "check_loader", "make_loader", "check_batch",
           "train_stage", "evaluate", "predict"]

_logger = logging.getLogger(__name__)

BatchCheck = Callable[[torch.Tensor, torch.Tensor], None]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


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


def _autocast(device: torch.device, amp: str):
    if amp == "none" or device.type != "cuda":
        return nullcontext()
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if amp not in dtypes:
        raise ValueError(f"amp must be 'none', 'bf16' or 'fp16', got {amp!r}")
    return torch.autocast(device_type="cuda", dtype=dtypes[amp])


def train_stage(task: nn.Module, loader: DataLoader, cfg: StageConfig, *, stage: str, device: torch.device,
                amp: str = "none", channels_last: bool = False, progress: bool = True,
                target_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
                check: Optional[BatchCheck] = None,
                val_fn: Optional[Callable[[], Dict[str, float]]] = None) -> List[Dict[str, float]]:
    """Train ``task.get_trainable_module()`` for ``cfg.epochs`` epochs; the loss is ``task(x, y)["loss"]``.

    Args:
        task: a timm `TrainingTask`.
        loader: yields (x (B, C, H, W), y (B,)) batches; `target_fn(y, x)` may map y to the task's target.
        check: called on every raw batch before compute (bad input -> ValueError).
        val_fn: called after each epoch; its metrics are added to the epoch record with a ``val_`` prefix.

    Returns:
        One dict per epoch: epoch, loss, accuracy (classification outputs only), lr, seconds, val_*.

    Raises:
        NonFiniteLossError: the loss became NaN/inf; the weights are those of the last finite step.
    """
    module = task.get_trainable_module()
    if not any(p.requires_grad for p in module.parameters()):
        raise ValueError(f"{stage}: nothing to train (every parameter is frozen)")
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
    history = []
    num_updates = 0
    for epoch in range(cfg.epochs):
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
        record = {"epoch": epoch, "loss": loss_sum / max(seen, 1),
                  "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - start}
        if classifies:
            record["accuracy"] = correct / max(seen, 1)
        if val_fn is not None:
            record.update({f"val_{k}": v for k, v in val_fn().items()})
        history.append(record)
        _logger.info("%s epoch %d/%d: %s", stage, epoch + 1, cfg.epochs,
                     ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "epoch"))
    return history


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, *, check: Optional[BatchCheck] = None,
             channels_last: bool = False, progress: bool = False) -> Dict[str, float]:
    """Top-1 accuracy in [0, 1] and mean cross-entropy of `model` over `loader`."""
    was_training = model.training
    model.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    try:
        for x, y in tqdm(loader, desc="evaluate", disable=not progress, leave=False):
            if check is not None:
                check(x, y)
            x, y = x.to(device, memory_format=memory_format), y.to(device)
            logits = model(x).float()
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            seen += y.numel()
    finally:
        model.train(was_training)
    if seen == 0:
        raise ValueError("evaluation loader is empty")
    return {"accuracy": correct / seen, "loss": loss_sum / seen}


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device: torch.device, *, check: Optional[BatchCheck] = None,
            channels_last: bool = False, progress: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eval-mode pass of a timm classifier over `loader`, in loader order.

    Returns:
        pre_logits (N, D) float32 (``forward_head(..., pre_logits=True)``), logits (N, K) float32,
        labels (N,) int64; all on CPU.
    """
    was_training = model.training
    model.eval()
    feats, logits, labels = [], [], []
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    try:
        for x, y in tqdm(loader, desc="features", disable=not progress, leave=False):
            if check is not None:
                check(x, y)
            z = model.forward_features(x.to(device, memory_format=memory_format))
            feats.append(model.forward_head(z, pre_logits=True).flatten(1).float().cpu())
            logits.append(model.forward_head(z).float().cpu())
            labels.append(y.long().cpu())
    finally:
        model.train(was_training)
    return torch.cat(feats), torch.cat(logits), torch.cat(labels)
