"""The one training loop and evaluation; knows timm tasks, not EncodeNet stages.

Step order: to device -> autocast -> forward -> loss -> (at a read: losses to the host, finite check)
-> backward -> clip -> step -> schedule. A read is every step on CPU, every `READ_EVERY_ACCELERATOR`
steps (and at checkpoints, stops, epoch ends) on a GPU, so its queue is not drained for a loss value.
Optimizers and schedules come from timm (`create_optimizer_v2`, `create_scheduler_v2`).
"""
import logging
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import distributed
from .checks import BatchCheck, check_once, eval_mode
from .config import StageConfig
from .env import autocast, autocast_dtype
from .errors import Interrupted, NonFiniteLossError
from .loaders import epoch_batches, full_last_batch, reseed_loader, set_epoch, shard_batches, train_loader
from .seeding import epoch_seed, rng_state, seed_everything, set_rng_state

__all__ = ["LoopOptions", "TrainState", "train_stage", "evaluate"]

_logger = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Where a stage stands after `epoch` complete epochs and `step` batches of the next: what
    `train_stage` needs to go on exactly.

    Attributes:
        epoch: epochs complete; training goes on with epoch index `epoch`.
        num_updates: optimizer steps taken so far (drives the per-update schedule).
        history: the per-epoch records so far.
        optimizer, scheduler, scaler: their ``state_dict()`` (scheduler/scaler None when unused).
        step: batches of epoch index `epoch` already trained (0: at an epoch boundary).
        ranks: with ``step > 0``, per rank (in rank order): ``{"rng": the global RNG states,
            "sums": [loss_sum, correct, seen, classifies] of the epoch so far, "seconds": its time so far}``.
    """
    epoch: int
    num_updates: int
    history: List[Dict[str, float]]
    optimizer: Dict[str, Any]
    scheduler: Optional[Dict[str, Any]] = None
    scaler: Optional[Dict[str, Any]] = None
    step: int = 0
    ranks: Optional[List[Dict[str, Any]]] = None


@dataclass
class LoopOptions:
    """How the loop runs, the same for every stage of a run (none of it changes what is computed on CPU).

    Attributes:
        device: where the task's module and the batches go.
        amp: "none", "auto", "bf16" or "fp16" autocast (`autocast_dtype`: bf16 on CUDA and CPU, fp16 on CUDA
            only, with a GradScaler); weights and optimizer state stay fp32.
        channels_last: batches in channels_last memory format.
        progress: a tqdm bar per epoch (rank 0 only).
        compile: ``task.compile()`` (torch.compile of the trainable module) before training.
        read_every: steps between reads of the losses to the host (the finite check, the running sums,
            the progress bar and, under torchrun, the stop vote); each read waits for the device to
            finish. None: every step on CPU, where a read costs nothing, and every
            `READ_EVERY_ACCELERATOR` steps elsewhere. A checkpoint step, a stop and an epoch's last
            step are always read.
    """
    device: torch.device
    amp: str = "none"
    channels_last: bool = False
    progress: bool = True
    compile: bool = False
    read_every: Optional[int] = None

    def steps_between_reads(self) -> int:
        if self.read_every is None:
            return 1 if self.device.type == "cpu" else READ_EVERY_ACCELERATOR
        if isinstance(self.read_every, bool) or not isinstance(self.read_every, int) or self.read_every < 1:
            raise ValueError(f"read_every must be a positive int or None, got {self.read_every!r}")
        return self.read_every


READ_EVERY_ACCELERATOR = 16  # a host read per 16 steps: the GPU queue never drains for a loss value


def train_stage(task: nn.Module, loader: DataLoader, cfg: StageConfig, *, stage: str,
                options: Optional[LoopOptions] = None, check: Optional[BatchCheck] = None,
                val_fn: Optional[Callable[[], Dict[str, float]]] = None, seed: Optional[int] = None,
                resume: Optional[TrainState] = None, on_checkpoint: Optional[Callable[[TrainState], None]] = None,
                checkpoint_every: int = 0, stop: Optional[Callable[[], int]] = None,
                **loop: Any) -> List[Dict[str, float]]:
    """Train ``task.get_trainable_module()`` for ``cfg.epochs`` epochs; the loss is ``task(x, y)["loss"]``.

    Inside a torch.distributed process group (torchrun) the task is wrapped in DDP with its own
    ``prepare_distributed`` and `loader` is re-sampled with a `DistributedSampler`
    (`loaders.train_loader`): `loader`'s batch size is per rank. Losses and accuracies in the
    history are over all ranks; every rank raises together on a non-finite loss. A last batch that
    would hold one image is left out (`loaders.full_last_batch`): BatchNorm cannot train on it.

    Args:
        task: a timm `TrainingTask`.
        loader: yields (x (B, C, H, W), y (B,)) batches.
        options: device, amp, channels_last, progress, compile (`LoopOptions`); or give those as keywords
            (``device=..., amp=...``) instead.
        check: called on every raw batch before compute (bad input -> ValueError).
        val_fn: called after each epoch; its metrics are added to the epoch record with a ``val_`` prefix.
        seed: when given, every epoch starts by re-seeding the global RNGs and the loader's shuffle
            generators from ``epoch_seed(seed, epoch)``, so an epoch's randomness does not depend on
            the epochs before it (exact resume).
        resume: continue after ``resume.epoch`` epochs and ``resume.step`` batches; the module must
            already hold the weights of that point. Inside an epoch, the epoch's batch order is drawn
            again and its first ``resume.step`` batches passed over in the sampler (`loaders.epoch_batches`),
            then the RNG states and running sums are those of the interrupted run.
        on_checkpoint: called with the `TrainState` after every epoch, every `checkpoint_every` steps
            inside one, and at a stop (to write a checkpoint; under torchrun on every rank).
        checkpoint_every: optimizer steps between checkpoints inside an epoch (0: at epoch ends only).
        stop: polled at every step; a signal number (not 0) stops every rank after that step: a
            checkpoint there (`on_checkpoint`), then `Interrupted`.

    Returns:
        One dict per epoch: epoch, loss, accuracy (classification outputs only), lr, seconds, val_*.

    Raises:
        NonFiniteLossError: the loss became NaN/inf. On CPU (a read every step) the weights are those of the
            last finite step; with ``read_every`` > 1 up to ``read_every - 1`` later steps may have been
            applied. No checkpoint holds them: the error comes before the next checkpoint is written.
        Interrupted: `stop` asked for it; the checkpoint of that step has been written.
        TypeError: both `options` and option keywords, or a keyword that is not a `LoopOptions` field.
    """
    if options is not None and loop:
        raise TypeError(f"train_stage takes options=LoopOptions(...) or its fields as keywords, not both "
                        f"(got {sorted(loop)})")
    options = options if options is not None else LoopOptions(**loop)
    if cfg.epochs < 0:
        raise ValueError(f"{stage}: epochs must be >= 0, got {cfg.epochs}")
    if checkpoint_every < 0:
        raise ValueError(f"{stage}: checkpoint_every must be >= 0 (0: at epoch ends only), got {checkpoint_every}")
    if cfg.epochs == 0:  # the stage is skipped (timm's schedulers need at least one epoch)
        return []
    if not any(p.requires_grad for p in task.get_trainable_module().parameters()):
        raise ValueError(f"{stage}: nothing to train (every parameter is frozen)")
    device = options.device
    unfused = _unfuse_attention(task, device, options.amp)
    in_group = distributed.is_distributed()
    try:
        if options.compile:
            task.compile()
        if in_group:
            loader = train_loader(loader, seed if seed is not None else 0)
            task.prepare_distributed(device_ids=[device.index] if device.type == "cuda" else None)
        loader = full_last_batch(loader)
        check = check_once(check, loader)  # a device dataset: checked whole here, not per batch
        return _train_epochs(task, loader, cfg, options, stage=stage, check=check, val_fn=val_fn, seed=seed,
                             resume=resume, on_checkpoint=on_checkpoint, checkpoint_every=checkpoint_every,
                             stop=stop)
    finally:
        if in_group:  # drop the DDP wrapper: a later stage wraps the same modules anew
            task.trainable_module = task.trainable_module.module
        for m in unfused:
            m.fused_attn = True


def _unfuse_attention(task: nn.Module, device: torch.device, amp: str) -> List[nn.Module]:
    """On a CPU in bf16, switch timm's attention modules from `F.scaled_dot_product_attention` (``fused_attn``) to
    their explicit matmul + softmax for the stage, and return them to be switched back after it: the same
    computation, but torch's CPU flash-attention backward in bf16 is about 10x slower than in fp32, which cancels
    bf16's gain (vit_tiny at 32 px: 1.0x with it, 2.4x without; benchmarks/results/cpu-speed/)."""
    if device.type != "cpu" or autocast_dtype(device, amp) != torch.bfloat16:
        return []
    switched = [m for m in task.modules() if getattr(m, "fused_attn", None) is True]
    for m in switched:
        m.fused_attn = False
    return switched


def _train_epochs(task, loader, cfg, options: LoopOptions, *, stage, check, val_fn, seed, resume,
                  on_checkpoint, checkpoint_every, stop) -> List[Dict[str, float]]:
    module = task.get_trainable_module()
    device, amp = options.device, options.amp
    progress = options.progress and distributed.is_main()
    in_group, world = distributed.is_distributed(), distributed.world_size()
    optimizer = create_optimizer_v2(module, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                    momentum=cfg.momentum)
    steps_per_epoch = len(loader)
    scheduler = None
    if cfg.sched != "none":
        scheduler, _ = create_scheduler_v2(optimizer, sched=cfg.sched, num_epochs=cfg.epochs,
                                           warmup_epochs=cfg.warmup_epochs, step_on_epochs=False,
                                           updates_per_epoch=steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda") if autocast_dtype(device, amp) == torch.float16 else None
    memory_format = torch.channels_last if options.channels_last else torch.preserve_format
    read_every = options.steps_between_reads()
    history: List[Dict[str, float]] = []
    num_updates, start_epoch, skip = 0, 0, 0
    if resume is not None:
        optimizer.load_state_dict(resume.optimizer)
        if scheduler is not None and resume.scheduler is not None:
            scheduler.load_state_dict(resume.scheduler)
        if scaler is not None and resume.scaler is not None:
            scaler.load_state_dict(resume.scaler)
        history, num_updates = [dict(r) for r in resume.history], resume.num_updates
        start_epoch, skip = resume.epoch, resume.step
        if skip and len(resume.ranks or ()) != world:
            raise ValueError(f"{stage}: the checkpoint was written inside epoch {resume.epoch + 1} by "
                             f"{len(resume.ranks or ())} process(es); a resume inside an epoch needs as many "
                             f"(this run has {world})")
        _logger.info("%s: resuming after epoch %d/%d + %d steps (%d updates)", stage, resume.epoch, cfg.epochs,
                     skip, num_updates)

    def state(epoch: int, step: int = 0, ranks: Optional[List[Dict[str, Any]]] = None) -> TrainState:
        return TrainState(epoch, num_updates, history, optimizer.state_dict(),
                          scheduler.state_dict() if scheduler is not None else None,
                          scaler.state_dict() if scaler is not None else None, step=step, ranks=ranks)

    for epoch in range(start_epoch, cfg.epochs):
        if seed is not None:
            seed_everything(epoch_seed(seed, epoch))
            reseed_loader(loader, epoch_seed(seed, epoch))
        set_epoch(loader, epoch)
        task.train()
        start = time.perf_counter()
        sums, classifies = [0.0, 0, 0], False  # loss_sum, correct, seen: over the steps read so far
        unread: List[Tuple[int, torch.Tensor, int, Optional[torch.Tensor]]] = []  # (step, loss, n, hits)
        batches = epoch_batches(loader, skip)  # the epoch's order drawn; `skip` batches passed over unread
        if skip:  # where the interrupted epoch stood on this rank
            mine = resume.ranks[distributed.rank()]
            set_rng_state(mine["rng"])
            *sums, classifies = mine["sums"]
            start -= mine["seconds"]
        # a bar in a terminal; with output redirected (CI, a log file) tqdm stays silent (disable=None) and
        # the epoch's one logging line below is the record
        bar = tqdm(batches, total=steps_per_epoch, initial=skip, desc=f"{stage} {epoch + 1}/{cfg.epochs}",
                   disable=(not progress) or None, leave=False)
        for step, (x, y) in enumerate(bar, start=skip):
            if check is not None:
                check(x, y)
            x = x.to(device, non_blocking=True, memory_format=memory_format)
            y = y.to(device, non_blocking=True)
            try:
                with autocast(device, amp):
                    out = task(x, y)
            except ValueError as e:  # a custom batch_sampler's batch of one: say what to change
                if x.shape[0] == 1 and "Expected more than 1 value per channel" in str(e):
                    raise ValueError(f"{stage}: batch {step} of epoch {epoch} holds one image, which BatchNorm "
                                     f"cannot train on ({e}); give the training loader batches of two or more "
                                     f"(drop_last=True, or a batch_sampler without single-image batches)") from e
                raise
            loss, n, done = out["loss"], x.shape[0], step + 1
            logits = out.get("output")
            hits = None
            if logits is not None and logits.ndim == 2 and y.ndim == 1:
                classifies = True
                hits = (logits.detach().argmax(1) == y).sum()  # stays on the device until the next read
            unread.append((step, loss.detach(), n, hits))
            checkpoint_due = bool(checkpoint_every) and done % checkpoint_every == 0 and done < steps_per_epoch
            signum = stop() if stop is not None else 0  # a flag set by the signal handler: no device wait
            if (read_every == 1 or done % read_every == 0 or done == steps_per_epoch or checkpoint_due
                    or (signum and not in_group)):  # the same steps on every rank: the vote below is collective
                signum = _read(unread, signum, stage=stage, epoch=epoch, device=device, world=world, sums=sums)
                unread = []
                bar.set_postfix(loss=f"{sums[0] / max(sums[2], 1):.4f}")
            else:
                signum = 0  # under torchrun a stop waits for the next read, where every rank votes
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
            if on_checkpoint is not None and (signum or checkpoint_due):
                position = {"rng": rng_state(), "sums": [*sums, classifies],
                            "seconds": time.perf_counter() - start}
                on_checkpoint(state(epoch, done, distributed.gather_objects(position)))  # rank 0: all
            if signum:
                distributed.barrier()  # the checkpoint is written: every rank stops together
                raise Interrupted(signum, stage, epoch, done)
        skip = 0
        if scheduler is not None:
            scheduler.step(epoch + 1)
        loss_sum, correct, seen = sums
        if in_group:
            loss_sum, correct, seen, classifies = distributed.all_reduce_sum([loss_sum, correct, seen, classifies],
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
        if on_checkpoint is not None:
            on_checkpoint(state(epoch + 1))
        if stop is not None:  # a signal during validation or the checkpoint: stop here, the checkpoint is written
            signum = stop()
            if in_group:
                signum = signum or _common_signal(*distributed.all_reduce_sum([signum, signum > 0], device))
            if signum:
                raise Interrupted(signum, stage, epoch + 1, 0)
    return history


def _read(unread: List[Tuple[int, torch.Tensor, int, Optional[torch.Tensor]]], signum: int, *, stage: str,
          epoch: int, device: torch.device, world: int, sums: List[float]) -> int:
    """Bring the unread steps' losses and hits to the host (one wait for the device), check them, add them
    to `sums` ([loss_sum, correct, seen], in place); under torchrun the losses are the means over ranks and
    every rank learns whether one was asked to stop. Returns the stop signal (0: go on).

    Raises:
        NonFiniteLossError: the first unread step whose loss is NaN/inf (on any rank).
    """
    losses = torch.stack([loss.double() for _, loss, _, _ in unread]).tolist()  # float64: float() of each
    hits = [h for _, _, _, h in unread if h is not None]
    if distributed.is_distributed():  # a NaN on any rank stops every rank at the same step
        *losses, signum_sum, stopping = distributed.all_reduce_sum(losses + [signum, signum > 0], device)
        losses = [v / world for v in losses]
        signum = signum or _common_signal(signum_sum, stopping)
    for (step, _, n, _), value in zip(unread, losses):
        if not np.isfinite(value):
            raise NonFiniteLossError(stage, epoch, step, value)
        sums[0] += value * n
        sums[2] += n
    if hits:
        sums[1] += sum(torch.stack(hits).tolist())
    return signum


def _common_signal(signum_sum: float, count: float) -> int:
    """The signal the ranks that received one got (SIGTERM where they differ); 0 when none did."""
    if count == 0:
        return 0
    signum = round(signum_sum / count)
    return signum if signum in (signal.SIGINT, signal.SIGTERM) else int(signal.SIGTERM)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, *, check: Optional[BatchCheck] = None,
             channels_last: bool = False, progress: bool = False, amp: str = "none") -> Dict[str, float]:
    """Top-1 accuracy in [0, 1] and mean cross-entropy of `model` over `loader`, under `amp`'s autocast
    (`autocast_dtype`); the logits are read in float32.

    In a process group each rank evaluates its share of the batches (`loaders.shard_batches`) and
    the sums are reduced: every rank must call it, and every rank gets the whole set's metrics.
    """
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: one read at the end
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = 0
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    check = check_once(check, loader)
    with eval_mode(model):
        for x, y in tqdm(shard_batches(loader), desc="evaluate",
                         disable=(not progress or not distributed.is_main()) or None, leave=False):
            if check is not None:
                check(x, y)
            x, y = x.to(device, memory_format=memory_format), y.to(device)
            with autocast(device, amp):
                logits = model(x)
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").double()  # as float(): float32 -> float64
            correct += (logits.argmax(1) == y).sum()
            seen += y.numel()
    loss_sum, correct, seen = distributed.all_reduce_sum([float(loss_sum), int(correct), seen], device)
    if seen == 0:
        raise ValueError("evaluation loader is empty")
    return {"accuracy": correct / seen, "loss": loss_sum / seen}
