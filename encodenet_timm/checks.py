"""Every input check, before any compute: loaders, batches, datasets and class counts.

Bad input is a `ValueError` / `TypeError` that names the bad value and what is allowed. `check_data` runs
them all on a training loader before the first stage; `check_batch` runs on every batch of every stage.
"""
import difflib
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, TensorDataset

__all__ = ["BatchCheck", "check_config", "check_writable", "check_loader", "check_batch", "check_class_counts", "check_data",
           "dataset_targets", "first_sample", "eval_mode"]

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


def check_batch(x: torch.Tensor, y: torch.Tensor, *, num_classes: int, in_chans: int,
                image_size: Optional[Tuple[int, int]] = None) -> None:
    """Raise ValueError for a batch the model cannot train on: wrong shape, labels out of range, NaN/inf."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ValueError(f"images must be a (B, C, H, W) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.shape[1] != in_chans:
        raise ValueError(f"images have {x.shape[1]} channels but the model takes {in_chans} "
                         f"(timm.create_model(..., in_chans={x.shape[1]}) or convert the images)")
    if image_size is not None and tuple(x.shape[2:]) != tuple(image_size):
        raise ValueError(f"images are {tuple(x.shape[2:])} but the decoder was built for {tuple(image_size)}; "
                         f"resize the images or set config.input_size before the autoencoder stage")
    if not torch.isfinite(x).all():
        raise ValueError("images contain NaN or inf values; check the dataset and its transforms")
    if not isinstance(y, torch.Tensor) or y.ndim != 1 or y.dtype.is_floating_point:
        raise ValueError(f"labels must be a (B,) integer tensor of class indices, got "
                         f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}) (the model's num_classes), found "
                         f"{int(y.min())}..{int(y.max())}")


def check_class_counts(labels: np.ndarray, num_classes: int, clusters_per_class: Union[int, str]) -> np.ndarray:
    """Images per class, (num_classes,) int64, after checking that clustering can run on them.

    Args:
        labels: (N,) int class of every image.
        clusters_per_class: k for every class, or "auto".

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
        raise ValueError(f"classes {empty} have no images in the training set; every class of the model's "
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
               clusters_per_class: Union[int, str]) -> None:
    """Raise ValueError, before any training, for data `model` cannot be trained on with EncodeNet.

    Checks the dataset's class names (``.classes``) against ``model.num_classes``; its labels, when
    `dataset_targets` can read them, with `check_class_counts`; and the first sample (through the
    loader's collate_fn) with `check_batch` and one eval-mode forward of the model.
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
        check_class_counts(targets, num_classes, clusters_per_class)
    x, y = first_sample(loader)
    check_batch(x, y, num_classes=num_classes, in_chans=in_chans)
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


def first_sample(loader: DataLoader) -> Tuple[torch.Tensor, torch.Tensor]:
    """The first sample of ``loader.dataset`` as a batch of one, through the loader's collate_fn:
    (images (1, C, H, W), labels (1,))."""
    return next(iter(DataLoader(Subset(loader.dataset, [0]), batch_size=1, collate_fn=loader.collate_fn)))


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in eval mode inside the block; its train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
