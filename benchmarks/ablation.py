"""Ablation of EncodeNet's variants against same-size controls at equal extra compute (`encodenet_timm.compare`).

    python benchmarks/ablation.py --data-dir ../shared/data --regime converged --phase converge
    python benchmarks/ablation.py --data-dir ../shared/data --regime converged --seeds 0 1 2

Protocol (fixed before any run):

* Data: a stratified training subset of the CIFAR-10 training set (``per_class`` images per class, drawn
  with data seed 0, the same for every seed) and a validation split drawn from the training images the
  subset leaves unused (``val_per_class`` per class; or, for the legacy regimes, a fraction of the subset).
  The test set is evaluated once, after the choice, for the chosen row, the paper row, the default and
  the controls.
* ``--phase converge`` (one seed): from-scratch baselines of the lengths in ``convergence_epochs``, in
  order, until E/2, E and 1.5E are there with 1.5E gaining < 0.5 validation points over E; E is the
  shortest such length (``converge.json``). The
  validate phase trains its baselines for that E.
* Rows (``compare``): ``baseline`` (E epochs), ``encodenet`` (the package default `EncodeNetConfig()` at
  the regime's stage lengths), the variants in ``VARIANTS``, and the controls continued, ema, kd and
  equal, each given the default recipe's extra compute X (FLOPs counted on the real stage code). A
  variant's own extra compute is reported beside it: one that costs more than X is marked.
* Selection: the EncodeNet row (default or variant) with the highest mean validation accuracy.
* ``--phase anchor``: the sanity anchor, before any other row: the test accuracy of each finished baseline
  (``anchor.json``; the full regime asks for a 3-seed mean of at least 90.0%). It reads the test set for the
  baseline alone, which no choice depends on; the rows are still chosen on validation and tested once.
* ``--phase evidence``: from-scratch runs of other lengths beside E (seed 0; ``evidence.json``). Their test
  accuracy is read only after the rows' sealed test (``test.json``), by the phase that reads or reports it.

Runs are resumable per (row, seed): ``runs/*.json`` are committed as they finish, with the baselines'
weights (``weights/baseline-seed*.safetensors``; the other rows' weights are git-ignored). Outputs go to ``benchmarks/results/ablation-<regime>/``.
"""
import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import timm
import torch
from torch.utils.data import DataLoader

from encodenet_timm import EncodeNetConfig, EncodeNetWrapper, StageConfig
from encodenet_timm.config import ControlsConfig
from encodenet_timm.files import write_json
from encodenet_timm.compare import CONTROLS, CompareResult, compare
from encodenet_timm.controls import train_seconds
from encodenet_timm.row_names import record_path, row_what
from encodenet_timm.stats import paired_difference
from encodenet_timm.data import CifarDataset, load_cifar, stratified_subset, train_val_split
from encodenet_timm.env import machine, resolve_device, versions
from encodenet_timm.training import evaluate

_logger = logging.getLogger("benchmarks.ablation")


@dataclasses.dataclass
class Regime:
    """Sizes and stage schedules shared by every row; chosen once, before any run."""
    description: str
    per_class: int                   # stratified training subset per class
    batch_size: int
    baseline: StageConfig            # its epochs are replaced by the converge phase's E when convergence_epochs is set
    autoencoder: StageConfig
    transfer: StageConfig
    finetune: StageConfig
    val_per_class: Optional[int] = None  # validation drawn from the unused training images; None: val_fraction
    val_fraction: float = 0.1        # of the subset, per class (legacy regimes)
    convergence_epochs: tuple = ()   # from-scratch lengths the converge phase trains (one seed), E chosen by rule
    evidence_epochs: tuple = ()      # E fixed: from-scratch lengths beside it (seed 0) that show E has converged
    amp: str = "none"                # "auto": bf16 autocast where the CPU (or GPU) has native bf16
    controls: tuple = CONTROLS       # the control rows
    variants: Optional[tuple] = None  # the variant rows (None: every one in VARIANTS)


def _sgd(epochs: int, lr: float) -> StageConfig:
    return StageConfig(epochs=epochs, lr=lr, opt="sgd", momentum=0.9, weight_decay=5e-4, sched="cosine")


def _adamw(epochs: int) -> StageConfig:
    return StageConfig(epochs=epochs, lr=1e-3, opt="adamw", weight_decay=0.0, sched="cosine")


REGIMES = {
    "converged": Regime(
        description="2 CPU cores, converged baseline: 250 images per class for training (2,500), 500 per class of "
                    "the unused training images for validation (5,000); baseline E epochs from the converge phase; "
                    "autoencoder 10, transfer 10, fine-tune 5 epochs (the package defaults)",
        per_class=250, val_per_class=500, batch_size=128, baseline=_sgd(0, 0.1),
        autoencoder=_adamw(10), transfer=_sgd(10, 0.01), finetune=_sgd(5, 0.01),
        convergence_epochs=(40, 80, 120, 60, 180, 90, 270, 135, 405, 608, 202)),
    "full": Regime(
        description="all of CIFAR-10 (the JPEG copy): 45,000 training images, 5,000 stratified validation images "
                    "from the training set, the 10,000 test images sealed until the choice; resnet20 baseline SGD "
                    "lr 0.1, momentum 0.9, wd 5e-4, cosine, batch 128, crop + flip, E = 120 epochs, with 60 and "
                    "180 from scratch beside it (seed 0); autoencoder 10, transfer 10, fine-tune 5 epochs (the "
                    "package defaults); bf16 autocast on CPUs with native bf16",
        per_class=4500, val_per_class=500, batch_size=128, baseline=_sgd(120, 0.1),
        autoencoder=_adamw(10), transfer=_sgd(10, 0.01), finetune=_sgd(5, 0.01), evidence_epochs=(60, 180),
        amp="auto", controls=("continued", "ema", "kd"), variants=("paper", "split_last_no_ae")),
    "short": Regime(description="2 CPU cores: 500 images per class (450 train + 50 validation), 12 baseline epochs; "
                                "autoencoder 2, transfer 3, fine-tune 2 epochs",
                    per_class=500, batch_size=128, baseline=_sgd(12, 0.1), autoencoder=_adamw(2),
                    transfer=_sgd(3, 0.01), finetune=_sgd(2, 0.01)),
    "smoke": Regime(description="pipeline check (tests): 20 images per class, 1 epoch per stage; numbers mean nothing",
                    per_class=20, val_fraction=0.2, batch_size=50, baseline=_sgd(1, 0.05), autoencoder=_adamw(1),
                    transfer=_sgd(1, 0.01), finetune=_sgd(1, 0.01)),
}

# variant -> (description, overrides on the default recipe at the regime's lengths); "paper" starts from
# EncodeNetConfig.paper() instead. "<stage>" is scaled by the regime: "<ae>"/"<ft>" = its epochs.
VARIANTS: Dict[str, tuple] = {
    "paper": ("the paper: split at forward_features, k=5, min-entropy, pure MSE, frozen encoder, no fine-tune", {}),
    "split_last_no_ae": ("the default without the autoencoder (0 epochs): is the autoencoder doing anything?",
                         {"autoencoder.epochs": 0}),
    "split_features": ("the default split at forward_features (paper's split) instead of before the last stage",
                       {"split": "features"}),
    "ce_0.3": ("autoencoder loss MSE + 0.3 x CE (default 1.0)", {"autoencoder.ce_weight": 0.3}),
    "ce_3": ("autoencoder loss MSE + 3.0 x CE (default 1.0)", {"autoencoder.ce_weight": 3.0}),
    "ae_half": ("half the autoencoder epochs", {"autoencoder.epochs": "<ae/2>"}),
    "ae_double": ("twice the autoencoder epochs", {"autoencoder.epochs": "<ae*2>"}),
    "ft_0": ("no final fine-tune", {"finetune.epochs": 0}),
    "ft_double": ("twice the fine-tune epochs", {"finetune.epochs": "<ft*2>"}),
}


def regime_config(regime: Regime, seed: int = 0, baseline_epochs: Optional[int] = None,
                  variant: Optional[str] = None) -> EncodeNetConfig:
    """The default recipe (or a variant, or the paper preset) at the regime's stage lengths."""
    overrides = {"seed": seed, "progress": False, "channels_last": True, "amp": regime.amp}
    for stage in ("baseline", "autoencoder", "transfer", "finetune"):
        for key, value in dataclasses.asdict(getattr(regime, stage)).items():
            overrides[f"{stage}.{key}"] = value
    if baseline_epochs is not None:
        overrides["baseline.epochs"] = baseline_epochs
    if variant == "paper":
        overrides["finetune.epochs"] = 0
        return EncodeNetConfig.paper(**overrides)
    scaled = {"<ae/2>": max(1, regime.autoencoder.epochs // 2), "<ae*2>": 2 * regime.autoencoder.epochs,
              "<ft*2>": 2 * regime.finetune.epochs}
    for key, value in (VARIANTS[variant][1] if variant else {}).items():
        overrides[key] = scaled.get(value, value)
    return EncodeNetConfig().override(overrides)


# ---- data ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Data:
    train: DataLoader                # augmented, shuffled
    plain: DataLoader                # the same images, no augmentation, in order
    val: DataLoader
    test: DataLoader


def make_data(arrays, regime: Regime, data_seed: int = 0) -> Data:
    labels = arrays.train_labels
    sub = stratified_subset(labels, regime.per_class, seed=data_seed)
    if regime.val_per_class is not None:
        rest = np.setdiff1d(np.arange(len(labels)), sub)
        tr, va = sub, rest[stratified_subset(labels[rest], regime.val_per_class, seed=data_seed + 1)]
    else:
        t, v = train_val_split(labels[sub], regime.val_fraction, seed=data_seed)
        tr, va = sub[t], sub[v]
    assert not set(tr.tolist()) & set(va.tolist())
    ds = lambda images, y, augment: CifarDataset(images, y, arrays.mean, arrays.std, augment=augment)
    g = torch.Generator().manual_seed(data_seed)
    return Data(train=DataLoader(ds(arrays.train_images[tr], labels[tr], True), batch_size=regime.batch_size,
                                 shuffle=True, generator=g),
                plain=DataLoader(ds(arrays.train_images[tr], labels[tr], False), batch_size=500),
                val=DataLoader(ds(arrays.train_images[va], labels[va], False), batch_size=500),
                test=DataLoader(ds(arrays.test_images, arrays.test_labels, False), batch_size=500))


def _model_fn(args, num_classes: int):
    return lambda: timm.create_model(args.model, pretrained=False, num_classes=num_classes)


# ---- convergence ---------------------------------------------------------------------------------------------
def converge(ctx) -> Dict:
    """From-scratch baselines of each length in the regime's convergence_epochs (seed 0); the chosen E."""
    regime, data, out = ctx["regime"], ctx["data"], ctx["out"]
    path = out / "converge.json"
    done = json.loads(path.read_text()) if path.is_file() else {"runs": {}}
    device = resolve_device(ctx["args"].device)
    lengths = ctx["args"].epochs or regime.convergence_epochs
    for epochs in lengths:  # in order, until E/2, E and 1.5E show convergence
        done = json.loads(path.read_text()) if path.is_file() else done  # another process may have added runs
        if choose_epochs(done["runs"]) is not None:
            break
        if str(epochs) in done["runs"]:
            continue
        start = time.perf_counter()
        torch.manual_seed(0)
        wrapper = EncodeNetWrapper(_model_fn(ctx["args"], ctx["num_classes"])(),
                                   regime_config(regime, 0, baseline_epochs=epochs), copy=False)
        hist = wrapper.fit_baseline(data.train)
        done["runs"][str(epochs)] = {
            "epochs": epochs, "val_accuracy": wrapper.evaluate(data.val)["accuracy"],
            "train_accuracy": evaluate(wrapper.model, data.plain, device, channels_last=True)["accuracy"],
            "final_train_loss": hist[-1]["loss"], "seconds": time.perf_counter() - start}
        _logger.info("converge: %d epochs -> val %.4f, train %.4f (%.0f s)", epochs,
                     done["runs"][str(epochs)]["val_accuracy"], done["runs"][str(epochs)]["train_accuracy"],
                     done["runs"][str(epochs)]["seconds"])
        record = done["runs"][str(epochs)]
        done = json.loads(path.read_text()) if path.is_file() else done
        done["runs"][str(epochs)] = record
        write_json(path, done)
    done = json.loads(path.read_text()) if path.is_file() else done
    done["chosen"] = choose_epochs(done["runs"])
    done["rule"] = "E = the shortest length whose 1.5E schedule gains < 0.5 validation points (seed 0)"
    write_json(path, done)
    return done


def choose_epochs(runs: Dict[str, Dict]) -> Optional[int]:
    """The shortest E with runs at E/2 and 1.5E where 1.5E gains < 0.5 validation points; None if none."""
    acc = {int(k): v["val_accuracy"] for k, v in runs.items()}
    for e in sorted(acc):
        half, longer = int(round(e / 2)), int(round(1.5 * e))
        if half in acc and longer in acc and acc[longer] - acc[e] < 0.005:
            return e
    return None


def baseline_epochs(ctx) -> int:
    regime = ctx["regime"]
    if ctx["args"].baseline_epochs is not None:
        return ctx["args"].baseline_epochs
    if not regime.convergence_epochs:
        return regime.baseline.epochs
    path = ctx["out"] / "converge.json"
    chosen = json.loads(path.read_text()).get("chosen") if path.is_file() else None
    if chosen is None:
        raise SystemExit(f"{path} has no chosen E yet: run --phase converge first (and longer lengths if none "
                         f"converged)")
    return chosen


# ---- rows -------------------------------------------------------------------------------------------------
def run_compare(ctx, seeds: List[int], rows: Optional[List[str]] = None, test: bool = True):
    """compare() over `seeds` into the results folder: runs/*.json (committed), weights/ (only the baselines
    are committed: a later run trains the missing rows from them), checkpoints/ of rows in progress."""
    args, regime, data = ctx["args"], ctx["regime"], ctx["data"]
    E = baseline_epochs(ctx)
    config = regime_config(regime, baseline_epochs=E)
    variants = {v: regime_config(regime, baseline_epochs=E, variant=v) for v in ctx["variants"]}
    return compare(_model_fn(args, ctx["num_classes"]), data.train, data.val, config=config, controls=regime.controls,
                   seeds=seeds, plain_loader=data.plain, test_loader=data.test if test else None, out_dir=ctx["out"],
                   variants=variants, controls_config=ctx["controls_config"], trials=args.trials,
                   checkpoint_every=args.checkpoint_every, rows=rows,
                   described={v: VARIANTS[v][0] for v in variants},
                   allow_untrained_baseline=args.allow_untrained_baseline)


def baselines(ctx):
    """Only the baseline row of each seed (the long part of a regime; the other rows start from them)."""
    for seed in ctx["args"].seeds:
        run_compare(ctx, [seed], rows=["baseline"], test=False)


def evidence(ctx) -> Dict:
    """From-scratch baselines of the regime's evidence lengths beside E (seed 0, one compare folder each under
    evidence/E<L>), resumable inside a run; their validation and (unaugmented) training accuracy."""
    args, regime, data, out = ctx["args"], ctx["regime"], ctx["data"], ctx["out"]
    path = out / "evidence.json"
    found = json.loads(path.read_text()) if path.is_file() else {"runs": {}}
    amp = args.evidence_amp or regime.amp
    tag = "" if amp == regime.amp else f"-{amp}"  # another precision than the regime's: its own run, beside
    for length in args.epochs or regime.evidence_epochs:
        if f"{length}{tag}" in found["runs"]:
            continue
        folder = out / "evidence" / f"E{length}{tag}"
        config = regime_config(regime, baseline_epochs=length).override({"amp": amp})
        res = compare(_model_fn(args, ctx["num_classes"]), data.train, data.val, config=config, controls=(), seeds=[0],
                      plain_loader=data.plain, out_dir=folder, controls_config=ctx["controls_config"],
                      checkpoint_every=args.checkpoint_every, rows=["baseline"])
        record = res.records["baseline"][0]
        model = res.model("baseline", 0).to(resolve_device(args.device))
        found = json.loads(path.read_text()) if path.is_file() else found  # another process may have added one
        found["runs"][f"{length}{tag}"] = {
            "epochs": length, "precision": record["precision"], "val_accuracy": record["val_accuracy"],
            "seconds": record["seconds"], "train_seconds": record["train_seconds"],
            "train_accuracy": evaluate(model, data.plain, resolve_device(args.device), channels_last=True,
                                       amp=amp)["accuracy"],
            "final_train_loss": record["history"][-1]["loss"], "folder": str(folder.relative_to(out))}
        write_json(path, found)
        _logger.info("evidence: %d epochs from scratch (%s) -> val %.4f", length, record["precision"],
                     record["val_accuracy"])
    return found


def evidence_test(ctx) -> Optional[Dict]:
    """The evidence runs' test accuracy, read only once the declared rows' test has been (compare's test.json):
    they were fixed before the choice and take no part in it (from-scratch references; the longest is the
    from-scratch row at more than E + X). Added to evidence.json; None while the test is sealed."""
    out = ctx["out"]
    path = out / "evidence.json"
    if not (out / "test.json").is_file() or not path.is_file():
        return None
    found = json.loads(path.read_text())
    untested = {key: run for key, run in found["runs"].items() if "test_accuracy" not in run}
    for key, run in untested.items():
        amp = key.split("-", 1)[1] if "-" in key else ctx["regime"].amp  # "60-none": that run's own precision
        run["test_accuracy"] = _baseline_test(ctx, out / run["folder"], 0, amp)
    if untested:
        write_json(path, found)
    return found


def _baseline_test(ctx, folder: Path, seed: int, amp: str) -> float:
    """Test accuracy of `seed`'s finished baseline in the compare folder `folder`, from its kept weights."""
    device = resolve_device(ctx["args"].device)
    finished = CompareResult.load(folder, seeds=[seed], model_fn=_model_fn(ctx["args"], ctx["num_classes"]))
    model = finished.model("baseline", seed).to(device).to(memory_format=torch.channels_last)
    return evaluate(model, ctx["data"].test, device, channels_last=True, amp=amp)["accuracy"]


def validate(ctx):
    rows = ctx["args"].rows.split(",") if ctx["args"].rows else None
    for seed in ctx["args"].seeds:  # one seed at a time: every row of a seed finishes before the next seed
        run_compare(ctx, [seed], rows=rows, test=False)
    # the test: once, after the choice over every seed (--no-test: a process that trains some seeds' rows)
    return run_compare(ctx, ctx["args"].seeds, rows=rows, test=not ctx["args"].no_test)


ANCHOR = 0.90  # the full regime's sanity anchor: 3-seed mean test accuracy of the E baseline


def anchor(ctx) -> Dict:
    """The test accuracy of every finished baseline (its committed weights), their mean and whether the mean is
    at least `ANCHOR` (``anchor.json``): the check before the other rows. Trains nothing."""
    args, out = ctx["args"], ctx["out"]
    tests = {}
    for seed in args.seeds:
        if not (out / "runs" / f"baseline-seed{seed}.json").is_file():
            _logger.info("anchor: seed %d's baseline has not finished", seed)
            continue
        tests[str(seed)] = _baseline_test(ctx, out, seed, ctx["regime"].amp)
        _logger.info("anchor: seed %d's baseline: test %.4f", seed, tests[str(seed)])
    mean = float(np.mean(list(tests.values()))) if tests else None
    found = {"test_accuracy": tests, "mean": mean, "threshold": ANCHOR, "seeds_finished": len(tests),
             "holds": None if len(tests) < 3 else mean >= ANCHOR,
             "note": "the baselines' test accuracy only (the sanity anchor); every other row waits for the choice"}
    write_json(out / "anchor.json", found)
    return found


def load_result(ctx) -> CompareResult:
    """The finished records as a `CompareResult` (`CompareResult.load`), training and evaluating nothing: the
    rows finished on every seed asked for; the sealed test once all of them have (compare wrote test.json)."""
    result = CompareResult.load(ctx["out"], seeds=ctx["args"].seeds, model_fn=_model_fn(ctx["args"], ctx["num_classes"]),
                                described={v: VARIANTS[v][0] for v in ctx["variants"]})
    expected = ["baseline", "encodenet", *ctx["variants"], *ctx["regime"].controls]
    missing = [r for r in expected if r not in result.records]
    if missing and not any(n.startswith("partial") for n in result.notes):
        result.notes.append(f"partial: {', '.join(missing)} not run yet")
    return result


# ---- report ------------------------------------------------------------------------------------------------
def _pct(values: List[float]) -> str:
    v = 100 * np.asarray(values)
    return f"{v.mean():.2f} ± {v.std(ddof=1) if len(v) > 1 else 0:.2f}"


def _per_seed(values: List[float]) -> str:
    return ", ".join(f"{100 * a:.2f}" for a in values)


def _add_train_seconds(evid: Dict, out: Path) -> bool:
    """Give each evidence run written before records kept it its training time over every process
    (`train_seconds`, from its record's history); True if any was added."""
    added = False
    for run in evid["runs"].values():
        record = record_path(out / run["folder"], "baseline", 0)
        if "train_seconds" not in run and record.is_file():
            run["train_seconds"], added = train_seconds(json.loads(record.read_text())["history"]), True
    return added


def _length_table(title: str, runs: Dict, rule: Optional[str]) -> List[str]:
    tested = any("test_accuracy" in r for r in runs.values())  # read only after the rows' sealed test
    lines = [f"## {title}", "", "| epochs | val accuracy (%) | train accuracy (%, unaugmented) | training seconds |"
             + (" test accuracy (%) |" if tested else ""), "|---:|---:|---:|---:|" + ("---:|" if tested else "")]
    for e, r in sorted(runs.items(), key=lambda kv: (int(kv[0].split("-")[0]), kv[0])):
        e = e if "-" not in e else f"{e.split('-')[0]} ({e.split('-', 1)[1]})"  # another precision than the regime's
        test = (f" {100 * r['test_accuracy']:.2f} |" if "test_accuracy" in r else " |") if tested else ""
        seconds = r.get("train_seconds", r["seconds"])  # every process's epochs (a run resumed after stops)
        lines.append(f"| {e} | {100 * r['val_accuracy']:.2f} | {100 * r['train_accuracy']:.2f} | {seconds:.0f} |"
                     + test)
    return lines + ([""] + ([rule, ""] if rule else []))


def _equal_from_evidence(result: CompareResult, evid: Dict) -> List[str]:
    """The longest from-scratch evidence run (the regime's precision) that trained at least the rows' total
    E + X epochs is the from-scratch `equal` row: its test against each declared row's, on seed 0 (the only
    seed it has: means only). Empty until the rows' test has been read and that run's test with it."""
    base = result.records["baseline"].get(0)
    if not result.has_test or base is None:
        return []
    E, X = len(base["history"]), result.compute["extra_epochs"]
    runs = [r for key, r in evid["runs"].items() if "-" not in key and r["epochs"] >= E + X and "test_accuracy" in r]
    if not runs:
        return []
    run = max(runs, key=lambda r: r["epochs"])
    t = run["test_accuracy"]
    lines = ["## From scratch at more than the rows' compute (the `equal` row, seed 0 only)", "",
             f"One schedule of {run['epochs']} epochs from scratch: {run['epochs'] / (E + X):.2f}x the rows' total "
             f"(E + X = {E} + {X:.2f} epochs), so more compute than any row, not equal to it. Validation "
             f"{100 * run['val_accuracy']:.2f}%, test {100 * t:.2f}%. One seed: differences are means, no test.", "",
             "| row | test, seed 0 (%) | equal - row (points) |", "|---|---:|---:|"]
    lines += [f"| {r} | {100 * result.tests[r][0]:.2f} | {100 * (t - result.tests[r][0]):+.2f} |"
              for r in result.tests if 0 in result.tests[r]]
    return lines + [""]


def _paired_table(title: str, deltas: Dict[str, Dict]) -> List[str]:
    """Markdown: one row per comparison of `CompareResult.comparisons` (mean, 95% CI and minimal detectable
    difference from 3 seeds on, per-seed differences, Holm-corrected p), in points, under `title`."""
    lines = [title, "", "| comparison | mean | 95% CI | per seed | p (Holm) | detectable |", "|---|---:|---|---|---:|---:|"]
    for other, d in deltas.items():
        ci = "" if d["ci"] is None or d["n"] < 3 else f"{100 * d['ci'][0]:+.2f}..{100 * d['ci'][1]:+.2f}"
        p = "" if d["p_holm"] is None else f"{d['p_holm']:.3f}"
        det = "" if d["detectable"] is None or d["n"] < 3 else f"{100 * d['detectable']:.2f}"
        lines.append(f"| {d['row']} - {other} | {100 * d['mean']:+.2f} | {ci} | "
                     f"{', '.join(f'{100 * v:+.2f}' for v in d['diffs'])} | {p} | {det} |")
    return lines + [""]


def _choice_against_controls(result: CompareResult) -> List[str]:
    """When validation chose a variant over the default recipe: that variant against the baseline and each
    control (its chosen trial) on test, paired over seeds, Holm-corrected over these comparisons. A second
    look, beside the verdict (which speaks for the default recipe): does *any* EncodeNet configuration beat a
    control?"""
    mine = result.chosen
    if mine == result.default or mine not in result.tests:
        return []
    return _paired_table(f"EncodeNet's choice on validation (**{mine}**) against the baseline and each control, "
                         f"paired test differences (points; Holm over these comparisons):",
                         result.comparisons("test", best_of=True, mine=mine))


def report(ctx, result: CompareResult) -> Dict:
    """results.json/.md/.png (compare's own report) and ablation.md: the baseline's convergence, every row on
    validation (which chooses), and the sealed test of the declared rows with the verdict."""
    out, regime = ctx["out"], ctx["regime"]
    result.save(out)
    conv = json.loads((out / "converge.json").read_text()) if (out / "converge.json").is_file() else None
    evid = json.loads((out / "evidence.json").read_text()) if (out / "evidence.json").is_file() else None
    if evid is not None and _add_train_seconds(evid, out):
        write_json(out / "evidence.json", evid)
    X = result.compute["extra_epochs"]
    lines = [f"# Ablation: {ctx['args'].dataset} / {ctx['args'].model} / regime `{ctx['args'].regime}`", "",
             f"`python benchmarks/ablation.py {' '.join(ctx['args'].argv)}`", "",
             f"Regime: {regime.description}.", "",
             f"Seeds {result.seeds}; validation trials per side: {result.trials}. Machine: {machine()}. "
             f"Versions: {versions()}.", "", *[f"**{n}.**\n" for n in result.notes]]
    if conv is not None:
        lines += _length_table("Convergence of the baseline (seed 0, from scratch)", conv["runs"],
                               f"Chosen E = **{conv.get('chosen')}** ({conv.get('rule')}).")
    if evid is not None:
        lines += _length_table("Convergence evidence: from-scratch lengths beside E (seed 0)", evid["runs"], None)
    anch = json.loads((out / "anchor.json").read_text()) if (out / "anchor.json").is_file() else None
    if anch is not None and anch["test_accuracy"]:
        verdict = {True: "holds", False: "**does not hold**", None: "waits for 3 seeds"}[anch["holds"]]
        lines += ["## Sanity anchor: the baselines' test accuracy (read before the rows)", "",
                  f"Per seed: {', '.join(f'{k}: {100 * v:.2f}%' for k, v in anch['test_accuracy'].items())}; mean "
                  f"{100 * anch['mean']:.2f}% against at least {100 * anch['threshold']:.1f}%: {verdict}.", ""]
    lines += ["## Validation (chooses; the test set is not read here)", "",
              f"Extra compute in supervised epochs of FLOPs beyond the baseline. The controls get X = {X:.2f}, the "
              f"default recipe's; a variant that costs more than X is marked †. Differences vs the default are "
              f"paired over seeds (p uncorrected, shown from 3 seeds on).", "",
              "| row | what | extra epochs | val accuracy (%) | per seed | Δ vs default |", "|---|---|---:|---|---|---|"]
    for r in result.rows:
        extra = result.extra_epochs(r)
        d = paired_difference(result.accuracy(r), result.accuracy("encodenet")) if (
            r != "encodenet" and "encodenet" in result.records) else None
        delta = "" if d is None else (f"{100 * d['mean']:+.2f}" + (f" (p={d['p']:.3f})" if d["p"] is not None and
                                                                      d["n"] >= 3 else ""))
        mark = " †" if extra > X * 1.05 else ""
        what = VARIANTS[r][0] if r in VARIANTS else row_what(r)
        diverged = f" **diverged**: {result.diverged(r)}" if result.diverged(r) else ""
        lines.append(f"| {r} | {what}{diverged} | {extra:.2f}{mark} | {_pct(result.accuracy(r))} | "
                     f"{_per_seed(result.accuracy(r))} | {delta} |")
    lines += ["", f"Chosen on validation: EncodeNet row **{result.chosen}**" +
              (f"; best of {result.trials} per side: " + ", ".join(f"{k} -> {v}" for k, v in result.chosen_trials.items())
               if result.chosen_trials else "") + ".", "",
              f"The verdict on validation: {result.verdict_on('val')}", ""]
    if result.has_test:
        lines += ["## Test (read once, after the choice, for the declared rows only)", "",
                  "| row | test accuracy (%) | per seed |", "|---|---|---|"]
        for r in result.tests:
            lines.append(f"| {r} | {_pct(result.accuracy(r, 'test'))} | {_per_seed(result.accuracy(r, 'test'))} |")
        lines += ["", f"**Verdict (test):** {result.verdict}", ""]
        for best_of in ((False, True) if result.trials > 1 and result.chosen_trials else (False,)):
            lines += _paired_table(f"Paired test differences{' (best of k against best of k)' if best_of else ''} "
                                   f"(points):", result.comparisons("test", best_of))
        lines += _choice_against_controls(result)
        lines += _equal_from_evidence(result, evid) if evid is not None else []
    else:
        lines += ["## Test", "", "Not read yet: the test set is read once every row has finished on every seed.", ""]
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    return {"converge": conv, "evidence": evid}


def main(argv: Optional[List[str]] = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="cifar10-jpeg", help="cifar10-jpeg (../shared/data zip) or cifar10")
    p.add_argument("--download", action="store_true",
                   help="--dataset cifar10: download the original files into --data-dir when they are not there")
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--model", default="resnet20_cifar")
    p.add_argument("--regime", choices=sorted(REGIMES), default="converged")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--phase", choices=("converge", "baselines", "evidence", "anchor", "validate", "report", "all"),
                   default="all", help="converge: choose E by rule (regimes with convergence_epochs); baselines: "
                   "only each seed's baseline; evidence: the from-scratch lengths beside a fixed E; validate: every "
                   "row; anchor: the finished baselines' test accuracy (the sanity anchor); report: trains nothing")
    p.add_argument("--out-dir", default=None, help="results folder (default benchmarks/results/ablation-<regime>)")
    p.add_argument("--cache-dir", default=None, help="decoded cifar10-jpeg cache (default ~/.cache/encodenet_timm)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="auto")
    p.add_argument("--variants", default=None, help="comma-separated variant rows (default: the regime's)")
    p.add_argument("--epochs", type=int, nargs="+", default=None,
                   help="converge phase: train these lengths (default: the regime's convergence_epochs)")
    p.add_argument("--evidence-amp", default=None, choices=("none", "bf16", "auto"),
                   help="evidence: train the lengths in this precision instead of the regime's (runs named "
                        "E<L>-<amp>, beside the regime's): e.g. none to see what bf16 costs at full length")
    p.add_argument("--rows", default=None, help="validate: train only these rows (comma-separated; default all)")
    p.add_argument("--no-test", action="store_true",
                   help="validate: train these seeds' rows and read no test set (processes that share a regime's "
                        "seeds; the last call, over every seed, reads it)")
    p.add_argument("--trials", type=int, default=1, help="validation trials per side (compare's trials)")
    p.add_argument("--checkpoint-every", type=int, default=200,
                   help="optimizer steps between checkpoints inside a row (a stopped process loses at most these)")
    p.add_argument("--allow-untrained-baseline", action="store_true",
                   help="compare from a baseline near chance accuracy (the smoke regime's tiny data)")
    p.add_argument("--controls-config", default=None, help="YAML file of ControlsConfig settings (default: its "
                   "defaults)")
    p.add_argument("--baseline-epochs", type=int, default=None,
                   help="the baseline's E instead of converge.json's choice (the records say which E they used)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("encodenet_timm").setLevel(logging.WARNING)
    logging.getLogger("encodenet_timm.compare").setLevel(logging.INFO)
    logging.getLogger("encodenet_timm.controls").setLevel(logging.INFO)
    logging.getLogger("encodenet_timm.training").setLevel(logging.INFO)  # a line per epoch: the long runs' progress
    if args.threads:
        torch.set_num_threads(args.threads)
    regime = REGIMES[args.regime]
    if args.variants is None:
        args.variants = ",".join(regime.variants if regime.variants is not None else VARIANTS)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    arrays = load_cifar(args.dataset, args.data_dir, cache_dir=args.cache_dir, download=args.download)
    out = Path(args.out_dir or Path(__file__).parent / "results" / f"ablation-{args.regime}")
    out.mkdir(parents=True, exist_ok=True)
    controls_config = (ControlsConfig.from_yaml(args.controls_config) if args.controls_config else
                       ControlsConfig())
    ctx = {"args": args, "regime": regime, "variants": variants, "num_classes": len(arrays.classes), "out": out,
           "data": make_data(arrays, regime), "controls_config": controls_config}
    if args.phase == "converge":
        return converge(ctx)
    if args.phase == "baselines":
        return baselines(ctx)
    if args.phase == "evidence":
        return evidence(ctx)
    if args.phase == "anchor":
        return anchor(ctx)
    if args.phase in ("validate", "all"):
        if regime.convergence_epochs and args.baseline_epochs is None and not (out / "converge.json").is_file():
            converge(ctx)
        result = validate(ctx)
    else:  # report (and test): what has finished, training nothing; the sealed test once every row has
        result = load_result(ctx)
    if result.has_test:
        evidence_test(ctx)
    return {"result": result, **report(ctx, result)}


if __name__ == "__main__":
    main()
