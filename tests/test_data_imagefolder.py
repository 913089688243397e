"""encodenet_timm.data.imagefolder, through build_datasets(\"imagefolder\", ...)."""
from pathlib import Path
from typing import Dict, Sequence

import numpy as np
import pytest
import torch
from PIL import Image

from encodenet_timm.data import build_datasets, make_loaders


def make_image_folder(root: Path, counts: Dict[str, int], classes: Sequence[int] = (0, 1, 2),
                      size: int = 32) -> Path:
    """Write real digit images as PNGs: ``root/<split>/digit<c>/<i>.png``, `counts[split]` per class."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    for c in classes:
        images = digits.images[digits.target == c]  # (n, 8, 8) in 0..16
        start = 0
        for split, n in counts.items():
            folder = root / split / f"digit{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i, img in enumerate(images[start:start + n]):
                grey = Image.fromarray((img * 255 / 16).astype(np.uint8)).resize((size, size))
                grey.convert("RGB").save(folder / f"{i:03d}.png")
            start += n
    return root


def _labels(dataset) -> list:
    return [int(dataset[i][1]) for i in range(len(dataset))]


def test_image_folder_splits(tmp_path):
    root = make_image_folder(tmp_path, {"train": 10, "val": 3})
    data = build_datasets("imagefolder", root, img_size=24, val_fraction=0.2, seed=0)
    assert data.classes == ["digit0", "digit1", "digit2"] and data.num_classes == 3
    assert len(data.train) == len(data.plain) == 24 and len(data.val) == 6 and len(data.test) == 9
    assert data.input_size == (3, 24, 24)
    assert sorted(_labels(data.val)) == [0, 0, 1, 1, 2, 2]
    assert set(data.train.indices).isdisjoint(data.val.indices)
    assert _labels(data.plain) == _labels(data.train)
    assert len(data.mean) == len(data.std) == 3  # computed from the training images
    x = torch.stack([data.plain[i][0] for i in range(len(data.plain))])  # (24, 3, 24, 24)
    assert abs(float(x.mean())) < 0.35 and 0.7 < float(x.std()) < 1.3
    back = data.denormalize(x)
    assert float(back.min()) >= 0.0 and float(back.max()) <= 1.0 and float(back.max()) > 0.9
    loaders = make_loaders(data, batch_size=8)
    xb, yb = next(iter(loaders["train"]))
    assert xb.shape == (8, 3, 24, 24) and yb.dtype == torch.int64


def test_image_folder_held_out_folders_keep_train_labels(tmp_path):
    root = make_image_folder(tmp_path, {"train": 4})
    make_image_folder(tmp_path, {"test": 2}, classes=(1, 2))  # digit0 missing from test/
    make_image_folder(tmp_path, {"val": 1}, classes=(0,))
    data = build_datasets("imagefolder", root, val_fraction=0.5, seed=0)
    assert _labels(data.test) == [1, 1, 2, 2]  # train/'s labels, not test/'s own folder order
    assert _labels(data.val) == [0]  # val/ is the validation set when test/ exists: nothing held out
    assert len(data.train) == 12


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train"):
        build_datasets("imagefolder", tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_datasets("imagefolder", tmp_path / "missing")
    with pytest.raises(ValueError, match="needs a data dir"):
        build_datasets("imagefolder")
    make_image_folder(tmp_path, {"train": 2}, classes=(0, 1))
    make_image_folder(tmp_path, {"val": 1}, classes=(2,))
    with pytest.raises(ValueError, match="digit2"):
        build_datasets("imagefolder", tmp_path)


def test_image_folder_grey(tmp_path):
    make_image_folder(tmp_path, {"train": 3}, classes=(0, 1))
    data = build_datasets("imagefolder", tmp_path, in_chans=1, val_fraction=0)
    assert data.input_size == (1, 32, 32) and len(data.mean) == 1 and data.val is None and data.test is None
