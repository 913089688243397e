"""How much disk a finished run directory takes, as a multiple of the model's weights (issue #16.7).

    python benchmarks/tools/run_dir_size.py                      # resnet20_cifar on digits (seconds)
    python benchmarks/tools/run_dir_size.py --model resnet18 --baseline-opt sgd

Runs ``encodenet fit`` through every stage (1 epoch each) into a temporary directory, then writes
``benchmarks/results/run-dir-size.{json,md}``: every file's size, grouped (final weights, the kept
checkpoint, pictures, records), and the ratio of the whole directory to ``model.safetensors``.
"""
import argparse
import platform
import shlex
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from encodenet_timm.files import write_json
from encodenet_timm.cli import main as encodenet
from encodenet_timm.env import machine, versions

RESULTS = Path(__file__).resolve().parents[1] / "results"


def _group(rel: Path) -> str:
    if rel.parts[0] == "checkpoints":
        return f"checkpoint {rel.parts[1]}/{rel.name}"
    return {".png": "pictures", ".json": "records", ".yaml": "records", ".csv": "records"}.get(rel.suffix, rel.name)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet20_cifar")
    p.add_argument("--baseline-opt", default="adamw", help="adamw keeps 2 moments per weight: the worst case")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        code = encodenet(["fit", "--model", args.model, "--dataset", "digits", "--per-class", "10", "--val-fraction",
                          "0", "--batch-size", "32", "--device", "cpu", "--set", "progress=false",
                          "--representatives.clusters_per_class", "2", "--baseline.epochs", "1", "--baseline.opt",
                          args.baseline_opt, "--autoencoder.epochs", "1", "--transfer.epochs", "1",
                          "--finetune.epochs", "1", "--out", str(run)])
        if code != 0:
            raise SystemExit(f"encodenet fit failed ({code})")
        sizes = defaultdict(int)
        for path in run.rglob("*"):
            if path.is_file():
                sizes[_group(path.relative_to(run))] += path.stat().st_size
    model = sizes["model.safetensors"]
    total = sum(sizes.values())
    result = {"command": "python " + " ".join(map(shlex.quote, [sys.argv[0], *(argv or sys.argv[1:])])),
              "model": args.model, "baseline_opt": args.baseline_opt, "bytes": dict(sorted(sizes.items())),
              "total_bytes": total, "model_bytes": model, "ratio": round(total / model, 2),
              "machine": machine(None), "versions": versions(), "python": platform.python_version()}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "run-dir-size.json", result, indent=2, newline=True)
    lines = [f"# Disk of a finished run directory ({args.model}, baseline {args.baseline_opt}, digits)", "",
             f"`{result['command']}`", "", "| files | bytes | x model |", "|---|---:|---:|"]
    lines += [f"| {k} | {v:,} | {v / model:.2f} |" for k, v in sorted(sizes.items(), key=lambda kv: -kv[1])]
    lines += [f"| **all** | **{total:,}** | **{total / model:.2f}** |", ""]
    (args.out / "run-dir-size.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
