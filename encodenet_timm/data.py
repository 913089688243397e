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
import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from .cifar import CifarDataset, load_cifar, stratified_subset, train_val_split
from .datasets import digits_datasets
from .device_data import device_loader_kwargs

__all__ = ["DATASETS", "DataSplits", "build_datasets", "make_loaders"]

_logger = logging.getLogger(__name__)

DATASETS = ("digits", "cifar10", "cifar100", "cifar10-jpeg", "imagefolder")
_STATS_SAMPLE = 1000  # images read to compute an image folder's mean/std


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
        mean, std: per-channel normalisation (pixel values in [0, 1]); None for digits, which come
            normalised to mean 0 / std 1 over the whole training set.
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

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (..., C, H, W) -> pixel values in [0, 1] (clamped), for display."""
        if self.mean is None:
            raise ValueError("this dataset records no mean/std to undo")
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return (x * std + mean).clamp(0.0, 1.0)


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
            1,000 training images of an image folder). Ignored by ``"digits"``.

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
        train, test = digits_datasets(size=img_size, in_chans=in_chans, seed=seed)
        augmented, plain, labels, val = train, train, train.tensors[1].numpy(), None
        classes, mean, std = [str(d) for d in range(10)], None, None
    elif name == "imagefolder":
        augmented, plain, labels, val, test, classes, mean, std = _image_folder(
            Path(data_dir), img_size, in_chans, seed, mean, std)
    else:
        augmented, plain, labels, val, test, classes, mean, std = _cifar(
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
        kwargs = {"num_workers": workers, "pin_memory": pin_memory, **device_loader_kwargs(dataset)}
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, **kwargs,
                          generator=torch.Generator().manual_seed(seed) if shuffle else None)
    return {"train": loader(data.train, shuffle=True), "plain": loader(data.plain), "val": loader(data.val),
            "test": loader(data.test)}


def _cifar(name: str, data_dir: Union[str, Path], img_size: int, in_chans: int, download: bool,
           mean: Optional[Sequence[float]], std: Optional[Sequence[float]]):
    """CIFAR splits: (augmented, plain, labels, val=None, test, classes, mean, std)."""
    if img_size != 32 or in_chans != 3:
        raise ValueError(f"{name} images are 3x32x32; got img_size={img_size}, in_chans={in_chans}")
    try:
        arrays = load_cifar(name, data_dir, download=download)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
        raise FileNotFoundError(f"{name} is not in {data_dir} ({e}); allow the download or point "
                                f"--data-dir at torchvision's copy") from e
    mean, std = tuple(mean or arrays.mean), tuple(std or arrays.std)
    augmented = CifarDataset(arrays.train_images, arrays.train_labels, mean, std, augment=True)
    plain = CifarDataset(arrays.train_images, arrays.train_labels, mean, std)
    test = CifarDataset(arrays.test_images, arrays.test_labels, mean, std)
    return augmented, plain, arrays.train_labels, None, test, arrays.classes, mean, std


# ---- image folders -------------------------------------------------------------------------------------
def _open_image(path: str, mode: str):
    from PIL import Image
    with open(path, "rb") as f:
        return Image.open(f).convert(mode)


def _image_folder(root: Path, img_size: int, in_chans: int, seed: int, mean: Optional[Sequence[float]],
                  std: Optional[Sequence[float]]):
    """ImageFolder splits of ``root/{train,val,test}``: (augmented, plain, labels, val, test, classes, mean, std)."""
    from torchvision import transforms
    from torchvision.datasets import ImageFolder
    if in_chans not in (1, 3):
        raise ValueError(f"image folders load as RGB (in_chans=3) or grey (in_chans=1), not in_chans={in_chans}")
    if not (root / "train").is_dir():
        raise FileNotFoundError(f"no {root / 'train'} folder: an image folder dataset needs "
                                f"train/<class>/<image> (and test/ or val/ with the same class folders)")
    loader = functools.partial(_open_image, mode="RGB" if in_chans == 3 else "L")
    resize = [transforms.Resize(img_size), transforms.CenterCrop(img_size), transforms.ToTensor()]
    if mean is None or std is None:
        mean, std = _folder_stats(ImageFolder(str(root / "train"), transforms.Compose(resize), loader=loader), seed)
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    norm = transforms.Normalize(mean, std)
    plain_tf = transforms.Compose([*resize, norm])
    augment_tf = transforms.Compose([*resize, transforms.RandomCrop(img_size, padding=max(1, img_size // 8)),
                                     transforms.RandomHorizontalFlip(), norm])
    plain = ImageFolder(str(root / "train"), plain_tf, loader=loader)
    augmented = ImageFolder(str(root / "train"), augment_tf, loader=loader)
    held = {s: _held_out_folder(root / s, plain.classes, plain_tf, loader) for s in ("val", "test")}
    test = held["test"] if held["test"] is not None else held["val"]
    val = held["val"] if held["test"] is not None else None
    return augmented, plain, np.asarray(plain.targets), val, test, plain.classes, mean, std


def _held_out_folder(path: Path, classes: List[str], transform, loader):
    """ImageFolder of `path` labelled with the training `classes` (a class may be missing), or None."""
    from torchvision.datasets import ImageFolder
    if not path.is_dir():
        return None
    found = sorted(p.name for p in path.iterdir() if p.is_dir())
    extra = sorted(set(found) - set(classes))
    if extra:
        raise ValueError(f"{path} has class folders {extra} that train/ lacks")
    dataset = ImageFolder(str(path), transform, loader=loader, allow_empty=True)
    index = {c: i for i, c in enumerate(classes)}  # relabel: train/'s label for each class name
    dataset.samples = [(p, index[dataset.classes[y]]) for p, y in dataset.samples]
    dataset.targets = [y for _, y in dataset.samples]
    dataset.classes, dataset.class_to_idx = list(classes), index
    return dataset


def _folder_stats(dataset: Dataset, seed: int) -> Tuple[List[float], List[float]]:
    """Per-channel mean and std of pixel values in [0, 1] over up to 1,000 random images."""
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(dataset))[:_STATS_SAMPLE]
    x = torch.stack([dataset[int(i)][0] for i in idx])  # (n, C, H, W)
    _logger.info("normalisation computed from %d training images", len(idx))
    return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).clamp_min(1e-6).tolist()
