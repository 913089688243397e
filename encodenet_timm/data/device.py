"""The CLI's datasets moved onto the training device (`encodenet_timm.device_data.DeviceArrayDataset`).

`to_device_dataset` converts a `CifarDataset`, the digits `TensorDataset` and a torchvision `ImageFolder`
(decoded once to uint8 within a byte budget); anything else, or anything over the budget, stays on the
per-sample path with a logged reason. `on_cuda_device` is what the CLI calls: CUDA only, CPU unchanged.
"""
import logging
from dataclasses import replace
from typing import Any, Dict, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from ..device_data import DeviceArrayDataset
from ..distributed import local_device
from ..env import resolve_device
from .cifar import CifarDataset

__all__ = ["to_device_dataset", "device_splits", "on_cuda_device", "DEFAULT_BUDGET_BYTES"]

_logger = logging.getLogger(__name__)

DEFAULT_BUDGET_BYTES = 8 * 2 ** 30  # an image folder is decoded to a uint8 array on the device up to this size


def to_device_dataset(dataset: Dataset, device: Union[str, torch.device], *, budget_bytes: int = DEFAULT_BUDGET_BYTES,
                      mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                      img_size: Optional[int] = None, in_chans: int = 3, augment: Optional[bool] = None,
                      _decoded: Optional[Dict[Any, np.ndarray]] = None) -> Dataset:
    """A device dataset equal to `dataset` (same images, labels, order and augmentation), or `dataset`
    itself (with a logged reason) when it is of a kind it cannot convert or exceeds `budget_bytes`.

    Converts a `CifarDataset`, a two-tensor `TensorDataset` (digits) and a torchvision `ImageFolder`
    (decoded once: resize + centre crop to `img_size`, uint8; `mean`/`std` needed; random crop with
    padding ``max(1, img_size // 8)`` and flip when `augment`, as the CLI's image folders). A `Subset`
    is converted inside and wrapped again.
    """
    if isinstance(dataset, Subset):
        inner = to_device_dataset(dataset.dataset, device, budget_bytes=budget_bytes, mean=mean, std=std,
                                  img_size=img_size, in_chans=in_chans, augment=augment, _decoded=_decoded)
        return dataset if inner is dataset.dataset else Subset(inner, dataset.indices)
    if isinstance(dataset, CifarDataset):
        p = dataset.pad if dataset.augment else 0
        h, w = dataset.size
        images = dataset.images[:, :, p:p + h, p:p + w]  # (N, 3, H, W) uint8, the padding undone
        need = images.numel() + (images.shape[0] * 3 * (h + 2 * p) * (w + 2 * p) if p else 0)
        if need > budget_bytes:
            _logger.info("keeping the per-sample loader: %d bytes exceed the device budget %d", need, budget_bytes)
            return dataset
        return DeviceArrayDataset(images, dataset.labels, dataset.mean.flatten().tolist(),
                                  dataset.std.flatten().tolist(), augment=dataset.augment, pad=dataset.pad,
                                  device=device, layout="nchw")
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2 and dataset.tensors[0].ndim == 4:
        x, y = dataset.tensors
        if x.numel() * x.element_size() > budget_bytes:
            _logger.info("keeping the per-sample loader: %d bytes exceed the device budget %d",
                         x.numel() * x.element_size(), budget_bytes)
            return dataset
        return DeviceArrayDataset(x, y, device=device, layout="nchw")
    try:
        from torchvision.datasets import ImageFolder
    except ImportError:  # no torchvision: no image folders to convert
        ImageFolder = ()
    if isinstance(dataset, ImageFolder):
        if img_size is None or mean is None or std is None:
            raise ValueError("an image folder needs img_size, mean and std to be decoded onto the device")
        need = len(dataset) * in_chans * img_size * img_size
        if need > budget_bytes:
            _logger.info("keeping the per-sample loader for %s: %d images of %dx%dx%d need %d bytes, over the "
                         "device budget of %d", dataset.root, len(dataset), in_chans, img_size, img_size, need,
                         budget_bytes)
            return dataset
        key = (str(dataset.root), tuple(p for p, _ in dataset.samples), img_size, in_chans)
        cache = _decoded if _decoded is not None else {}
        if key not in cache:  # the CLI's augmented and plain folders are the same files: decode them once
            cache[key] = _decode_folder(dataset, img_size, in_chans)
        images = cache[key]  # (N, H, W, C) uint8
        if augment is None:
            augment = "Random" in repr(dataset.transform)
        return DeviceArrayDataset(images, dataset.targets, mean, std, augment=augment, pad=max(1, img_size // 8),
                                  device=device, layout="nhwc", classes=dataset.classes)
    _logger.info("keeping the per-sample loader: %s has no device form", type(dataset).__name__)
    return dataset


def _decode_folder(dataset, img_size: int, in_chans: int) -> np.ndarray:
    """Every image of an ImageFolder, resized and centre-cropped: (N, img_size, img_size, C) uint8."""
    from torchvision import transforms
    tf = transforms.Compose([transforms.Resize(img_size), transforms.CenterCrop(img_size)])
    out = np.empty((len(dataset), img_size, img_size, in_chans), dtype=np.uint8)
    for i, (path, _) in enumerate(dataset.samples):
        out[i] = np.asarray(tf(dataset.loader(path)), dtype=np.uint8).reshape(img_size, img_size, in_chans)
    _logger.info("decoded %d images of %s once into a uint8 array", len(dataset), dataset.root)
    return out


def device_splits(data, device: Union[str, torch.device], *, budget_bytes: int = DEFAULT_BUDGET_BYTES):
    """The CLI's `DataSplits` with every split that fits moved onto `device` (see `to_device_dataset`)."""
    img_size, in_chans = data.input_size[1], data.input_size[0]
    decoded: Dict[Any, np.ndarray] = {}

    def move(ds: Optional[Dataset]) -> Optional[Dataset]:
        if ds is None:
            return None
        return to_device_dataset(ds, device, budget_bytes=budget_bytes, mean=data.mean, std=data.std,
                                 img_size=img_size, in_chans=in_chans, _decoded=decoded)
    return replace(data, train=move(data.train), plain=move(data.plain), val=move(data.val), test=move(data.test))


def on_cuda_device(data, device: str = "auto", *, budget_bytes: int = DEFAULT_BUDGET_BYTES):
    """`device_splits` onto the training device when it is CUDA (the CLI's default there); `data` itself on
    CPU, where the per-sample path stays as it was (seeded CPU runs repeat bit for bit)."""
    dev = resolve_device(local_device(device))
    return device_splits(data, dev, budget_bytes=budget_bytes) if dev.type == "cuda" else data
