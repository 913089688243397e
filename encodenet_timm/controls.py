"""How `compare` trains its supervised rows (the baseline and the same-size controls), resumable inside a row.

* ``baseline``: the model from ``model_fn``, ``config.baseline`` (timm `ClassificationTask`, as
  `EncodeNetWrapper.fit_baseline` trains it: same task, seed and weights).
* ``continued``: the baseline trained on for the recipe's extra compute X with `ControlsConfig`'s restart
  schedule (low lr, linear warm-up, gradient clipping); ``ema``: the `ModelEmaV3` average of that run.
* ``kd``: timm's `LogitDistillationTask`, teacher = the baseline (eval mode), student = a copy of it in
  train mode, as timm's ``train.py --kd-model-name`` runs it; X epochs' worth of its FLOPs.
* ``equal``: from scratch, one schedule of ``baseline.epochs`` + X epochs of ``config.baseline``.

A row's budget is exact to the image: ``ceil(budget)`` epochs of ``round(budget * N / ceil(budget))``
images each (a seeded `RandomSampler`), one schedule. With a checkpoint directory a row writes a
checkpoint (weights, EMA weights, optimizer, loop position) every `checkpoint_every` steps and at every
epoch end (`RowCheckpoints`); a process stopped anywhere continues the row where it stood, with the
weights an uninterrupted run gives.
"""
import logging
import math
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from timm.task import LogitDistillationTask
from torch.utils.data import DataLoader, RandomSampler

from .errors import NonFiniteLossError
from .files import load_state_into, read_json
from .run_dir import RunDir
from .stopping import StopSignals
from .training import LoopOptions, TrainState, train_stage

__all__ = ["budget_loader", "RowCheckpoints", "train_row", "divergence", "train_seconds", "DistillationTask"]

_logger = logging.getLogger(__name__)

LOSS_RISE = 1.5      # a row whose epoch loss exceeds LOSS_RISE x its first epoch's (+ 0.05) diverged
ACCURACY_DROP = 0.02  # ... or whose training accuracy falls this far below where it started


class DistillationTask(LogitDistillationTask):
    """timm's `LogitDistillationTask` (teacher in eval mode, KL at `temperature` plus the task loss), with the
    student's BatchNorm in train mode (``student_bn="train"``, timm's own behaviour) or kept in eval mode
    (``"eval"``: the running statistics the student started with are used and not updated, as in the
    teacher; its affine weights still train). From a converged teacher that is also the student's start,
    "eval" makes the KL term exactly 0 at the first step; "train" does not (batch statistics differ from
    running ones), so its KD gradient does not vanish at convergence."""

    def __init__(self, *args: Any, student_bn: str = "train", **kwargs: Any):
        super().__init__(*args, **kwargs)
        if student_bn not in ("train", "eval"):
            raise ValueError(f"student_bn must be 'train' or 'eval', got {student_bn!r}")
        self.student_bn = student_bn

    def train(self, mode: bool = True) -> "DistillationTask":
        super().train(mode)
        if mode and self.student_bn == "eval":
            for m in self.trainable_module.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self


def budget_loader(like: DataLoader, images: float, seed: int) -> Tuple[DataLoader, int]:
    """A loader over ``like.dataset`` that sees `images` images in ``ceil(images / N)`` epochs (an equal
    share each, drawn without replacement within an epoch by a seeded `RandomSampler`); and that epoch count."""
    n = len(like.dataset)
    epochs = max(1, math.ceil(images / n - 1e-9))
    per_epoch = max(1, int(round(images / epochs)))
    sampler = RandomSampler(like.dataset, num_samples=per_epoch, generator=torch.Generator().manual_seed(seed))
    loader = DataLoader(like.dataset, batch_size=like.batch_size or 1, sampler=sampler, num_workers=like.num_workers,
                        collate_fn=like.collate_fn, pin_memory=like.pin_memory, drop_last=like.drop_last,
                        persistent_workers=like.persistent_workers and like.num_workers > 0)
    return loader, epochs


class RowCheckpoints:
    """The checkpoints of one (row, seed) in `directory` (a `RunDir` with the row as its one stage).

    Its run.json records the row's `fingerprint`; a checkpoint made with other settings is refused.
    ``RowCheckpoints(None, ...)`` writes and restores nothing.
    """

    def __init__(self, directory: Optional[Path], row: str, fingerprint: Dict[str, Any]):
        self.row, self.fingerprint = row, fingerprint
        self.dir = RunDir(directory, (row,)) if directory is not None else None

    def restore(self, modules: Dict[str, nn.Module]) -> Optional[TrainState]:
        """Load the latest checkpoint's weights into `modules` (file stem -> module) and return its loop
        state; None when there is none.

        Raises:
            ValueError: the checkpoint was made with other settings, or one of its files is corrupted.
        """
        ckpt = self.dir.checkpoint(self.row) if self.dir is not None else None
        if ckpt is None:
            return None
        saved = read_json(self.dir.record_path).get("fingerprint") if self.dir.record_path.is_file() else None
        if saved != self.fingerprint:
            raise ValueError(f"{self.dir.path} holds a checkpoint of {self.row} made with other settings; delete "
                             f"that folder to train the row from its start")
        self.dir.record = read_json(self.dir.record_path)
        for stem, module in modules.items():
            load_state_into(module, ckpt.tensors(stem), str(ckpt.directory))
        _logger.info("compare: %s continues from %s (epoch %d/%d + %d steps)", self.row, ckpt.directory.name,
                     ckpt.epoch, ckpt.epochs, ckpt.step)
        return ckpt.train_state()

    def save(self, state: TrainState, epochs: int, modules: Dict[str, nn.Module]) -> None:
        """A checkpoint after ``state.epoch`` epochs + ``state.step`` steps; older ones are removed."""
        if self.dir is None:
            return
        if not self.dir.record:
            self.dir.record = {"row": self.row, "fingerprint": self.fingerprint}
        self.dir.save(self.row, state.epoch, epochs, tensors={k: m.state_dict() for k, m in modules.items()},
                      state={}, train=state)

    def remove(self) -> None:
        """Delete the directory once the row's record and weights are written."""
        if self.dir is not None and self.dir.path.is_dir():
            shutil.rmtree(self.dir.path, ignore_errors=True)


def train_row(task: nn.Module, loader: DataLoader, cfg, *, row: str, seed: int, options: LoopOptions, check,
              checkpoints: RowCheckpoints, checkpoint_every: int = 0,
              modules: Optional[Dict[str, nn.Module]] = None, stop: Optional[StopSignals] = None) -> List[Dict[str, float]]:
    """`train_stage` for one row, continued from its latest checkpoint and checkpointed as it goes.

    Args:
        modules: what a checkpoint holds, file stem -> module (default: the task's trainable module as
            "model"; the ema control adds its average as "ema").
        stop: SIGTERM/SIGINT handlers (entered by the caller): a signal finishes the step, writes a
            checkpoint and raises `Interrupted`.
    """
    modules = modules or {"model": task.get_trainable_module()}
    resume = checkpoints.restore(modules)
    with stop.deferred() if stop is not None else nullcontext():
        return train_stage(task, loader, cfg, stage=row, options=options, check=check, seed=seed, resume=resume,
                           on_checkpoint=lambda state: checkpoints.save(state, cfg.epochs, modules),
                           checkpoint_every=checkpoint_every, stop=stop)


def train_seconds(history: Any) -> float:
    """Seconds of the training epochs in `history` (a stage's list of epochs, or stage -> list), summed over
    every process that trained them: a row resumed after a stop counts the epochs before the stop too."""
    stages = history.values() if isinstance(history, dict) else [history]
    return float(sum(e.get("seconds", 0.0) for stage in stages if isinstance(stage, list) for e in stage
                     if isinstance(e, dict)))


def divergence(history: List[Dict[str, float]], start_accuracy: Optional[float] = None,
               images: Optional[int] = None, start_loss: Optional[float] = None) -> Optional[str]:
    """Why a classification row's training went wrong, in words, or None when it did not.

    A row diverged when an epoch's training loss rises above ``LOSS_RISE x`` where it started (+ 0.05), or
    its training accuracy falls more than `ACCURACY_DROP` below where it started. Where it started: the
    baseline's last training epoch (`start_accuracy`, `start_loss`) for rows that continue it with the same
    loss, else the row's first epoch. With `images`
    (per epoch) the drop must also exceed three standard errors of an epoch's accuracy, so that a few
    images' worth of noise on a tiny training set is not taken for a collapse.
    """
    if not history:
        return None
    losses = [r["loss"] for r in history]
    worst = max(range(len(losses)), key=lambda i: losses[i])
    first, where = (losses[0], "epoch 1") if start_loss is None else (start_loss, "the baseline's last epoch")
    if not math.isfinite(losses[worst]) or losses[worst] > LOSS_RISE * first + 0.05:
        return f"training loss rose from {first:.3f} ({where}) to {losses[worst]:.3f} (epoch {worst + 1})"
    accs = [r["accuracy"] for r in history if r.get("accuracy") is not None]
    if accs:
        start = accs[0] if start_accuracy is None else start_accuracy
        low = min(range(len(accs)), key=lambda i: accs[i])
        noise = 3 * math.sqrt(max(start * (1 - start), 0.0) / images) if images else 0.0
        drop = max(ACCURACY_DROP, noise)
        if accs[low] < start - drop:
            return (f"training accuracy fell from {start:.3f} to {accs[low]:.3f} (epoch {low + 1}), more than "
                    f"{100 * drop:.1f} points")
    return None


def non_finite(error: NonFiniteLossError) -> str:
    """A `NonFiniteLossError` as a row's divergence note."""
    return f"non-finite training loss ({error})"
