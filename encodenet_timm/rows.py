"""How each row of a comparison is trained, one (row, seed) at a time, and what its result depends on.

`Rows` trains the baseline, the EncodeNet rows (`EncodeNetWrapper.fit`, resumable through its run
directory) and the controls (`encodenet_timm.controls`), evaluates each on validation only, and writes its
record and weights to the comparison's folder. A record carries its row's fingerprint (`row_fingerprint`):
the model, the data's sizes, the precision, the baseline's schedule and the row's own settings, so that a
record is reused exactly when its row would train the same again.
"""
import dataclasses
import logging
import time
from copy import deepcopy
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from timm.task import ClassificationTask

from . import distributed
from .checks import check_batch
from .config import ControlsConfig, EncodeNetConfig
from .controls import (DistillationTask, RowCheckpoints, budget_loader, divergence, non_finite, train_row,
                       train_seconds)
from .env import precision
from .errors import NonFiniteLossError
from .files import read_json, write_atomic, write_json
from .row_names import TRIAL_FACTORS, base_row, record_path, trial_name, weights_path
from .seeding import seed_everything
from .split import check_timm_classifier
from .stopping import StopSignals
from .training import LoopOptions, evaluate
from .wrapper import EncodeNetWrapper

__all__ = ["Rows", "row_fingerprint", "projected"]

_logger = logging.getLogger("encodenet_timm.compare")  # one logger for a comparison's progress

# offsets from the row's seed for the controls' random streams (EncodeNet's stages use 0..4)
_SEED_OFFSET = {"continued": 10, "kd": 11, "equal": 12}
_RUNTIME_KEYS = ("seed", "device", "progress")  # config keys that do not change what a row computes


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


def row_fingerprint(common: Dict[str, Any], row: str, *, config: EncodeNetConfig,
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


def projected(fingerprint: Any, row: str) -> Any:
    """A record's fingerprint as `row_fingerprint` writes it. Records written before per-row fingerprints
    held the whole comparison's settings; their part that the row depends on is read out of them
    (their controls had no `ControlsConfig`, so old control rows never match and train again)."""
    if isinstance(fingerprint, dict) and isinstance(fingerprint.get("controls"), dict):
        try:  # a ControlsConfig key added since counts at its default
            return {**fingerprint, "controls": ControlsConfig.from_dict(fingerprint["controls"]).to_dict()}
        except (ValueError, TypeError):
            return fingerprint
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


class Rows:
    """Trains one (row, seed) at a time; each finished one is written to `out_dir` (or kept in memory).
    With `out_dir` a row in progress keeps checkpoints in ``out_dir/checkpoints/<row>-seed<k>``."""

    def __init__(self, model_fn, train_loader, val_loader, config: EncodeNetConfig, controls: ControlsConfig, *,
                 plain_loader, out_dir: Optional[Path], compute: Dict[str, Any], common: Dict[str, Any],
                 recipes: Dict[str, EncodeNetConfig], checkpoint_every: int, stop: Optional[StopSignals] = None):
        self.model_fn, self.train, self.val, self.plain = model_fn, train_loader, val_loader, plain_loader
        self.config, self.controls, self.out_dir, self.compute = config, controls, out_dir, compute
        self.common, self.recipes, self.checkpoint_every, self.stop = common, recipes, checkpoint_every, stop
        self.device = distributed.training_device(config.device, config.amp)
        self.n = len(train_loader.dataset)
        self.weights: Dict[Tuple[str, int], Dict[str, torch.Tensor]] = {}
        self.records: Dict[str, Dict[int, Dict[str, Any]]] = {}

    def fingerprint(self, row: str) -> Dict[str, Any]:
        return row_fingerprint(self.common, row, config=self.config, recipe=self.recipes.get(row),
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
        if projected(record.get("fingerprint"), row) != self.fingerprint(row):
            raise ValueError(f"{path} was made with other settings (model, data, precision, the baseline's schedule "
                             f"or the row's own); use another out_dir, or delete that record (and "
                             f"{self.out_dir / 'checkpoints'}) to train the row again")
        record.setdefault("train_seconds", train_seconds(record.get("history")))  # as CompareResult.load does
        self.records.setdefault(row, {})[seed] = record
        return True

    def checkpoints(self, row: str, seed: int) -> RowCheckpoints:
        directory = None if self.out_dir is None else self.out_dir / "checkpoints" / f"{row}-seed{seed}"
        return RowCheckpoints(directory, row, self.fingerprint(row))

    def _finish(self, row: str, seed: int, model: nn.Module, record: Dict[str, Any]) -> None:
        """Evaluate on validation (never test: see `test_rows`), write the record and the weights."""
        metrics = evaluate(model, self.val, self.device, channels_last=self.config.channels_last, amp=self.config.amp)
        record = {"row": row, "seed": seed, "val_accuracy": metrics["accuracy"], "val_loss": metrics["loss"],
                  "precision": precision(self.device, self.config.amp), "diverged": None, **record,
                  "train_seconds": train_seconds(record.get("history"))}
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
        task = DistillationTask(student, teacher_model=teacher, device=self.device, verbose=False,
                                temperature=c.kd_temperature, task_loss_weight=c.kd_task_loss_weight,
                                student_bn=c.kd_student_bn)
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
