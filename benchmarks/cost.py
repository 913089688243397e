"""What EncodeNet's stages cost, in baseline epochs, and FAISS against scikit-learn k-means.

    nice -n 5 python benchmarks/cost.py --data-dir ../shared/data

Everything is measured in one process, with one thread count, and reported as ratios (the cores may be
shared, so absolute seconds mean little):

* Stages: `resnet20_cifar` at 32x32, batch 128, on a stratified subset of the CIFAR-10 JPEG copy, run
  through the public `EncodeNetWrapper` stage methods with the default `EncodeNetConfig()` (split before
  the last stage, MSE + CE autoencoder, fine-tune); only the seed, the progress bar and the epochs are
  changed. Load from other processes comes and goes, so the stages are timed in rounds: each round runs
  every stage once, in `fit()`'s order, for one epoch (`seconds` in the wrapper's history), and
  `--epochs-per-stage` (>= 2) rounds are run. A stage's ratio is the median over rounds of its epoch
  over that round's baseline epoch. The representatives stage is also split into feature pass,
  clustering and pick, timed doing the same work as the wrapper. The default recipe's extra cost =
  representatives + each stage's default epochs x its ratio. FLOPs ratios come from `FlopCounterMode`
  over one epoch of each stage on 10 images per class (run first: it also warms up).
* Clustering: per class, FAISS `Kmeans` (the settings of `encodenet_timm.clustering`) against
  scikit-learn `KMeans(init="random", n_init=1, tol=0, algorithm="lloyd")` run `nredo` times (the best
  kept, as FAISS does): the same k, iterations and restarts, both initialised from k random points.
  scikit-learn still stops a restart early when no label changes, so iterations are reported too. Rows:
  the pre-logits features of the training subset after the first baseline epoch, and a larger synthetic
  Gaussian mixture.

`--smoke` (the test) uses 100 of scikit-learn's digits instead of CIFAR-10; its numbers mean nothing.
"""
import argparse
import json
import logging
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import faiss
import numpy as np
import timm
import torch
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_info, threadpool_limits
from torch.utils.data import DataLoader, Subset, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from encodenet_timm import EncodeNetConfig, EncodeNetWrapper
from encodenet_timm.env import machine, versions
from encodenet_timm.data import CifarDataset, load_cifar, stratified_subset
from encodenet_timm.clustering import cluster_per_class
from encodenet_timm.data import digits_datasets
from encodenet_timm.representatives import pick_representatives, softmax_entropy

_logger = logging.getLogger("benchmarks.cost")

MODEL = "resnet20_cifar"
STAGES = ("baseline", "representatives", "autoencoder", "transfer", "finetune")
TRAINED = ("autoencoder", "transfer", "finetune")  # the stages after representatives, with default epochs
PARTS = ("features", "clustering", "pick")  # of the representatives stage
SHARED = ("The CPU cores may be shared with other processes: absolute seconds are not comparable between "
          "runs; the ratios, measured in one process with one thread count, are what this reports.")


# ---- data ---------------------------------------------------------------------------------------------
def load_data(args):
    """(augmented shuffled train loader, plain ordered loader, description, num_classes)."""
    g = torch.Generator().manual_seed(args.seed)
    if args.smoke:
        train, _ = digits_datasets(size=32, in_chans=3, seed=args.seed)
        x, y = train.tensors  # (N, 3, 32, 32), (N,)
        idx = torch.from_numpy(stratified_subset(y.numpy(), args.train_size // 10, seed=args.seed))
        ds = TensorDataset(x[idx], y[idx])
        what = (f"smoke: {len(ds)} of scikit-learn's digits at 3x32x32 (not CIFAR-10; no augmentation), "
                f"stratified with seed {args.seed}")
        return DataLoader(ds, args.batch_size, shuffle=True, generator=g), DataLoader(ds, args.batch_size), what, 10
    arrays = load_cifar("cifar10-jpeg", args.data_dir, cache_dir=args.cache_dir, download=False)
    idx = stratified_subset(arrays.train_labels, args.train_size // len(arrays.classes), seed=args.seed)
    ds = lambda augment: CifarDataset(arrays.train_images[idx], arrays.train_labels[idx], arrays.mean,
                                      arrays.std, augment=augment)
    what = (f"CIFAR-10 (JPEG copy in {args.data_dir}): stratified {len(idx)}-image training subset (seed "
            f"{args.seed}), standard augmentation for training, none for the feature pass")
    return (DataLoader(ds(True), args.batch_size, shuffle=True, generator=g), DataLoader(ds(False), args.batch_size),
            what, len(arrays.classes))


# ---- stages -------------------------------------------------------------------------------------------
@torch.no_grad()
def feature_pass(model: torch.nn.Module, loader: DataLoader, device: torch.device):
    """Eval-mode pre-logits (N, D), logits (N, K) and labels (N,) over `loader`, as the wrapper's feature pass."""
    was_training = model.training
    model.eval()
    feats, logits, labels = [], [], []
    for x, y in loader:
        z = model.forward_features(x.to(device))
        feats.append(model.forward_head(z, pre_logits=True).flatten(1).float().cpu())  # (B, D)
        logits.append(model.forward_head(z).float().cpu())  # (B, K)
        labels.append(y.long())
    model.train(was_training)
    return torch.cat(feats), torch.cat(logits), torch.cat(labels)


def representative_parts(w: EncodeNetWrapper, plain: DataLoader) -> Dict:
    """Seconds of the representatives stage's three parts: the same work as `select_representatives`
    (feature pass, `cluster_per_class`, entropy + `pick_representatives` + reading the images)."""
    cfg = w.config.representatives
    ordered = DataLoader(plain.dataset, batch_size=cfg.batch_size, shuffle=False)
    t0 = time.perf_counter()
    feats, logits, labels = feature_pass(w.model, ordered, w.device)  # (N, D), (N, K), (N,)
    t1 = time.perf_counter()
    clusters = cluster_per_class(feats.numpy(), labels.numpy(), w.num_classes, cfg.clusters_per_class,
                                 max_auto_clusters=cfg.max_auto_clusters, niter=cfg.niter, nredo=cfg.nredo,
                                 seed=w.config.seed, faiss_gpu=cfg.faiss_gpu)
    t2 = time.perf_counter()
    reps = pick_representatives(torch.from_numpy(clusters.cluster_ids), softmax_entropy(logits),
                                len(clusters.cluster_labels))
    torch.stack([plain.dataset[i][0] for i in reps.tolist()])  # (M, C, H, W) representative images
    t3 = time.perf_counter()
    return {"features": t1 - t0, "clustering": t2 - t1, "pick": t3 - t2, "feats": feats.numpy(),
            "labels": labels.numpy()}


def time_stages(cfg: EncodeNetConfig, model: torch.nn.Module, train: DataLoader, plain: DataLoader, rounds: int):
    """`rounds` rounds of every stage once, in fit()'s order (`cfg` gives each stage 1 epoch).

    Returns:
        seconds: stage or representatives part -> its seconds in each round; loads: the 1-min load average
        after each round; the pre-logits features (N, D) and labels (N,) after the first baseline epoch;
        `wrapper.flops()`.
    """
    w = EncodeNetWrapper(model, cfg)
    fit = {"baseline": lambda: w.fit_baseline(train),
           "autoencoder": lambda: w.fit_autoencoder(train, w.representatives),
           "transfer": lambda: w.fit_transfer(train), "finetune": lambda: w.fit_finetune(train)}
    seconds: Dict[str, List[float]] = {k: [] for k in (*STAGES, *PARTS)}
    loads, first = [], None
    for r in range(rounds):
        for stage in STAGES:
            if stage == "representatives":
                parts = representative_parts(w, plain)
                for k in PARTS:
                    seconds[k].append(parts[k])
                first = first or (parts["feats"], parts["labels"])
                w.select_representatives(plain)
                seconds[stage].append(w.history["representatives"]["seconds"])
            else:
                seconds[stage].append(fit[stage]()[0]["seconds"])
        loads.append(round(os.getloadavg()[0], 2))  # were the cores shared?
        _logger.info("round %d/%d: %s (load %.2f)", r + 1, rounds,
                     ", ".join(f"{s} {seconds[s][-1]:.1f} s" for s in STAGES), loads[-1])
    return seconds, loads, first[0], first[1], w.flops()


def stage_flops(cfg: EncodeNetConfig, model: torch.nn.Module, plain: DataLoader) -> Dict:
    """FLOPs per image of one epoch of each stage (`cfg` gives each 1 epoch; FlopCounterMode, forward +
    backward, k-means not counted), on 10 images per class of the plain training set."""
    labels = np.asarray([int(plain.dataset[i][1]) for i in range(len(plain.dataset))])
    idx = stratified_subset(labels, max(10, cfg.representatives.clusters_per_class), seed=0)
    loader = DataLoader(Subset(plain.dataset, idx.tolist()), batch_size=len(idx))
    w = EncodeNetWrapper(model, cfg)
    w.decoder  # built (its own FLOPs counted) outside the counters

    def count(fn):
        with FlopCounterMode(display=False) as counter:
            fn()
        return float(counter.get_total_flops()) / len(idx)

    return {"baseline": count(lambda: w.fit_baseline(loader)),
            "representatives": count(lambda: w.select_representatives(loader)),
            "autoencoder": count(lambda: w.fit_autoencoder(loader)),
            "transfer": count(lambda: w.fit_transfer(loader)),
            "finetune": count(lambda: w.fit_finetune(loader))}


# ---- clustering ---------------------------------------------------------------------------------------
def inertia(x: np.ndarray, centroids: np.ndarray) -> float:
    """Sum over points x (n, d) of the squared distance to the nearest of centroids (k, d), in float64."""
    x, c = x.astype(np.float64), centroids.astype(np.float64)
    d2 = (x * x).sum(1)[:, None] - 2.0 * x @ c.T + (c * c).sum(1)[None, :]  # (n, k)
    return float(np.maximum(d2.min(1), 0.0).sum())


def faiss_kmeans(x: np.ndarray, k: int, niter: int, nredo: int, seed: int):
    """FAISS k-means with `encodenet_timm.clustering`'s settings (every point used); train + assignment."""
    start = time.perf_counter()
    km = faiss.Kmeans(x.shape[1], k, niter=niter, nredo=nredo, seed=seed, gpu=False, verbose=False,
                      max_points_per_centroid=math.ceil(len(x) / k) + 1, min_points_per_centroid=1)
    km.train(x)
    km.index.search(x, 1)
    return km.centroids, time.perf_counter() - start, niter * nredo


def sklearn_kmeans(x: np.ndarray, k: int, niter: int, nredo: int, seed: int):
    """scikit-learn Lloyd k-means, `nredo` random-point initialisations, the lowest inertia kept."""
    rng = np.random.RandomState(seed)
    start = time.perf_counter()
    best, iterations = None, 0
    for _ in range(nredo):
        km = KMeans(k, init="random", n_init=1, max_iter=niter, tol=0.0, algorithm="lloyd", random_state=rng).fit(x)
        iterations += int(km.n_iter_)
        if best is None or km.inertia_ < best.inertia_:
            best = km
    return best.cluster_centers_, time.perf_counter() - start, iterations


def compare_clustering(name: str, x: np.ndarray, labels: np.ndarray, k: int, niter: int, nredo: int,
                       seed: int, threads: int) -> Dict:
    """Both k-means per class on x (N, D) float32; seconds, iterations and inertia summed over classes."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    row = {"features": name, "n": int(len(x)), "dim": int(x.shape[1]), "classes": int(len(np.unique(labels))),
           "k": k}
    with threadpool_limits(limits=threads):
        for lib, fn in (("faiss", faiss_kmeans), ("sklearn", sklearn_kmeans)):
            total = {"seconds": 0.0, "iterations": 0, "inertia": 0.0}
            for c in np.unique(labels):
                xc = x[labels == c]
                centroids, seconds, iterations = fn(xc, k, niter, nredo, seed + int(c))
                total["seconds"] += seconds
                total["iterations"] += iterations
                total["inertia"] += inertia(xc, centroids)
            total["seconds_per_iteration"] = total["seconds"] / total["iterations"]
            row[lib] = total
    row["time_ratio_sklearn_over_faiss"] = row["sklearn"]["seconds"] / row["faiss"]["seconds"]
    row["per_iteration_ratio_sklearn_over_faiss"] = (row["sklearn"]["seconds_per_iteration"]
                                                     / row["faiss"]["seconds_per_iteration"])
    row["inertia_ratio_sklearn_over_faiss"] = row["sklearn"]["inertia"] / row["faiss"]["inertia"]
    return row


def synthetic(classes: int, per_class: int, dim: int, k: int, seed: int):
    """A Gaussian mixture per class: k centres ~ N(0, 1), points = centre + N(0, 1.5^2) noise (clusters overlap)."""
    rng = np.random.default_rng(seed)
    xs = [(rng.standard_normal((k, dim))[rng.integers(0, k, per_class)]
           + 1.5 * rng.standard_normal((per_class, dim))) for _ in range(classes)]
    return np.concatenate(xs).astype(np.float32), np.repeat(np.arange(classes), per_class)


# ---- report -------------------------------------------------------------------------------------------
def _median(values: List[float]) -> float:
    return float(statistics.median(values))


def summarise(seconds: Dict, flops: Dict, cfg_default: EncodeNetConfig) -> Dict:
    """Per stage: the median over rounds of its seconds over that round's baseline seconds (the result), the
    ratio of the medians, and the FLOPs ratio; the default recipe's extra cost in baseline epochs from each."""
    base = np.asarray(seconds["baseline"])

    def entry(key: str) -> Dict:
        v = np.asarray(seconds[key])
        return {"seconds": seconds[key], "median_seconds": float(np.median(v)), "ratio": float(np.median(v / base)),
                "ratio_of_medians": float(np.median(v) / np.median(base))}

    stages = {s: {**entry(s), "flops_per_image": flops[s], "flops_ratio": flops[s] / flops["baseline"]}
              for s in STAGES}
    stages["representatives"]["parts"] = {k: entry(k) for k in PARTS}
    epochs = {s: getattr(cfg_default, s).epochs for s in TRAINED}
    extra = lambda key: stages["representatives"][key] + sum(epochs[s] * stages[s][key] for s in TRAINED)
    recipe = {"default_epochs": epochs, "time": extra("ratio"), "time_of_medians": extra("ratio_of_medians"),
              "flops": extra("flops_ratio")}
    return {"stages": stages, "recipe_extra_baseline_epochs": recipe}


def markdown(res: Dict) -> str:
    st, rec = res["stages"], res["recipe_extra_baseline_epochs"]
    e = rec["default_epochs"]
    lines = [f"# Cost of EncodeNet's stages: {res['model']}, {res['data']['dataset']}", "",
             f"`{res['command']}`", "", f"**Warning.** {SHARED}", "",
             f"Data: {res['data']['description']}. Batch {res['batch_size']}, 32x32, CPU. Config: "
             f"`EncodeNetConfig()` (seed {res['seed']}), every stage run once per round for one epoch, "
             f"{res['epochs_per_stage']} rounds.", "",
             f"Threads: {res['threads']} (torch, FAISS and scikit-learn). Load average (1, 5, 15 min) before "
             f"{res['loadavg']['before']}, after {res['loadavg']['after']}. Wall time {res['wall_seconds']:.0f} s.",
             "", f"Machine: {res['machine']}. Versions: {res['versions']}.", "",
             "## Stages", "",
             "Seconds of one epoch (one call for representatives) in each round. Ratio to a baseline epoch: the "
             "median over rounds of the stage's seconds over that round's baseline seconds (the result); ratio of "
             "medians: median seconds over median baseline seconds. FLOPs ratio: per image, one epoch of the stage "
             "over one baseline epoch (FlopCounterMode; k-means not counted).", "",
             "| stage | seconds, each round | median seconds | ratio to a baseline epoch | ratio of medians | "
             "FLOPs ratio |", "|---|---|---|---|---|---|"]
    for s in STAGES:
        d = st[s]
        lines.append(f"| {s} | {', '.join(f'{v:.2f}' for v in d['seconds'])} | {d['median_seconds']:.2f} | "
                     f"**{d['ratio']:.3f}** | {d['ratio_of_medians']:.3f} | {d['flops_ratio']:.3f} |")
        if s == "representatives":
            for k, p in d["parts"].items():
                lines.append(f"| &nbsp;&nbsp;{k} | {', '.join(f'{v:.3f}' for v in p['seconds'])} | "
                             f"{p['median_seconds']:.3f} | {p['ratio']:.4f} | {p['ratio_of_medians']:.4f} | |")
    f = res["decoder_flops"]
    lines += ["", f"Load average (1 min) after each round: {res['loadavg']['rounds']}. Fine-tune runs the same "
              f"computation as a baseline epoch (FLOPs ratio {st['finetune']['flops_ratio']:.3f}): its time ratio, "
              f"{st['finetune']['ratio']:.3f}, shows how far the measurement is from exact.",
              "", "Representatives parts are timed outside the wrapper doing the same work (feature pass, "
              "`cluster_per_class`, `softmax_entropy` + `pick_representatives` + reading the images).", "",
              f"**The default recipe's extra cost**: representatives + {e['autoencoder']} autoencoder + "
              f"{e['transfer']} transfer + {e['finetune']} fine-tune epochs = **{rec['time']:.1f} baseline epochs "
              f"of time** ({rec['time_of_medians']:.1f} from the ratio of medians), {rec['flops']:.1f} of FLOPs (the "
              f"representatives stage on this training subset; its cost grows with the training set like an "
              f"epoch does).", "",
              f"Decoder FLOPs / encoder FLOPs per image (`wrapper.flops()`): {f['ratio']:.3f} "
              f"({f['decoder'] / 1e6:.1f} M / {f['encoder'] / 1e6:.1f} M).", "",
              "## Clustering: FAISS against scikit-learn", "", res["clustering"]["settings"], "",
              "| features | points x dim (classes, k) | FAISS s | sklearn s | sklearn / FAISS | iterations FAISS / "
              "sklearn | per-iteration sklearn / FAISS | inertia FAISS | inertia sklearn | sklearn / FAISS |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["clustering"]["rows"]:
        fa, sk = r["faiss"], r["sklearn"]
        lines.append(f"| {r['features']} | {r['n']} x {r['dim']} ({r['classes']}, {r['k']}) | {fa['seconds']:.3f} | "
                     f"{sk['seconds']:.3f} | {r['time_ratio_sklearn_over_faiss']:.2f} | {fa['iterations']} / "
                     f"{sk['iterations']} | {r['per_iteration_ratio_sklearn_over_faiss']:.2f} | {fa['inertia']:.6g} | "
                     f"{sk['inertia']:.6g} | {r['inertia_ratio_sklearn_over_faiss']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default="../shared/data", help="folder holding cifar10-jpeg.zip (or the zip)")
    p.add_argument("--cache-dir", default=None, help="decoded cifar10-jpeg cache (default ~/.cache/encodenet_timm)")
    p.add_argument("--train-size", type=int, default=None, help="stratified training images (default 5000; smoke 100)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs-per-stage", type=int, default=3,
                   help="rounds: epochs timed per stage, one per round (>= 2; medians reported)")
    p.add_argument("--threads", type=int, default=None, help="torch, FAISS and sklearn threads (default torch's)")
    p.add_argument("--synthetic", type=int, nargs=3, default=None, metavar=("CLASSES", "PER_CLASS", "DIM"),
                   help="synthetic clustering set (default 10 5000 512; smoke 3 200 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=str(Path(__file__).parent / "results" / "cost"))
    p.add_argument("--smoke", action="store_true", help="tiny run on scikit-learn's digits (the test)")
    args = p.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    if args.epochs_per_stage < 2:
        p.error("--epochs-per-stage must be >= 2 (the median over epochs is reported)")
    args.train_size = args.train_size or (100 if args.smoke else 5000)
    args.synthetic = args.synthetic or ([3, 200, 32] if args.smoke else [10, 5000, 512])
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("encodenet_timm").setLevel(logging.WARNING)
    _logger.warning(SHARED)
    faiss_threads_before = faiss.omp_get_max_threads()
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    start, load_before = time.perf_counter(), os.getloadavg()
    try:
        train, plain, what, num_classes = load_data(args)
        torch.manual_seed(args.seed)
        model = timm.create_model(MODEL, pretrained=False, num_classes=num_classes)
        default = EncodeNetConfig()
        cfg = default.override({"seed": args.seed, "progress": False,
                                **{f"{s}.epochs": 1 for s in ("baseline", *TRAINED)}})
        flops = stage_flops(cfg, model, plain)
        _logger.info("timing %d rounds of every stage on %d images, %d threads", args.epochs_per_stage,
                     len(train.dataset), threads)
        seconds, loads, feats, labels, decoder_flops = time_stages(cfg, model, train, plain, args.epochs_per_stage)
        rc = cfg.representatives
        _logger.info("clustering: FAISS against scikit-learn")
        rows = [compare_clustering("pre-logits after 1 baseline epoch (real)", feats, labels, rc.clusters_per_class,
                                   rc.niter, rc.nredo, args.seed, threads),
                compare_clustering("synthetic Gaussian mixture", *synthetic(*args.synthetic, rc.clusters_per_class,
                                                                            args.seed),
                                   rc.clusters_per_class, rc.niter, rc.nredo, args.seed, threads)]
        threadpools = [{k: i[k] for k in ("user_api", "internal_api", "num_threads", "prefix")}
                       for i in threadpool_info()]
    finally:
        faiss.omp_set_num_threads(faiss_threads_before)
    res = {"command": "python benchmarks/cost.py " + " ".join(argv), "smoke": args.smoke, "model": MODEL,
           "data": {"dataset": "digits (smoke)" if args.smoke else "cifar10-jpeg", "description": what,
                    "train_size": len(train.dataset)},
           "batch_size": args.batch_size, "epochs_per_stage": args.epochs_per_stage, "seed": args.seed,
           "threads": threads, "threadpools": threadpools, "warning": SHARED,
           "loadavg": {"before": [round(v, 2) for v in load_before], "after": [round(v, 2) for v in os.getloadavg()],
                       "rounds": loads},
           "config": cfg.to_dict(), "decoder_flops": decoder_flops,
           **summarise(seconds, flops, default),
           "clustering": {"settings": (
               f"Per class, k={rc.clusters_per_class}, {rc.niter} iterations, {rc.nredo} restarts (best inertia kept), "
               f"seed + class. FAISS `Kmeans` (settings of `encodenet_timm.clustering`: every point used; init = k "
               f"random points; always runs every iteration). scikit-learn `KMeans(init='random', n_init=1, "
               f"max_iter={rc.niter}, tol=0, algorithm='lloyd')` x {rc.nredo} (init = k random points; stops a "
               f"restart early only when no label changes). Times include the final assignment; inertia = sum of "
               f"squared distances to the nearest final centroid, float64, summed over classes."), "rows": rows},
           "versions": {**versions(), "scikit-learn": __import__("sklearn").__version__},
           "package_path": str(Path(sys.modules["encodenet_timm"].__file__).parent),
           "machine": machine(), "wall_seconds": time.perf_counter() - start}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    text = markdown(res)
    (out / "results.md").write_text(text)
    print(text)
    return res


if __name__ == "__main__":
    main()
