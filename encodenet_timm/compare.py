"""Will EncodeNet help *this* model? The recipe against same-size controls at equal extra compute.

    result = compare(lambda: timm.create_model("resnet20_cifar", num_classes=10), train_loader, val_loader,
                     test_loader=test_loader, seeds=(0, 1, 2))
    print(result.table()); print(result.verdict)
    model = result.model()            # the best row's weights as a plain timm model

Rows, per seed (each a model of the baseline's architecture and size):

* ``baseline``: trained here when ``config.baseline.epochs > 0``; otherwise the model `model_fn` returns
  *is* the trained baseline and the seeds vary only what comes after it.
* ``encodenet``: `EncodeNetWrapper.fit` from the baseline with `config` (and one row per entry of `variants`).
* the controls (`encodenet_timm.controls`), each given the recipe's extra compute X (its FLOPs counted
  with `FlopCounterMode` on the real stage code, in supervised epochs; `count_compute`): ``continued``,
  ``ema``, ``kd`` (restarted from the baseline with `ControlsConfig`'s schedule) and ``equal`` (from
  scratch, baseline + X epochs; only when the baseline is trained here).

An equal tuning budget: with ``trials=k`` EncodeNet gets k settings (every stage's lr x 1, 1/3, 3, ...) and
so does each of continued, ema and kd (its lr x the same factors); each side's best is chosen on validation.
Validation chooses everything; the test set is evaluated once, after the choice, and only for the rows
declared before it (`result.declared_rows`); it is written to ``test.json`` apart from the runs.
A row whose training diverges (`controls.divergence`) is marked and left out of the verdict. A baseline
that looks untrained (validation accuracy near chance) is refused unless ``allow_untrained_baseline``.
"""
import dataclasses
import json
import logging
import math
import time
from contextlib import contextmanager, nullcontext
from copy import deepcopy
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from timm.task import ClassificationTask, LogitDistillationTask
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from . import distributed
from .checks import check_batch, check_data, check_loader
from .config import ControlsConfig, EncodeNetConfig
from .controls import RowCheckpoints, budget_loader, divergence, non_finite, train_row
from .env import precision
from .errors import NonFiniteLossError, RunDirInUseError
from .files import DirLock, read_json, write_atomic, write_json
from .loaders import readable
from .result import (CONTROLS, TRIAL_FACTORS, CompareResult, _choose_on_val, base_row, declared_rows, record_path,
                     trial_name, weights_path)
from .split import check_timm_classifier
from .stats import paired_difference
from .stopping import StopSignals
from .training import LoopOptions, evaluate, resolve_device, seed_everything
from .wrapper import EncodeNetWrapper

__all__ = ["compare", "count_compute", "paired_difference", "CompareResult", "CONTROLS", "UNTRAINED_MARGIN"]

_logger = logging.getLogger(__name__)

# offsets from the row's seed for the controls' random streams (EncodeNet's stages use 0..4)
_SEED_OFFSET = {"continued": 10, "kd": 11, "equal": 12}
UNTRAINED_MARGIN = 0.05  # a baseline within this much of chance accuracy (1 / num_classes) is refused
_RUNTIME_KEYS = ("seed", "device", "progress")  # config keys that do not change what a row computes


# ---- compute ---------------------------------------------------------------------------------------------
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
        per_epoch[s] = _flops(lambda: fit(loader)) / n if getattr(one, s).epochs else 0.0
    extra = per_epoch["features"] + sum(per_epoch[s] * getattr(config, s).epochs for s in stages)
    return {"train_step": train_step, "kd_step": kd_step, "per_image_per_epoch": per_epoch,
            "extra_epochs": extra / train_step,
            "note": "FLOPs per image (matmul/conv/attention, forward + backward) from FlopCounterMode over one "
                    "epoch of each stage's real code on one batch of real images; k-means and evaluation are "
                    "not counted"}


# ---- what each row depends on --------------------------------------------------------------------------
def _recipe(config_dict: Dict[str, Any]) -> Dict[str, Any]:
    """An EncodeNet row's settings: its config without the runtime keys and the baseline's section."""
    return {k: v for k, v in config_dict.items() if k not in (*_RUNTIME_KEYS, "baseline")}


def _settled(config_dict: Dict[str, Any]) -> Dict[str, Any]:
    """`config_dict` read back through `EncodeNetConfig`: a key added since a record was written counts at its
    default, so committed records stay valid; a key since removed is kept as it is (it then differs)."""
    try:
        return EncodeNetConfig.from_dict(config_dict).to_dict()
    except (ValueError, TypeError):
        return config_dict


def _row_fingerprint(common: Dict[str, Any], row: str, *, config: EncodeNetConfig,
                     recipe: Optional[EncodeNetConfig] = None, controls: Optional[ControlsConfig] = None,
                     X: Optional[float] = None) -> Dict[str, Any]:
    """What the row's result depends on besides its seed: the model, the data's sizes, the precision and
    memory format, the baseline's schedule, and the row's own settings (recipe / controls, lr factor, X)."""
    fp = {**common, "baseline": _settled(config.to_dict())["baseline"], "row": base_row(row)[0]}
    kind, trial = base_row(row)
    if kind == "baseline":
        return fp
    if recipe is not None:
        return {**fp, "row": "encodenet", "recipe": _recipe(_settled(recipe.to_dict()))}
    if kind == "equal":
        return {**fp, "X": X}
    return {**fp, "row": "continued" if kind == "ema" else kind, "controls": controls.to_dict(),
            "lr_factor": TRIAL_FACTORS[trial], "X": X}


def _projected(fingerprint: Any, row: str) -> Any:
    """A record's fingerprint as `_row_fingerprint` writes it. Records written before per-row fingerprints
    held the whole comparison's settings; their part that the row depends on is read out of them
    (their controls had no `ControlsConfig`, so old control rows never match and train again)."""
    if not isinstance(fingerprint, dict) or "config" not in fingerprint:
        return fingerprint
    config = _settled(fingerprint["config"])
    data = fingerprint.get("data") or {}
    fp = {"model": fingerprint.get("model"), "params": fingerprint.get("params"),
          "num_classes": fingerprint.get("num_classes"), "data": {"train": data.get("train"), "val": data.get("val")},
          "precision": "fp32",  # compare autocast on CUDA only then; these rows ran on CPU
          "channels_last": config.get("channels_last"), "baseline": config.get("baseline"), "row": base_row(row)[0]}
    kind = base_row(row)[0]
    if kind == "baseline":
        return fp
    if kind == "encodenet" or kind in (fingerprint.get("variants") or {}):
        source = config if kind == "encodenet" else _settled(fingerprint["variants"][kind])
        return {**fp, "row": "encodenet", "recipe": _recipe(source)}
    if kind == "equal":  # from scratch on the baseline's schedule: it never read the controls' settings
        return {**fp, "X": fingerprint.get("X")}
    return {**fp, "legacy_controls": [fingerprint.get("kd"), fingerprint.get("ema_decay")]}


# ---- rows ------------------------------------------------------------------------------------------------
class _Rows:
    """Trains one (row, seed) at a time; each finished one is written to `out_dir` (or kept in memory).
    With `out_dir` a row in progress keeps checkpoints in ``out_dir/checkpoints/<row>-seed<k>``."""

    def __init__(self, model_fn, train_loader, val_loader, config: EncodeNetConfig, controls: ControlsConfig, *,
                 plain_loader, out_dir: Optional[Path], compute: Dict[str, Any], common: Dict[str, Any],
                 recipes: Dict[str, EncodeNetConfig], checkpoint_every: int, stop: Optional[StopSignals] = None):
        self.model_fn, self.train, self.val, self.plain = model_fn, train_loader, val_loader, plain_loader
        self.config, self.controls, self.out_dir, self.compute = config, controls, out_dir, compute
        self.common, self.recipes, self.checkpoint_every, self.stop = common, recipes, checkpoint_every, stop
        self.device = resolve_device(config.device)
        self.n = len(train_loader.dataset)
        self.weights: Dict[Tuple[str, int], Dict[str, torch.Tensor]] = {}
        self.records: Dict[str, Dict[int, Dict[str, Any]]] = {}

    def fingerprint(self, row: str) -> Dict[str, Any]:
        return _row_fingerprint(self.common, row, config=self.config, recipe=self.recipes.get(row),
                                controls=self.controls, X=self.compute["extra_epochs"])

    # -- storage
    def done(self, row: str, seed: int) -> bool:
        if row in self.records and seed in self.records[row]:
            return True
        if self.out_dir is None:
            return False
        path = record_path(self.out_dir, row, seed)
        if not path.is_file():  # its weights may be absent (not committed): rows that start from it say so
            return False
        record = read_json(path)
        if _projected(record.get("fingerprint"), row) != self.fingerprint(row):
            raise ValueError(f"{path} was made with other settings (model, data, precision, the baseline's schedule "
                             f"or the row's own); use another out_dir, or delete that record (and "
                             f"{self.out_dir / 'checkpoints'}) to train the row again")
        self.records.setdefault(row, {})[seed] = record
        return True

    def checkpoints(self, row: str, seed: int) -> RowCheckpoints:
        directory = None if self.out_dir is None else self.out_dir / "checkpoints" / f"{row}-seed{seed}"
        return RowCheckpoints(directory, row, self.fingerprint(row))

    def _finish(self, row: str, seed: int, model: nn.Module, record: Dict[str, Any]) -> None:
        """Evaluate on validation (never test: see `test_rows`), write the record and the weights."""
        metrics = evaluate(model, self.val, self.device, channels_last=self.config.channels_last, amp=self.config.amp)
        record = {"row": row, "seed": seed, "val_accuracy": metrics["accuracy"], "val_loss": metrics["loss"],
                  "precision": precision(self.device, self.config.amp), "diverged": None, **record}
        state = {k: v.detach().contiguous().cpu().clone() for k, v in model.state_dict().items()}
        if self.out_dir is not None:
            record["fingerprint"] = self.fingerprint(row)
            write_atomic(weights_path(self.out_dir, row, seed), lambda p: save_file(state, str(p)))
            write_json(record_path(self.out_dir, row, seed), record)
            self.checkpoints(row, seed).remove()
        else:
            self.weights[(row, seed)] = state
        self.records.setdefault(row, {})[seed] = record
        _logger.info("compare: %s seed %d: val %.4f (extra %.2f epochs, %.0f s)%s", row, seed, record["val_accuracy"],
                     record["extra_epochs"], record["seconds"],
                     f"; DIVERGED: {record['diverged']}" if record["diverged"] else "")

    def load(self, row: str, seed: int) -> nn.Module:
        """A fresh model holding `row`'s finished weights for `seed`, on the device."""
        state = self.weights.get((row, seed))
        if state is None:
            path = weights_path(self.out_dir, row, seed)
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing but {record_path(self.out_dir, row, seed)} says the row "
                                        f"finished; delete that record to train the row again")
            state = load_file(str(path))
        model = self.fresh(seed)
        model.load_state_dict(state)
        return model.to(self.device)

    def fresh(self, seed: int) -> nn.Module:
        """``model_fn()`` after seeding with `seed`; a copy, so that a model_fn returning one trained
        model is never changed in place."""
        seed_everything(seed)
        return deepcopy(check_timm_classifier(self.model_fn()))

    def _prepare(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.config.channels_last else model

    def _check(self, model: nn.Module):
        in_chans = getattr(model, "in_chans", None) or self.train.dataset[0][0].shape[0]
        return lambda x, y: check_batch(x, y, num_classes=model.num_classes, in_chans=in_chans)

    def _train(self, task, model: nn.Module, cfg, images: float, row: str, seed: int, modules=None):
        """`images` images of training (exact, see `budget_loader`) under `cfg`, on the row's own random stream
        (`_SEED_OFFSET`): (history, images trained, why it diverged or None)."""
        kind = base_row(row)[0]
        stream = seed + _SEED_OFFSET["continued" if kind == "ema" else kind]
        loader, epochs = budget_loader(self.train, images, stream)
        c = self.config
        seed_everything(stream)
        options = LoopOptions(self.device, amp=c.amp, channels_last=c.channels_last, progress=c.progress,
                              compile=c.compile)
        try:
            hist = train_row(task, loader, dataclasses.replace(cfg, epochs=epochs), row=row, seed=stream,
                             options=options, check=self._check(model), checkpoints=self.checkpoints(row, seed),
                             checkpoint_every=self.checkpoint_every, modules=modules, stop=self.stop)
            bad = None
        except NonFiniteLossError as e:  # recorded as diverged, with the weights of its last finite step
            hist, bad = [], non_finite(e)
        return hist, epochs * len(loader.sampler), bad

    def _start(self, seed: int, same_loss: bool) -> Dict[str, Optional[float]]:
        """Where a row that continues the baseline starts: its last epoch's training accuracy and, when the
        row trains the same loss (`same_loss`), its training loss (`controls.divergence`)."""
        hist = self.records["baseline"][seed].get("history") or []
        last = hist[-1] if hist and isinstance(hist[-1], dict) else {}
        return {"start_accuracy": last.get("accuracy"), "start_loss": last.get("loss") if same_loss else None}

    # -- the rows
    def baseline(self, seed: int) -> None:
        start = time.perf_counter()
        model = self._prepare(self.fresh(seed))
        hist, bad = [], None
        if self.config.baseline.epochs > 0:  # as EncodeNetWrapper.fit_baseline trains it: task, seed, weights
            seed_everything(seed)
            model.requires_grad_(True)
            task = ClassificationTask(model, criterion_kwargs=dict(smoothing=self.config.baseline.smoothing),
                                      device=self.device, verbose=False)
            options = LoopOptions(self.device, amp=self.config.amp, channels_last=self.config.channels_last,
                                  progress=self.config.progress, compile=self.config.compile)
            try:
                hist = train_row(task, self.train, self.config.baseline, row="baseline", seed=seed, options=options,
                                 check=self._check(model), checkpoints=self.checkpoints("baseline", seed),
                                 checkpoint_every=self.checkpoint_every, stop=self.stop)
            except NonFiniteLossError as e:
                bad = non_finite(e)
            bad = bad or divergence(hist, images=len(self.train.dataset))
        self._finish("baseline", seed, model, {"extra_epochs": 0.0, "history": hist, "diverged": bad,
                                               "seconds": time.perf_counter() - start})

    def encodenet(self, row: str, seed: int) -> None:
        start = time.perf_counter()
        cfg = self.recipes[row].override({"seed": seed, "baseline.epochs": 0})
        wrapper = EncodeNetWrapper(self.load("baseline", seed), cfg, copy=False)
        run_dir = None if self.out_dir is None else self.checkpoints(row, seed).dir.path
        bad = None
        try:
            hist = wrapper.fit(self.train, plain_loader=self.plain, run_dir=run_dir,
                               resume=run_dir is not None and (run_dir / "run.json").is_file(),
                               checkpoint_every=self.checkpoint_every if run_dir is not None else 0)
        except NonFiniteLossError as e:
            hist, bad = {}, non_finite(e)
        hist = {k: v for k, v in hist.items() if isinstance(v, list)}
        bad = bad or next(filter(None, (divergence(hist.get(s, []), images=self.n) for s in ("transfer", "finetune"))),
                          None)
        extra = self.compute["variants"].get(row, self.compute["extra_epochs"])
        self._finish(row, seed, wrapper.model, {"extra_epochs": extra, "history": hist, "diverged": bad,
                                                "seconds": time.perf_counter() - start})

    def continued(self, seed: int, trial: int, rows: Sequence[str]) -> None:
        """The baseline trained on for X epochs; `rows` says which of continued and ema (trial names) to record."""
        start = time.perf_counter()
        model = self._prepare(self.load("baseline", seed))
        task = ClassificationTask(model, criterion_kwargs=dict(smoothing=self.controls.smoothing),
                                  device=self.device, verbose=False)
        task.setup_ema(decay=self.controls.ema_decay, use_warmup=True, warmup_power=0.75, device=self.device)
        ema = task.get_trainable_module(ema=True)
        name = trial_name("continued", trial)
        hist, images, bad = self._train(task, model, self.controls.stage(1, TRIAL_FACTORS[trial]),
                                        self.compute["extra_epochs"] * self.n, name, seed,
                                        modules={"model": model, "ema": ema})
        same_loss = self.controls.smoothing == self.config.baseline.smoothing
        bad = bad or divergence(hist, images=images // max(len(hist), 1), **self._start(seed, same_loss))
        record = {"extra_epochs": images / self.n, "history": hist, "diverged": bad,
                  "seconds": time.perf_counter() - start}
        if name in rows:
            self._finish(name, seed, model, dict(record))
        if trial_name("ema", trial) in rows:
            self._finish(trial_name("ema", trial), seed, ema.module, dict(record))

    def kd(self, seed: int, trial: int) -> None:
        start = time.perf_counter()
        teacher = self._prepare(self.load("baseline", seed)).eval().requires_grad_(False)
        student = self._prepare(self.load("baseline", seed))
        c = self.controls
        task = LogitDistillationTask(student, teacher_model=teacher, device=self.device, verbose=False,
                                     temperature=c.kd_temperature, task_loss_weight=c.kd_task_loss_weight)
        ratio = self.compute["kd_step"] / self.compute["train_step"]  # one kd image costs this many supervised ones
        name = trial_name("kd", trial)
        hist, images, bad = self._train(task, student, c.stage(1, TRIAL_FACTORS[trial]),
                                        self.compute["extra_epochs"] * self.n / ratio, name, seed)
        bad = bad or divergence(hist, images=images // max(len(hist), 1), **self._start(seed, same_loss=False))
        self._finish(name, seed, student, {"extra_epochs": images * ratio / self.n, "history": hist, "diverged": bad,
                                           "seconds": time.perf_counter() - start})

    def equal(self, seed: int) -> None:
        start = time.perf_counter()
        model = self._prepare(self.fresh(seed))
        task = ClassificationTask(model, criterion_kwargs=dict(smoothing=self.config.baseline.smoothing),
                                  device=self.device, verbose=False)
        E = self.config.baseline.epochs
        hist, images, bad = self._train(task, model, self.config.baseline, (E + self.compute["extra_epochs"]) * self.n,
                                        "equal", seed)
        bad = bad or divergence(hist, images=images // max(len(hist), 1))
        self._finish("equal", seed, model, {"extra_epochs": images / self.n - E, "history": hist, "diverged": bad,
                                            "seconds": time.perf_counter() - start})


@contextmanager
def _seed_lock(out: Optional[Path], seed: int, todo: Sequence[str]) -> Iterator[None]:
    """Hold ``out/locks/seed<k>`` while a seed's unfinished rows train: processes given other seeds share
    `out`, a second process on the same seed is refused. A seed with nothing to train takes no lock."""
    if out is None or not todo:
        yield
        return
    lock = DirLock(out / "locks" / f"seed{seed}")
    try:
        lock.acquire()
    except RunDirInUseError as e:
        raise RunDirInUseError(f"seed {seed} of {out} is being trained by another process ({e}); give this "
                               f"process other seeds, or wait for that one to end") from None
    try:
        yield
    finally:
        lock.release()


def _check_trained(runner: _Rows, seed: int, allow: bool) -> None:
    """Refuse a baseline whose validation accuracy is within `UNTRAINED_MARGIN` of chance."""
    acc = runner.records["baseline"][seed]["val_accuracy"]
    chance = 1.0 / runner.common["num_classes"]
    if acc < chance + UNTRAINED_MARGIN and not allow:
        raise ValueError(f"the baseline of seed {seed} scores {100 * acc:.1f}% on validation, within "
                         f"{100 * UNTRAINED_MARGIN:.0f} points of chance ({100 * chance:.1f}%): it looks untrained, "
                         f"so every row would be compared from noise. Train it (config.baseline.epochs > 0, CLI "
                         f"--baseline.epochs N), pass a model_fn that returns the trained model, or pass "
                         f"allow_untrained_baseline=True if this is intended")


def _run_seed(runner: _Rows, seed: int, rows: Sequence[str], allow_untrained: bool) -> None:
    """Every row of `rows` for `seed` not finished yet (a record another process wrote counts as finished)."""
    finished = [r for r in rows if runner.done(r, seed)]
    todo = [r for r in rows if r not in finished]
    if todo:
        _logger.info("compare: seed %d: %s%s", seed, f"kept (finished before): {', '.join(finished)}; " if finished
                     else "", f"to train: {', '.join(todo)}")
    if "baseline" in todo:
        runner.baseline(seed)
    if runner.done("baseline", seed):
        _check_trained(runner, seed, allow_untrained)
    for row in todo:
        kind, trial = base_row(row)
        if runner.done(row, seed) or kind == "baseline":
            continue
        if row in runner.recipes:
            runner.encodenet(row, seed)
        elif kind in ("continued", "ema"):
            runner.continued(seed, trial, [r for r in (trial_name("continued", trial), trial_name("ema", trial))
                                           if r in todo])
        elif kind == "kd":
            runner.kd(seed, trial)
        elif kind == "equal":
            runner.equal(seed)


def _test_rows(runner: _Rows, test_loader: DataLoader, rows: Sequence[str], seeds: Sequence[int],
               out: Optional[Path], choice: Dict[str, Any]) -> Dict[str, Dict[int, float]]:
    """Test accuracy of the declared `rows`, once, after the choice: read from ``test.json`` when it holds
    them for the same choice, from a record that measured it blind at its end (records written before the
    test was sealed), or evaluated now from the row's weights; written to ``test.json``."""
    path = out / "test.json" if out is not None else None
    saved = read_json(path) if path is not None and path.is_file() else {}
    same = saved.get("choice") == choice
    tests: Dict[str, Dict[int, float]] = {}
    for row in rows:
        tests[row] = {}
        for seed in seeds:
            old = (saved.get("test", {}).get(row, {}) if same else {}).get(str(seed))
            legacy = runner.records[row][seed].get("test_accuracy")
            if old is None and legacy is None:
                model = runner.load(row, seed)
                old = evaluate(model, test_loader, runner.device, channels_last=runner.config.channels_last,
                               amp=runner.config.amp)["accuracy"]
            tests[row][seed] = float(old if old is not None else legacy)
    if path is not None:
        write_json(path, {"choice": choice, "rule": "validation chooses; these rows were declared before the choice "
                          "and their test accuracy read once, after it", "seeds": list(seeds),
                          "test": {r: {str(s): v for s, v in by_seed.items()} for r, by_seed in tests.items()}})
    return tests


def compare(model_fn: Callable[[], nn.Module], train_loader: DataLoader, val_loader: DataLoader, *,
            config: Optional[EncodeNetConfig] = None, controls: Sequence[str] = CONTROLS,
            seeds: Sequence[int] = (0, 1, 2), plain_loader: Optional[DataLoader] = None,
            test_loader: Optional[DataLoader] = None, out_dir: Optional[Union[str, Path]] = None,
            variants: Optional[Mapping[str, EncodeNetConfig]] = None,
            controls_config: Optional[ControlsConfig] = None, trials: int = 1, checkpoint_every: int = 0,
            rows: Optional[Sequence[str]] = None, allow_untrained_baseline: bool = False,
            described: Optional[Mapping[str, str]] = None) -> CompareResult:
    """Train the baseline, EncodeNet and same-size controls at equal extra compute, per seed, and compare.

    Args:
        model_fn: returns a fresh timm classifier; called after seeding with each seed. With
            ``config.baseline.epochs == 0`` it must return the *trained* baseline.
        train_loader: (images, labels) over a map-style dataset, may augment; every row trains on it.
        val_loader: every row is evaluated on it once, at its end; every choice is made on it.
        config: the EncodeNet recipe (``EncodeNetConfig()`` when None); its ``seed`` is replaced per seed.
        controls: any of ``("continued", "kd", "ema", "equal")``.
        seeds: one full set of rows per seed; a verdict needs at least 3 (`encodenet_timm.stats`).
        plain_loader: the training set without augmentation (EncodeNet's feature pass), as in `fit`.
        test_loader: evaluated once, after the choice, for the declared rows only (`result.declared_rows`).
        out_dir: each finished (row, seed) is written there (runs/*.json, weights/*.safetensors) and skipped
            when compare runs again with the same settings; a row in progress checkpoints under
            checkpoints/ (every `checkpoint_every` steps and every epoch) and continues from there;
            compute.json holds the counted FLOPs, test.json the sealed test. SIGTERM or SIGINT then finishes
            the step, writes the row's checkpoint and raises `Interrupted` (compare again to continue).
        variants: more EncodeNet rows, name -> config (e.g. an ablation); each is counted for its own compute.
        controls_config: how continued, ema and kd are trained (`ControlsConfig`; its defaults when None).
        trials: validation trials per side: EncodeNet's stage lrs and each restarted control's lr times
            1, 1/3, 3, 1/9, 9 (the first `trials`); each side's best is chosen on validation.
        checkpoint_every: optimizer steps between checkpoints inside a row (with `out_dir`; 0: epoch ends only).
        rows: train only these rows now (names as in the table, e.g. ``["baseline"]``; their seed's baseline
            too; ``[]`` trains nothing); the rows that finished before are reported, and the test waits until
            every row has finished.
        allow_untrained_baseline: compare from a baseline at chance accuracy instead of refusing it.
        described: row -> what it is, for the table (variants).

    Raises:
        ValueError: an unknown control, no seeds, a variant named like a row, settings that differ from the
            ones `out_dir` was made with, an untrained-looking baseline, or bad data (`EncodeNetWrapper.fit`'s
            checks).
        TypeError: `model_fn` does not return a timm classifier, or a loader is not a DataLoader.
    """
    config = EncodeNetConfig() if config is None else config
    if not isinstance(config, EncodeNetConfig):
        raise TypeError(f"config must be an EncodeNetConfig, got {type(config).__name__}")
    controls_config = ControlsConfig() if controls_config is None else controls_config
    if not isinstance(controls_config, ControlsConfig):
        raise TypeError(f"controls_config must be a ControlsConfig, got {type(controls_config).__name__}")
    controls = list(dict.fromkeys(controls))
    unknown = [c for c in controls if c not in CONTROLS]
    if unknown:
        raise ValueError(f"unknown controls {unknown}; choose from {', '.join(CONTROLS)}")
    seeds = list(dict.fromkeys(int(s) for s in seeds))
    if not seeds:
        raise ValueError("seeds is empty: give at least one (three or more for a verdict)")
    if isinstance(trials, bool) or not isinstance(trials, int) or not 1 <= trials <= len(TRIAL_FACTORS):
        raise ValueError(f"trials must be an int from 1 to {len(TRIAL_FACTORS)}, got {trials!r}")
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be an int >= 0 (0: at epoch ends only), got {checkpoint_every!r}")
    variants = dict(variants or {})
    clash = [v for v in variants if base_row(v)[0] in ("baseline", "encodenet", *CONTROLS) or "@" in v]
    if clash:
        raise ValueError(f"variant names {clash} are taken by compare's own rows (or hold '@'); rename them")
    if distributed.is_distributed():
        raise ValueError("compare runs in one process: launch it without torchrun (fit runs under torchrun)")
    check_loader(train_loader, "train_loader", map_style=True)
    check_loader(val_loader, "val_loader")
    for name, loader in (("plain_loader", plain_loader), ("test_loader", test_loader)):
        if loader is not None:
            check_loader(loader, name)
    notes = []
    if "equal" in controls and config.baseline.epochs == 0:
        controls.remove("equal")
        notes.append("equal was left out: the baseline came trained (config.baseline.epochs == 0), so there is no "
                     "baseline schedule to lengthen")
        _logger.warning("compare: %s", notes[-1])
    recipes = {trial_name("encodenet", t): config.override(
        {f"{s}.lr": getattr(config, s).lr * TRIAL_FACTORS[t] for s in ("autoencoder", "transfer", "finetune")})
        for t in range(trials)}
    recipes.update(variants)
    all_rows = ["baseline", *recipes] + [trial_name(c, t) for c in controls
                                         for t in range(1 if c == "equal" else trials)]
    unknown_rows = [r for r in (rows or ()) if r not in all_rows]
    if unknown_rows:
        raise ValueError(f"rows {unknown_rows} are not rows of this comparison ({', '.join(all_rows)})")
    probe = check_timm_classifier(model_fn())
    w = EncodeNetWrapper(probe, config)  # fit's bad-data checks, before any training
    train_loader, val_loader, plain_loader, _ = readable(  # image files named (or left out) before any row
        train_loader, val_loader, plain_loader, scan=config.data.scan, skip=config.data.skip_unreadable)
    check_data(train_loader, w.model, w.device, in_chans=w.input_size[0],
               clusters_per_class=config.representatives.clusters_per_class)
    out = Path(out_dir) if out_dir is not None else None
    compute_path = out / "compute.json" if out is not None else None
    if compute_path is not None and compute_path.is_file():
        compute = read_json(compute_path)
    else:
        _logger.info("compare: counting each stage's FLOPs on one batch (nothing is trained)")
        compute = count_compute(probe, config, train_loader, kd_temperature=controls_config.kd_temperature,
                                kd_task_loss_weight=controls_config.kd_task_loss_weight)
        compute["variants"] = {name: count_compute(probe, cfg, train_loader)["extra_epochs"]
                               for name, cfg in variants.items()}
        if compute_path is not None:
            write_json(compute_path, compute)
    compute.setdefault("variants", {})
    _logger.info("compare: EncodeNet's extra compute is %.2f supervised epochs; each control gets the same",
                 compute["extra_epochs"])
    device = resolve_device(config.device)
    common = {"model": type(probe).__name__, "params": int(sum(p.numel() for p in probe.parameters())),
              "num_classes": int(probe.num_classes),
              "data": {"train": len(train_loader.dataset), "val": len(val_loader.dataset)},
              "precision": precision(device, config.amp), "channels_last": config.channels_last}
    # with out_dir, SIGTERM/SIGINT finish the step, checkpoint the row and raise Interrupted (fit's own
    # handlers take over inside an EncodeNet row)
    stop = StopSignals() if out is not None else None
    runner = _Rows(model_fn, train_loader, val_loader, config, controls_config, plain_loader=plain_loader,
                   out_dir=out, compute=compute, common=common, recipes=recipes, checkpoint_every=checkpoint_every,
                   stop=stop)
    # every row needs its seed's baseline: it trains first whenever another row is asked for
    training = all_rows if rows is None else [r for r in all_rows if r in rows or (r == "baseline" and rows)]
    with stop if stop is not None else nullcontext():
        for seed in seeds:
            with _seed_lock(out, seed, todo=[r for r in training if not runner.done(r, seed)]):
                _run_seed(runner, seed, training, allow_untrained_baseline)
    finished = [r for r in all_rows if all(runner.done(r, s) for s in seeds)]
    if len(finished) < len(all_rows):
        notes.append(f"partial: {', '.join(r for r in all_rows if r not in finished)} not trained yet on every seed "
                     f"{seeds}; no test until they are")
    records = {r: {s: runner.records[r][s] for s in seeds} for r in finished}
    chosen = _choose_on_val(records, list(recipes))
    chosen_trials = {c: _choose_on_val(records, [trial_name(c, t) for t in range(trials)]) for c in ("encodenet", *controls)
                     if c != "equal" and trials > 1}
    chosen_trials = {c: r for c, r in chosen_trials.items() if r is not None}
    tests = {}
    if test_loader is not None and len(finished) == len(all_rows):
        declared = declared_rows(finished, chosen, chosen_trials)
        tests = _test_rows(runner, test_loader, declared, seeds, out,
                           {"chosen": chosen, "chosen_trials": chosen_trials, "declared": declared})
    return CompareResult(records=records, compute=compute, seeds=seeds, controls=controls, config=config.to_dict(),
                         notes=notes, tests=tests, chosen=chosen, chosen_trials=chosen_trials, trials=trials,
                         described=dict(described or {}), model_fn=model_fn, out_dir=out, _weights=runner.weights)
