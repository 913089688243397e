"""The exported model as timm's own folder (`timm.models.save_for_hf`): config.json with its data config
(input size, interpolation, crop, mean/std) and model.safetensors, loadable by timm alone."""
import logging
from copy import deepcopy
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .files import follow_umask

__all__ = ["plain_model", "export_timm"]

_logger = logging.getLogger(__name__)


def plain_model(model: nn.Module) -> nn.Module:
    """A deep copy of trained `model` as a user gets it: on CPU, eval mode, every parameter trainable, contiguous."""
    exported = deepcopy(model).cpu().eval()
    exported.requires_grad_(True)
    return exported.to(memory_format=torch.contiguous_format)


def export_timm(model: nn.Module, directory: Union[str, Path], *, input_size: Tuple[int, int, int],
                label_names: Optional[Sequence[str]] = None, mean: Optional[Sequence[float]] = None,
                std: Optional[Sequence[float]] = None, data_config: Optional[Dict[str, Any]] = None) -> Path:
    """Write `model` (a plain timm model) as timm's own folder (`timm.models.save_for_hf`): ``config.json``
    (architecture, num_classes, label names, and how its images are prepared: input size,
    interpolation, crop, mean/std) and ``model.safetensors``.

    ``timm.create_model("local-dir:DIR", pretrained=True)`` loads it (after ``import encodenet_timm``
    for the CIFAR zoo); ``timm.data.resolve_model_data_config(model)`` then reads back the data config,
    and ``timm.models.push_to_hf_hub`` can publish it.

    Args:
        label_names: class names in label order.
        mean, std: the normalisation the model was trained with (pixel values in [0, 1]); they win over
            `data_config`'s.
        data_config: how the training images were prepared, in timm's data-config keys (``mean``,
            ``std``, ``interpolation``, ``crop_pct``, ``crop_mode``); ``input_size`` is `input_size`, (C, H, W).
            Without a mean/std, config.json keeps the model's own pretrained_cfg normalisation
            (ImageNet's for most timm models), with a warning.

    Raises:
        ValueError: `directory` holds other files (nothing of yours is overwritten), or `label_names`
            does not have ``num_classes`` names.
    """
    from timm.models import save_for_hf
    num_classes = model.num_classes
    directory = Path(directory)
    if directory.is_file() or (directory.is_dir() and set(p.name for p in directory.iterdir())
                               - {"config.json", "model.safetensors"}):
        raise ValueError(f"{directory} is a file or holds other files; export_timm writes config.json and "
                         f"model.safetensors into an empty (or its own) directory")
    if label_names is not None and len(label_names) != num_classes:
        raise ValueError(f"label_names has {len(label_names)} names but the model has {num_classes} "
                         f"classes")
    data_config = {k: v for k, v in (data_config or {}).items() if v is not None}
    data_config.update({k: tuple(v) for k, v in (("mean", mean), ("std", std)) if v is not None})
    data_config["input_size"] = tuple(input_size)
    if "mean" not in data_config or "std" not in data_config:
        _logger.warning("export_timm without the mean/std the model was trained with: %s/config.json keeps the "
                        "model's pretrained_cfg normalisation; pass mean=, std=", directory)
    save_for_hf(model, str(directory), safe_serialization=True, data_config=data_config,
                model_config={"label_names": list(label_names)} if label_names is not None else None)
    for name in ("config.json", "model.safetensors"):
        follow_umask(directory / name)
    return directory
