"""Your own images as an image folder: ``root/train/<class>/<image>`` and ``root/test/...`` or ``root/val/...``.

torchvision's `ImageFolder` reads them; classes are the folder names of ``train/``, sorted. Images are
resized and centre-cropped; the training view adds a padded random crop and a horizontal flip. A class
folder without images is an error naming it; an image that cannot be read raises `DataError` naming
its file (fit scans every file before training: ``config.data``).
"""
import functools
import logging
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError

__all__ = ["image_folder_splits"]

_logger = logging.getLogger(__name__)

_STATS_SAMPLE = 1000  # images read to compute an image folder's mean/std


def _open_image(path: str, mode: str):
    """The image at `path` in `mode`; `DataError` naming the file when it cannot be read."""
    from PIL import Image
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert(mode)
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError ("truncated"), SyntaxError, ...
        raise DataError(f"cannot read image {path} ({type(e).__name__}: {e}); remove or replace it",
                        path=path) from e


def _check_class_folders(train: Path) -> None:
    """ValueError naming every class folder of `train` that holds no image torchvision would read."""
    from torchvision.datasets.folder import IMG_EXTENSIONS
    folders = sorted(p for p in train.iterdir() if p.is_dir())
    if not folders:
        raise FileNotFoundError(f"{train} has no class folders: an image folder dataset needs "
                                f"train/<class>/<image>")
    empty = [str(d) for d in folders
             if not any(f.is_file() and f.name.lower().endswith(IMG_EXTENSIONS) for f in d.rglob("*"))]
    if empty:
        raise ValueError(f"class folder(s) {', '.join(empty)} hold no images (files ending "
                         f"{', '.join(IMG_EXTENSIONS)}); add images or remove the folder(s)")


def image_folder_splits(root: Path, img_size: int, in_chans: int, seed: int, mean: Optional[Sequence[float]],
                  std: Optional[Sequence[float]]):
    """ImageFolder splits of ``root/{train,val,test}``: (augmented, plain, labels, val, test, classes, mean, std)."""
    from torchvision import transforms
    from torchvision.datasets import ImageFolder
    if in_chans not in (1, 3):
        raise ValueError(f"image folders load as RGB (in_chans=3) or grey (in_chans=1), not in_chans={in_chans}")
    if not (root / "train").is_dir():
        raise FileNotFoundError(f"no {root / 'train'} folder: an image folder dataset needs "
                                f"train/<class>/<image> (and test/ or val/ with the same class folders)")
    _check_class_folders(root / "train")
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
    """Per-channel mean and std of pixel values in [0, 1] over up to 1,000 random images (unreadable ones are
    passed over here: fit's scan names them, or leaves them out with ``data.skip_unreadable``)."""
    rng = np.random.default_rng(seed)
    images = []
    for i in rng.permutation(len(dataset)):
        if len(images) == _STATS_SAMPLE:
            break
        try:
            images.append(dataset[int(i)][0])
        except DataError:
            continue
    if not images:
        raise DataError(f"none of the {len(dataset)} training images can be read (e.g. {dataset.samples[0][0]})")
    x = torch.stack(images)  # (n, C, H, W)
    _logger.info("normalisation computed from %d training images", len(images))
    return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).clamp_min(1e-6).tolist()
