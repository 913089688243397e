"""The datasets the command line knows, as train / plain / validation / test splits and their loaders.

* ``"digits"``: scikit-learn's 1,797 handwritten digits (no download, no data dir), resized.
* ``"cifar10"``, ``"cifar100"``: torchvision's copies in ``data_dir`` (downloaded when allowed).
* ``"cifar10-jpeg"``: the CIFAR-10 JPEG zip (``data_dir`` is the zip or the folder holding it).
* ``"imagefolder"``: your own images, ``data_dir/train/<class>/<image>`` and ``data_dir/test/<class>/...``
  or ``data_dir/val/<class>/...`` (torchvision `ImageFolder`; classes sorted by folder name).

Every split yields (image (C, H, W) float32 normalised, label int). ``plain`` is ``train`` without
random augmentation, same images, same order: EncodeNet's feature pass and representative images
read it.
"""
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ..device_data import device_loader_kwargs
from ..loaders import seeded_loader
from .cifar import CIFAR_DATASETS, cifar_splits
from .digits import digits_splits
from .imagefolder import image_folder_splits
from .splits import denormalize, stratified_subset, train_val_split

__all__ = ["DATASETS", "RESIZE", "DATA_CONFIG_KEYS", "DataSplits", "build_datasets", "make_loaders"]

_logger = logging.getLogger(__name__)

DATASETS = ("digits", *CIFAR_DATASETS, "imagefolder")
# how every dataset here reaches its input size, in timm's data-config keys: the short side resized (bilinear)
# to the input size, then a centre crop of that size (crop_pct 1.0: no margin); CIFAR is stored at 32x32
RESIZE = {"interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center"}
DATA_CONFIG_KEYS = ("input_size", *RESIZE, "mean", "std")  # `DataSplits.data_config`'s keys


@dataclass
class DataSplits:
    """The datasets of one run.

    Attributes:
        train: training images (less the validation hold-out), augmented where the dataset augments.
        plain: `train` without augmentation: the same images in the same order.
        val: the validation images (a stratified hold-out of the training set, or ``val/`` of an image
            folder that also has ``test/``); None when there are none.
        test: the dataset's test split; None when it has none.
        classes: class names in label order.
        mean, std: per-channel normalisation (pixel values in [0, 1]): the dataset's own statistics (digits:
            its training images', CIFAR's, an image folder's sample) or those given to `build_datasets`.
    """
    train: Dataset
    plain: Dataset
    val: Optional[Dataset]
    test: Optional[Dataset]
    classes: List[str]
    mean: Optional[Tuple[float, ...]]
    std: Optional[Tuple[float, ...]]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_size(self) -> Tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.plain[0][0].shape)

    @property
    def data_config(self) -> Dict[str, Any]:
        """What every image went through, in timm's data-config keys (`timm.data.resolve_data_config`):
        input_size (C, H, W), interpolation, crop_pct, crop_mode, mean and std. timm's eval transform
        built from it (`timm.data.create_transform`) prepares an image as this dataset's test split does."""
        return {"input_size": self.input_size, **RESIZE, "mean": self.mean, "std": self.std}

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (..., C, H, W) -> pixel values in [0, 1] (clamped), for display."""
        if self.mean is None:
            raise ValueError("this dataset records no mean/std to undo")
        return denormalize(x, self.mean, self.std)


def build_datasets(name: str, data_dir: Optional[Union[str, Path]] = None, *, img_size: int = 32,
                   in_chans: int = 3, val_fraction: float = 0.1, per_class: Optional[int] = None, seed: int = 0,
                   download: bool = True, mean: Optional[Sequence[float]] = None,
                   std: Optional[Sequence[float]] = None) -> DataSplits:
    """Build the splits of a dataset the command line knows.

    Args:
        name: one of `DATASETS`.
        data_dir: where the data lies (not used by ``"digits"``).
        img_size: image side for ``"digits"`` and ``"imagefolder"`` (resize, then centre crop); CIFAR is 32.
        in_chans: 3, or 1 for ``"digits"`` and ``"imagefolder"`` (grey).
        val_fraction: stratified share of the training set held out for validation; 0 holds none out.
        per_class: keep at most this many training images per class (a quick run); None keeps all.
        seed: fixes the subset and the validation split.
        download: let torchvision download CIFAR when `data_dir` lacks it.
        mean, std: normalisation to use; None: the dataset's own (CIFAR's, or computed from up to
            1,000 training images of an image folder). Ignored by ``"digits"`` (its training images').

    Raises:
        ValueError: an unknown name or a setting the dataset cannot take.
        FileNotFoundError: `data_dir` is missing or lacks the expected files.
    """
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    if name != "digits":
        if data_dir is None:
            raise ValueError(f"dataset {name!r} needs a data dir (--data-dir)")
        if not Path(data_dir).exists() and not (download and name in ("cifar10", "cifar100")):
            raise FileNotFoundError(f"data dir {data_dir} does not exist")
    if name == "digits":
        train, test, mean, std = digits_splits(size=img_size, in_chans=in_chans, seed=seed)
        augmented, plain, labels, val = train, train, train.tensors[1].numpy(), None
        classes = [str(d) for d in range(10)]
    elif name == "imagefolder":
        augmented, plain, labels, val, test, classes, mean, std = image_folder_splits(
            Path(data_dir), img_size, in_chans, seed, mean, std)
    else:
        augmented, plain, labels, val, test, classes, mean, std = cifar_splits(
            name, data_dir, img_size, in_chans, download, mean, std)
    keep = stratified_subset(labels, per_class, seed)
    if val is None and val_fraction > 0:
        train_idx, val_idx = train_val_split(labels[keep], val_fraction, seed)
        keep, val = keep[train_idx], Subset(plain, keep[val_idx].tolist())
    return DataSplits(train=Subset(augmented, keep.tolist()), plain=Subset(plain, keep.tolist()), val=val,
                      test=test, classes=list(classes), mean=mean, std=std)


def make_loaders(data: DataSplits, *, batch_size: int, workers: int = 0, seed: int = 0,
                 pin_memory: bool = False) -> Dict[str, Optional[DataLoader]]:
    """{"train" (shuffled, seeded), "plain", "val", "test"} loaders; None for a missing split."""
    def loader(dataset: Optional[Dataset], shuffle: bool = False) -> Optional[DataLoader]:
        if dataset is None:
            return None
        extra = device_loader_kwargs(dataset)  # a device dataset: no workers, no pinning, device_collate
        if extra:
            return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, **extra,
                              generator=torch.Generator().manual_seed(seed) if shuffle else None)
        return seeded_loader(dataset, batch_size=batch_size, shuffle=shuffle, seed=seed, workers=workers,
                             pin_memory=pin_memory)
    return {"train": loader(data.train, shuffle=True), "plain": loader(data.plain), "val": loader(data.val),
            "test": loader(data.test)}
