"""Data path: the per-sample CIFAR loader against the device-batched one (`encodenet_timm.device_data`).

    python benchmarks/data_path.py --data-dir /work/shared/data --threads 2          # CPU rows
    python benchmarks/data_path.py --data-dir /work/shared/data --device cuda        # GPU rows (H100/H200)
    python benchmarks/data_path.py --device cpu --smoke --out-dir /tmp/dp            # the test: tiny, synthetic

In one run, on one device, with the same batch size and augmentation (random crop, pad 4, flip):

* Loader img/s: one epoch of `CifarDataset(augment=True)` through a plain shuffled `DataLoader`
  (``--workers``; batches moved to the device, as the loop does) against `DeviceArrayDataset`
  (`device_collate`, no workers), over the training set (``--loader-images`` of it).
* Training img/s: `resnet20_cifar` through the package's loop (`train_stage`, `ClassificationTask`) on
  images already on the device, the second of two epochs of ``--train-steps`` batches timed: the
  loader must run >= 5x faster than this for the data path never to be the bottleneck.
* Stage epochs: `EncodeNetWrapper` with the default config, baseline -> representatives -> autoencoder
  -> transfer, 2 epochs each (the second timed), on a ``--stage-images`` stratified subset, with each
  path. The autoencoder / baseline epoch ratio is reported per path.

Results go to ``--out-dir`` (default ``benchmarks/results/data-path-<device>``): results.json and results.md.
"""
import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import timm
import torch
from timm.task import ClassificationTask
from torch.utils.data import DataLoader, TensorDataset

import encodenet_timm  # noqa: F401  (registers resnet20_cifar)
from encodenet_timm import EncodeNetConfig, EncodeNetWrapper
from encodenet_timm.config import StageConfig
from encodenet_timm.data import CIFAR_STATS, CifarDataset, load_cifar, stratified_subset
from encodenet_timm.data.device import to_device_dataset
from encodenet_timm.device_data import device_collate
from encodenet_timm.env import machine, resolve_device, versions
from encodenet_timm.training import train_stage


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loader_rate(loader: DataLoader, device: torch.device) -> Dict:
    """img/s of one pass over `loader`, each batch moved to `device` (and synchronised at the end)."""
    n, start = 0, time.perf_counter()
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        n += len(y)
    _sync(device)
    seconds = time.perf_counter() - start
    return {"images": n, "seconds": seconds, "img_per_s": n / seconds}


def training_rate(device: torch.device, batch: int, steps: int, amp: str, channels_last: bool,
                  read_every: Optional[int] = None) -> Dict:
    """img/s of resnet20_cifar in `train_stage` (second of two epochs), images on the device; `read_every`:
    steps between host reads of the losses (None: the loop's default for the device)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch * steps, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (batch * steps,), generator=g).to(device)
    torch.manual_seed(0)
    model = timm.create_model("resnet20_cifar", num_classes=10).to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    task = ClassificationTask(model, device=device, verbose=False)
    hist = train_stage(task, DataLoader(TensorDataset(x, y), batch_size=batch), StageConfig(epochs=2, sched="none"),
                       stage="throughput", device=device, amp=amp, channels_last=channels_last, progress=False,
                       seed=0, read_every=read_every)
    return {"img_per_s": batch * steps / hist[1]["seconds"], "seconds": hist[1]["seconds"], "amp": amp,
            "channels_last": channels_last, "read_every": read_every}


def stage_epochs(train: CifarDataset, plain: CifarDataset, device: torch.device, batch: int, path: str,
                 amp: str, channels_last: bool, epochs: int = 2) -> Dict:
    """Seconds of an epoch of baseline, autoencoder and transfer (default config) on one path: the median
    of epochs 2..`epochs` of each (the first warms up), every epoch's seconds kept under ``epoch_seconds``."""
    if path == "device":
        train, plain = to_device_dataset(train, device), to_device_dataset(plain, device)
    kw = {"collate_fn": device_collate} if path == "device" else {}
    loader = DataLoader(train, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(0), **kw)
    plain_loader = DataLoader(plain, batch_size=batch, **kw)
    cfg = EncodeNetConfig(device=str(device), progress=False, amp=amp, channels_last=channels_last)
    for s in ("baseline", "autoencoder", "transfer"):
        getattr(cfg, s).epochs = epochs
    cfg.finetune.epochs = 0
    torch.manual_seed(0)
    wrapper = EncodeNetWrapper(timm.create_model("resnet20_cifar", num_classes=10), cfg)
    hist = wrapper.fit(loader, plain_loader=plain_loader)
    stages = ("baseline", "autoencoder", "transfer")
    out = {s: float(np.median([h["seconds"] for h in hist[s][1:]])) for s in stages}
    out["epoch_seconds"] = {s: [h["seconds"] for h in hist[s]] for s in stages}
    out["representatives"] = hist["representatives"]["seconds"]
    out["images"] = len(loader.dataset)
    out["autoencoder_over_baseline"] = out["autoencoder"] / out["baseline"]
    out["transfer_accuracy"] = hist["transfer"][-1]["accuracy"]
    return out


def markdown(res: Dict) -> str:
    a = res["args"]
    lines = [f"# Data path: per-sample `CifarDataset` loader vs `DeviceArrayDataset`, {res['machine']['device']}"
             f" ({res['machine']['gpu'] or 'CPU'})", "", f"`{res['command']}`", "",
             f"Data: {res['data']}. Batch {a['batch_size']}, augmentation on (crop pad 4 + flip), "
             f"torch threads {res['machine']['torch_threads']}, loader workers (per-sample path) {a['workers']}.", "",
             "## Loader throughput (one epoch, batches moved to the device)", "",
             "| path | images | seconds | img/s | vs per-sample | vs training img/s |", "|---|---|---|---|---|---|"]
    base, train = res["loader"]["per_sample"]["img_per_s"], res["training"]["img_per_s"]
    for name, r in res["loader"].items():
        lines.append(f"| {name} | {r['images']} | {r['seconds']:.2f} | {r['img_per_s']:.0f} | "
                     f"{r['img_per_s'] / base:.1f}x | {r['img_per_s'] / train:.1f}x |")
    t = res["training"]
    lines += ["", f"Training: resnet20_cifar in `train_stage`, {t['img_per_s']:.0f} img/s (amp {t['amp']}, "
              f"channels_last {t['channels_last']}; images already on the device). Goal: loader >= 5x this.", ""]
    if "every_step" in t:
        lines += [f"Reading the losses to the host every step instead: {t['every_step']['img_per_s']:.0f} img/s "
                  f"({t['img_per_s'] / t['every_step']['img_per_s']:.2f}x for the default reads every 16 steps).", ""]
    if res.get("stages"):
        batch = min(a["batch_size"], 128) if res["machine"]["device"] == "cpu" else a["batch_size"]
        n = a.get("stage_epochs", 2)
        which = "second of two epochs each" if n == 2 else f"median of epochs 2-{n} of each"
        lines += [f"## Stage epochs (default config, batch {batch}, {which}; one run)", "",
                  "| path | images | baseline s | autoencoder s | transfer s | representatives s | AE / baseline |",
                  "|---|---|---|---|---|---|---|"]
        for name, r in res["stages"].items():
            lines.append(f"| {name} | {r['images']} | {r['baseline']:.2f} | {r['autoencoder']:.2f} | "
                         f"{r['transfer']:.2f} | {r['representatives']:.2f} | {r['autoencoder_over_baseline']:.3f} |")
        lines.append("")
        if res["machine"]["device"] == "cpu" and n == 2:
            lines += ["On 2 CPU cores shared with other jobs one epoch of 2,000 images varies by tens of per cent "
                      "between runs: the stage seconds above are one sample each. The CPU autoencoder is compute-bound "
                      "(see benchmarks/results/profile-autoencoder-cpu: the same operators as a baseline epoch, in "
                      "proportion to its FLOPs).", ""]
    if res["machine"]["device"] == "cpu":
        lines += ["## GPU rows", "", "Not run: no GPU lent to this task; command: "
                  "`python benchmarks/data_path.py --device cuda --data-dir /work/shared/data --batch-size 512` "
                  "(all of #15's GPU rows: `benchmarks/tools/run_gpu_15.sh`).", ""]
    lines += [f"Machine: {res['machine']}.", "", f"Versions: {res['versions']}.", ""]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--data-dir", default="/work/shared/data", help="holds cifar10-jpeg.zip")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers of the per-sample path")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--loader-images", type=int, default=None, help="images per loader epoch (default: all)")
    p.add_argument("--train-steps", type=int, default=None, help="batches per training epoch (default 10 CPU, 100 GPU)")
    p.add_argument("--stage-images", type=int, default=None, help="training subset for the stage rows "
                   "(default 2,000 on CPU, all on CUDA; 0 skips them)")
    p.add_argument("--stage-epochs", type=int, default=2, help="epochs per stage in the stage rows; each stage's "
                   "seconds are the median of epochs 2..N")
    p.add_argument("--amp", default="auto")
    p.add_argument("--smoke", action="store_true", help="tiny synthetic data (the test)")
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    channels_last = device.type == "cuda"
    if args.smoke:
        rng = np.random.default_rng(0)
        images, labels = rng.integers(0, 256, (200, 32, 32, 3), dtype=np.uint8), np.arange(200) % 10
        data = "synthetic uint8, 200 images (smoke)"
        args.batch_size, args.train_steps, args.stage_images = 20, 2, 100
    else:
        arrays = load_cifar("cifar10-jpeg", args.data_dir, download=False)
        images, labels = arrays.train_images, arrays.train_labels
        data = f"CIFAR-10 train (JPEG copy in {args.data_dir}), {len(labels)} images"
    if args.loader_images:
        images, labels = images[:args.loader_images], labels[:args.loader_images]
    mean, std = CIFAR_STATS["cifar10"]
    steps = args.train_steps or (100 if device.type == "cuda" else 10)
    stage_images = args.stage_images if args.stage_images is not None else (2000 if device.type == "cpu" else None)
    out = Path(args.out_dir or Path(__file__).parent / "results" / f"data-path-{device.type}")
    out.mkdir(parents=True, exist_ok=True)

    augmented = CifarDataset(images, labels, mean, std, augment=True)
    torch.manual_seed(0)
    per_sample = loader_rate(DataLoader(augmented, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                                        pin_memory=device.type == "cuda" and args.workers > 0,
                                        persistent_workers=False), device)
    on_device = to_device_dataset(augmented, device)
    loader_rate(DataLoader(on_device, batch_size=args.batch_size, shuffle=True, collate_fn=device_collate), device)  # warm-up
    device_row = loader_rate(DataLoader(on_device, batch_size=args.batch_size, shuffle=True,
                                        collate_fn=device_collate), device)
    print({"per_sample": per_sample, "device": device_row}, flush=True)
    training = training_rate(device, args.batch_size, steps, args.amp, channels_last)
    if device.type == "cuda":  # the loop's host reads every 16 steps against a read every step
        training["every_step"] = training_rate(device, args.batch_size, steps, args.amp, channels_last, 1)
    print(training, flush=True)
    stages = {}
    if stage_images != 0:
        keep = stratified_subset(labels, None if stage_images is None else max(1, stage_images // 10), 0)
        train = CifarDataset(images[keep], labels[keep], mean, std, augment=True)
        plain = CifarDataset(images[keep], labels[keep], mean, std)
        for path in ("per_sample", "device"):
            stages[path] = stage_epochs(train, plain, device, min(args.batch_size, 128) if device.type == "cpu"
                                        else args.batch_size, path, args.amp, channels_last, args.stage_epochs)
            print(path, stages[path], flush=True)
    res = {"command": "python benchmarks/data_path.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "args": vars(args), "data": data, "machine": machine(device), "versions": versions(),
           "loader": {"per_sample": per_sample, "device": device_row}, "training": training, "stages": stages}
    (out / "results.json").write_text(json.dumps(res, indent=1))
    (out / "results.md").write_text(markdown(res))
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
