"""What the EncodeNet recipe costs, in the compute `compare` gives each control: FLOPs counted on the real
stage code (`FlopCounterMode`, forward + backward) over one batch of real images, in supervised epochs."""
import logging
import math
from contextlib import contextmanager
from copy import deepcopy
from typing import Any, Callable, Dict, Iterator

import torch
import torch.nn as nn
from timm.task import ClassificationTask, LogitDistillationTask
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from .config import EncodeNetConfig
from .wrapper import EncodeNetWrapper

__all__ = ["count_compute"]


def _flops(fn: Callable[[], Any]) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def _counting_loader(loader: DataLoader, num_classes: int) -> DataLoader:
    """One batch of real images from `loader.dataset` (the first ``max(num_classes, 2)``, cycled when the
    set is smaller), labelled ``i % num_classes`` so that every class has one image: FLOPs per image do
    not depend on the labels, and one cluster per class keeps the count cheap."""
    dataset = loader.dataset
    n = max(num_classes, 2)
    first = next(iter(DataLoader(dataset, batch_size=min(n, len(dataset)), collate_fn=loader.collate_fn)))[0]
    x = first.repeat(math.ceil(n / len(first)), 1, 1, 1)[:n]  # (n, C, H, W)
    y = torch.arange(n) % num_classes
    return DataLoader(TensorDataset(x, y), batch_size=n)


def count_compute(model: nn.Module, config: EncodeNetConfig, train_loader: DataLoader, *,
                  kd_temperature: float = 4.0, kd_task_loss_weight: float = 0.3) -> Dict[str, Any]:
    """Per-image FLOPs (forward + backward, `FlopCounterMode`) of a supervised step, a kd step and one epoch
    of each EncodeNet stage under `config`, measured by running the real stage code on one batch of real
    images; and the recipe's extra compute in supervised epochs.

    Returns:
        ``{"train_step", "kd_step", "per_image_per_epoch": {features, autoencoder, transfer, finetune},
        "extra_epochs", "note"}``; FLOPs are per image. k-means and evaluation passes are not counted.
    """
    with _quiet():  # a count, not a training run: the stages' own logging stays out of the way
        return _count_compute(model, config, train_loader, kd_temperature=kd_temperature,
                              kd_task_loss_weight=kd_task_loss_weight)


@contextmanager
def _quiet() -> Iterator[None]:
    """The package's INFO logging held back (warnings still show) while FLOPs are counted, also from its
    loggers that were given their own level."""
    names = ["encodenet_timm"] + [n for n in logging.root.manager.loggerDict if n.startswith("encodenet_timm.")]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg, level in zip(loggers, levels):
        if lg is loggers[0] or level:  # NOTSET children follow the package logger
            lg.setLevel(max(logging.WARNING, level))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _count_compute(model: nn.Module, config: EncodeNetConfig, train_loader: DataLoader, *,
                   kd_temperature: float, kd_task_loss_weight: float) -> Dict[str, Any]:
    loader = _counting_loader(train_loader, model.num_classes)
    x, y = next(iter(loader))
    n = len(x)
    probe = deepcopy(model).cpu()
    train_step = _flops(lambda: ClassificationTask(probe, verbose=False)(x, y)["loss"].backward()) / n
    kd = LogitDistillationTask(probe, teacher_model=deepcopy(probe).requires_grad_(False), verbose=False,
                               temperature=kd_temperature, task_loss_weight=kd_task_loss_weight)
    kd_step = _flops(lambda: kd(x, y)["loss"].backward()) / n
    stages = ("autoencoder", "transfer", "finetune")
    one = config.override({"device": "cpu", "progress": False, "channels_last": False, "compile": False,
                           "amp": "none", "representatives.clusters_per_class": 1,
                           "representatives.feature_store": None,
                           **{f"{s}.epochs": min(1, getattr(config, s).epochs) for s in stages},
                           **{f"{s}.warmup_epochs": 0 for s in stages}})  # FLOPs do not depend on the schedule
    w = EncodeNetWrapper(probe, one)
    w.decoder  # built (and its own FLOPs probed) outside the counters below
    per_epoch = {"features": _flops(lambda: w.select_representatives(loader)) / n}
    for s in stages:
        fit = getattr(w, f"fit_{s}")
        if getattr(one, s).epochs or s == "autoencoder":  # as fit runs them: the autoencoder even at 0 epochs
            flops = _flops(lambda: fit(loader))           # (nothing trained), so transfer follows an autoencoder
        per_epoch[s] = flops / n if getattr(one, s).epochs else 0.0
    extra = per_epoch["features"] + sum(per_epoch[s] * getattr(config, s).epochs for s in stages)
    return {"train_step": train_step, "kd_step": kd_step, "per_image_per_epoch": per_epoch,
            "extra_epochs": extra / train_step,
            "note": "FLOPs per image (matmul/conv/attention, forward + backward) from FlopCounterMode over one "
                    "epoch of each stage's real code on one batch of real images; k-means and evaluation are "
                    "not counted"}
