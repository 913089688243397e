"""Per-class clustering of ImageNet-size features from an on-disk FeatureStore: peak memory and time.

    python benchmarks/scale_clustering.py --classes 1000 --per-class 1280 --dim 2048 --dtype float16
    python benchmarks/scale_clustering.py --classes 20 --modes disk,ram   # the same ids from RAM and from disk

Protocol:

* Synthetic features shaped like a ResNet-50 feature pass over ImageNet (1000 classes x 1280 images,
  D = 2048). Each class is a seeded mixture of ``--centres`` Gaussian centres plus unit noise. The
  labels are a seeded permutation, so each class's rows are scattered over the file the way a
  non-sorted dataset's are (the store reads them one row per call, the slow case).
* Write phase (this process): rows are generated ``--block-rows`` at a time and written into an
  on-disk `FeatureStore` in ``--store-dir``; the whole matrix never exists in RAM. The time includes
  the final fsync.
* Cluster phase, once per ``--modes`` entry, each in a fresh subprocess whose peak RSS is measured
  (``VmHWM`` from /proc/self/status; ``ru_maxrss`` is recorded too): ``disk`` runs `cluster_per_class` on the
  store (one class's rows in memory at a time); ``ram`` loads the whole matrix into an array first
  (what the wrapper did before the store). With both, the cluster ids are compared.
* The store is deleted at the end. Each run is added to ``results.json`` / ``results.md`` in
  ``--out-dir`` under a key of its shape and dtype (a rerun of the same shape replaces it).

Numbers are for this machine's page cache: the file was just written, so reads come from RAM when it
fits there. The process RSS never includes those pages (the store uses pread, not mmap).
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from encodenet_timm.env import machine, versions
from encodenet_timm.clustering import cluster_per_class
from encodenet_timm.feature_store import FeatureStore

_RESULTS = Path(__file__).parent / "results" / "scale-clustering"
_DISK_MARGIN = 512 << 20  # bytes left free on the store's disk beyond the matrix
_BYTES_PER_ROW = 25  # what cluster_per_class keeps per row besides features: labels, ids, distances (int64,
#                      int64, float64) and the per-class boolean mask


def _status_kb() -> Dict[str, int]:
    """VmHWM, VmRSS, RssAnon and RssFile of this process (kB), from /proc/self/status."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0])
    return out


def _mib(kb: float) -> float:
    return round(kb / 1024, 1)


# ---- cluster phase (the subprocess) ------------------------------------------------------------------------
def cluster_child(store_dir: Path, mode: str, clusters_per_class: int, niter: int, nredo: int, seed: int) -> Dict:
    """Cluster the store in `store_dir` ("disk": from the store; "ram": from the whole matrix loaded first).

    Runs in a fresh process; returns times and this process's memory (MiB) after imports and at its peak.
    """
    import faiss
    after_import = _status_kb()
    labels = np.load(store_dir / "labels.npy")  # (N,) int64
    num_classes = int(labels.max()) + 1
    read_s = 0.0
    with FeatureStore.open(store_dir / "store") as store:
        t0 = time.perf_counter()
        if mode == "ram":
            features = store.array()  # (N, D) float32, all in this process
            read_s = time.perf_counter() - t0
        else:
            features, real_rows = store, store.rows

            def timed_rows(idx: np.ndarray) -> np.ndarray:
                nonlocal read_s
                start = time.perf_counter()
                out = real_rows(idx)
                read_s += time.perf_counter() - start
                return out

            store.rows = timed_rows  # count the time spent reading rows
        t1 = time.perf_counter()
        res = cluster_per_class(features, labels, num_classes, clusters_per_class, niter=niter, nredo=nredo,
                                seed=seed, faiss_gpu="never", progress=True)  # the bar goes to stderr
        cluster_s = time.perf_counter() - t1
    np.save(store_dir / f"cluster_ids-{mode}.npy", res.cluster_ids)
    peak = _status_kb()
    return {"mode": mode, "cluster_s": round(cluster_s, 2), "load_s": round(t1 - t0, 2) if mode == "ram" else 0.0,
            "read_s": round(read_s, 2), "per_class_ms": round(1000 * cluster_s / num_classes, 1),
            "num_clusters": int(len(res.cluster_labels)), "faiss_threads": faiss.omp_get_max_threads(),
            "rss_after_import_mib": _mib(after_import["VmRSS"]),
            "anon_after_import_mib": _mib(after_import["RssAnon"]), "peak_rss_mib": _mib(peak["VmHWM"]),
            "ru_maxrss_mib": _mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss),  # see markdown()
            "peak_minus_import_mib": _mib(peak["VmHWM"] - after_import["VmRSS"]),
            "end_anon_mib": _mib(peak["RssAnon"]), "end_file_mib": _mib(peak["RssFile"])}


# ---- write phase -------------------------------------------------------------------------------------------
def write_store(path: Path, labels: np.ndarray, dim: int, dtype: str, centres: int, block_rows: int,
                seed: int) -> float:
    """Generate rows block by block (class mixture + unit noise) into a new store at `path`; seconds taken."""
    n, num_classes = len(labels), int(labels.max()) + 1
    rng = np.random.default_rng(seed)
    means = rng.normal(scale=2.0, size=(num_classes, centres, dim)).astype(np.float32)  # (C, m, D)
    start = time.perf_counter()
    with FeatureStore(n, dim, path, dtype=dtype) as store:
        for b, s in enumerate(range(0, n, block_rows)):
            e = min(s + block_rows, n)
            g = np.random.default_rng([seed, b])
            x = g.standard_normal((e - s, dim), dtype=np.float32)  # (B, D) noise
            x += means[labels[s:e], g.integers(0, centres, size=e - s)]  # + each row's centre
            store.write(s, x)
        store.flush()
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> Dict:
    """Write the store, cluster it in a subprocess per mode, delete it; the result entry."""
    n = args.classes * args.per_class
    nbytes = n * args.dim * np.dtype(args.dtype).itemsize
    Path(args.store_dir).mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.store_dir).free
    if free < nbytes + _DISK_MARGIN:
        raise SystemExit(f"{args.store_dir} has {free / 2**30:.1f} GiB free but the ({n}, {args.dim}) {args.dtype} "
                         f"store needs {nbytes / 2**30:.1f} GiB (+0.5 GiB margin): use --dtype float16, fewer "
                         f"--classes, or another --store-dir")
    work = Path(tempfile.mkdtemp(prefix="scale-clustering-", dir=args.store_dir))
    try:
        labels = np.random.default_rng(args.seed).permutation(np.repeat(np.arange(args.classes), args.per_class))
        np.save(work / "labels.npy", labels)
        print(f"writing ({n}, {args.dim}) {args.dtype} = {nbytes / 2**30:.2f} GiB to {work}", file=sys.stderr)
        write_s = write_store(work / "store", labels, args.dim, args.dtype, args.centres, args.block_rows, args.seed)
        del labels
        writer = _status_kb()
        modes = {}
        for mode in args.modes:
            print(f"clustering ({mode}) in a fresh process", file=sys.stderr)
            cmd = [sys.executable, __file__, "--child", str(work), mode, str(args.k), str(args.niter),
                   str(args.nredo), str(args.seed)]
            done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
            modes[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        same = None
        if len(modes) > 1:
            ids = [np.load(work / f"cluster_ids-{m}.npy") for m in modes]
            same = all(np.array_equal(ids[0], i) for i in ids[1:])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"key": f"{args.classes}x{args.per_class}x{args.dim}-{args.dtype}",
            "command": "python benchmarks/scale_clustering.py " + " ".join(args.argv),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "classes": args.classes, "per_class": args.per_class, "rows": n, "dim": args.dim, "dtype": args.dtype,
            "matrix_bytes": nbytes, "matrix_float32_bytes": n * args.dim * 4, "order": "shuffled (classes scattered)",
            "k": args.k, "niter": args.niter, "nredo": args.nredo, "seed": args.seed, "centres": args.centres,
            "write_s": round(write_s, 2), "write_mib_s": round(nbytes / 2**20 / write_s, 1),
            "writer_peak_rss_mib": _mib(writer["VmHWM"]), "disk_free_before_gib": round(free / 2**30, 2),
            "modes": modes, "identical_cluster_ids": same,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "machine": machine(), "versions": versions()}


# ---- report ------------------------------------------------------------------------------------------------
def _size(nbytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if nbytes >= scale:
            return f"{nbytes / scale:.{2 if unit == 'GiB' else 0}f} {unit}"
    return f"{nbytes / 2**10:.0f} KiB"


def markdown(runs: List[Dict], full_classes: int = 1000) -> str:
    lines = ["# Per-class clustering from an on-disk FeatureStore: peak memory and time", "",
             "Measured by `benchmarks/scale_clustering.py` (protocol in its docstring). Synthetic features, classes "
             "scattered over the rows (shuffled order).", "",
             "- Peak RSS: `VmHWM` of a fresh process that only clusters. 'After imports' is its RSS once numpy, "
             "torch, timm, FAISS and the package are loaded, before any feature is read. Its `ru_maxrss` (in "
             "results.json) is not its own: Linux carries the launching process's high-water mark across "
             "fork + exec, so it shows the writer's peak when that is higher.",
             "- Where: 'disk' clusters from the store (one class's rows at a time); 'RAM' loads the whole matrix "
             "into an array first (what clustering needed before the store).",
             "- Times are wall seconds. Write: generating the rows, writing them and the final fsync. Cluster: "
             "`cluster_per_class`, reading included. Read: for disk, the time inside `store.rows` (part of "
             "cluster); for RAM, loading the matrix (before cluster).", "",
             "| rows | classes | D | dtype | where | matrix | as float32 | peak RSS | after imports | peak - imports "
             "| write s | cluster s | read s | per-class ms | same ids |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        for mode, m in r["modes"].items():
            same = {None: "", True: "yes", False: "**no**"}[r["identical_cluster_ids"]]
            read = m["load_s"] if mode == "ram" else m["read_s"]
            cells = [f"{r['rows']:,}", r["classes"], r["dim"], r["dtype"], "RAM" if mode == "ram" else "disk",
                     _size(r["matrix_bytes"]), _size(r["matrix_float32_bytes"]), f"{m['peak_rss_mib']:,.0f} MiB",
                     f"{m['rss_after_import_mib']:,.0f} MiB", f"{m['peak_minus_import_mib']:,.0f} MiB",
                     f"{r['write_s']:.1f}", f"{m['cluster_s']:.1f}", f"{read:.1f}", f"{m['per_class_ms']:.0f}", same]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    extra = [r for r in runs if r["dtype"] == "float32" and "disk" in r["modes"] and r["classes"] < full_classes]
    extra = sorted(extra, key=lambda r: r["rows"])[-1:]  # the largest measured float32 run
    if extra:
        lines += ["", f"## Extrapolated to {full_classes} classes in float32 (not measured)", "",
                  "From the largest float32 disk run: write time scales with bytes (at the measured MiB/s), cluster time "
                  "with classes (at the measured per-class ms), and peak RSS grows only by what `cluster_per_class` "
                  f"keeps per row besides features ({_BYTES_PER_ROW} bytes: labels, cluster ids, distances, the class "
                  "mask); the rows held at once (one class) do not grow with the number of classes.", "",
                  "| from | rows | matrix (float32) | peak RSS | write s | cluster s |", "|---|---|---|---|---|---|"]
        for r in extra:
            n_full = full_classes * r["per_class"]
            full_bytes = n_full * r["dim"] * 4
            m = r["modes"]["disk"]
            rss = m["peak_rss_mib"] + _BYTES_PER_ROW * (n_full - r["rows"]) / 2**20
            lines.append(f"| {r['key']} | {n_full:,} | {_size(full_bytes)} | ~{rss:,.0f} MiB "
                         f"| ~{full_bytes / 2**20 / r['write_mib_s']:.0f} "
                         f"| ~{m['per_class_ms'] * full_classes / 1000:.0f} |")
    lines += ["", "## Runs", ""]
    for r in runs:
        threads = next(iter(r["modes"].values()))["faiss_threads"]
        lines += [f"- `{r['key']}` ({r['date']}): `{r['command']}`; k={r['k']}, niter={r['niter']}, "
                  f"nredo={r['nredo']}, seed={r['seed']}, {r['centres']} centres per class; write "
                  f"{r['write_mib_s']:.0f} MiB/s; FAISS threads {threads}, OMP_NUM_THREADS={r['omp_num_threads']}; "
                  f"{r['disk_free_before_gib']} GiB free before writing."]
    last = runs[-1]
    lines += ["", f"Machine: {last['machine']}.", "", f"Versions: {last['versions']}.", ""]
    return "\n".join(lines)


def save(out_dir: Path, entry: Dict) -> Dict:
    """Add (or replace, by key) this run in results.json and rewrite results.md; the whole results dict."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {"benchmark": "scale-clustering", "runs": []}
    results["runs"] = [r for r in results["runs"] if r["key"] != entry["key"]] + [entry]
    results["runs"].sort(key=lambda r: (r["dtype"], r["rows"]))
    path.write_text(json.dumps(results, indent=1))
    (out_dir / "results.md").write_text(markdown(results["runs"]))
    return results


def main(argv: Optional[List[str]] = None) -> Dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:  # the cluster phase, in its own process; prints one JSON line
        store_dir, mode, k, niter, nredo, seed = argv[1:7]
        res = cluster_child(Path(store_dir), mode, int(k), int(niter), int(nredo), int(seed))
        print(json.dumps(res))
        return res
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--per-class", type=int, default=1280, help="images per class (ImageNet: ~1280)")
    p.add_argument("--dim", type=int, default=2048, help="feature dimension (ResNet-50: 2048)")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="the store's dtype")
    p.add_argument("--modes", default="disk", help="comma-separated: disk (from the store), ram (whole matrix)")
    p.add_argument("--k", type=int, default=5, help="clusters per class")
    p.add_argument("--niter", type=int, default=25)
    p.add_argument("--nredo", type=int, default=3, help="k-means restarts (the package default is 3)")
    p.add_argument("--centres", type=int, default=4, help="Gaussian centres per class")
    p.add_argument("--block-rows", type=int, default=8192, help="rows generated and written at once")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--store-dir", default=tempfile.gettempdir(), help="where the (deleted afterwards) store goes")
    p.add_argument("--out-dir", default=str(_RESULTS))
    args = p.parse_args(argv)
    args.argv = argv
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or set(args.modes) - {"disk", "ram"}:
        p.error(f"--modes takes disk and/or ram, got {args.modes}")
    entry = run(args)
    save(Path(args.out_dir), entry)
    print(json.dumps({k: entry[k] for k in ("key", "write_s", "modes", "identical_cluster_ids")}, indent=1))
    return entry


if __name__ == "__main__":
    main()
