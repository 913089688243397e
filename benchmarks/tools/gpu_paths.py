"""GPU paths: training img/s with and without AMP, channels_last and torch.compile; FAISS k-means on GPU vs CPU.

    python benchmarks/tools/gpu_paths.py --device cuda                   # on a GPU machine: resnet50 at 224
    python benchmarks/tools/gpu_paths.py --device cpu --smoke --out-dir /tmp/gp   # the test: tiny, CPU rows only

* Throughput: `encodenet_timm.training.train_stage` (the loop every stage runs) with timm's
  `ClassificationTask` on synthetic images held on the device (no data loading in the figure). Each
  setting trains 2 epochs of ``--steps`` batches from the same initial weights; the second epoch is
  timed (the first absorbs cuDNN autotuning and compilation). AMP only applies on CUDA (the library
  ignores it on the CPU), so AMP rows are skipped, with the reason, on a CPU run.
* Clustering: `cluster_per_class` on a synthetic per-class Gaussian mixture with
  ``faiss_gpu="never"`` and, when the FAISS build sees a GPU, ``"always"`` (every GPU it sees); same
  k, iterations, restarts and seed. Seconds and the share of identical cluster ids.

Results go to ``--out-dir`` (default ``benchmarks/results/gpu-paths-<device>``): results.json and
results.md with the command, machine and versions.
"""
import argparse
import copy
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

from encodenet_timm.env import machine, resolve_device, versions
from encodenet_timm.clustering import _import_faiss, cluster_per_class
from encodenet_timm.config import StageConfig
from encodenet_timm.training import train_stage

SETTINGS = [  # (amp, channels_last, compile)
    ("none", False, False), ("none", True, False), ("bf16", False, False), ("bf16", True, False),
    ("fp16", True, False), ("bf16", True, True),
]


def throughput(model: torch.nn.Module, device: torch.device, amp: str, channels_last: bool, compile: bool,
               batch: int, steps: int, size: int, num_classes: int) -> Dict:
    """img/s of the second of two training epochs of `steps` batches (B, 3, size, size)."""
    if amp != "none" and device.type != "cuda":
        return {"skipped": "AMP applies on CUDA only"}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch * steps, 3, size, size, generator=g)
    y = torch.randint(0, num_classes, (batch * steps,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)
    m = copy.deepcopy(model).to(device)
    if channels_last:
        m.to(memory_format=torch.channels_last)
    task = ClassificationTask(m, device=device, verbose=False)
    cfg = StageConfig(epochs=2, lr=0.01, sched="none")
    hist = train_stage(task, loader, cfg, stage="throughput", device=device, amp=amp, channels_last=channels_last,
                       progress=False, seed=0, compile=compile)
    seconds = hist[1]["seconds"]
    return {"img_per_s": batch * steps / seconds, "seconds": seconds, "first_epoch_seconds": hist[0]["seconds"],
            "loss": hist[1]["loss"]}


def clustering(classes: int, per_class: int, dim: int, k: int, niter: int, nredo: int) -> List[Dict]:
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 4, (classes, 4, dim)).astype(np.float32)
    labels = np.repeat(np.arange(classes), per_class)
    feats = centres[labels, rng.integers(0, 4, len(labels))] + rng.normal(0, 1, (len(labels), dim)).astype(np.float32)
    faiss = _import_faiss()
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    rows, ids = [], {}
    for mode in ("never", "always"):
        if mode == "always" and gpus == 0:
            rows.append({"faiss_gpu": mode, "skipped": "this FAISS build sees no GPU"})
            continue
        start = time.perf_counter()
        res = cluster_per_class(feats, labels, classes, k, niter=niter, nredo=nredo, seed=0, faiss_gpu=mode)
        ids[mode] = res.cluster_ids
        rows.append({"faiss_gpu": mode, "gpus": gpus if mode == "always" else 0,
                     "seconds": time.perf_counter() - start})
    if len(ids) == 2:
        rows[1]["same_ids"] = float((ids["never"] == ids["always"]).mean())
    for r in rows:
        r.update(points=len(labels), dim=dim, classes=classes, k=k, niter=niter, nredo=nredo)
    return rows


def markdown(res: Dict) -> str:
    a = res["args"]
    lines = [f"# GPU paths: {a['model']} at {a['img_size']}x{a['img_size']}, batch {a['batch_size']}, "
             f"{res['machine']['gpu'] or 'CPU'}", "", f"`{res['command']}`", "",
             "## Training throughput (second of two epochs; synthetic images on the device)", "",
             "| amp | channels_last | compile | img/s | vs fp32 NCHW | epoch s | first epoch s |",
             "|---|---|---|---|---|---|---|"]
    base = res["throughput"][0].get("img_per_s")
    for r in res["throughput"]:
        if "skipped" in r:
            lines.append(f"| {r['amp']} | {r['channels_last']} | {r['compile']} | skipped: {r['skipped']} | | | |")
        else:
            lines.append(f"| {r['amp']} | {r['channels_last']} | {r['compile']} | {r['img_per_s']:.1f} | "
                         f"{r['img_per_s'] / base:.2f} | {r['seconds']:.2f} | {r['first_epoch_seconds']:.2f} |")
    lines += ["", "## FAISS k-means per class, CPU vs GPU", "",
              "| faiss_gpu | GPUs | points x dim | classes, k | seconds | identical ids |", "|---|---|---|---|---|---|"]
    for r in res["clustering"]:
        if "skipped" in r:
            lines.append(f"| {r['faiss_gpu']} | | {r['points']} x {r['dim']} | {r['classes']}, {r['k']} | "
                         f"skipped: {r['skipped']} | |")
        else:
            same = f"{r['same_ids']:.3f}" if "same_ids" in r else ""
            lines.append(f"| {r['faiss_gpu']} | {r['gpus']} | {r['points']} x {r['dim']} | {r['classes']}, {r['k']} | "
                         f"{r['seconds']:.2f} | {same} |")
    lines += ["", f"Machine: {res['machine']}.", "", f"Versions: {res['versions']}.", ""]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--model", default="resnet50")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="batches per epoch")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile row")
    p.add_argument("--cluster", type=int, nargs=3, default=(100, 1280, 2048), metavar=("CLASSES", "PER_CLASS", "DIM"))
    p.add_argument("--smoke", action="store_true", help="tiny sizes (the test)")
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.img_size, args.batch_size, args.steps, args.no_compile = "resnet10t", 32, 8, 2, True
        args.cluster = (3, 40, 16)
    device = resolve_device(args.device)
    out = Path(args.out_dir or Path(__file__).parents[1] / "results" / f"gpu-paths-{device.type}")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, num_classes=1000 if not args.smoke else 10)
    rows = []
    for amp, cl, comp in SETTINGS:
        if comp and args.no_compile:
            continue
        r = throughput(model, device, amp, cl, comp, args.batch_size, args.steps, args.img_size, model.num_classes)
        rows.append({"amp": amp, "channels_last": cl, "compile": comp, **r})
        print(rows[-1], flush=True)
    classes, per_class, dim = args.cluster
    res = {"command": " ".join([sys.executable.split("/")[-1], *sys.argv]) if argv is None
           else "python benchmarks/tools/gpu_paths.py " + " ".join(argv),
           "args": vars(args), "machine": machine(device), "versions": versions(), "throughput": rows,
           "clustering": clustering(classes, per_class, dim, k=5, niter=25, nredo=3)}
    (out / "results.json").write_text(json.dumps(res, indent=1))
    (out / "results.md").write_text(markdown(res))
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
