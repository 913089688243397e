"""The full regime's baselines scored through a path that shares no data code with the package: the test
JPEGs read straight from the zip with Pillow, torchvision's ``ToTensor`` + ``Normalize`` (CIFAR-10's
published mean/std), the committed weights loaded into ``timm.create_model``, fp32. It rules the package's
decoding, cache, label order and evaluation in or out as a cause of the anchor's miss (issue #23).

    python benchmarks/tools/independent_eval.py --data-dir ../shared/data     # ~1 min on one core

Writes ``benchmarks/results/ablation-full/independent-eval.{json,md}``: per seed the test accuracy beside
the package's own (``anchor.json``), and per class.
"""
import argparse
import io
import json
import sys
import zipfile
from pathlib import Path

import timm
import torch
from PIL import Image
from safetensors.torch import load_file
from torchvision import transforms

import encodenet_timm  # noqa: F401  (registers resnet20_cifar)
from encodenet_timm.env import machine, versions

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # CIFAR-10's, as torchvision examples use them


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="../shared/data", help="folder holding cifar10-jpeg.zip")
    p.add_argument("--results", default=str(Path(__file__).parents[1] / "results" / "ablation-full"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    results = Path(args.results)
    with zipfile.ZipFile(Path(args.data_dir) / "cifar10-jpeg.zip") as zf:
        names = sorted(n for n in zf.namelist() if "/test/" in "/" + n and n.lower().endswith((".jpg", ".jpeg")))
        classes = sorted({n.split("/")[-2] for n in names})
        tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
        x = torch.stack([tf(Image.open(io.BytesIO(zf.read(n))).convert("RGB")) for n in names])  # (N, 3, 32, 32)
    y = torch.tensor([classes.index(n.split("/")[-2]) for n in names])
    package = json.loads((results / "anchor.json").read_text())["test_accuracy"]
    seeds = {}
    for path in sorted((results / "weights").glob("baseline-seed*.safetensors")):
        seed = path.stem.split("seed")[-1]
        model = timm.create_model("resnet20_cifar", num_classes=len(classes))
        model.load_state_dict(load_file(str(path)))
        model.eval()
        with torch.no_grad():
            pred = torch.cat([model(x[i:i + 500]).argmax(1) for i in range(0, len(x), 500)])
        hit = (pred == y).float()
        seeds[seed] = {"test_accuracy": hit.mean().item(), "package_test_accuracy": package.get(seed),
                       "per_class": {c: hit[y == i].mean().item() for i, c in enumerate(classes)}}
    record = {"command": " ".join(["python", "benchmarks/tools/independent_eval.py", *(argv or sys.argv[1:])]),
              "images": len(names), "classes": classes, "seeds": seeds, "machine": machine(), "versions": versions()}
    (results / "independent-eval.json").write_text(json.dumps(record, indent=1) + "\n")
    lines = ["# The full regime's baselines through an independent evaluation path", "",
             f"`{record['command']}`", "", __doc__.split("\n\n")[0].replace("\n", " "), "",
             "| seed | test accuracy (%), independent fp32 | the package's (`anchor.json`) | "
             + " | ".join(classes) + " |", "|---|---:|---:|" + "---:|" * len(classes)]
    for seed, r in seeds.items():
        ours = "" if r["package_test_accuracy"] is None else f"{100 * r['package_test_accuracy']:.2f}"
        lines.append(f"| {seed} | {100 * r['test_accuracy']:.2f} | {ours} | "
                     + " | ".join(f"{100 * v:.1f}" for v in r["per_class"].values()) + " |")
    lines += ["", f"Machine: {record['machine']}. Versions: {record['versions']}.", ""]
    (results / "independent-eval.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return record


if __name__ == "__main__":
    main()
