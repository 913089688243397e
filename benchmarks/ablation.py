"""Ablation of EncodeNet's variants against equal-compute controls, chosen on a validation split.

    python benchmarks/ablation.py --data-dir ../shared/data --seeds 0 1 2

Protocol (fixed before any run):

* Per seed: a stratified training subset of the CIFAR-10 training set; 10% of it (per class) is held out
  as the validation split. Nothing is tuned on the test set.
* One baseline per seed (supervised, E epochs) is the starting point of every variant, of ``kd`` and of
  ``baseline_continued``.
* Rows: the variants in ``VARIANTS`` (config overrides on the paper preset, `EncodeNetConfig.paper()`),
  and the controls ``baseline`` (E epochs), ``baseline_equal`` (from scratch, one schedule of E + X
  epochs), ``baseline_continued`` (the baseline trained X more epochs at the fine-tune lr) and ``kd``
  (timm's `LogitDistillationTask`, teacher = the baseline, student = a copy of it, X epochs' FLOPs).
  X is the extra compute of the *most expensive* variant, in supervised epochs (FLOPs counted with
  `FlopCounterMode` on the real stage code): every variant gets at most the controls' compute.
* Selection: the variant with the highest mean validation accuracy (last epoch) over seeds.
* Test: evaluated once, after selection, for the chosen variant, the paper row and the controls,
  from weights saved at the end of each run.

``--phase validate`` trains (resumable: finished runs are skipped); ``--phase test`` evaluates the
test set; ``--phase all`` does both. Outputs go to ``benchmarks/results/ablation-<name>/``.
"""
import argparse
import dataclasses
import json
import logging
import sys
import time
from copy import deepcopy
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.task import ClassificationTask, LogitDistillationTask
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))
from cifar import _mean_std, _plain, paired  # noqa: E402  (the benchmark's shared statistics)

from encodenet_timm import EncodeNetConfig, EncodeNetWrapper, StageConfig  # noqa: E402
from encodenet_timm.env import machine, versions  # noqa: E402
from encodenet_timm.data import CifarDataset, load_cifar, stratified_subset, train_val_split  # noqa: E402
from encodenet_timm.split import stage_names  # noqa: E402
from encodenet_timm.training import evaluate, resolve_device, seed_everything, train_stage  # noqa: E402

_logger = logging.getLogger("benchmarks.ablation")

CONTROLS = ("baseline", "baseline_equal", "baseline_continued", "kd")


@dataclasses.dataclass
class Regime:
    """Sizes and stage schedules shared by every row; chosen once, before any run."""
    description: str
    per_class: int                   # stratified training subset per class (before the validation hold-out)
    val_fraction: float
    batch_size: int
    baseline: StageConfig
    autoencoder: StageConfig         # the paper preset's stage lengths at this scale
    transfer: StageConfig
    finetune: StageConfig            # used by the rows that fine-tune, and by baseline_continued / kd
    kd_temperature: float = 4.0
    kd_task_loss_weight: float = 0.3


def _sgd(epochs: int, lr: float) -> StageConfig:
    return StageConfig(epochs=epochs, lr=lr, opt="sgd", momentum=0.9, weight_decay=5e-4, sched="cosine")


def _cpu_regime(baseline_epochs: int, what: str) -> Regime:
    """500 images per class (450 train + 50 validation); autoencoder 2, transfer 3, fine-tune 2 epochs."""
    return Regime(description=f"2 CPU cores{what}: 500 images per class drawn with the seed (450 train + 50 "
                              f"validation), {baseline_epochs} baseline epochs; autoencoder 2, transfer 3, "
                              f"fine-tune 2 epochs",
                  per_class=500, val_fraction=0.1, batch_size=128, baseline=_sgd(baseline_epochs, 0.1),
                  autoencoder=StageConfig(epochs=2, lr=1e-3, opt="adamw", weight_decay=0.0, sched="cosine"),
                  transfer=_sgd(3, 0.01), finetune=_sgd(2, 0.01))


REGIMES = {
    "short": _cpu_regime(12, ""),
    "long": _cpu_regime(30, ", nearer convergence"),
    "smoke": Regime(
        description="pipeline check (tests): 20 images per class, 1 epoch per stage; numbers mean nothing",
        per_class=20, val_fraction=0.2, batch_size=50, baseline=_sgd(1, 0.05),
        autoencoder=StageConfig(epochs=1, lr=1e-3, opt="adamw", weight_decay=0.0, sched="cosine"),
        transfer=_sgd(1, 0.01), finetune=_sgd(1, 0.01)),
}


# variant name -> (description, overrides on the paper preset); "<last>" is the model's second-to-last
# feature_info stage (the last stage and the head are retrained in transfer)
VARIANTS: Dict[str, tuple] = {
    "paper": ("the paper: split at forward_features, k=5, min-entropy, MSE, frozen encoder", {}),
    "split_last": ("split before the last stage: it restarts from the baseline and trains with the head",
                   {"split": "<last>"}),
    "ce": ("autoencoder loss MSE + 1.0 x cross-entropy through the head", {"autoencoder.ce_weight": 1.0}),
    "ae_lr_low": ("autoencoder lr 1e-4 instead of 1e-3", {"autoencoder.lr": 1e-4}),
    "centroid": ("representative = member nearest the cluster centroid", {"representatives.rule": "nearest_centroid"}),
    "auto_k": ("clusters per class chosen by silhouette (2..10)", {"representatives.clusters_per_class": "auto"}),
    "finetune": ("paper + a final fine-tune of every weight (lr 0.01, cosine)", {"finetune.epochs": "<ft>"}),
    "split_last_ce_ft": ("split_last + ce + finetune together",
                         {"split": "<last>", "autoencoder.ce_weight": 1.0, "finetune.epochs": "<ft>"}),
    "split_last_no_ae": ("split_last without the autoencoder (0 epochs): is the autoencoder doing anything?",
                         {"split": "<last>", "autoencoder.epochs": 0}),
}


def variant_config(regime: Regime, model: torch.nn.Module, name: str, seed: int) -> EncodeNetConfig:
    """The paper preset at this regime's stage lengths, with the variant's overrides."""
    last = stage_names(model)[-2]
    overrides = {"seed": seed, "progress": False, "channels_last": True}
    for stage in ("autoencoder", "transfer", "finetune"):
        for key, value in dataclasses.asdict(getattr(regime, stage)).items():
            overrides[f"{stage}.{key}"] = value
    overrides["finetune.epochs"] = 0
    for key, value in VARIANTS[name][1].items():
        overrides[key] = {"<last>": last, "<ft>": regime.finetune.epochs}.get(value, value)
    return EncodeNetConfig.paper(**overrides)


# ---- data ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Data:
    train: DataLoader                # augmented, shuffled
    plain: DataLoader                # the same images, no augmentation, in order
    val: DataLoader
    n_train: int


def seed_data(arrays, regime: Regime, seed: int) -> Data:
    sub = stratified_subset(arrays.train_labels, regime.per_class, seed=seed)
    tr, va = train_val_split(arrays.train_labels[sub], regime.val_fraction, seed=seed)
    tr, va = sub[tr], sub[va]
    ds = lambda idx, augment: CifarDataset(arrays.train_images[idx], arrays.train_labels[idx], arrays.mean,
                                           arrays.std, augment=augment)
    g = torch.Generator().manual_seed(seed)
    return Data(DataLoader(ds(tr, True), batch_size=regime.batch_size, shuffle=True, generator=g),
                DataLoader(ds(tr, False), batch_size=500), DataLoader(ds(va, False), batch_size=500), len(tr))


# ---- compute --------------------------------------------------------------------------------------------
def _flops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def count_compute(args, regime: Regime, arrays, num_classes: int) -> Dict:
    """Per-image FLOPs of a supervised step and of each variant's stages, measured by running the real
    stage code for one epoch on a small real subset (5 images per class) inside `FlopCounterMode`."""
    idx = stratified_subset(arrays.train_labels, 5, seed=0)
    n = len(idx)
    ds = CifarDataset(arrays.train_images[idx], arrays.train_labels[idx], arrays.mean, arrays.std)
    loader = DataLoader(ds, batch_size=n)
    model = _new_model(args, num_classes, 0)
    x, y = next(iter(loader))
    sup = ClassificationTask(model, verbose=False)
    train_step = _flops(lambda: sup(x, y)["loss"].backward()) / n
    kd = LogitDistillationTask(model, teacher_model=deepcopy(model).requires_grad_(False), verbose=False)
    kd_step = _flops(lambda: kd(x, y)["loss"].backward()) / n
    variants = {}
    for name in VARIANTS:
        cfg = variant_config(regime, model, name, 0)
        one = cfg.override({f"{s}.epochs": min(1, getattr(cfg, s).epochs)
                            for s in ("autoencoder", "transfer", "finetune")})
        one.channels_last = False
        w = EncodeNetWrapper(model, one)
        w.decoder  # built (and its own FLOPs counted) outside the counters below
        per_epoch = {"features": _flops(lambda: w.select_representatives(loader)) / n,
                     "autoencoder": _flops(lambda: w.fit_autoencoder(loader)) / n,
                     "transfer": _flops(lambda: w.fit_transfer(loader)) / n,
                     "finetune": _flops(lambda: w.fit_finetune(loader)) / n if one.finetune.epochs else 0.0}
        extra = per_epoch["features"] + sum(per_epoch[s] * getattr(cfg, s).epochs
                                            for s in ("autoencoder", "transfer", "finetune"))
        variants[name] = {"per_image_per_epoch": per_epoch, "extra_epochs": extra / train_step}
    x_epochs = max(v["extra_epochs"] for v in variants.values())
    return {"train_step": train_step, "kd_step": kd_step, "variants": variants,
            "control_extra_epochs": int(np.ceil(x_epochs - 1e-9)),
            "kd_epochs": max(1, int(round(np.ceil(x_epochs - 1e-9) * train_step / kd_step))),
            "note": "FLOPs per image (matmul/conv, forward + backward) from FlopCounterMode over one epoch of "
                    "each stage on 50 real images; k-means (FAISS) and validation passes are not counted. "
                    "X = ceil(max variant extra) supervised epochs for baseline_equal / baseline_continued; "
                    "kd gets the epochs whose FLOPs are closest to X supervised epochs."}


# ---- runs -----------------------------------------------------------------------------------------------
def _new_model(args, num_classes: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(args.model, pretrained=False, num_classes=num_classes)


def _val_fn(model, loader, device):
    return lambda: evaluate(model, loader, device, channels_last=True)


def _train(task, model, data: Data, cfg: StageConfig, stage: str, device, seed: int) -> List[Dict]:
    seed_everything(seed)
    model.to(memory_format=torch.channels_last)
    return train_stage(task, data.train, cfg, stage=stage, device=device, channels_last=True, progress=False,
                       val_fn=_val_fn(model, data.val, device))


def _baseline_model(ctx, seed: int) -> torch.nn.Module:
    model = _new_model(ctx["args"], ctx["num_classes"], seed)
    model.load_state_dict(load_file(str(_weights(ctx, "baseline", seed))))
    return model.to(ctx["device"])


def run_row(ctx, row: str, seed: int, data: Data) -> Dict:
    """Train one row for one seed; returns its record (validation history) and saves its final weights."""
    args, regime, device, compute = ctx["args"], ctx["regime"], ctx["device"], ctx["compute"]
    X = compute["control_extra_epochs"]
    start = time.perf_counter()
    if row in ("baseline", "baseline_equal"):
        model = _new_model(args, ctx["num_classes"], seed).to(device)
        epochs = regime.baseline.epochs + (X if row == "baseline_equal" else 0)
        cfg = dataclasses.replace(regime.baseline, epochs=epochs)
        hist = {row: _train(ClassificationTask(model, verbose=False, device=device), model, data, cfg, row,
                            device, seed)}
        extra = float(epochs - regime.baseline.epochs)
    elif row == "baseline_continued":
        model = _baseline_model(ctx, seed)
        cfg = dataclasses.replace(regime.finetune, epochs=X)
        hist = {row: _train(ClassificationTask(model, verbose=False, device=device), model, data, cfg, row,
                            device, seed)}
        extra = float(X)
    elif row == "kd":
        teacher = _baseline_model(ctx, seed).eval().requires_grad_(False).to(memory_format=torch.channels_last)
        model = _baseline_model(ctx, seed)
        task = LogitDistillationTask(model, teacher_model=teacher, temperature=regime.kd_temperature,
                                     task_loss_weight=regime.kd_task_loss_weight, device=device, verbose=False)
        cfg = dataclasses.replace(regime.finetune, epochs=compute["kd_epochs"])
        hist = {row: _train(task, model, data, cfg, row, device, seed)}
        extra = compute["kd_epochs"] * compute["kd_step"] / compute["train_step"]
    else:
        model = _baseline_model(ctx, seed)
        cfg = variant_config(regime, model, row, seed)
        wrapper = EncodeNetWrapper(model, cfg, copy=False)
        hist = wrapper.fit(data.train, data.val, plain_loader=data.plain)
        hist = {k: v for k, v in hist.items() if isinstance(v, list)}
        model = wrapper.model
        extra = compute["variants"][row]["extra_epochs"]
    final = evaluate(model, data.val, device, channels_last=True)
    save_file({k: v.contiguous().cpu() for k, v in model.state_dict().items()}, str(_weights(ctx, row, seed)))
    return {"row": row, "seed": seed, "val_accuracy": final["accuracy"], "val_loss": final["loss"],
            "extra_epochs": extra, "wall_seconds": time.perf_counter() - start, "history": _plain(hist)}


def _weights(ctx, row: str, seed: int) -> Path:
    path = ctx["out"] / "cache" / f"{row}-seed{seed}.safetensors"  # git-ignored
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _record_path(ctx, row: str, seed: int) -> Path:
    return ctx["out"] / "runs" / f"{row}-seed{seed}.json"


def validate(ctx) -> None:
    rows = ["baseline", *ctx["variants"], "baseline_equal", "baseline_continued", "kd"]
    if ctx["args"].only:  # a share of the rows, in the order given (to split the work across processes)
        rows = [r for r in ctx["args"].only.split(",") if r in rows]
    for seed in ctx["args"].seeds:
        data = None
        for row in rows:
            path = _record_path(ctx, row, seed)
            if path.is_file() and _weights(ctx, row, seed).is_file():
                continue
            data = data or seed_data(ctx["arrays"], ctx["regime"], seed)
            _logger.info("==== %s, seed %d ====", row, seed)
            record = run_row(ctx, row, seed, data)
            record["fingerprint"] = ctx["fingerprint"]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record, indent=1))
            _logger.info("%s seed %d: val %.4f (extra %.2f epochs, %.0f s)", row, seed, record["val_accuracy"],
                         record["extra_epochs"], record["wall_seconds"])


def load_runs(ctx) -> Dict[str, Dict[int, Dict]]:
    runs: Dict[str, Dict[int, Dict]] = {}
    for path in sorted((ctx["out"] / "runs").glob("*.json")):
        record = json.loads(path.read_text())
        if record.get("fingerprint") != ctx["fingerprint"]:
            raise ValueError(f"{path} was made with another setup; delete {ctx['out']} or pass --name")
        runs.setdefault(record["row"], {})[record["seed"]] = record
    return runs


def choose(runs: Dict[str, Dict[int, Dict]], seeds: List[int]) -> str:
    """The variant with the highest mean validation accuracy over the seeds every variant finished."""
    done = {r: v for r, v in runs.items() if r in VARIANTS and all(s in v for s in seeds)}
    if not done:
        raise ValueError("no variant has finished every seed; run --phase validate first")
    return max(done, key=lambda r: np.mean([done[r][s]["val_accuracy"] for s in seeds]))


def test(ctx) -> Dict:
    runs = load_runs(ctx)
    seeds = sorted(set.intersection(*[set(v) for v in runs.values()]))
    chosen = choose(runs, seeds)
    arrays = ctx["arrays"]
    test_ds = CifarDataset(arrays.test_images, arrays.test_labels, arrays.mean, arrays.std)
    loader = DataLoader(test_ds, batch_size=500)
    out = {}
    for row in dict.fromkeys([chosen, "paper", *CONTROLS]):
        for seed in seeds:
            model = _new_model(ctx["args"], ctx["num_classes"], seed)
            model.load_state_dict(load_file(str(_weights(ctx, row, seed))))
            model = model.to(ctx["device"], memory_format=torch.channels_last)
            out.setdefault(row, {})[seed] = evaluate(model, loader, ctx["device"], channels_last=True)["accuracy"]
    result = {"chosen": chosen, "seeds": seeds, "test_accuracy": out}
    (ctx["out"] / "test.json").write_text(json.dumps(result, indent=1))
    return result


# ---- report ------------------------------------------------------------------------------------------------
def _pct(values: List[float]) -> str:
    return f"{100 * np.mean(values):.2f} ± {100 * np.std(values, ddof=1) if len(values) > 1 else 0:.2f}"


def report(ctx) -> Dict:
    runs = load_runs(ctx)
    seeds = sorted(set.intersection(*[set(v) for v in runs.values()])) if runs else []
    tested = json.loads((ctx["out"] / "test.json").read_text()) if (ctx["out"] / "test.json").is_file() else None
    val = {r: [runs[r][s]["val_accuracy"] for s in seeds] for r in runs}
    extra = {r: float(np.mean([runs[r][s]["extra_epochs"] for s in seeds])) for r in runs}
    results = {"command": "python benchmarks/ablation.py " + " ".join(ctx["args"].argv),
               "regime": ctx["args"].regime, "regime_config": _plain(dataclasses.asdict(ctx["regime"])),
               "model": ctx["args"].model, "dataset": ctx["args"].dataset, "seeds": seeds,
               "compute": ctx["compute"], "versions": versions(), "machine": machine(),
               "validation": {r: {**_mean_std(v), "per_seed": v, "extra_epochs": extra[r]} for r, v in val.items()},
               "validation_paired": {}, "test": None}
    rows = [r for r in ["baseline", *VARIANTS, "baseline_equal", "baseline_continued", "kd"] if r in val]
    for r in rows:
        if r in VARIANTS and r != "paper":
            results["validation_paired"][f"{r} - paper"] = paired(val[r], val["paper"])
    if tested is not None and tested["seeds"] == seeds:
        t = {r: [tested["test_accuracy"][r][str(s)] if str(s) in tested["test_accuracy"][r]
                 else tested["test_accuracy"][r][s] for s in seeds] for r in tested["test_accuracy"]}
        comps = {f"{a} - {b}": paired(t[a], t[b]) for a in dict.fromkeys([tested["chosen"], "paper"])
                 for b in CONTROLS if a in t and b in t}
        results["test"] = {"chosen": tested["chosen"], "accuracy": {r: {**_mean_std(v), "per_seed": v}
                                                                    for r, v in t.items()}, "paired": comps}
    (ctx["out"] / "results.json").write_text(json.dumps(results, indent=1))
    (ctx["out"] / "results.md").write_text(markdown(results, rows))
    plot(ctx, results, rows)
    return results


def _p(d: Dict) -> str:
    return "n/a" if d.get("p") is None else f"{d['p']:.2f}"


def markdown(res: Dict, rows: List[str]) -> str:
    v, c = res["validation"], res["compute"]
    lines = [f"# Ablation: {res['dataset']} / {res['model']} / regime `{res['regime']}`", "",
             f"`{res['command']}`", "", f"Regime: {res['regime_config']['description']}.", "",
             f"Seeds {res['seeds']}. Machine: {res['machine']}. Versions: {res['versions']}.", "",
             "## Validation (chooses the recipe; the test set is not used)", "",
             "Validation accuracy (%) at the end of each row, mean ± std over seeds. Extra compute: supervised "
             "epochs of FLOPs beyond the shared baseline.", "",
             "| row | what | extra compute (epochs) | val accuracy | per seed | Δ vs paper |", "|---|---|---|---|---|---|"]
    for r in rows:
        what = VARIANTS[r][0] if r in VARIANTS else {
            "baseline": "supervised baseline, E epochs (the starting point of every other row but baseline_equal)",
            "baseline_equal": "from scratch, one schedule of E + X epochs", "kd": "timm LogitDistillationTask, "
            "teacher = baseline, X epochs of FLOPs", "baseline_continued": "baseline trained X more epochs"}[r]
        d = res["validation_paired"].get(f"{r} - paper")
        delta = f"{100 * d['mean']:+.2f} (p={_p(d)})" if d else ""
        lines.append(f"| {r} | {what} | {v[r]['extra_epochs']:.2f} | {_pct(v[r]['per_seed'])} | "
                     f"{', '.join(f'{100 * a:.2f}' for a in v[r]['per_seed'])} | {delta} |")
    lines += ["", f"X = {c['control_extra_epochs']} supervised epochs (the most expensive variant, rounded up); "
              f"kd runs {c['kd_epochs']} epochs. {c['note']}", ""]
    t = res["test"]
    if t:
        lines += ["## Test (once, after choosing on validation)", "",
                  f"Chosen on validation: **{t['chosen']}**. Test accuracy (%) on the full CIFAR-10 test set.", "",
                  "| row | test accuracy | per seed |", "|---|---|---|"]
        for r, a in t["accuracy"].items():
            lines.append(f"| {r} | {_pct(a['per_seed'])} | {', '.join(f'{100 * x:.2f}' for x in a['per_seed'])} |")
        lines += ["", "Paired differences on the test set (percentage points; t-test over seeds, weak with 3):", "",
                  "| comparison | mean diff | per seed | p |", "|---|---|---|---|"]
        for k, d in t["paired"].items():
            lines.append(f"| {k} | {100 * d['mean']:+.2f} | {', '.join(f'{100 * x:+.2f}' for x in d['diffs'])} "
                         f"| {_p(d)} |")
    return "\n".join(lines) + "\n"


def plot(ctx, res: Dict, rows: List[str]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        v = res["validation"][r]
        control = r in CONTROLS
        ax.errorbar(v["extra_epochs"], 100 * v["mean"], yerr=100 * v["std"], fmt="s" if control else "o",
                    color="tab:gray" if control else "tab:blue", capsize=3)
        ax.annotate(r, (v["extra_epochs"], 100 * v["mean"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("extra compute beyond the baseline (supervised epochs of FLOPs)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(f"{res['model']} on {res['dataset']}, regime {res['regime']} (mean ± std, {len(res['seeds'])} seeds)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(ctx["out"] / "accuracy_vs_compute.png", dpi=120)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="cifar10-jpeg", help="cifar10-jpeg (../shared/data zip) or cifar10")
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--model", default="resnet20_cifar")
    p.add_argument("--regime", choices=sorted(REGIMES), default="short")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--phase", choices=("validate", "test", "report", "all"), default="all")
    p.add_argument("--name", default=None, help="results folder name (default ablation-<regime>)")
    p.add_argument("--only", default=None,
                   help="train only these rows, in this order (e.g. 'baseline_equal,kd' in a second process); "
                        "variants need the seed's baseline to have finished")
    p.add_argument("--out-dir", default=None, help="results folder (default benchmarks/results/<name>)")
    p.add_argument("--cache-dir", default=None, help="decoded cifar10-jpeg cache (default ~/.cache/encodenet_timm)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="auto")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated variant rows to train (default: all; 'paper' is always included)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("encodenet_timm").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    arrays = load_cifar(args.dataset, args.data_dir, cache_dir=args.cache_dir, download=False)
    regime = REGIMES[args.regime]
    num_classes = len(arrays.classes)
    out = Path(args.out_dir or Path(__file__).parent / "results" / (args.name or f"ablation-{args.regime}"))
    out.mkdir(parents=True, exist_ok=True)
    compute_path = out / "compute.json"
    if compute_path.is_file():
        compute = json.loads(compute_path.read_text())
    else:
        compute = count_compute(args, regime, arrays, num_classes)
        compute_path.write_text(json.dumps(compute, indent=1))
    _logger.info("extra compute (epochs): %s; controls get X=%d, kd %d epochs",
                 {k: round(v["extra_epochs"], 2) for k, v in compute["variants"].items()},
                 compute["control_extra_epochs"], compute["kd_epochs"])
    variants = list(dict.fromkeys(["paper", *[v.strip() for v in args.variants.split(",") if v.strip()]]))
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    ctx = {"args": args, "regime": regime, "variants": variants, "arrays": arrays, "num_classes": num_classes, "out": out,
           "device": resolve_device(args.device), "compute": compute,
           "fingerprint": {"dataset": args.dataset, "model": args.model, "regime": _plain(dataclasses.asdict(regime)),
                           "variants": _plain(VARIANTS), "X": compute["control_extra_epochs"]}}
    if args.phase in ("validate", "all"):
        validate(ctx)
    if args.phase in ("test", "all"):
        test(ctx)
    return report(ctx)


if __name__ == "__main__":
    main()
