"""What the image-file scan before training costs (`data.scan`, issue #16.4), per image and for ImageNet.

    python benchmarks/tools/scan_files.py                                # 4,000 JPEGs at 500x375 (ImageNet's typical size)
    python benchmarks/tools/scan_files.py --images 200 --size 64 --out-dir /tmp/scan   # smoke

Writes `--images` JPEGs (random colour fields with pixel noise, quality 90) of `--size` pixels into a temporary
image folder, then times `file_checks.scan_files` in each mode ("verify": headers and checksums, "decode":
every pixel) against one plain PIL decode pass over the same files, and writes
``results.json`` + ``results.md`` under ``--out-dir`` (default ``benchmarks/results/scan-files``) with
the seconds per 1,000 images and the extrapolation to ImageNet-1k's 1,281,167 training images. The
files were just written, so every pass reads them from the page cache: a cold disk or a network file
system adds its read time (an epoch's worth of reading for "decode", a fraction of it for "verify").
"""
import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
from PIL import Image

from encodenet_timm.file_checks import scan_files
from encodenet_timm.env import machine, versions
from encodenet_timm.files import write_json

IMAGENET_TRAIN = 1_281_167


def make_jpegs(root: Path, n: int, size: List[int], seed: int = 0) -> List[str]:
    """`n` JPEGs of (width, height) `size`: random colour fields upsampled from 8x6 noise, plus pixel noise
    (sigma 12) so that a file is about as large as a photo of that size (ImageNet's average is ~110 KiB)."""
    rng = np.random.default_rng(seed)
    files = []
    for i in range(n):
        small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        path = root / f"class{i % 10}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        field = np.asarray(small.resize(tuple(size), Image.BILINEAR), dtype=np.float32)
        noisy = np.clip(field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(path, quality=90)
        files.append(str(path))
    return files


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _decode_all(files: List[str]) -> None:
    for f in files:
        with Image.open(f) as im:
            im.convert("RGB").load()


def main(argv: Optional[List[str]] = None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--size", type=int, nargs="+", default=[500, 375], help="width [height] of each JPEG")
    p.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parents[1] / "results" / "scan-files")
    args = p.parse_args(argv)
    size = args.size * 2 if len(args.size) == 1 else args.size[:2]
    with tempfile.TemporaryDirectory() as tmp:
        files = make_jpegs(Path(tmp), args.images, size)
        mb = sum(Path(f).stat().st_size for f in files) / 2 ** 20
        rows = {"verify, first call": _timed(lambda: scan_files(files, "verify")),
                "verify": _timed(lambda: scan_files(files, "verify")),
                "decode": _timed(lambda: scan_files(files, "decode")),
                "plain PIL decode, one thread": _timed(lambda: _decode_all(files))}
    out = {name: {"seconds": s, "s_per_1000": s / args.images * 1000,
                  "imagenet_minutes": s / args.images * IMAGENET_TRAIN / 60} for name, s in rows.items()}
    res = {"command": "python benchmarks/tools/scan_files.py " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None
                                                                      else argv)),
           "images": args.images, "size": size, "megabytes": mb, "rows": out, "machine": machine(),
           "versions": versions()}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_json(args.out_dir / "results.json", res, newline=True)
    lines = [f"# The image-file scan before training: {args.images} JPEGs at {size[0]}x{size[1]} "
             f"({mb / args.images * 1024:.0f} KiB each)", "", f"`{res['command']}`", "",
             "| mode | seconds | s per 1,000 images | ImageNet-1k train (1.28M), minutes |", "|---|---:|---:|---:|"]
    for name, r in out.items():
        lines.append(f"| {name} | {r['seconds']:.2f} | {r['s_per_1000']:.2f} | "
                     f"{r['imagenet_minutes']:.1f} |")
    lines += ["", "`data.scan` runs once per `fit` (and once per `compare`, not per row), with up to 8 threads. "
              "Every pass reads the files from the page cache (they were just written).", "",
              f"Machine: {res['machine']}.", "", f"Versions: {res['versions']}.", ""]
    (args.out_dir / "results.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return res


if __name__ == "__main__":
    main()
