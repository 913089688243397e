"""Will EncodeNet help *this* model? The recipe against same-size controls at equal extra compute.

    result = compare(lambda: timm.create_model("resnet20_cifar", num_classes=10), train_loader, val_loader)
    print(result.table()); print(result.verdict)
    model = result.model()            # the best row's weights as a plain timm model

Rows, per seed (each a model of the baseline's architecture and size):

* ``baseline``: trained here when ``config.baseline.epochs > 0``; otherwise the model `model_fn` returns
  *is* the trained baseline and the seeds vary only what comes after it.
* ``encodenet``: `EncodeNetWrapper.fit` from the baseline with `config` (and one row per entry of `variants`).
* the controls, each given the recipe's extra compute X (its FLOPs counted with `FlopCounterMode` on the
  real stage code, in supervised epochs; `count_compute`):

  - ``continued``: the baseline trained on for X epochs with the fine-tune schedule (``config.finetune``);
  - ``ema``: the weight average (timm `ModelEmaV3`) of that same run, evaluated at the end;
  - ``kd``: timm's `LogitDistillationTask`, teacher = the baseline, student = a copy of it, X epochs' FLOPs;
  - ``equal``: from scratch, one schedule of ``baseline.epochs`` + X epochs (only when the baseline is
    trained here).

A control's budget is exact to the image, not rounded to whole epochs: it runs ``ceil(budget)`` epochs of
``round(budget * N / ceil(budget))`` images each (a seeded `RandomSampler`), one schedule.
Validation picks nothing inside a row: every row is evaluated once at its end on `val_loader` (and
`test_loader`), and `CompareResult.best` is the row with the highest mean validation accuracy.
"""
import dataclasses
import json
import logging
import math
import time
from contextlib import contextmanager
from copy import deepcopy
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from timm.task import ClassificationTask, LogitDistillationTask
from torch.utils.data import DataLoader, RandomSampler, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from . import distributed
from .checks import check_batch, check_data, check_loader
from .config import EncodeNetConfig, StageConfig
from .env import machine, versions
from .errors import RunDirInUseError
from .files import DirLock, write_atomic, write_json
from .loaders import readable
from .split import check_timm_classifier
from .training import LoopOptions, evaluate, resolve_device, seed_everything, train_stage
from .wrapper import EncodeNetWrapper

__all__ = ["compare", "count_compute", "paired_difference", "CompareResult", "CONTROLS"]

_logger = logging.getLogger(__name__)

CONTROLS = ("continued", "kd", "ema", "equal")
_CONTROL_WHAT = {
    "baseline": "the baseline (starting point of every row but equal)",
    "encodenet": "EncodeNet with the given config",
    "continued": "baseline trained X more epochs (fine-tune schedule)",
    "ema": "weight average (ModelEmaV3) of the continued run",
    "kd": "timm LogitDistillationTask, teacher = baseline, X epochs of FLOPs",
    "equal": "from scratch, one schedule of baseline + X epochs",
}
# offsets from the row's seed for the controls' random streams (EncodeNet's stages use 0..4)
_SEED_OFFSET = {"continued": 10, "kd": 11, "equal": 12}
_ALPHA = 0.05  # significance level of the verdict's paired t-test


# ---- statistics -------------------------------------------------------------------------------------------
def paired_difference(a: Sequence[float], b: Sequence[float]) -> Dict[str, Any]:
    """Paired comparison a - b over seeds: per-seed diffs, mean, std, t statistic, two-sided p-value.

    ``t`` and ``p`` are None with fewer than 2 pairs or identical differences (no variance to test).
    """
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    out = {"n": int(len(d)), "diffs": d.tolist(), "mean": float(d.mean()) if len(d) else None,
           "std": float(d.std(ddof=1)) if len(d) > 1 else None, "t": None, "p": None}
    if len(d) >= 2 and out["std"] > 0:
        from scipy import stats
        out["t"] = float(d.mean() / (out["std"] / math.sqrt(len(d))))
        out["p"] = float(2 * stats.t.sf(abs(out["t"]), len(d) - 1))
    return out


def _mean_std(values: Sequence[float]) -> Dict[str, float]:
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": int(len(v))}


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


def _budget_loader(like: DataLoader, images: float, seed: int) -> Tuple[DataLoader, int]:
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


# ---- result ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class CompareResult:
    """Every row's accuracy per seed, the compute it got, and the paired verdict against each control.

    Attributes:
        records: row -> seed -> record (val_accuracy, test_accuracy, extra_epochs, seconds, history, ...).
        compute: `count_compute`'s figures for the recipe (and ``variants``: the same per variant row).
        seeds: the seeds every row finished.
        notes: what was left out and why (e.g. ``equal`` when the baseline came trained).
    """
    records: Dict[str, Dict[int, Dict[str, Any]]]
    compute: Dict[str, Any]
    seeds: List[int]
    controls: List[str]
    config: Dict[str, Any]
    notes: List[str]
    model_fn: Optional[Callable[[], nn.Module]] = dataclasses.field(default=None, repr=False)
    out_dir: Optional[Path] = None
    _weights: Dict[Tuple[str, int], Dict[str, torch.Tensor]] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def rows(self) -> List[str]:
        return list(self.records)

    @property
    def has_test(self) -> bool:
        return all(self.records[r][s].get("test_accuracy") is not None for r in self.rows for s in self.seeds)

    def accuracy(self, row: str, split: str = "val") -> List[float]:
        """The row's accuracy per seed on ``"val"`` or ``"test"``."""
        return [self.records[row][s][f"{split}_accuracy"] for s in self.seeds]

    @property
    def best(self) -> str:
        """The row with the highest mean validation accuracy."""
        return max(self.rows, key=lambda r: np.mean(self.accuracy(r)))

    def _split(self, split: Optional[str]) -> str:
        if split is None:
            return "test" if self.has_test else "val"
        if split not in ("val", "test") or (split == "test" and not self.has_test):
            raise ValueError(f"split must be 'val' or 'test' (test only when compare got a test_loader), got {split!r}")
        return split

    def deltas(self, split: Optional[str] = None, row: str = "encodenet") -> Dict[str, Dict[str, Any]]:
        """`row` - every other baseline/control row, paired over seeds (`paired_difference`), on `split`
        (default: test when compare got a test_loader, else validation)."""
        split = self._split(split)
        mine = self.accuracy(row, split)
        return {other: paired_difference(mine, self.accuracy(other, split))
                for other in ("baseline", *self.controls) if other in self.records and other != row}

    @property
    def verdict(self) -> str:
        """One plain sentence: beats / ties / loses to each row (mean paired difference in points, p), on
        test accuracy when compare got a test_loader, else on validation."""
        return self.verdict_on(None)

    def verdict_on(self, split: Optional[str]) -> str:
        """`verdict` on ``"val"`` or ``"test"`` accuracy."""
        split = self._split(split)
        parts = []
        for other, d in self.deltas(split).items():
            mean, p = 100 * d["mean"], d["p"]
            if p is None:
                word = "above" if mean > 0 else "below" if mean < 0 else "equal to"
                parts.append(f"{word} {other} ({mean:+.2f}, {d['n']} seed{'s' * (d['n'] != 1)}: no test)")
            else:
                word = "beats" if p < _ALPHA and mean > 0 else "loses to" if p < _ALPHA else "ties"
                parts.append(f"{word} {other} ({mean:+.2f}, p={p:.2f})")
        best = self.best
        same_size = "" if best == "encodenet" else f"; the most accurate same-size model here is {best!r}"
        n = len(self.seeds)
        how = f"{n} seeds, paired t-test" if n > 1 else "1 seed: differences of a point or two can be noise"
        return f"EncodeNet {'; '.join(parts)} [{split} accuracy, points, {how}]{same_size}"

    def table(self) -> str:
        """A Markdown table: per row, what it is, extra compute (supervised epochs), accuracy mean ± std."""
        test = self.has_test
        head = "| row | what | extra epochs | val accuracy (%) |" + (" test accuracy (%) |" if test else "")
        lines = [head, "|---|---|---:|---|" + ("---|" if test else "")]
        for r in self.rows:
            extra = np.mean([self.records[r][s]["extra_epochs"] for s in self.seeds])
            cells = [r, _CONTROL_WHAT.get(r, "EncodeNet variant"), f"{extra:.2f}", _pct(self.accuracy(r))]
            if test:
                cells.append(_pct(self.accuracy(r, "test")))
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def model(self, row: Optional[str] = None, seed: Optional[int] = None) -> nn.Module:
        """That row's trained model (default: `best`, first seed) as a plain timm model, on CPU, eval mode."""
        row = row or self.best
        seed = self.seeds[0] if seed is None else seed
        if row not in self.records or seed not in self.records[row]:
            raise ValueError(f"no trained model for row {row!r} seed {seed}; rows: {self.rows}, seeds: {self.seeds}")
        if self.model_fn is None:
            raise ValueError("this result was loaded without a model_fn; pass one to CompareResult.load")
        state = self._weights.get((row, seed))
        if state is None:
            path = None if self.out_dir is None else _weights_path(self.out_dir, row, seed)
            if path is None or not path.is_file():
                raise ValueError(f"the weights of {row!r} seed {seed} were not kept ({path or 'no out_dir'})")
            state = load_file(str(path))
        seed_everything(seed)
        model = deepcopy(self.model_fn())
        model.load_state_dict(state)
        return model.cpu().eval()

    def to_dict(self) -> Dict[str, Any]:
        split = self._split(None)
        return {"rows": {r: {"what": _CONTROL_WHAT.get(r, "EncodeNet variant"),
                             "val": {**_mean_std(self.accuracy(r)), "per_seed": self.accuracy(r)},
                             "test": ({**_mean_std(self.accuracy(r, "test")), "per_seed": self.accuracy(r, "test")}
                                      if self.has_test else None),
                             "extra_epochs": float(np.mean([self.records[r][s]["extra_epochs"] for s in self.seeds]))}
                         for r in self.rows},
                "deltas": {"split": split, **self.deltas(split)}, "verdict": self.verdict, "best": self.best,
                "seeds": self.seeds, "controls": self.controls, "compute": self.compute, "config": self.config,
                "notes": self.notes, "versions": versions(), "machine": machine(),
                "records": {r: {str(s): v for s, v in by_seed.items()} for r, by_seed in self.records.items()}}

    def save(self, directory: Union[str, Path]) -> Path:
        """Write results.json (every number, config, versions, machine), results.md and accuracy_vs_compute.png."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        write_json(directory / "results.json", data)
        write_atomic(directory / "results.md", lambda p: p.write_text(self.markdown()))
        self.plot(directory / "accuracy_vs_compute.png")
        return directory

    def markdown(self) -> str:
        split = self._split(None)
        lines = ["# EncodeNet against same-size controls at equal extra compute", "",
                 f"Seeds {self.seeds}. X = {self.compute['extra_epochs']:.2f} supervised epochs of FLOPs (the "
                 f"recipe's extra compute; {self.compute['note']}).", "", self.table(), "",
                 f"**Verdict:** {self.verdict}", "", f"Paired differences ({split} accuracy, points):", "",
                 "| comparison | mean | std | per seed | p |", "|---|---:|---:|---|---:|"]
        for other, d in self.deltas(split).items():
            std = "" if d["std"] is None else f"{100 * d['std']:.2f}"
            p = "" if d["p"] is None else f"{d['p']:.3f}"
            lines.append(f"| encodenet - {other} | {100 * d['mean']:+.2f} | {std} | "
                         f"{', '.join(f'{100 * v:+.2f}' for v in d['diffs'])} | {p} |")
        lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def plot(self, path: Union[str, Path]) -> None:
        """Validation accuracy against extra compute, mean ± std over seeds, one point per row."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(8, 5))
        for r in self.rows:
            acc = 100 * np.asarray(self.accuracy(r))
            extra = float(np.mean([self.records[r][s]["extra_epochs"] for s in self.seeds]))
            control = r in CONTROLS or r == "baseline"
            ax.errorbar(extra, acc.mean(), yerr=acc.std(ddof=1) if len(acc) > 1 else 0, fmt="s" if control else "o",
                        color="tab:gray" if control else "tab:blue", capsize=3)
            ax.annotate(r, (extra, acc.mean()), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel("extra compute beyond the baseline (supervised epochs of FLOPs)")
        ax.set_ylabel("validation accuracy (%)")
        ax.set_title(f"EncodeNet vs same-size controls (mean ± std, {len(self.seeds)} seeds)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def _pct(values: Sequence[float]) -> str:
    v = 100 * np.asarray(values, dtype=float)
    return f"{v.mean():.2f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.2f}"


def _weights_path(out_dir: Path, row: str, seed: int) -> Path:
    return out_dir / "weights" / f"{row}-seed{seed}.safetensors"


def _record_path(out_dir: Path, row: str, seed: int) -> Path:
    return out_dir / "runs" / f"{row}-seed{seed}.json"


# ---- rows ------------------------------------------------------------------------------------------------
class _Rows:
    """Trains one (row, seed) at a time; each finished one is written to `out_dir` (or kept in memory)."""

    def __init__(self, model_fn, train_loader, val_loader, config: EncodeNetConfig, *, plain_loader, test_loader,
                 out_dir: Optional[Path], compute: Dict[str, Any], kd_temperature: float,
                 kd_task_loss_weight: float, ema_decay: float, fingerprint: Dict[str, Any]):
        self.model_fn, self.train, self.val, self.plain, self.test = (model_fn, train_loader, val_loader,
                                                                     plain_loader, test_loader)
        self.config, self.out_dir, self.compute, self.fingerprint = config, out_dir, compute, fingerprint
        self.kd = dict(temperature=kd_temperature, task_loss_weight=kd_task_loss_weight)
        self.ema_decay = ema_decay
        self.device = resolve_device(config.device)
        self.n = len(train_loader.dataset)
        self.weights: Dict[Tuple[str, int], Dict[str, torch.Tensor]] = {}
        self.records: Dict[str, Dict[int, Dict[str, Any]]] = {}

    # -- storage
    def done(self, row: str, seed: int) -> bool:
        if row in self.records and seed in self.records[row]:
            return True
        if self.out_dir is None:
            return False
        path = _record_path(self.out_dir, row, seed)
        if not path.is_file():  # its weights may be absent (not committed): rows that start from it say so
            return False
        record = json.loads(path.read_text())
        if _settled(record.get("fingerprint")) != _settled(self.fingerprint):
            raise ValueError(f"{path} was made with other settings (model, data, config or controls); use another "
                             f"out_dir, or delete {self.out_dir} to start again")
        self.records.setdefault(row, {})[seed] = record
        return True

    def _finish(self, row: str, seed: int, model: nn.Module, record: Dict[str, Any]) -> None:
        model_metrics = evaluate(model, self.val, self.device, channels_last=self.config.channels_last)
        record = {"row": row, "seed": seed, "val_accuracy": model_metrics["accuracy"], "val_loss": model_metrics["loss"],
                  "test_accuracy": None, **record}
        if self.test is not None:
            record["test_accuracy"] = evaluate(model, self.test, self.device,
                                               channels_last=self.config.channels_last)["accuracy"]
        state = {k: v.detach().contiguous().cpu().clone() for k, v in model.state_dict().items()}
        if self.out_dir is not None:
            record["fingerprint"] = self.fingerprint
            write_atomic(_weights_path(self.out_dir, row, seed), lambda p: save_file(state, str(p)))
            write_json(_record_path(self.out_dir, row, seed), record)
        else:
            self.weights[(row, seed)] = state
        self.records.setdefault(row, {})[seed] = record
        _logger.info("compare: %s seed %d: val %.4f%s (extra %.2f epochs, %.0f s)", row, seed, record["val_accuracy"],
                     "" if record["test_accuracy"] is None else f", test {record['test_accuracy']:.4f}",
                     record["extra_epochs"], record["seconds"])

    def load(self, row: str, seed: int) -> nn.Module:
        """A fresh model holding `row`'s finished weights for `seed`, on the device."""
        state = self.weights.get((row, seed))
        if state is None:
            path = _weights_path(self.out_dir, row, seed)
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing but {_record_path(self.out_dir, row, seed)} says the row "
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

    def _train(self, task, model: nn.Module, cfg: StageConfig, images: float, stage: str, seed: int):
        loader, epochs = _budget_loader(self.train, images, seed)
        c = self.config
        seed_everything(seed)
        options = LoopOptions(self.device, amp=c.amp, channels_last=c.channels_last, progress=c.progress,
                              compile=c.compile)
        hist = train_stage(task, loader, dataclasses.replace(cfg, epochs=epochs), stage=stage, options=options,
                           check=self._check(model), seed=seed)
        return hist, epochs * len(loader.sampler)

    # -- the rows
    def baseline(self, seed: int) -> None:
        start = time.perf_counter()
        wrapper = EncodeNetWrapper(self.fresh(seed), self.config.override({"seed": seed}), copy=False)
        hist = wrapper.fit_baseline(self.train) if self.config.baseline.epochs > 0 else []
        self._finish("baseline", seed, wrapper.model, {"extra_epochs": 0.0, "history": hist,
                                                       "seconds": time.perf_counter() - start})

    def encodenet(self, row: str, seed: int, config: EncodeNetConfig, extra_epochs: float) -> None:
        start = time.perf_counter()
        cfg = config.override({"seed": seed, "baseline.epochs": 0})
        wrapper = EncodeNetWrapper(self.load("baseline", seed), cfg, copy=False)
        hist = wrapper.fit(self.train, plain_loader=self.plain)
        hist = {k: v for k, v in hist.items() if isinstance(v, list)}
        self._finish(row, seed, wrapper.model, {"extra_epochs": extra_epochs, "history": hist,
                                                "seconds": time.perf_counter() - start})

    def continued(self, seed: int, rows: Sequence[str]) -> None:
        """The baseline trained on for X epochs; `rows` says which of "continued" and "ema" to record."""
        start = time.perf_counter()
        model = self._prepare(self.load("baseline", seed))
        task = ClassificationTask(model, criterion_kwargs=dict(smoothing=self.config.finetune.smoothing),
                                  device=self.device, verbose=False)
        if "ema" in rows:  # warm-up decay: the average spans about the last fifth of a short run
            task.setup_ema(decay=self.ema_decay, use_warmup=True, warmup_power=0.75, device=self.device)
        X = self.compute["extra_epochs"]
        hist, images = self._train(task, model, self.config.finetune, X * self.n, "continued",
                                   seed + _SEED_OFFSET["continued"])
        seconds = time.perf_counter() - start
        if "continued" in rows:
            self._finish("continued", seed, model, {"extra_epochs": images / self.n, "history": hist,
                                                    "seconds": seconds})
        if "ema" in rows:
            ema = task.get_trainable_module(ema=True).module
            self._finish("ema", seed, ema, {"extra_epochs": images / self.n, "history": hist, "seconds": seconds})

    def kd_row(self, seed: int) -> None:
        start = time.perf_counter()
        teacher = self._prepare(self.load("baseline", seed)).eval().requires_grad_(False)
        student = self._prepare(self.load("baseline", seed))
        task = LogitDistillationTask(student, teacher_model=teacher, device=self.device, verbose=False, **self.kd)
        c = self.compute
        ratio = c["kd_step"] / c["train_step"]  # one kd image costs this many supervised images
        hist, images = self._train(task, student, self.config.finetune, c["extra_epochs"] * self.n / ratio, "kd",
                                   seed + _SEED_OFFSET["kd"])
        self._finish("kd", seed, student, {"extra_epochs": images * ratio / self.n, "history": hist,
                                           "seconds": time.perf_counter() - start})

    def equal(self, seed: int) -> None:
        start = time.perf_counter()
        model = self._prepare(self.fresh(seed))
        task = ClassificationTask(model, criterion_kwargs=dict(smoothing=self.config.baseline.smoothing),
                                  device=self.device, verbose=False)
        E = self.config.baseline.epochs
        hist, images = self._train(task, model, self.config.baseline, (E + self.compute["extra_epochs"]) * self.n,
                                   "equal", seed + _SEED_OFFSET["equal"])
        self._finish("equal", seed, model, {"extra_epochs": images / self.n - E, "history": hist,
                                            "seconds": time.perf_counter() - start})


def _fingerprint(model: nn.Module, config: EncodeNetConfig, variants: Mapping[str, EncodeNetConfig],
                 loaders: Dict[str, Optional[DataLoader]], extra: Dict[str, Any]) -> Dict[str, Any]:
    return {"model": type(model).__name__, "params": int(sum(p.numel() for p in model.parameters())),
            "num_classes": int(model.num_classes), "config": config.to_dict(),
            "variants": {k: v.to_dict() for k, v in variants.items()},
            "data": {k: (None if v is None else len(v.dataset)) for k, v in loaders.items()}, **extra}


def _settled(fingerprint: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """`fingerprint` with its configs read back through `EncodeNetConfig`: a key added to the config since a
    record was written counts at its default, so the record stays valid."""
    if not isinstance(fingerprint, dict) or not isinstance(fingerprint.get("config"), dict):
        return fingerprint
    try:
        return {**fingerprint, "config": EncodeNetConfig.from_dict(fingerprint["config"]).to_dict(),
                "variants": {k: EncodeNetConfig.from_dict(v).to_dict()
                             for k, v in (fingerprint.get("variants") or {}).items()}}
    except (ValueError, TypeError):  # a key since removed: not the same settings
        return fingerprint


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


def _run_seed(runner: "_Rows", seed: int, config: EncodeNetConfig, variants: Mapping[str, EncodeNetConfig],
              controls: Sequence[str], compute: Dict[str, Any]) -> None:
    """Every row of `seed` not finished yet (a record another process wrote counts as finished)."""
    if not runner.done("baseline", seed):
        runner.baseline(seed)
    if not runner.done("encodenet", seed):
        runner.encodenet("encodenet", seed, config, compute["extra_epochs"])
    for name, cfg in variants.items():
        if not runner.done(name, seed):
            runner.encodenet(name, seed, cfg, compute["variants"][name])
    todo = [r for r in ("continued", "ema") if r in controls and not runner.done(r, seed)]
    if todo:
        runner.continued(seed, todo)
    if "kd" in controls and not runner.done("kd", seed):
        runner.kd_row(seed)
    if "equal" in controls and not runner.done("equal", seed):
        runner.equal(seed)


def compare(model_fn: Callable[[], nn.Module], train_loader: DataLoader, val_loader: DataLoader, *,
            config: Optional[EncodeNetConfig] = None, controls: Sequence[str] = CONTROLS,
            seeds: Sequence[int] = (0, 1, 2), plain_loader: Optional[DataLoader] = None,
            test_loader: Optional[DataLoader] = None, out_dir: Optional[Union[str, Path]] = None,
            variants: Optional[Mapping[str, EncodeNetConfig]] = None, kd_temperature: float = 4.0,
            kd_task_loss_weight: float = 0.3, ema_decay: float = 0.9998) -> CompareResult:
    """Train the baseline, EncodeNet and same-size controls at equal extra compute, per seed, and compare.

    Args:
        model_fn: returns a fresh timm classifier; called after seeding with each seed. With
            ``config.baseline.epochs == 0`` it must return the *trained* baseline.
        train_loader: (images, labels) over a map-style dataset, may augment; every row trains on it.
        val_loader: every row is evaluated on it once, at its end; `CompareResult.best` uses it.
        config: the EncodeNet recipe (``EncodeNetConfig()`` when None); its ``seed`` is replaced per seed.
        controls: any of ``("continued", "kd", "ema", "equal")``.
        seeds: one full set of rows per seed; the paired statistics run over them.
        plain_loader: the training set without augmentation (EncodeNet's feature pass), as in `fit`.
        test_loader: evaluated once per row at its end, reported beside validation; never used to choose.
        out_dir: each finished (row, seed) is written there (runs/*.json, weights/*.safetensors) and skipped
            when compare runs again with the same settings; compute.json holds the counted FLOPs.
        variants: more EncodeNet rows, name -> config (e.g. an ablation); each is counted for its own compute.
        kd_temperature, kd_task_loss_weight: timm `LogitDistillationTask` settings of the ``kd`` control.
        ema_decay: the ``ema`` control's `ModelEmaV3` decay (with warm-up).

    Raises:
        ValueError: an unknown control, no seeds, a variant named like a control, settings that differ
            from the ones `out_dir` was made with, or bad data (the checks of `EncodeNetWrapper.fit`).
        TypeError: `model_fn` does not return a timm classifier, or a loader is not a DataLoader.
    """
    config = EncodeNetConfig() if config is None else config
    if not isinstance(config, EncodeNetConfig):
        raise TypeError(f"config must be an EncodeNetConfig, got {type(config).__name__}")
    controls = list(dict.fromkeys(controls))
    unknown = [c for c in controls if c not in CONTROLS]
    if unknown:
        raise ValueError(f"unknown controls {unknown}; choose from {', '.join(CONTROLS)}")
    seeds = list(dict.fromkeys(int(s) for s in seeds))
    if not seeds:
        raise ValueError("seeds is empty: give at least one (three or more for a paired test)")
    variants = dict(variants or {})
    clash = [v for v in variants if v in ("baseline", "encodenet", *CONTROLS)]
    if clash:
        raise ValueError(f"variant names {clash} are taken by compare's own rows; rename them")
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
    probe = check_timm_classifier(model_fn())
    w = EncodeNetWrapper(probe, config)  # fit's bad-data checks, before any training
    train_loader, val_loader, plain_loader, _ = readable(  # image files named (or left out) before any row
        train_loader, val_loader, plain_loader, scan=config.data.scan, skip=config.data.skip_unreadable)
    check_data(train_loader, w.model, w.device, in_chans=w.input_size[0],
               clusters_per_class=config.representatives.clusters_per_class)
    out = Path(out_dir) if out_dir is not None else None
    compute_path = out / "compute.json" if out is not None else None
    if compute_path is not None and compute_path.is_file():
        compute = json.loads(compute_path.read_text())
    else:
        compute = count_compute(probe, config, train_loader, kd_temperature=kd_temperature,
                                kd_task_loss_weight=kd_task_loss_weight)
        compute["variants"] = {name: count_compute(probe, cfg, train_loader)["extra_epochs"]
                               for name, cfg in variants.items()}
        if compute_path is not None:
            write_json(compute_path, compute)
    _logger.info("compare: EncodeNet's extra compute is %.2f supervised epochs; each control gets the same",
                 compute["extra_epochs"])
    fingerprint = _fingerprint(probe, config, variants, {"train": train_loader, "val": val_loader,
                                                         "test": test_loader},
                               {"controls": controls, "kd": [kd_temperature, kd_task_loss_weight],
                                "ema_decay": ema_decay, "X": compute["extra_epochs"]})
    runner = _Rows(model_fn, train_loader, val_loader, config, plain_loader=plain_loader, test_loader=test_loader,
                   out_dir=out, compute=compute, kd_temperature=kd_temperature,
                   kd_task_loss_weight=kd_task_loss_weight, ema_decay=ema_decay, fingerprint=fingerprint)
    rows = ["baseline", "encodenet", *variants, *controls]
    for seed in seeds:
        with _seed_lock(out, seed, todo=[r for r in rows if not runner.done(r, seed)]):
            _run_seed(runner, seed, config, variants, controls, compute)
    records = {r: runner.records[r] for r in rows}
    return CompareResult(records=records, compute=compute, seeds=seeds, controls=controls,
                         config=config.to_dict(), notes=notes, model_fn=model_fn, out_dir=out,
                         _weights=runner.weights)
