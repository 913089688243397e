"""CPU training speed: fp32 against bf16 autocast (and torch.compile), as ratios measured in one run.

    python benchmarks/cpu_speed.py --data-dir ../shared/data --threads 2 --profile    # speed rows + profile
    python benchmarks/cpu_speed.py --data-dir ../shared/data --threads 1 --parity     # bf16 accuracy parity
    python benchmarks/cpu_speed.py --smoke --out-dir /tmp/cs                          # the test: tiny, synthetic

Speed rows (training img/s through the package's own loop, `train_stage`): per model and setting, rounds
of ``--steps`` batches; every round runs every setting once (A B C A B C ...), so load from elsewhere hits
them alike, and a setting's figure is the median over rounds of its img/s; each ratio is the median of
the per-round ratios to fp32 of the same model. Models: ``resnet20_cifar`` (real CIFAR-10 data through
the package's per-sample `CifarDataset` loader and its `DeviceArrayDataset`, crop + flip), ``resnet10t`` and
a small ViT at 32 px (synthetic batches), and the autoencoder stage of ``resnet20_cifar`` (the
package's `ConvertingAutoencoderTask` on the real data). The first round of a setting (compile's
tracing, oneDNN's kernel choice) is a warm-up and not counted.

``--profile``: `torch.profiler` over one round of bf16 training of resnet20_cifar (data path included) and of
its autoencoder stage: the ops that take the time. ``--parity`` (instead of the speed rows; it needs no idle
cores): resnet20_cifar trained on a CIFAR-10 subset in fp32 and in bf16, the same seeds, validation accuracy
paired seed by seed.

Results: ``--out-dir`` (default benchmarks/results/cpu-speed): results.json and results.md (speed, written
after every workload, so a stopped run keeps what it finished), parity.json and parity.md, each with the
command, the machine (CPU flags as torch sees them) and versions.
"""
import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import timm
import torch
from timm.task import ClassificationTask
from torch.utils.data import DataLoader, TensorDataset

import encodenet_timm  # noqa: F401  (registers resnet20_cifar)
from encodenet_timm import EncodeNetConfig, EncodeNetWrapper
from encodenet_timm.config import StageConfig
from encodenet_timm.data import CifarDataset, load_cifar, stratified_subset
from encodenet_timm.device_data import DeviceArrayDataset, device_collate
from encodenet_timm.env import machine, precision, versions
from encodenet_timm.seeding import seed_everything
from encodenet_timm.stats import paired_difference
from encodenet_timm.tasks import ClusterTargets
from encodenet_timm.training import LoopOptions, evaluate, train_stage

CPU = torch.device("cpu")
SETTINGS = {"fp32": dict(amp="none", compile=False), "bf16": dict(amp="bf16", compile=False),
            "bf16+compile": dict(amp="bf16", compile=True), "fp32+compile": dict(amp="none", compile=True)}


@dataclasses.dataclass
class Data:
    images: np.ndarray   # (N, 32, 32, 3) uint8
    labels: np.ndarray   # (N,) int64
    mean: tuple
    std: tuple


def load_data(args) -> Data:
    if args.smoke:
        g = np.random.default_rng(0)
        return Data(g.integers(0, 256, (256, 32, 32, 3), dtype=np.uint8), g.integers(0, 10, 256).astype(np.int64),
                    (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    a = load_cifar("cifar10-jpeg", args.data_dir, download=False)
    order = np.random.default_rng(0).permutation(len(a.train_labels))  # the files are by class: "the first n" mixes them
    return Data(a.train_images[order], a.train_labels[order], a.mean, a.std)


def _loader(data: Data, path: str, batch: int, n: int) -> DataLoader:
    """A shuffled, augmenting training loader over the first `n` images: "per_sample" (`CifarDataset`) or
    "device" (`DeviceArrayDataset` on the CPU, one gather per batch)."""
    images, labels = data.images[:n], data.labels[:n]
    g = torch.Generator().manual_seed(0)
    if path == "device":
        ds = DeviceArrayDataset(images, labels, data.mean, data.std, augment=True)
        return DataLoader(ds, batch_size=batch, shuffle=True, generator=g, drop_last=True, collate_fn=device_collate)
    ds = CifarDataset(images, labels, data.mean, data.std, augment=True)
    return DataLoader(ds, batch_size=batch, shuffle=True, generator=g, drop_last=True)


def _synthetic(batch: int, steps: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch * steps, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (batch * steps,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False, drop_last=True)


def _model(name: str) -> torch.nn.Module:
    kw = dict(img_size=32, patch_size=4) if name.startswith("vit") else {}
    return timm.create_model(name, pretrained=False, num_classes=10, **kw).to(memory_format=torch.channels_last)


def classification_round(name: str, loader: DataLoader, setting: str) -> Callable[[], float]:
    """A closure that trains `name` for one pass over `loader` under `setting` and returns its img/s;
    the model, task and optimizer persist across calls (the first call pays compile and warm-up)."""
    torch.manual_seed(0)
    model = _model(name)
    task = ClassificationTask(model, verbose=False)
    options = LoopOptions(CPU, channels_last=True, progress=False, **SETTINGS[setting])
    cfg = StageConfig(epochs=1, lr=0.05, opt="sgd", momentum=0.9, weight_decay=5e-4, sched="none")
    state = {"compiled": False}

    def run() -> float:
        if options.compile and not state["compiled"]:
            task.compile()  # once; train_stage would compile again on every call
            state["compiled"] = True
        start = time.perf_counter()
        train_stage(task, loader, cfg, stage=setting, options=dataclasses.replace(options, compile=False))
        return len(loader) * loader.batch_size / (time.perf_counter() - start)
    return run


def autoencoder_round(data: Data, setting: str, batch: int, n: int) -> Callable[[], float]:
    """A closure that runs one autoencoder epoch of resnet20_cifar (the wrapper's encoder, decoder and task on
    real data, representatives picked once) and returns its img/s; like a real multi-epoch stage, the task is
    built and compiled once and persists across calls."""
    torch.manual_seed(0)
    amp, compile_ = SETTINGS[setting]["amp"], SETTINGS[setting]["compile"]
    cfg = EncodeNetConfig(device="cpu", progress=False, channels_last=True, amp=amp, input_size=(3, 32, 32)).override(
        {"representatives.clusters_per_class": 1})  # k does not change an epoch's cost
    w = EncodeNetWrapper(_model("resnet20_cifar"), cfg, copy=False)
    plain = DataLoader(CifarDataset(data.images[:n], data.labels[:n], data.mean, data.std), batch_size=256)
    reps = w.select_representatives(plain)
    train = _loader(data, "per_sample", batch, n)
    loader = DataLoader(ClusterTargets(train.dataset, reps.cluster_ids), batch_size=batch, shuffle=True,
                        generator=torch.Generator().manual_seed(0), drop_last=True)
    task = w.autoencoder_task(reps)  # the stage's own task: MSE + the default CE weight through the head
    stage = dataclasses.replace(cfg.autoencoder, epochs=1, sched="none")
    options = LoopOptions(CPU, amp=amp, channels_last=True, progress=False)
    state = {"compiled": False}

    def run() -> float:
        if compile_ and not state["compiled"]:
            task.compile()
            state["compiled"] = True
        start = time.perf_counter()
        train_stage(task, loader, stage, stage=f"autoencoder-{setting}", options=options)
        return len(loader) * batch / (time.perf_counter() - start)
    return run


def speed(args, data: Data, rows: List[Dict[str, Any]], save: Callable[[], None]) -> None:
    """Append rows (workload, setting) -> median img/s over rounds and the median per-round ratio to fp32,
    calling `save` after each workload (a stopped run keeps the workloads it finished)."""
    n = args.steps * args.batch_size
    settings = [s for s in args.settings.split(",") if s]
    workloads: Dict[str, Callable[[str], Callable[[], float]]] = {
        "resnet20_cifar (CIFAR-10, per-sample loader)": lambda s: classification_round(
            "resnet20_cifar", _loader(data, "per_sample", args.batch_size, n), s),
        "resnet20_cifar (CIFAR-10, device loader)": lambda s: classification_round(
            "resnet20_cifar", _loader(data, "device", args.batch_size, n), s),
        "resnet10t (synthetic)": lambda s: classification_round("resnet10t", _synthetic(args.batch_size, args.steps), s),
        "autoencoder stage, resnet20_cifar (CIFAR-10)": lambda s: autoencoder_round(data, s, args.batch_size, n),
        "vit_tiny, patch 4 at 32 px (synthetic)": lambda s: classification_round(
            "vit_tiny_patch16_224", _synthetic(args.batch_size, args.steps), s),
    }
    if args.workloads:
        keep = args.workloads.split(",")
        workloads = {k: v for k, v in workloads.items() if any(k.startswith(w) for w in keep)}
    for workload, make in workloads.items():
        runs = {s: make(s) for s in settings}
        for s in settings:  # warm-up round, not counted
            runs[s]()
        rates: Dict[str, List[float]] = {s: [] for s in settings}
        for _ in range(args.rounds):
            for s in settings:
                rates[s].append(runs[s]())
        for s in settings:
            ratios = [r / f for r, f in zip(rates[s], rates["fp32"])] if "fp32" in rates else []
            rows.append({"workload": workload, "setting": s, "img_per_s": statistics.median(rates[s]),
                         "per_round": rates[s], "ratio_to_fp32": statistics.median(ratios) if ratios else None,
                         "ratio_range": [min(ratios), max(ratios)] if ratios else None})
            print(f"{workload:48s} {s:13s} {rows[-1]['img_per_s']:8.0f} img/s  x{rows[-1]['ratio_to_fp32'] or 0:.2f}",
                  file=sys.stderr)
        save()


def profile(args, data: Data) -> Dict[str, str]:
    """The ops that take the time in bf16 training of resnet20_cifar (data path included) and of its autoencoder
    stage, as tables."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    n = args.steps * args.batch_size
    runs = {"resnet20_cifar": classification_round("resnet20_cifar", _loader(data, "per_sample", args.batch_size, n),
                                                   "bf16"),
            "autoencoder": autoencoder_round(data, "bf16", args.batch_size, n)}
    tables = {}
    for name, run in runs.items():
        run()  # warm-up
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
        tables[name] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
    return tables


def parity(args, data: Data) -> Dict[str, Any]:
    """Validation accuracy of resnet20_cifar trained in fp32 and in bf16 on the same stratified subset, seed by seed."""
    per_class, val_per_class = (20, 5) if args.smoke else (args.parity_per_class, 500)
    train_idx = stratified_subset(data.labels, per_class, seed=0)
    rest = np.setdiff1d(np.arange(len(data.labels)), train_idx)
    val_idx = rest[stratified_subset(data.labels[rest], val_per_class, seed=1)]
    val = DataLoader(CifarDataset(data.images[val_idx], data.labels[val_idx], data.mean, data.std), batch_size=500)
    out: Dict[str, Any] = {"train_images": int(len(train_idx)), "val_images": int(len(val_idx)),
                           "epochs": args.parity_epochs, "seeds": args.parity_seeds, "val_accuracy": {}}
    for amp in ("none", "bf16"):
        accs = []
        for seed in range(args.parity_seeds):
            seed_everything(seed)
            model = _model("resnet20_cifar")
            g = torch.Generator().manual_seed(seed)
            train = DataLoader(CifarDataset(data.images[train_idx], data.labels[train_idx], data.mean, data.std,
                                            augment=True), batch_size=128, shuffle=True, generator=g)
            task = ClassificationTask(model, verbose=False)
            cfg = StageConfig(epochs=args.parity_epochs, lr=0.1, opt="sgd", momentum=0.9, weight_decay=5e-4,
                              sched="cosine")
            train_stage(task, train, cfg, stage=f"parity-{amp}", seed=seed,
                        options=LoopOptions(CPU, amp=amp, channels_last=True, progress=False))
            accs.append(evaluate(model, val, CPU, channels_last=True, amp=amp)["accuracy"])
            print(f"parity {amp} seed {seed}: val {accs[-1]:.4f}", file=sys.stderr)
        out["val_accuracy"][precision(CPU, amp)] = accs
    out["bf16_minus_fp32"] = paired_difference(out["val_accuracy"]["bf16"], out["val_accuracy"]["fp32"])
    return out


def _header(res: Dict[str, Any]) -> List[str]:
    return [f"`{res['command']}`", "", f"Machine: {res['machine']}. Versions: {res['versions']}.", ""]


def markdown(res: Dict[str, Any]) -> str:
    lines = ["# CPU training speed: fp32 against bf16 autocast (and torch.compile)", "", *_header(res),
             f"Batch {res['batch_size']}, channels_last, {res['threads']} torch thread(s); {res['steps']} steps a "
             f"round, {res['rounds']} counted rounds after one warm-up, settings interleaved in every round. "
             f"img/s is the median over rounds; the ratio is the median of the per-round ratios to fp32 "
             f"(min..max over rounds).", "",
             "| workload | setting | img/s | x fp32 (min..max) |", "|---|---|---:|---|"]
    for r in res["speed"]:
        ratio = "" if r["ratio_to_fp32"] is None else (f"{r['ratio_to_fp32']:.2f} ({r['ratio_range'][0]:.2f}.."
                                                         f"{r['ratio_range'][1]:.2f})")
        lines.append(f"| {r['workload']} | {r['setting']} | {r['img_per_s']:.0f} | {ratio} |")
    for name, table in (res.get("profile") or {}).items():
        lines += ["", f"## Where the time goes: bf16 {name} (per-sample loader, torch.profiler)", "",
                  "```", table, "```"]
    return "\n".join(lines) + "\n"


def parity_markdown(res: Dict[str, Any]) -> str:
    p = res["parity"]
    d = p["bf16_minus_fp32"]
    lines = [f"# bf16 parity: resnet20_cifar, {p['train_images']} training images, {p['epochs']} epochs, "
             f"{p['val_images']} validation images", "", *_header(res),
             "| precision | val accuracy (%) per seed | mean |", "|---|---|---:|"]
    for k, v in p["val_accuracy"].items():
        lines.append(f"| {k} | {', '.join(f'{100 * a:.2f}' for a in v)} | {100 * np.mean(v):.2f} |")
    ci = "" if d["ci"] is None else f", 95% CI {100 * d['ci'][0]:+.2f}..{100 * d['ci'][1]:+.2f}"
    pval = "" if d["p"] is None else f", p={d['p']:.3f}"
    lines += ["", f"bf16 - fp32, paired by seed: {100 * d['mean']:+.2f} points (per seed "
                  f"{', '.join(f'{100 * x:+.2f}' for x in d['diffs'])}{ci}{pval})."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default="../shared/data", help="holds cifar10-jpeg.zip")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=30, help="batches per round")
    p.add_argument("--rounds", type=int, default=3, help="counted rounds (after one warm-up round)")
    p.add_argument("--settings", default="fp32,bf16,bf16+compile", help=f"comma-separated, of {list(SETTINGS)}")
    p.add_argument("--workloads", default=None, help="comma-separated prefixes of the workloads to run (default all)")
    p.add_argument("--profile", action="store_true", help="also profile bf16 training (torch.profiler)")
    p.add_argument("--parity", action="store_true",
                   help="instead of speed: train fp32 and bf16 to compare accuracy (parity.json, parity.md)")
    p.add_argument("--parity-per-class", type=int, default=500)
    p.add_argument("--parity-epochs", type=int, default=15)
    p.add_argument("--parity-seeds", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="tiny synthetic data, few steps (the test)")
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.steps, args.rounds, args.batch_size, args.parity_epochs, args.parity_seeds = 2, 1, 16, 1, 2
    data = load_data(args)
    out = Path(args.out_dir or Path(__file__).parent / "results" / "cpu-speed")
    out.mkdir(parents=True, exist_ok=True)
    res = {"command": "python benchmarks/cpu_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "machine": machine(), "versions": versions(), "threads": torch.get_num_threads()}
    if args.parity:
        res["parity"] = parity(args, data)
        (out / "parity.json").write_text(json.dumps(res, indent=1) + "\n")
        (out / "parity.md").write_text(parity_markdown(res))
        return res
    res.update({"batch_size": args.batch_size, "steps": args.steps, "rounds": args.rounds, "speed": []})

    def save() -> None:
        (out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
        (out / "results.md").write_text(markdown(res))
    if args.profile:  # first: a short step, and kept if a long compile below is stopped
        res["profile"] = profile(args, data)
        save()
    speed(args, data, res["speed"], save)
    return res


if __name__ == "__main__":
    main()
