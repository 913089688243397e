"""torch.profiler of one autoencoder epoch against one baseline epoch (resnet20_cifar, CIFAR-10, default config).

    python benchmarks/tools/profile_autoencoder.py --images 1000 --threads 1               # CPU
    python benchmarks/tools/profile_autoencoder.py --images 50000 --device cuda            # GPU (H100/H200)

Runs `EncodeNetWrapper` stage methods with the default config (1 baseline epoch, representatives,
1 autoencoder epoch) under `torch.profiler.profile`, per-sample (`CifarDataset`) or device-batched
(`--path device`) data, and writes the top operators by self time of each stage to
``--out-dir`` (default ``benchmarks/results/profile-autoencoder-<device>``): profile.md.
"""
import argparse
import sys
import time
from pathlib import Path

import timm
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader

import encodenet_timm  # noqa: F401
from encodenet_timm import EncodeNetConfig, EncodeNetWrapper
from encodenet_timm.data import CifarDataset, load_cifar, stratified_subset
from encodenet_timm.data.device import to_device_dataset
from encodenet_timm.device_data import device_collate
from encodenet_timm.env import resolve_device


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", default="/work/shared/data")
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--path", choices=("per_sample", "device"), default="device")
    p.add_argument("--amp", default="auto")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    arrays = load_cifar("cifar10-jpeg", args.data_dir, download=False)
    keep = stratified_subset(arrays.train_labels, args.images // 10, 0)
    train = CifarDataset(arrays.train_images[keep], arrays.train_labels[keep], arrays.mean, arrays.std, augment=True)
    kw = {}
    if args.path == "device":
        train, kw = to_device_dataset(train, device), {"collate_fn": device_collate}
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0), **kw)
    cfg = EncodeNetConfig(device=str(device), progress=False, amp=args.amp, channels_last=device.type == "cuda")
    cfg.baseline.epochs = cfg.autoencoder.epochs = 1
    torch.manual_seed(0)
    wrapper = EncodeNetWrapper(timm.create_model("resnet20_cifar", num_classes=10), cfg)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    wrapper.fit_baseline(loader)  # warm-up (and the weights the autoencoder starts from)
    reps = wrapper.select_representatives(loader)
    lines = [f"# Profile: one baseline epoch vs one autoencoder epoch, resnet20_cifar, {len(train)} CIFAR-10 images, "
             f"{device} ({args.path} data)", "", f"`python benchmarks/tools/profile_autoencoder.py {' '.join(sys.argv[1:] if argv is None else argv)}`", ""]
    seconds = {}
    for stage, run in (("baseline", lambda: wrapper.fit_baseline(loader)),
                       ("autoencoder", lambda: wrapper.fit_autoencoder(loader, reps))):
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            run()
            seconds[stage] = time.perf_counter() - start
        lines += [f"## {stage}: {seconds[stage]:.2f} s", "", "```",
                  prof.key_averages().table(sort_by=sort, row_limit=args.top), "```", ""]
    lines.insert(4, f"autoencoder / baseline epoch (under the profiler): {seconds['autoencoder'] / seconds['baseline']:.3f}\n")
    out = Path(args.out_dir or Path(__file__).parents[1] / "results" / f"profile-autoencoder-{device.type}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
