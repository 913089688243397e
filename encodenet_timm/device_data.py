"""In-memory datasets held on the training device, batched and augmented there with tensor ops.

`DeviceArrayDataset` keeps a whole image array (uint8, or float already normalised) on one device and
builds each batch with a handful of tensor ops there: one gather of the batch's images, random crop
from the zero-padded image and horizontal flip folded into that gather, then normalisation. It stays
a map-style `Dataset` read by a standard `DataLoader`: ``DataLoader.__iter__`` calls
``dataset.__getitems__(batch_indices)`` (torch/utils/data/_utils/fetch.py) and hands the result to
``collate_fn``; `device_collate` passes the pre-built `DeviceBatch` through. Samplers (seeded,
`DistributedSampler`), `Subset` and single-item reads (``dataset[i]``) work unchanged.

Randomness: crop offsets and flips are drawn from the global torch RNG of the dataset's device, which
the training loop's per-epoch ``seed_everything`` reseeds (``torch.manual_seed`` seeds CPU and every
CUDA device): a seeded run repeats, and a resumed epoch draws what the uninterrupted one drew.

`encodenet_timm.data.device` turns the CLI's datasets (CIFAR arrays, digits tensors, or an image folder
decoded once to uint8 when it fits a byte budget) into device datasets; `device_loader_kwargs` gives the
DataLoader settings they need (no workers, no pinning, `device_collate`).
"""
import logging
from typing import Any, Dict, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset, default_collate

__all__ = ["DeviceArrayDataset", "DeviceBatch", "device_collate", "is_device_dataset", "device_loader_kwargs"]

_logger = logging.getLogger(__name__)


class DeviceBatch(tuple):
    """(x (B, C, H, W) float32, y (B,) int64), already a batch: `device_collate` passes it through."""


def device_collate(batch: Any) -> Any:
    """collate_fn for device datasets: a `DeviceBatch` as (x, y); anything else through `default_collate`."""
    if isinstance(batch, DeviceBatch):
        return tuple(batch)
    return default_collate(batch)


class DeviceArrayDataset(Dataset):
    """(image (C, H, W) float32 normalised, label) over an image array held on `device`.

    Args:
        images: (N, H, W, C) or (N, C, H, W) uint8 (pixel values 0..255), or float32 images already
            normalised (`mean`/`std` then must be None); numpy array or tensor. C is 1 or 3.
        labels: (N,) integer class indices.
        mean, std: per-channel statistics for pixel values in [0, 1] (uint8 images); the output is
            ``(x / 255 - mean) / std``, the same float ops as `CifarDataset`.
        augment: random crop from the image zero-padded by `pad` pixels (offsets uniform over
            0..2*pad in each axis), then a horizontal flip with probability 0.5, per image.
        pad: padding for the random crop.
        device: where the images live and batches are built.
        layout: "auto" (NHWC when the last axis is 1 or 3 and the second is not), "nhwc" or "nchw".
        classes: class names in label order (read by the wrapper's class-count check).
    """

    def __init__(self, images: Union[np.ndarray, torch.Tensor], labels: Sequence[int],
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None, *,
                 augment: bool = False, pad: int = 4, device: Union[str, torch.device] = "cpu",
                 layout: str = "auto", classes: Optional[Sequence[str]] = None):
        x = torch.as_tensor(np.ascontiguousarray(images) if isinstance(images, np.ndarray) else images)
        if x.ndim != 4:
            raise ValueError(f"images must be (N, H, W, C) or (N, C, H, W), got shape {tuple(x.shape)}")
        if layout not in ("auto", "nhwc", "nchw"):
            raise ValueError(f"layout must be 'auto', 'nhwc' or 'nchw', got {layout!r}")
        if layout == "nhwc" or (layout == "auto" and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3)):
            x = x.permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
        if x.dtype == torch.uint8:
            if mean is None or std is None:
                raise ValueError("uint8 images need the mean and std to normalise them with")
        elif x.dtype.is_floating_point:
            if mean is not None or std is not None:
                raise ValueError("float images are taken as already normalised: pass mean=std=None")
            x = x.float()
            if not torch.isfinite(x).all():  # checked once here, so no batch needs it (`checks.check_once`)
                raise ValueError("images contain NaN or inf values; check the array")
        else:
            raise ValueError(f"images must be uint8 or float, got {x.dtype}")
        if len(labels) != len(x):
            raise ValueError(f"{len(x)} images but {len(labels)} labels")
        if pad < 0:
            raise ValueError(f"pad must be >= 0, got {pad}")
        self.device = torch.device(device)
        self.augment, self.pad = bool(augment), int(pad)
        self.size = tuple(x.shape[2:])  # (H, W)
        p = self.pad if self.augment else 0
        x = x.to(self.device)
        self.images = (F.pad(x, (p, p, p, p)) if p else x).contiguous()  # (N, C, H + 2p, W + 2p)
        labels = labels.cpu() if isinstance(labels, torch.Tensor) else labels
        self.targets = np.asarray(labels, dtype=np.int64)  # (N,) host copy: `dataset_targets` reads it
        self.labels = torch.as_tensor(self.targets, device=self.device)  # (N,) int64
        c = x.shape[1]
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, c, 1, 1)
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32, device=self.device).view(1, c, 1, 1)
        if classes is not None:
            self.classes = list(classes)

    @property
    def nbytes(self) -> int:
        return self.images.numel() * self.images.element_size()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, indices: Sequence[int]) -> DeviceBatch:
        """(x (B, C, H, W) float32, y (B,) int64) for dataset `indices`, built on the device."""
        idx = torch.as_tensor(indices, dtype=torch.long).to(self.device, non_blocking=True)  # (B,)
        if not self.augment:
            x = self.images[idx]  # (B, C, H, W)
        else:
            (h, w), b, dev = self.size, idx.numel(), self.device
            top = torch.randint(0, 2 * self.pad + 1, (b,), device=dev)  # (B,)
            left = torch.randint(0, 2 * self.pad + 1, (b,), device=dev)  # (B,)
            flip = torch.rand(b, device=dev) < 0.5  # (B,)
            windows = self.images.unfold(2, h, 1).unfold(3, w, 1)  # view (N, C, 2p+1, 2p+1, H, W)
            x = windows[idx, :, top, left]  # (B, C, H, W): image idx[i] cropped at (top[i], left[i])
            if x.is_cuda:  # no host sync
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            else:  # flip only the flipped half (2x faster on CPU than torch.where)
                x[flip] = x[flip].flip(-1)
        return DeviceBatch((self._normalised(x), self.labels[idx]))

    def _normalised(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean is not None:  # advanced indexing copied: x is never a view of the stored array
            x = x.float().div_(255.0).sub_(self.mean).div_(self.std)  # (x / 255 - mean) / std, in place
        return x

    def plain_image(self, i: int) -> torch.Tensor:
        """Image `i` as (1, C, H, W) float32, without augmentation (no random draw)."""
        (h, w), p = self.size, (self.pad if self.augment else 0)
        return self._normalised(self.images[i:i + 1, :, p:p + h, p:p + w].clone())

    def __getitem__(self, i: int):
        """(image (C, H, W) float32, label int) of one index (draws one crop/flip when augmenting)."""
        x, y = self.__getitems__([int(i)])
        return x[0], int(y[0])

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (..., C, H, W) -> pixel values in [0, 1] (clamped), for display."""
        if self.mean is None:
            raise ValueError("this dataset records no mean/std to undo")
        return (x * self.std[0].to(x.device) + self.mean[0].to(x.device)).clamp(0.0, 1.0)


def is_device_dataset(dataset: Optional[Dataset]) -> bool:
    """True for a `DeviceArrayDataset`, possibly inside `Subset`s."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return isinstance(dataset, DeviceArrayDataset)


def device_loader_kwargs(dataset: Optional[Dataset]) -> Dict[str, Any]:
    """DataLoader settings a device dataset needs (no workers, no pinning, `device_collate`); {} otherwise."""
    if not is_device_dataset(dataset):
        return {}
    return {"num_workers": 0, "pin_memory": False, "collate_fn": device_collate}
