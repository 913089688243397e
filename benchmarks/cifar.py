"""CIFAR benchmark: EncodeNet against equal-compute controls, over several seeds.

    python benchmarks/cifar.py --dataset cifar10-jpeg --data-dir ../shared/data --model resnet20_cifar \
        --profile quick --seeds 0 1 2 --methods baseline,baseline_equal,kd,encodenet

Methods (same data, seed and model; every classifier is trained by `encodenet_timm.training.train_stage`):

* ``baseline``: supervised training for E epochs (the profile's ``baseline`` stage).
* ``encodenet``: the full method from the trained baseline, through `EncodeNetWrapper`:
  representatives (feature pass + per-class k-means) -> converting autoencoder -> transfer.
* ``baseline_equal``: the baseline trained *from scratch* with one schedule of E + X epochs, where X is
  EncodeNet's extra cost (feature pass + autoencoder + transfer) in FLOPs, converted into supervised
  epochs and rounded to the nearest epoch: equal training compute.
* ``kd``: timm's `LogitDistillationTask`; teacher = the trained baseline, student = a copy of the trained
  baseline, trained for as many epochs as fit EncodeNet's extra FLOPs (a KD step costs a teacher forward
  on top of a student train step). Same extra budget, from the same starting point as EncodeNet.
* ``baseline_continued`` (optional): the trained baseline trained on for X epochs with the fine-tune
  schedule KD uses, without a teacher.

FLOPs are counted with `torch.utils.flop_counter.FlopCounterMode` on one batch of each kind of step
(matmuls and convolutions, forward and backward); evaluation on the test set is measurement and is
not counted. Measured wall time per stage is recorded too (the machine may be shared: time is noisy).

Each (method, seed) writes ``runs/<method>-seed<k>.json`` as it finishes; a rerun skips finished runs
and aggregates whatever is there into ``results.json``, ``results.md`` and the PNGs.
"""
import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import timm
import torch
from timm.task import ClassificationTask, LogitDistillationTask
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from encodenet_timm import (AutoencoderConfig, EncodeNetConfig, EncodeNetWrapper, RepresentativesConfig,
                            StageConfig)
from encodenet_timm.env import machine, versions
from encodenet_timm.data import CIFAR_DATASETS as DATASETS, CifarDataset, load_cifar, stratified_subset
from encodenet_timm.tasks import ConvertingAutoencoder, ConvertingAutoencoderTask, FrozenEncoderClassifier
from encodenet_timm.training import evaluate, resolve_device, seed_everything, train_stage

_logger = logging.getLogger("benchmarks.cifar")

METHODS = ("baseline", "baseline_equal", "kd", "encodenet", "baseline_continued")
COMPARISONS = (("encodenet", "baseline_equal"), ("encodenet", "kd"), ("encodenet", "baseline"),
               ("encodenet", "baseline_continued"))


# ---- profiles: every hyperparameter, chosen once (never tuned on the test set) -----------------------
@dataclass
class Profile:
    """One benchmark size. Stage configs are `StageConfig`s, the same ones `EncodeNetConfig` nests."""
    description: str
    train_per_class: Optional[int]   # stratified training subset (per class, drawn with the seed); None: all
    test_per_class: Optional[int]    # test subset per class; None: the full test set
    batch_size: int                  # training batch for every stage
    eval_batch_size: int             # test-set evaluation, feature pass
    num_workers: int                 # DataLoader workers (0: in the main process)
    amp: str                         # autocast on CUDA: "none", "bf16", "fp16"
    channels_last: bool              # NHWC (faster on CPU here and on GPUs)
    baseline: StageConfig            # supervised training; baseline_equal uses it with E + X epochs
    autoencoder: StageConfig         # EncodeNet's converting autoencoder (encoder + decoder)
    transfer: StageConfig            # EncodeNet's transfer (frozen encoder, head retrained)
    finetune: StageConfig            # kd and baseline_continued from the trained baseline; epochs from FLOPs
    eval_every: int = 1              # test-set evaluation every k epochs of baseline / baseline_equal (and
                                     # at their last epoch); every epoch of kd, transfer, continued
    clusters_per_class: int = 5      # EncodeNet's k per class (the package default)
    kd_temperature: float = 4.0      # timm's LogitDistillationTask example values:
    kd_task_loss_weight: float = 0.3  # loss = 0.3 * CE + 0.7 * T^2 * KL(teacher || student)


def _sgd(epochs: int, lr: float, **kw) -> StageConfig:
    return StageConfig(epochs=epochs, lr=lr, opt="sgd", momentum=0.9, weight_decay=5e-4, sched="cosine", **kw)


def _adamw(epochs: int, lr: float = 1e-3) -> StageConfig:
    return StageConfig(epochs=epochs, lr=lr, opt="adamw", weight_decay=0.0, sched="cosine")


PROFILES: Dict[str, Profile] = {
    "smoke": Profile(
        description="pipeline check only (tests): 20 images per class, 1 epoch per stage; numbers mean nothing",
        train_per_class=20, test_per_class=20, batch_size=50, eval_batch_size=200, num_workers=0, amp="none",
        channels_last=False, baseline=_sgd(1, 0.05), autoencoder=_adamw(1), transfer=_sgd(1, 0.01),
        finetune=_sgd(0, 0.01), clusters_per_class=2),
    "quick": Profile(
        description="2 shared CPU cores, <= 25 min per seed for the four methods: 4k-image stratified training "
                    "subset (400 per class), full 10k test set, 10 baseline epochs, 2 autoencoder + 3 transfer "
                    "epochs; baseline / baseline_equal evaluated every 5th epoch and at the last",
        train_per_class=400, test_per_class=None, batch_size=128, eval_batch_size=500, num_workers=0,
        amp="none", channels_last=True, baseline=_sgd(10, 0.1), autoencoder=_adamw(2), transfer=_sgd(3, 0.01),
        finetune=_sgd(0, 0.01), eval_every=5),
    "gpu": Profile(
        description="one H100, <= 10 min per seed: full 50k training set, 30 baseline epochs, bf16",
        train_per_class=None, test_per_class=None, batch_size=256, eval_batch_size=1024, num_workers=8,
        amp="bf16", channels_last=True, baseline=_sgd(30, 0.1), autoencoder=_adamw(10), transfer=_sgd(10, 0.01),
        finetune=_sgd(0, 0.01)),
    "paper": Profile(
        description="paper-length baseline (200 epochs, full data) for GPU users; autoencoder/transfer "
                    "lengths are the package defaults x2 (not run here)",
        train_per_class=None, test_per_class=None, batch_size=128, eval_batch_size=1024, num_workers=8,
        amp="bf16", channels_last=True, baseline=_sgd(200, 0.1), autoencoder=_adamw(20), transfer=_sgd(20, 0.01),
        finetune=_sgd(0, 0.01)),
}


# ---- the benchmark's shared state ---------------------------------------------------------------------
@dataclass
class Bench:
    args: argparse.Namespace
    profile: Profile
    device: torch.device
    data: object                     # encodenet_timm.data.CifarArrays
    out_dir: Path
    test_loader: DataLoader
    num_classes: int
    flops: Dict[str, float] = field(default_factory=dict)  # filled by count_flops


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", choices=DATASETS, default="cifar10")
    p.add_argument("--model", default="resnet20_cifar", help="any timm model name (the CIFAR zoo included)")
    p.add_argument("--data-dir", default="data", help="torchvision root, or the folder/zip of cifar10-jpeg")
    p.add_argument("--cache-dir", default=None, help="decoded cifar10-jpeg cache (default ~/.cache/encodenet_timm)")
    p.add_argument("--no-download", action="store_true", help="do not let torchvision download CIFAR")
    p.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", default="baseline,baseline_equal,kd,encodenet",
                   help=f"comma-separated, from {','.join(METHODS)}")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (cuda fails without a GPU)")
    p.add_argument("--out-dir", default=None, help="default benchmarks/results/<dataset>-<model>-<profile>")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--aggregate-only", action="store_true",
                   help="train nothing: aggregate the finished runs under --out-dir (e.g. after an interruption)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        p.error(f"unknown methods {bad}; choose from {', '.join(METHODS)}")
    if args.out_dir is None:
        args.out_dir = str(Path(__file__).parent / "results" / f"{args.dataset}-{args.model}-{args.profile}")
    return args


def main(argv: Optional[List[str]] = None) -> Dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    bench = setup(args)
    count_flops(bench)
    for seed in [] if args.aggregate_only else args.seeds:  # seeds outside: an interruption leaves whole seeds
        for method in ("baseline", *[m for m in args.methods if m != "baseline"]):
            run_cached(bench, method, seed)
    return report(bench)


def setup(args: argparse.Namespace) -> Bench:
    device = resolve_device(args.device)  # ValueError for cuda without a GPU
    if args.threads:
        torch.set_num_threads(args.threads)
    profile = PROFILES[args.profile]
    data = load_cifar(args.dataset, args.data_dir, cache_dir=args.cache_dir, download=not args.no_download)
    test_idx = stratified_subset(data.test_labels, profile.test_per_class, seed=0)  # fixed across seeds
    test = CifarDataset(data.test_images[test_idx], data.test_labels[test_idx], data.mean, data.std)
    out_dir = Path(args.out_dir)
    (out_dir / "runs").mkdir(parents=True, exist_ok=True)
    _logger.info("%s: %d train / %d test images, %d classes; profile %s; device %s", args.dataset,
                 len(data.train_labels), len(test), len(data.classes), args.profile, device)
    return Bench(args, profile, device, data, out_dir, _loader(test, profile, profile.eval_batch_size, None),
                 num_classes=len(data.classes))


def _loader(dataset, profile: Profile, batch_size: int, seed: Optional[int]) -> DataLoader:
    """Shuffled with a seeded generator when `seed` is given; in order otherwise."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=seed is not None, generator=generator,
                      num_workers=profile.num_workers, persistent_workers=profile.num_workers > 0,
                      pin_memory=profile.num_workers > 0 and torch.cuda.is_available())


def train_data(bench: Bench, seed: int):
    """(augmented training loader, plain loader over the same images) for this seed's subset."""
    d, p = bench.data, bench.profile
    idx = stratified_subset(d.train_labels, p.train_per_class, seed=seed)
    train = CifarDataset(d.train_images[idx], d.train_labels[idx], d.mean, d.std, augment=True)
    plain = CifarDataset(d.train_images[idx], d.train_labels[idx], d.mean, d.std)
    return _loader(train, p, p.batch_size, seed), _loader(plain, p, p.eval_batch_size, None)


def new_model(bench: Bench, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(bench.args.model, pretrained=False, num_classes=bench.num_classes).to(bench.device)
    return model.to(memory_format=torch.channels_last) if bench.profile.channels_last else model


# ---- FLOPs: the exchange rate between EncodeNet's stages and supervised epochs -------------------------
def _step_flops(step, batch: int) -> float:
    """FLOPs per image of `step()` (forward, and backward when it calls it)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / batch


def _features_and_logits(model: torch.nn.Module, x: torch.Tensor):
    """What EncodeNet's feature pass computes per batch (`encodenet_timm.representatives.extract_features`)."""
    z = model.forward_features(x)
    return model.forward_head(z, pre_logits=True), model.forward_head(z)


def count_flops(bench: Bench) -> None:
    """FLOPs per image of each kind of step, EncodeNet's extra cost, and the epochs that match it."""
    p, b, dev = bench.profile, 8, bench.device
    x = torch.randn(b, 3, *bench.data.train_images.shape[1:3], device=dev)  # (B, 3, H, W)
    y = torch.arange(b, device=dev) % bench.num_classes
    model = new_model(bench, 0)
    sup = ClassificationTask(model, device=dev, verbose=False)
    f = {"train_step": _step_flops(lambda: sup(x, y)["loss"].backward(), b)}
    with torch.no_grad():
        f["eval_forward"] = _step_flops(lambda: model(x), b)
        f["feature_pass"] = _step_flops(lambda: _features_and_logits(model, x), b)
    kd = LogitDistillationTask(model, teacher_model=deepcopy(model).requires_grad_(False), device=dev, verbose=False)
    f["kd_step"] = _step_flops(lambda: kd(x, y)["loss"].backward(), b)
    wrapper = EncodeNetWrapper(model, EncodeNetConfig.paper(device=str(dev), progress=False))
    ae = ConvertingAutoencoderTask(ConvertingAutoencoder(wrapper.encoder, wrapper.decoder.to(dev)), x, device=dev)
    f["autoencoder_step"] = _step_flops(lambda: ae(x, torch.arange(b, device=dev))["loss"].backward(), b)
    frozen = ClassificationTask(FrozenEncoderClassifier(wrapper.encoder, wrapper.head), device=dev, verbose=False)
    f["transfer_step"] = _step_flops(lambda: frozen(x, y)["loss"].backward(), b)
    n = len(stratified_subset(bench.data.train_labels, p.train_per_class, seed=0))  # the same size for every seed
    extra = n * (f["feature_pass"] + p.autoencoder.epochs * f["autoencoder_step"]
                 + p.transfer.epochs * f["transfer_step"])
    train_epoch = n * f["train_step"]
    bench.flops = {
        "per_image": f, "train_images": n, "supervised_epoch": train_epoch,
        "encodenet_extra": extra, "encodenet_extra_in_epochs": extra / train_epoch,
        "extra_epochs": max(1, round(extra / train_epoch)),                # baseline_equal: E + this
        "kd_epochs": max(1, round(extra / (n * f["kd_step"]))),             # kd: this many epochs
        "note": "FlopCounterMode counts matmul/conv FLOPs (forward + backward) of one batch per kind of step; "
                "test-set evaluation and the k-means itself (FAISS, < 0.1% of a supervised epoch here) are not "
                "counted; epochs are rounded to the nearest integer",
    }
    _logger.info("FLOPs per image: %s", ", ".join(f"{k}={v / 1e6:.1f}M" for k, v in f.items()))
    _logger.info("EncodeNet extra cost = %.2f supervised epochs -> baseline_equal trains %d + %d epochs, kd %d epochs",
                 extra / train_epoch, p.baseline.epochs, bench.flops["extra_epochs"], bench.flops["kd_epochs"])


def method_epochs(bench: Bench, method: str) -> float:
    """Training compute of a method in supervised epochs (baseline included where it is a starting point)."""
    E, fl = bench.profile.baseline.epochs, bench.flops
    return {"baseline": E, "baseline_equal": E + fl["extra_epochs"],
            "kd": E + fl["kd_epochs"] * fl["per_image"]["kd_step"] / fl["per_image"]["train_step"],
            "encodenet": E + fl["encodenet_extra_in_epochs"], "baseline_continued": E + fl["extra_epochs"]}[method]


# ---- runs ------------------------------------------------------------------------------------------------
def fingerprint(bench: Bench) -> Dict:
    a = bench.args
    return {"dataset": a.dataset, "model": a.model, "profile": a.profile,
            "profile_config": _plain(dataclasses.asdict(bench.profile)),
            "extra_epochs": bench.flops["extra_epochs"], "kd_epochs": bench.flops["kd_epochs"]}


def run_cached(bench: Bench, method: str, seed: int) -> Dict:
    """Run (method, seed) unless ``runs/<method>-seed<seed>.json`` already holds it for this config."""
    path = bench.out_dir / "runs" / f"{method}-seed{seed}.json"
    if path.is_file():
        record = json.loads(path.read_text())
        if record["fingerprint"] != fingerprint(bench):
            raise ValueError(f"{path} was made with another config; delete {bench.out_dir} or pass --out-dir")
        _logger.info("%s seed %d: done before (%s), skipped", method, seed, path.name)
        return record
    _logger.info("==== %s, seed %d ====", method, seed)
    start = time.perf_counter()
    record = RUNNERS[method](bench, seed)
    record.update(method=method, seed=seed, fingerprint=fingerprint(bench),
                  wall_seconds=time.perf_counter() - start, compute_epochs=method_epochs(bench, method))
    tested = [e for e in record["epochs"] if e["test_accuracy"] is not None]
    best = max(tested, key=lambda e: e["test_accuracy"])
    record.update(best=best["test_accuracy"], best_epoch=best["epoch"], last=tested[-1]["test_accuracy"])
    path.write_text(json.dumps(record, indent=1))
    _logger.info("%s seed %d: best %.4f, last %.4f (%.0f s)", method, seed, record["best"], record["last"],
                 record["wall_seconds"])
    return record


def _supervised(bench: Bench, task, model, loader, cfg: StageConfig, stage: str, seed: int,
                every: int = 1) -> Dict:
    """One stage through the package's loop, with test accuracy every `every` epochs and at the last."""
    seed_everything(seed)
    epochs_done = iter(range(1, cfg.epochs + 1))

    def test() -> Dict[str, float]:
        epoch = next(epochs_done)
        if epoch % every and epoch != cfg.epochs:
            return {}
        return evaluate(model, bench.test_loader, bench.device, channels_last=bench.profile.channels_last)

    start = time.perf_counter()
    hist = train_stage(task, loader, cfg, stage=stage, device=bench.device, amp=bench.profile.amp,
                       channels_last=bench.profile.channels_last, progress=False, val_fn=test)
    return {"epochs": _epochs(hist), "stages": {stage: time.perf_counter() - start}}


def _epochs(hist: List[Dict]) -> List[Dict]:
    """Per-epoch records; test_accuracy / test_loss are None on epochs without a test evaluation."""
    return [{"epoch": h["epoch"], "train_loss": h["loss"], "train_accuracy": h.get("accuracy"),
             "test_accuracy": h.get("val_accuracy"), "test_loss": h.get("val_loss"), "lr": h["lr"],
             "train_seconds": h["seconds"]} for h in hist]


def _checkpoint(bench: Bench, seed: int) -> Path:
    return bench.out_dir / "cache" / f"baseline-seed{seed}.pt"  # git-ignored


def run_baseline(bench: Bench, seed: int, epochs: Optional[int] = None) -> Dict:
    cfg = dataclasses.replace(bench.profile.baseline, epochs=epochs or bench.profile.baseline.epochs)
    model = new_model(bench, seed)
    loader, _ = train_data(bench, seed)
    task = ClassificationTask(model, device=bench.device, verbose=False)
    record = _supervised(bench, task, model, loader, cfg, "baseline", seed, every=bench.profile.eval_every)
    if epochs is None:
        _checkpoint(bench, seed).parent.mkdir(exist_ok=True)
        torch.save(model.state_dict(), _checkpoint(bench, seed))
    return record


def trained_baseline(bench: Bench, seed: int) -> torch.nn.Module:
    """The baseline of this seed, from its checkpoint (trained again, deterministically, if it is missing)."""
    if not _checkpoint(bench, seed).is_file():
        _logger.info("no baseline checkpoint for seed %d: training it again", seed)
        run_baseline(bench, seed)
    model = new_model(bench, seed)
    model.load_state_dict(torch.load(_checkpoint(bench, seed), map_location=bench.device, weights_only=True))
    return model


def run_baseline_equal(bench: Bench, seed: int) -> Dict:
    """From scratch, one schedule of E + X epochs (X: EncodeNet's extra FLOPs in epochs)."""
    return run_baseline(bench, seed, epochs=bench.profile.baseline.epochs + bench.flops["extra_epochs"])


def run_kd(bench: Bench, seed: int) -> Dict:
    teacher = trained_baseline(bench, seed).eval().requires_grad_(False)
    student = trained_baseline(bench, seed)
    task = LogitDistillationTask(student, teacher_model=teacher, temperature=bench.profile.kd_temperature,
                                 task_loss_weight=bench.profile.kd_task_loss_weight, device=bench.device,
                                 verbose=False)
    cfg = dataclasses.replace(bench.profile.finetune, epochs=bench.flops["kd_epochs"])
    loader, _ = train_data(bench, seed)
    return _supervised(bench, task, student, loader, cfg, "kd", seed)


def run_baseline_continued(bench: Bench, seed: int) -> Dict:
    model = trained_baseline(bench, seed)
    cfg = dataclasses.replace(bench.profile.finetune, epochs=bench.flops["extra_epochs"])
    loader, _ = train_data(bench, seed)
    return _supervised(bench, ClassificationTask(model, device=bench.device, verbose=False), model, loader, cfg,
                       "continued", seed)


def run_encodenet(bench: Bench, seed: int) -> Dict:
    p = bench.profile
    # the method as published (this benchmark's `encodenet`); benchmarks/ablation.py measures the variants
    cfg = dataclasses.replace(
        EncodeNetConfig.paper(), seed=seed, device=str(bench.device), amp=p.amp, channels_last=p.channels_last,
        progress=False, baseline=StageConfig(epochs=0),
        representatives=RepresentativesConfig(clusters_per_class=p.clusters_per_class, batch_size=p.eval_batch_size),
        autoencoder=AutoencoderConfig(**dataclasses.asdict(p.autoencoder), ce_weight=0.0), transfer=p.transfer)
    wrapper = EncodeNetWrapper(trained_baseline(bench, seed), cfg, copy=False)
    loader, plain = train_data(bench, seed)
    stages, t = {}, time.perf_counter()
    reps = wrapper.select_representatives(plain)
    stages["representatives"], t = time.perf_counter() - t, time.perf_counter()
    ae = wrapper.fit_autoencoder(loader, reps)
    stages["autoencoder"], t = time.perf_counter() - t, time.perf_counter()
    transfer = wrapper.fit_transfer(loader, bench.test_loader)
    stages["transfer"] = time.perf_counter() - t
    save_encodenet_pictures(bench, wrapper, plain.dataset, seed)
    return {"epochs": _epochs(transfer), "stages": stages,
            "autoencoder_loss": [h["loss"] for h in ae], "num_clusters": reps.num_clusters,
            "decoder_flops_ratio": wrapper.flops()["ratio"]}


RUNNERS = {"baseline": run_baseline, "baseline_equal": run_baseline_equal, "kd": run_kd,
           "encodenet": run_encodenet, "baseline_continued": run_baseline_continued}


# ---- pictures ----------------------------------------------------------------------------------------------
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _show(ax, img: torch.Tensor, dataset: CifarDataset) -> None:
    ax.imshow(dataset.denormalize(img.cpu()).permute(1, 2, 0).numpy())  # (3, H, W) -> (H, W, 3)
    ax.set_xticks([]), ax.set_yticks([])


def save_encodenet_pictures(bench: Bench, wrapper: EncodeNetWrapper, plain: CifarDataset, seed: int) -> None:
    """representatives-seed<k>.png (one row per class) and reconstructions-seed<k>.png (test input above
    its autoencoder output, two per class)."""
    plt, classes, reps = _plt(), bench.data.classes, wrapper.representatives
    k = int(np.bincount(reps.cluster_labels.numpy(), minlength=len(classes)).max())
    fig, axes = plt.subplots(len(classes), k, figsize=(1.1 * k + 1, 1.1 * len(classes)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for c, name in enumerate(classes):
        for j, m in enumerate(torch.nonzero(reps.cluster_labels == c).flatten().tolist()):
            _show(axes[c, j], reps.images[m], plain)
            axes[c, j].axis("on")
        axes[c, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(f"EncodeNet representatives per class (seed {seed})")
    fig.savefig(bench.out_dir / f"representatives-seed{seed}.png", dpi=80, bbox_inches="tight")
    plt.close(fig)

    test = bench.test_loader.dataset
    labels = test.labels.numpy()
    idx = [i for c in range(len(classes)) for i in np.flatnonzero(labels == c)[:2]]
    x = torch.stack([test[i][0] for i in idx])  # (2K, 3, H, W)
    out = wrapper.reconstruct(x)
    fig, axes = plt.subplots(2, len(idx), figsize=(0.8 * len(idx), 2), squeeze=False)
    for j in range(len(idx)):
        _show(axes[0, j], x[j], plain)
        _show(axes[1, j], out[j], plain)
    axes[0, 0].set_ylabel("input", fontsize=8)
    axes[1, 0].set_ylabel("AE out", fontsize=8)
    fig.suptitle(f"test images -> converting autoencoder output (seed {seed})")
    fig.savefig(bench.out_dir / f"reconstructions-seed{seed}.png", dpi=80, bbox_inches="tight")
    plt.close(fig)


def save_curves(bench: Bench, runs: Dict[str, Dict[int, Dict]]) -> None:
    """accuracy_curves.png: test accuracy against training compute (supervised-epoch equivalents)."""
    plt, fl = _plt(), bench.flops
    E, per = bench.profile.baseline.epochs, fl["per_image"]
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (method, seeds) in enumerate(runs.items()):
        if method == "baseline" or method == "baseline_equal":
            start, step = 0.0, 1.0
        elif method == "encodenet":  # the transfer epochs come last
            step = per["transfer_step"] / per["train_step"]
            start = E + fl["encodenet_extra_in_epochs"] - bench.profile.transfer.epochs * step
        else:  # kd, baseline_continued: from the trained baseline
            start, step = E, per["kd_step"] / per["train_step"] if method == "kd" else 1.0
        tested = [e["epoch"] for e in next(iter(seeds.values()))["epochs"] if e["test_accuracy"] is not None]
        curves = [[e["test_accuracy"] for e in r["epochs"] if e["test_accuracy"] is not None] for r in seeds.values()]
        xs = start + step * (np.asarray(tested) + 1)
        for c in curves:
            ax.plot(xs, c, color=f"C{i}", alpha=0.25, lw=0.8)
        ax.plot(xs, np.mean(curves, 0), color=f"C{i}", marker="." if len(xs) < 30 else None,
                label=f"{method} (mean of {len(curves)} seeds)")
    ax.set_xlabel("training compute, in supervised epochs (FLOPs)")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{bench.args.dataset} / {bench.args.model} / {bench.args.profile}")
    fig.savefig(bench.out_dir / "accuracy_curves.png", dpi=100, bbox_inches="tight")
    plt.close(fig)


# ---- aggregation -------------------------------------------------------------------------------------------
def paired(a: List[float], b: List[float]) -> Dict:
    """Paired comparison of a - b over seeds: mean, per-seed diffs, t statistic, two-sided p-value."""
    d = np.asarray(a) - np.asarray(b)
    out = {"n": len(d), "diffs": d.tolist(), "mean": float(d.mean()) if len(d) else None, "t": None, "p": None}
    if len(d) >= 2:
        sd = float(d.std(ddof=1))
        out["t"] = float(d.mean() / (sd / math.sqrt(len(d)))) if sd > 0 else None
        if out["t"] is not None:
            try:
                from scipy import stats
                out["p"] = float(2 * stats.t.sf(abs(out["t"]), len(d) - 1))
            except ImportError:  # p-value needs scipy; the t statistic stands on its own
                pass
    return out


def _mean_std(values: List[float]) -> Dict:
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": len(v)}


def report(bench: Bench) -> Dict:
    """Aggregate every finished run under ``runs/`` into results.json, results.md and accuracy_curves.png."""
    args = bench.args
    runs: Dict[str, Dict[int, Dict]] = {}
    for method in ("baseline", *[m for m in args.methods if m != "baseline"]):
        for seed in args.seeds:
            path = bench.out_dir / "runs" / f"{method}-seed{seed}.json"
            if path.is_file():
                record = json.loads(path.read_text())
                if record["fingerprint"] != fingerprint(bench):
                    raise ValueError(f"{path} was made with another config; delete it or pass another --out-dir")
                runs.setdefault(method, {})[seed] = record
    summary = {m: {"best": _mean_std([r["best"] for r in s.values()]),
                   "last": _mean_std([r["last"] for r in s.values()]),
                   "seeds": sorted(s), "compute_epochs": method_epochs(bench, m)} for m, s in runs.items()}
    comparisons = {}
    for a, b in COMPARISONS:
        if a in runs and b in runs:
            seeds = sorted(set(runs[a]) & set(runs[b]))
            comparisons[f"{a} - {b}"] = {
                "seeds": seeds, **{k: paired([runs[a][s][k] for s in seeds], [runs[b][s][k] for s in seeds])
                                   for k in ("last", "best")}}
    complete = all(len(runs.get(m, {})) == len(args.seeds) for m in args.methods)
    results = {
        "command": " ".join(["python", "benchmarks/cifar.py", *[a if " " not in a else repr(a) for a in args.argv]]),
        "argv": args.argv, "dataset": args.dataset, "model": args.model, "profile": args.profile,
        "profile_config": _plain(dataclasses.asdict(bench.profile)), "seeds": args.seeds, "methods": args.methods,
        "complete": complete, "flops": bench.flops, "versions": versions(), "machine": machine(bench.device),
        "summary": summary, "comparisons": comparisons,
        "wall_seconds": {m: {str(s): {"total": r["wall_seconds"], **r["stages"]} for s, r in sr.items()}
                         for m, sr in runs.items()},
        "runs": {m: {str(s): r for s, r in sr.items()} for m, sr in runs.items()},
    }
    (bench.out_dir / "results.json").write_text(json.dumps(results, indent=1))
    (bench.out_dir / "results.md").write_text(markdown(bench, results, runs))
    if runs:
        save_curves(bench, runs)
    _logger.info("wrote %s", bench.out_dir / "results.md")
    return results


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def markdown(bench: Bench, results: Dict, runs: Dict[str, Dict[int, Dict]]) -> str:
    p, fl = bench.profile, bench.flops
    lines = [f"# {results['dataset']} / {results['model']} / profile `{results['profile']}`", "",
             f"`{results['command']}`", "", f"Profile: {p.description}.", ""]
    if not results["complete"]:
        lines += ["**Partial results:** not every (method, seed) finished; the table holds those that did.", ""]
    lines += [("Test accuracy (%) on the full test set" if p.test_per_class is None else "Test accuracy (%)")
              + "; mean ± std over seeds (best epoch / last epoch; *best* is picked on the test set and is "
              "optimistic, *last* is the honest number).", "",
              "| method | compute (supervised epochs) | best | last | last per seed |", "|---|---|---|---|---|"]
    for m, s in results["summary"].items():
        per_seed = ", ".join(f"{_pct(runs[m][k]['last'])}" for k in sorted(runs[m]))
        lines.append(f"| {m} | {s['compute_epochs']:.1f} | {_pct(s['best']['mean'])} ± {_pct(s['best']['std'])} "
                     f"| {_pct(s['last']['mean'])} ± {_pct(s['last']['std'])} | {per_seed} |")
    lines += ["", "Paired differences over seeds (percentage points; t: paired t statistic, p: two-sided). "
              "With 3 seeds this is weak evidence either way.", "",
              "| comparison | last: mean diff | last: per seed | t | p | best: mean diff |",
              "|---|---|---|---|---|---|"]
    for name, c in results["comparisons"].items():
        last, best = c["last"], c["best"]
        fmt = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
        lines.append(f"| {name} | {100 * last['mean']:+.2f} | {', '.join(f'{100 * d:+.2f}' for d in last['diffs'])} "
                     f"| {fmt(last['t'])} | {fmt(last['p'])} | {100 * best['mean']:+.2f} |")
    per = fl["per_image"]
    lines += ["", "Equal compute (FLOPs per training image, forward + backward, FlopCounterMode): "
              f"supervised step {per['train_step'] / 1e6:.1f} M, "
              f"autoencoder step {per['autoencoder_step'] / 1e6:.1f} M, "
              f"transfer step {per['transfer_step'] / 1e6:.1f} M, KD step {per['kd_step'] / 1e6:.1f} M, "
              f"feature pass {per['feature_pass'] / 1e6:.1f} M. EncodeNet's extra stages (feature pass + "
              f"{p.autoencoder.epochs} autoencoder + {p.transfer.epochs} transfer epochs) cost "
              f"{fl['encodenet_extra_in_epochs']:.2f} supervised epochs -> `baseline_equal` trains from scratch "
              f"for {p.baseline.epochs} + {fl['extra_epochs']} epochs in one cosine schedule; `kd` "
              f"(timm LogitDistillationTask, T = {p.kd_temperature}, task weight {p.kd_task_loss_weight}, "
              f"distill weight {1 - p.kd_task_loss_weight:.1f}) fine-tunes a copy of the trained baseline with it "
              f"as teacher for {fl['kd_epochs']} epochs (lr {p.finetune.lr}, cosine).", "",
              "Wall time per run (s, mean over seeds): " + ", ".join(
                  f"{m} {np.mean([r['wall_seconds'] for r in s.values()]):.0f}" for m, s in runs.items()) + ".", ""]
    return "\n".join(lines)


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


if __name__ == "__main__":
    main()
