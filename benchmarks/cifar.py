"""CIFAR benchmark: EncodeNet (the default recipe and the paper's) against same-size controls, over seeds.

    python benchmarks/cifar.py --dataset cifar10-jpeg --data-dir ../shared/data --model resnet20_cifar \
        --profile quick --seeds 0 1 2

A thin layer over `encodenet_timm.compare`: per seed, ``baseline`` (E epochs), ``encodenet`` (the package
default `EncodeNetConfig()` at the profile's stage lengths), ``paper`` (`EncodeNetConfig.paper()` at the
same lengths) and the controls (``--controls``, default continued, kd, ema, equal), each control given the
default recipe's extra compute in FLOPs (counted with `FlopCounterMode` on the real stage code).

Data: the profile's stratified training subset (drawn with data seed 0, the same for every seed), 10% of
it per class held out for validation (``compare``'s ``best`` uses it), and the CIFAR test set, evaluated
once per row at its end. Each (row, seed) writes ``runs/<row>-seed<k>.json`` as it finishes; a rerun skips
finished rows. Outputs: results.json, results.md, accuracy_vs_compute.png under
``benchmarks/results/<dataset>-<model>-<profile>/``.
"""
import argparse
import dataclasses
import logging
import sys
from pathlib import Path
from typing import Dict, List, Optional

import timm
import torch
from torch.utils.data import DataLoader

from encodenet_timm import EncodeNetConfig, StageConfig
from encodenet_timm.compare import CONTROLS, CompareResult, compare
from encodenet_timm.data import CIFAR_DATASETS, CifarDataset, load_cifar, stratified_subset, train_val_split
from encodenet_timm.data.device import to_device_dataset
from encodenet_timm.device_data import device_loader_kwargs
from encodenet_timm.env import resolve_device

_logger = logging.getLogger("benchmarks.cifar")


@dataclasses.dataclass
class Profile:
    """One benchmark size. Stage configs are `StageConfig`s, the same ones `EncodeNetConfig` nests."""
    description: str
    train_per_class: Optional[int]   # stratified training subset per class (data seed 0); None: all
    test_per_class: Optional[int]    # test subset per class; None: the full test set
    batch_size: int
    eval_batch_size: int
    num_workers: int
    amp: str                         # autocast on CUDA: "none", "bf16", "fp16"
    channels_last: bool
    baseline: StageConfig
    autoencoder: StageConfig
    transfer: StageConfig
    finetune: StageConfig            # the default recipe's fine-tune; also the continued/kd/ema schedule
    clusters_per_class: int = 5
    val_fraction: float = 0.1


def _sgd(epochs: int, lr: float) -> StageConfig:
    return StageConfig(epochs=epochs, lr=lr, opt="sgd", momentum=0.9, weight_decay=5e-4, sched="cosine")


def _adamw(epochs: int, lr: float = 1e-3) -> StageConfig:
    return StageConfig(epochs=epochs, lr=lr, opt="adamw", weight_decay=0.0, sched="cosine")


PROFILES: Dict[str, Profile] = {
    "smoke": Profile(
        description="pipeline check only (tests): 20 images per class, 1 epoch per stage; numbers mean nothing",
        train_per_class=20, test_per_class=20, batch_size=50, eval_batch_size=200, num_workers=0, amp="none",
        channels_last=False, baseline=_sgd(1, 0.05), autoencoder=_adamw(1), transfer=_sgd(1, 0.01),
        finetune=_sgd(1, 0.01), clusters_per_class=2, val_fraction=0.2),
    "quick": Profile(
        description="2 CPU cores: 4k-image stratified training subset (400 per class, 10% held out), full 10k "
                    "test set, 10 baseline epochs, 2 autoencoder + 3 transfer + 2 fine-tune epochs",
        train_per_class=400, test_per_class=None, batch_size=128, eval_batch_size=500, num_workers=0,
        amp="none", channels_last=True, baseline=_sgd(10, 0.1), autoencoder=_adamw(2), transfer=_sgd(3, 0.01),
        finetune=_sgd(2, 0.01)),
    "gpu": Profile(
        description="one GPU: full 50k training set (10% held out), 30 baseline epochs, bf16; autoencoder, "
                    "transfer and fine-tune at the package defaults (10, 10, 5)",
        train_per_class=None, test_per_class=None, batch_size=256, eval_batch_size=1024, num_workers=8,
        amp="bf16", channels_last=True, baseline=_sgd(30, 0.1), autoencoder=_adamw(10), transfer=_sgd(10, 0.01),
        finetune=_sgd(5, 0.01)),
    "converged": Profile(
        description="one GPU, a converged baseline: full 50k training set (10% held out), 160 baseline epochs, "
                    "bf16; autoencoder, transfer and fine-tune at the package defaults (10, 10, 5)",
        train_per_class=None, test_per_class=None, batch_size=128, eval_batch_size=1024, num_workers=8,
        amp="bf16", channels_last=True, baseline=_sgd(160, 0.1), autoencoder=_adamw(10), transfer=_sgd(10, 0.01),
        finetune=_sgd(5, 0.01)),
}


def profile_config(profile: Profile, device: str, paper: bool = False) -> EncodeNetConfig:
    """The default recipe (or the paper's) at the profile's stage lengths."""
    overrides = {"device": device, "amp": profile.amp, "channels_last": profile.channels_last, "progress": False,
                 "representatives.clusters_per_class": profile.clusters_per_class,
                 "representatives.batch_size": profile.eval_batch_size}
    for stage in ("baseline", "autoencoder", "transfer", "finetune"):
        for key, value in dataclasses.asdict(getattr(profile, stage)).items():
            overrides[f"{stage}.{key}"] = value
    if paper:
        overrides["finetune.epochs"] = 0
        return EncodeNetConfig.paper(**overrides)
    return EncodeNetConfig().override(overrides)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", choices=CIFAR_DATASETS, default="cifar10")
    p.add_argument("--model", default="resnet20_cifar", help="any timm model name (the CIFAR zoo included)")
    p.add_argument("--data-dir", default="data", help="torchvision root, or the folder/zip of cifar10-jpeg")
    p.add_argument("--cache-dir", default=None, help="decoded cifar10-jpeg cache (default ~/.cache/encodenet_timm)")
    p.add_argument("--no-download", action="store_true", help="do not let torchvision download CIFAR")
    p.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--controls", default=",".join(CONTROLS), help=f"comma-separated, from {','.join(CONTROLS)}")
    p.add_argument("--allow-untrained-baseline", action="store_true",
                   help="compare from a baseline near chance accuracy (the smoke profile's tiny data)")
    p.add_argument("--no-paper", action="store_true", help="leave out the paper row")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (cuda fails without a GPU)")
    p.add_argument("--out-dir", default=None, help="default benchmarks/results/<dataset>-<model>-<profile>")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.controls = [c.strip() for c in args.controls.split(",") if c.strip()]
    bad = [c for c in args.controls if c not in CONTROLS]
    if bad:
        p.error(f"unknown controls {bad}; choose from {', '.join(CONTROLS)}")
    if args.out_dir is None:
        args.out_dir = str(Path(__file__).parent / "results" / f"{args.dataset}-{args.model}-{args.profile}")
    return args


def _on_gpu(dataset, device: torch.device):
    """On CUDA the split is held and batched on the GPU (#15); on CPU the per-sample path, as before."""
    return to_device_dataset(dataset, device) if device.type == "cuda" else dataset


def _loader(dataset, profile: Profile, batch_size: int, shuffle: bool) -> DataLoader:
    kw = dict(num_workers=profile.num_workers, pin_memory=profile.num_workers > 0 and torch.cuda.is_available(),
              **device_loader_kwargs(dataset))  # #15: a device dataset takes no workers
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(0) if shuffle else None,
                      persistent_workers=kw["num_workers"] > 0, **kw)


def main(argv: Optional[List[str]] = None) -> CompareResult:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("encodenet_timm").setLevel(logging.WARNING)
    logging.getLogger("encodenet_timm.compare").setLevel(logging.INFO)
    device = resolve_device(args.device)  # ValueError for cuda without a GPU, before any data is read
    if args.threads:
        torch.set_num_threads(args.threads)
    profile = PROFILES[args.profile]
    d = load_cifar(args.dataset, args.data_dir, cache_dir=args.cache_dir, download=not args.no_download)
    sub = stratified_subset(d.train_labels, profile.train_per_class, seed=0)
    tr, va = train_val_split(d.train_labels[sub], profile.val_fraction, seed=0)
    tr, va = sub[tr], sub[va]
    test_idx = stratified_subset(d.test_labels, profile.test_per_class, seed=0)
    ds = lambda images, labels, augment=False: _on_gpu(CifarDataset(images, labels, d.mean, d.std, augment=augment),
                                                       device)
    train = _loader(ds(d.train_images[tr], d.train_labels[tr], True), profile, profile.batch_size, True)
    plain = _loader(ds(d.train_images[tr], d.train_labels[tr]), profile, profile.eval_batch_size, False)
    val = _loader(ds(d.train_images[va], d.train_labels[va]), profile, profile.eval_batch_size, False)
    test = _loader(ds(d.test_images[test_idx], d.test_labels[test_idx]), profile, profile.eval_batch_size, False)
    _logger.info("%s: %d train / %d val / %d test images; profile %s", args.dataset, len(tr), len(va), len(test_idx),
                 args.profile)
    variants = {} if args.no_paper else {"paper": profile_config(profile, args.device, paper=True)}
    model_fn = lambda: timm.create_model(args.model, pretrained=False, num_classes=len(d.classes))
    result = compare(model_fn, train, val, config=profile_config(profile, args.device), controls=args.controls,
                     seeds=args.seeds, plain_loader=plain, test_loader=test, out_dir=args.out_dir, variants=variants,
                     allow_untrained_baseline=args.allow_untrained_baseline)
    result.save(args.out_dir)
    md = Path(args.out_dir) / "results.md"
    md.write_text(f"`python benchmarks/cifar.py {' '.join(args.argv)}`\n\nProfile `{args.profile}`: "
                  f"{profile.description}.\n\n" + md.read_text())
    print(result.table())
    print(result.verdict)
    return result


if __name__ == "__main__":
    main()
