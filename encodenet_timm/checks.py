"""Input checks before any compute: config names, loaders, batches, datasets and class counts (the image
files' checks are in `file_checks`).

Bad input is a `ValueError` / `TypeError` that names the bad value and what is allowed. `check_data` runs
them all on a training loader before the first stage; `check_batch` runs on every batch of every stage.
"""
import difflib
import hashlib
import os
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, TensorDataset

from . import distributed
from .config import EncodeNetConfig
from .device_data import is_device_dataset
from .env import resolve_device
from .file_checks import dataset_files

__all__ = ["BatchCheck", "check_config", "BUILT_KEYS", "checked_config", "check_run_options", "built_with", "check_built_keys", "batch_checker", "check_writable", "check_loader", "check_plain_loader", "check_batch",
           "check_input_size", "check_once",
           "check_class_counts", "check_data", "dataset_targets", "data_fingerprint",
           "fingerprint_changes", "first_sample", "eval_mode"]

BatchCheck = Callable[[torch.Tensor, torch.Tensor], None]  # (images, labels) -> None, or ValueError


def check_config(config) -> None:
    """Raise ValueError, before any training, for a stage optimizer or scheduler that timm does not know.

    (Ranges and types are checked when the `EncodeNetConfig` is built; this needs timm's registries.)
    """
    from timm.optim import list_optimizers
    known = set(list_optimizers())
    scheds = ("cosine", "tanh", "step", "multistep", "plateau", "poly", "constant", "rsqrt", "none")
    for stage in ("baseline", "autoencoder", "transfer", "finetune"):
        cfg = getattr(config, stage)
        opt = cfg.opt.lower()
        if opt.split("_")[-1] not in known:
            close = difflib.get_close_matches(opt, sorted(known), n=3)
            raise ValueError(f"config key '{stage}.opt': timm has no optimizer {cfg.opt!r}"
                             + (f"; did you mean {', '.join(close)}?" if close else "")
                             + " (timm.optim.list_optimizers() lists them)")
        if cfg.sched not in scheds:
            raise ValueError(f"config key '{stage}.sched' must be one of {', '.join(scheds)} (timm's "
                             f"create_scheduler_v2 names, or none), got {cfg.sched!r}")
    if config.representatives.feature_store is not None:  # written in the representatives stage
        check_writable(config.representatives.feature_store, "config key 'representatives.feature_store'")


# config keys a wrapper is built with (__init__, and the decoder): a change on wrapper.config after it is refused
BUILT_KEYS = ("split", "input_size", "channels_last", "device", "decoder")


def checked_config(config):
    """A validated copy of an `EncodeNetConfig` (TypeError for anything else): a value of the wrong type or out of range -> ValueError naming
    its key, a plain StageConfig given for a stage with more options (autoencoder) gets their defaults; then
    every stage's optimizer and scheduler name against timm's registries (`check_config`)."""
    if not isinstance(config, EncodeNetConfig):
        raise TypeError(f"config must be an EncodeNetConfig, got {type(config).__name__}")
    config = type(config).from_dict(config.to_dict())
    check_config(config)
    return config


def check_run_options(run_dir, resume: bool, checkpoint_every: int) -> None:
    """Raise ValueError for `fit`'s run options that cannot work: a resume without its run_dir, a
    checkpoint_every that is not an int >= 0."""
    if resume and run_dir is None:
        raise ValueError("resume=True needs the run_dir of the run to continue")
    if not isinstance(checkpoint_every, int) or checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be an int >= 0 (0: at epoch ends only), got {checkpoint_every!r}")


def built_with(config) -> Dict[str, Any]:
    """The `BUILT_KEYS` of a checked config as dotted keys -> values (decoder.width, ...)."""
    out: Dict[str, Any] = {}
    for key in BUILT_KEYS:
        value = getattr(config, key)
        out.update({f"{key}.{k}": v for k, v in vars(value).items()} if key == "decoder" else {key: value})
    return out


def check_built_keys(built: Dict[str, Any], config, device: torch.device) -> None:
    """Raise ValueError for a change to a key a wrapper was built with (`built`, from `built_with`), which it
    would record without using; a device name that resolves to the wrapper's `device` is no change."""
    changed = [f"{k}: {built[k]!r} -> {v!r}" for k, v in built_with(config).items() if v != built[k]
               and not (k == "device" and resolve_device(distributed.local_device(v)) == device)]
    if changed:
        raise ValueError(f"wrapper.config changed after the wrapper was built ({'; '.join(changed)}), which it "
                         f"cannot apply; set it in the config of a new EncodeNetWrapper(model, config)")


def check_writable(path: Union[str, Path], what: str = "--out") -> None:
    """Raise ValueError unless `path` is (or can be created as) a directory this process can write.

    The nearest existing one of `path` and its parents must be a writable directory; nothing is created.
    """
    path = Path(path)
    existing = next(p for p in (path, *path.absolute().parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise ValueError(f"{what} {path}: {existing} is a file, not a directory; choose another {what}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path}: cannot write to {existing} (permission denied or a read-only file "
                         f"system); choose a directory you can write")
    if existing == path and not os.access(path, os.R_OK):
        raise ValueError(f"{what} {path}: cannot read the directory (permission denied)")


def check_loader(loader: DataLoader, what: str = "loader", map_style: bool = False) -> DataLoader:
    """Raise a clear error for a non-DataLoader, an empty one, or (if `map_style`) an IterableDataset."""
    if not isinstance(loader, DataLoader):
        raise TypeError(f"{what} must be a torch.utils.data.DataLoader yielding (images, labels), "
                        f"got {type(loader).__name__}")
    if map_style and isinstance(loader.dataset, IterableDataset):
        raise TypeError(f"{what}: EncodeNet needs a map-style dataset (index -> (image, label)) to pair each "
                        f"image with its representative; {type(loader.dataset).__name__} is an IterableDataset")
    try:
        empty = len(loader) == 0
    except TypeError:  # an IterableDataset without __len__
        empty = False
    if empty:
        raise ValueError(f"{what} is empty: its dataset has no samples")
    return loader


def check_plain_loader(plain: Optional[DataLoader], train: DataLoader) -> None:
    """Raise unless `plain` (fit's plain_loader) is None or a map-style loader as long as `train`'s dataset."""
    if plain is None:
        return
    check_loader(plain, "plain_loader", map_style=True)
    if len(plain.dataset) != len(train.dataset):
        raise ValueError(f"plain_loader's dataset has {len(plain.dataset)} images but train_loader's has "
                         f"{len(train.dataset)}; plain_loader must be the training set without augmentation, in "
                         f"the same order (or None: train_loader is used)")


def check_input_size(x: torch.Tensor, input_size: Optional[Tuple[int, int, int]]) -> None:
    """Raise ValueError when images `x` (B, C, H, W) are not the (C, H, W) that ``config.input_size`` sets."""
    if input_size is not None and tuple(x.shape[1:]) != tuple(input_size):
        raise ValueError(f"config.input_size is {tuple(input_size)} but the images are {tuple(x.shape[1:])}; set "
                         f"input_size=None (the data's size) or {tuple(x.shape[1:])}, or resize the images")


def batch_checker(num_classes: int, in_chans: int, *, image_size: Optional[Tuple[int, int]] = None,
                  labels: bool = True) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """`check_batch` as the loop's per-batch check; ``labels=False`` for batches whose second element is not
    a class label (the autoencoder's cluster ids)."""
    def check(x, y):
        check_batch(x, y if labels else torch.zeros(len(x), dtype=torch.long), num_classes=num_classes,
                    in_chans=in_chans, image_size=image_size)
    return check


def check_batch(x: torch.Tensor, y: torch.Tensor, *, num_classes: int, in_chans: int,
                image_size: Optional[Tuple[int, int]] = None) -> None:
    """Raise ValueError for a batch the model cannot train on: wrong shape, labels out of range, NaN/inf."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ValueError(f"images must be a (B, C, H, W) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"images are {x.dtype} but the model takes float images; convert them to float in the "
                         f"dataset's transform (torchvision: ToTensor(), or ConvertImageDtype(torch.float32), then "
                         f"Normalize)")
    if x.shape[1] != in_chans and x.shape[3] == in_chans:  # (B, H, W, C): an image library's layout
        raise ValueError(f"images are laid out (B, H, W, C) = {tuple(x.shape)} but the model takes (B, C, H, W); "
                         f"permute them in the dataset: image.permute(2, 0, 1) per image, or x.permute(0, 3, 1, 2) "
                         f"per batch")
    if x.shape[1] != in_chans:
        raise ValueError(f"images have {x.shape[1]} channels but the model takes {in_chans} "
                         f"(timm.create_model(..., in_chans={x.shape[1]}) or convert the images)")
    if image_size is not None and tuple(x.shape[2:]) != tuple(image_size):
        raise ValueError(f"images are {tuple(x.shape[2:])} but the decoder was built for {tuple(image_size)}; "
                         f"resize the images or set config.input_size before the autoencoder stage")
    if not torch.isfinite(x).all():
        raise ValueError("images contain NaN or inf values; check the dataset and its transforms")
    if not isinstance(y, torch.Tensor) or y.ndim != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
        got = f"{y.dtype} of shape {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"labels must be a (B,) integer tensor of class indices, got {got}; give the class "
                         f"index of each image as an int (e.g. target_transform=int, or labels.long(); one-hot "
                         f"labels: labels.argmax(1))")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}) (the model's num_classes), found "
                         f"{int(y.min())}..{int(y.max())}")


def check_class_counts(labels: np.ndarray, num_classes: int, clusters_per_class: Union[int, str],
                       classes: Optional[Sequence[str]] = None) -> np.ndarray:
    """Images per class, (num_classes,) int64, after checking that clustering can run on them.

    Args:
        labels: (N,) int class of every image.
        clusters_per_class: k for every class, or "auto".
        classes: the class names in label order, to name an empty class by (e.g. an empty class folder).

    Raises:
        ValueError: a label outside [0, num_classes), a class without images, a class with fewer
            images than `clusters_per_class`, or a bad `clusters_per_class`.
    """
    labels = np.asarray(labels, dtype=np.int64)
    auto = clusters_per_class == "auto"
    if not auto and (not isinstance(clusters_per_class, int) or isinstance(clusters_per_class, bool)
                     or clusters_per_class < 1):
        raise ValueError(f"clusters_per_class must be a positive int or 'auto', got {clusters_per_class!r}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}) (the model's num_classes), found "
                         f"{labels.min()}..{labels.max()}")
    counts = np.bincount(labels, minlength=num_classes)
    empty = np.flatnonzero(counts == 0).tolist()
    if empty:
        names = f" ({', '.join(repr(classes[c]) for c in empty)})" if classes is not None else ""
        raise ValueError(f"classes {empty}{names} have no images in the training set; every class of the model's "
                         f"{num_classes} needs at least one (check the dataset, or the model's num_classes)")
    if not auto:
        few = np.flatnonzero(counts < clusters_per_class).tolist()
        if few:
            raise ValueError(
                f"representatives.clusters_per_class={clusters_per_class} needs at least {clusters_per_class} images "
                f"per class, but " + ", ".join(f"class {c} has {counts[c]}" for c in few) + "; lower "
                f"representatives.clusters_per_class to at most {counts.min()}, or set it to 'auto'")
    return counts


def check_data(loader: DataLoader, model: nn.Module, device: torch.device, *, in_chans: int,
               clusters_per_class: Union[int, str], input_size: Optional[Tuple[int, int, int]] = None) -> None:
    """Raise ValueError, before any training, for data `model` cannot be trained on with EncodeNet.

    Checks the dataset's class names (``.classes``) against ``model.num_classes``; its labels, when
    `dataset_targets` can read them, with `check_class_counts`; and the first sample (through the
    loader's collate_fn) with `check_batch`, against `input_size` (``config.input_size``, when set) and
    with one eval-mode forward of the model.
    """
    dataset, num_classes = loader.dataset, model.num_classes
    root = dataset
    while isinstance(root, Subset):
        root = root.dataset
    classes = getattr(root, "classes", None)
    if classes is not None and len(classes) != num_classes:
        raise ValueError(f"the dataset has {len(classes)} classes but the model has num_classes={num_classes}; "
                         f"create it with timm.create_model(name, num_classes={len(classes)})")
    targets = dataset_targets(dataset)
    if targets is not None:
        check_class_counts(targets, num_classes, clusters_per_class, classes)
    x, y = first_sample(loader)
    check_batch(x, y, num_classes=num_classes, in_chans=in_chans)
    check_input_size(x, input_size)
    try:
        with eval_mode(model), torch.no_grad():
            model(x.to(device))
    except Exception as e:  # whatever the model raises for a size it cannot take
        raise ValueError(f"the model cannot take images of size {tuple(x.shape[1:])} ({type(e).__name__}: {e}); "
                         f"resize the images to the size the model was built for") from e


def dataset_targets(dataset: Dataset) -> Optional[np.ndarray]:
    """The (N,) int64 labels of a map-style dataset without reading its images, when it exposes them.

    Read from ``.targets`` (torchvision ImageFolder, CIFAR, MNIST), the label tensor of a two-tensor
    `TensorDataset`, or through a `Subset`'s indices; None otherwise.
    """
    if isinstance(dataset, Subset):
        inner = dataset_targets(dataset.dataset)
        return None if inner is None else inner[np.asarray(dataset.indices, dtype=np.int64)]
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        labels = dataset.tensors[1]
    else:
        labels = getattr(dataset, "targets", None)
    if labels is None:
        return None
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        return None
    return labels.astype(np.int64)


def check_once(check: Optional[BatchCheck], loader: DataLoader) -> Optional[BatchCheck]:
    """The batch check a loop should run per batch of `loader`: `check` itself, or, for a device dataset
    (`device_data.DeviceArrayDataset`, possibly inside Subsets), None after running `check` once on its
    first image (unaugmented) and all of its labels.

    A device dataset's batches are gathered from one array whose images are finite (uint8, or float
    checked when the dataset was built) and whose shape is fixed, so checking every label once is
    checking every batch, without a host read of the device per step.
    """
    dataset = getattr(loader, "dataset", None)
    if check is None or not is_device_dataset(dataset):
        return check
    if len(dataset):
        base, first = dataset, 0
        while isinstance(base, Subset):  # the first image's index in the array
            base, first = base.dataset, int(base.indices[first])
        check(base.plain_image(first), torch.from_numpy(dataset_targets(dataset)))  # (1, C, H, W), (N,)
    return None


def first_sample(loader: DataLoader) -> Tuple[torch.Tensor, torch.Tensor]:
    """The first sample of ``loader.dataset`` as a batch of one, through the loader's collate_fn:
    (images (1, C, H, W), labels (1,)).

    Raises:
        TypeError: the dataset yields dicts or tuples of other than two items; the message says what
            fit needs and how to adapt the dataset.
    """
    batch = next(iter(DataLoader(Subset(loader.dataset, [0]), batch_size=1, collate_fn=loader.collate_fn)))
    adapt = ("fit needs (image, label) pairs: image a (C, H, W) float tensor, label an int class index. Wrap "
             "the dataset in a small map-style Dataset whose __getitem__(i) returns them, e.g. "
             "`return sample{}, ...` then DataLoader(Pairs(dataset), ...)")
    if isinstance(batch, Mapping):
        keys = list(batch)
        raise TypeError(f"the loader's dataset yields dicts (keys {keys}); "
                        + adapt.format(f"[{keys[0]!r}], sample[<label key>]" if keys else "[...]"))
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        what = f"{len(batch)}-tuples" if isinstance(batch, (tuple, list)) else type(batch).__name__
        raise TypeError(f"the loader's dataset yields {what}; " + adapt.format("[0], sample[1]"))
    return batch[0], batch[1]


# ---- fingerprint -------------------------------------------------------------------------------------
def data_fingerprint(dataset: Dataset) -> Dict[str, Any]:
    """What identifies a training set without reading its images: its size and, where the dataset
    exposes them, its class counts and a SHA-256 of its labels in dataset order (`dataset_targets`) and
    of its file list relative to the files' common folder (`dataset_files`; moving the folder is fine)."""
    out: Dict[str, Any] = {"size": len(dataset)}
    targets = dataset_targets(dataset)
    if targets is not None and (targets.size == 0 or targets.min() >= 0):
        out["class_counts"] = np.bincount(targets).tolist()
        out["labels_sha256"] = hashlib.sha256(targets.astype("<i8").tobytes()).hexdigest()
    files = dataset_files(dataset)
    if files is not None:
        root = os.path.commonpath(files) if len(files) > 1 else os.path.dirname(files[0])
        names = "\n".join(os.path.relpath(f, root) for f in files)
        out["files_sha256"] = hashlib.sha256(names.encode()).hexdigest()
    return out


def fingerprint_changes(saved: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    """What differs between two `data_fingerprint`s, in words (facts missing from either are not compared)."""
    def both(key):
        return key in saved and key in current and saved[key] != current[key]
    changes = []
    if both("size"):
        changes.append(f"size {saved['size']} -> {current['size']}")
    if both("class_counts"):
        a, b = saved["class_counts"], current["class_counts"]
        diff = [f"class {c}: {a[c] if c < len(a) else 0} -> {b[c] if c < len(b) else 0}"
                for c in range(max(len(a), len(b))) if (a[c:c + 1] or [0]) != (b[c:c + 1] or [0])]
        changes.append("class counts " + ", ".join(diff[:5]) + (", ..." if len(diff) > 5 else ""))
    elif both("labels_sha256"):
        changes.append("the labels are in another order (same class counts)")
    if both("files_sha256") and not changes:
        changes.append("the image files differ (other names or another order)")
    return changes


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in eval mode inside the block; its train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
