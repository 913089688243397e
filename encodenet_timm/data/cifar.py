"""CIFAR-10/100 as uint8 arrays, and a map-style dataset that augments them with tensor ops.

Sources:

* ``"cifar10"`` / ``"cifar100"``: torchvision's `CIFAR10` / `CIFAR100` (downloaded into `data_dir` when
  ``download=True``).
* ``"cifar10-jpeg"``: a zip of the CIFAR-10 images as JPEG in ImageFolder layout
  (``train/<class>/NNNN.jpg``, ``test/<class>/NNNN.jpg``; class folders sort into label order). All
  images are decoded once with Pillow and cached as a uint8 ``.npz``.

`CifarDataset` applies the standard CIFAR augmentation (random crop with 4 pixels of zero padding,
horizontal flip) when ``augment=True``, and only normalisation otherwise (the "plain" view that
EncodeNet's feature pass and representative images need).
"""
import io
import logging
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..files import sha256_file
from ..models._cifar import CIFAR10_MEAN, CIFAR10_STD
from .splits import denormalize

__all__ = ["CIFAR_STATS", "CIFAR_DATASETS", "CifarArrays", "CifarDataset", "load_cifar", "read_image_zip",
           "cifar_splits"]

_logger = logging.getLogger(__name__)

# per-channel (mean, std) of the training images, pixel values in [0, 1]
CIFAR_STATS = {
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),  # the zoo's pretrained cfg uses the same (models/_cifar.py)
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
CIFAR_DATASETS = ("cifar10", "cifar100", "cifar10-jpeg")
_ZIP_NAME = "cifar10-jpeg.zip"
_MEMBER = re.compile(r"^(?:[^/]+/)*?(train|test)/([^/]+)/[^/]+\.(?:jpe?g|png)$", re.IGNORECASE)


@dataclass
class CifarArrays:
    """A CIFAR-style dataset in memory.

    Attributes:
        train_images: (N, H, W, 3) uint8.
        train_labels: (N,) int64.
        test_images: (M, H, W, 3) uint8.
        test_labels: (M,) int64.
        classes: class names in label order.
        mean, std: per-channel normalisation statistics (pixel values in [0, 1]).
    """
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: List[str]
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]


def load_cifar(name: str, data_dir: Union[str, Path], *, cache_dir: Optional[Union[str, Path]] = None,
               download: bool = True) -> CifarArrays:
    """Load a CIFAR dataset as uint8 arrays.

    Args:
        name: ``"cifar10"``, ``"cifar100"`` (torchvision) or ``"cifar10-jpeg"`` (the JPEG zip).
        data_dir: torchvision's root folder; for ``"cifar10-jpeg"`` the zip itself or the folder holding
            ``cifar10-jpeg.zip``.
        cache_dir: where the decoded JPEG zip is cached; default ``~/.cache/encodenet_timm``.
        download: let torchvision download the dataset when it is missing.

    Raises:
        ValueError: an unknown `name`.
        FileNotFoundError: no zip for ``"cifar10-jpeg"``.
    """
    if name not in CIFAR_DATASETS:
        raise ValueError(f"dataset must be one of {CIFAR_DATASETS}, got {name!r}")
    if name == "cifar10-jpeg":
        path = Path(data_dir)
        zip_path = path if path.suffix == ".zip" else path / _ZIP_NAME
        if not zip_path.is_file():
            raise FileNotFoundError(f"no CIFAR-10 JPEG zip at {zip_path} (pass --data-dir pointing to it)")
        arrays = read_image_zip(zip_path, cache_dir=cache_dir)
        mean, std = CIFAR_STATS["cifar10"]
        return CifarArrays(*arrays, mean=mean, std=std)
    import torchvision
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    train = cls(str(data_dir), train=True, download=download)
    test = cls(str(data_dir), train=False, download=download)
    mean, std = CIFAR_STATS[name]
    return CifarArrays(np.asarray(train.data, dtype=np.uint8), np.asarray(train.targets, dtype=np.int64),
                       np.asarray(test.data, dtype=np.uint8), np.asarray(test.targets, dtype=np.int64),
                       list(train.classes), mean=mean, std=std)


def read_image_zip(zip_path: Union[str, Path], *, cache_dir: Optional[Union[str, Path]] = None):
    """Decode every ``train|test/<class>/<file>.jpg`` image of a zip into uint8 arrays, cached.

    The cache file is named after the zip's name, size and content (SHA-256, about 0.1 s for CIFAR-10's
    65 MB): a changed zip is decoded again, the same zip copied or re-mounted (a new modification time)
    is not. Images within a class are ordered by file name; classes by folder name.

    Returns:
        (train_images (N, H, W, 3) uint8, train_labels (N,) int64, test_images (M, H, W, 3) uint8,
        test_labels (M,) int64, classes)
    """
    zip_path = Path(zip_path)
    cache_dir = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "encodenet_timm"
    cache = cache_dir / f"{zip_path.stem}-{zip_path.stat().st_size}-{sha256_file(zip_path)[:16]}.npz"
    if cache.is_file():
        with np.load(cache) as z:
            return (z["train_images"], z["train_labels"], z["test_images"], z["test_labels"],
                    [str(c) for c in z["classes"]])
    from PIL import Image
    _logger.info("decoding %s (once; cached at %s)", zip_path, cache)
    members = {"train": [], "test": []}
    with zipfile.ZipFile(zip_path) as zf:
        for info in zf.infolist():
            m = _MEMBER.match(info.filename)
            if m and not info.is_dir():
                members[m.group(1).lower()].append((m.group(2), info.filename))
        classes = sorted({c for c, _ in members["train"]})
        if not classes:
            raise ValueError(f"{zip_path} holds no train/<class>/<image> files")
        extra = sorted({c for c, _ in members["test"]} - set(classes))
        if extra:
            raise ValueError(f"{zip_path}: test classes {extra} have no training images")
        index = {c: i for i, c in enumerate(classes)}
        out = []
        for split in ("train", "test"):
            items = sorted(members[split])
            images = np.stack([np.asarray(Image.open(io.BytesIO(zf.read(f))).convert("RGB")) for _, f in items])
            out += [images.astype(np.uint8), np.array([index[c] for c, _ in items], dtype=np.int64)]
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(tmp, train_images=out[0], train_labels=out[1], test_images=out[2], test_labels=out[3],
             classes=np.array(classes))
    os.replace(tmp, cache)  # atomic: a concurrent reader never sees half a file
    return (*out, classes)


class CifarDataset(Dataset):
    """(image (3, H, W) float32 normalised, label int) over uint8 images; augmentation as tensor ops.

    Args:
        images: (N, H, W, 3) uint8.
        labels: (N,) integer class indices.
        mean, std: per-channel statistics for pixel values in [0, 1].
        augment: random crop from the image zero-padded by `pad` pixels, then a horizontal flip with
            probability 0.5 (torchvision's ``RandomCrop(H, padding=pad)`` + ``RandomHorizontalFlip()``),
            drawn from torch's global RNG (seeded per DataLoader worker by torch).
        pad: padding for the random crop.
    """

    def __init__(self, images: np.ndarray, labels: Sequence[int], mean: Sequence[float], std: Sequence[float],
                 *, augment: bool = False, pad: int = 4):
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be (N, H, W, 3) uint8, got {images.shape} {images.dtype}")
        if len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.size = images.shape[1:3]
        self.augment, self.pad = augment, pad
        x = torch.from_numpy(np.ascontiguousarray(images))
        x = x.permute(0, 3, 1, 2).contiguous()  # (N, H, W, 3) -> (N, 3, H, W)
        self.images = F.pad(x, (pad, pad, pad, pad)) if augment else x  # (N, 3, H + 2p, W + 2p) when augmenting
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = self.images[i]  # (3, H', W') uint8
        if self.augment:
            h, w = self.size
            top, left = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
            img = img[:, top:top + h, left:left + w]  # (3, H, W)
            if torch.rand(()) < 0.5:
                img = img.flip(-1)
        x = (img.float() / 255.0 - self.mean) / self.std
        return x, int(self.labels[i])

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (..., 3, H, W) -> pixel values in [0, 1] (clamped), for display."""
        return denormalize(x, self.mean.flatten().tolist(), self.std.flatten().tolist())


def cifar_splits(name: str, data_dir: Union[str, Path], img_size: int, in_chans: int, download: bool,
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
