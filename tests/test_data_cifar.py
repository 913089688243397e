import io
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from encodenet_timm.data import CIFAR_STATS, CifarDataset, load_cifar, read_image_zip

REAL_ZIP = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10-jpeg.zip"


def make_image_zip(path: Path, classes=("cat", "airplane", "dog"), n_train=6, n_test=2, size=32, seed=0) -> Path:
    """A zip in the cifar10-jpeg layout (train/<class>/NNNN.jpg, test/...); class c is tinted channel c % 3."""
    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(path, "w") as zf:
        for split, n in (("train", n_train), ("test", n_test)):
            for c, name in enumerate(sorted(classes)):
                for i in range(n):
                    img = np.full((size, size, 3), 40.0)
                    img[..., c % 3] = 200
                    img = np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)
                    buf = io.BytesIO()
                    Image.fromarray(img).save(buf, format="JPEG", quality=90)
                    zf.writestr(f"{split}/{name}/{i:04d}.jpg", buf.getvalue())
    return path


def test_zip_is_decoded_in_label_order_and_cached(tmp_path):
    zip_path = make_image_zip(tmp_path / "cifar10-jpeg.zip")
    data = load_cifar("cifar10-jpeg", tmp_path, cache_dir=tmp_path / "cache")
    assert data.classes == ["airplane", "cat", "dog"]  # folder names sorted
    assert data.train_images.shape == (18, 32, 32, 3) and data.train_images.dtype == np.uint8
    assert data.test_images.shape == (6, 32, 32, 3)
    assert np.bincount(data.train_labels).tolist() == [6, 6, 6]
    assert (data.mean, data.std) == CIFAR_STATS["cifar10"]
    # class c is tinted on channel c: the decode kept pixels and labels together
    for c in range(3):
        assert data.train_images[data.train_labels == c].mean(axis=(0, 1, 2)).argmax() == c
    cached = list((tmp_path / "cache").glob("*.npz"))
    assert len(cached) == 1
    again = read_image_zip(zip_path, cache_dir=tmp_path / "cache")  # from the cache, same arrays
    assert np.array_equal(again[0], data.train_images) and again[4] == data.classes
    # the zip itself can be passed too
    assert load_cifar("cifar10-jpeg", zip_path, cache_dir=tmp_path / "cache").train_images.shape[0] == 18
    # the cache follows the zip's content: a new modification time (a copy, a re-mount) reuses it...
    os.utime(zip_path, (1e9, 1e9))
    read_image_zip(zip_path, cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").glob("*.npz")) == cached
    # ...other images are decoded anew
    make_image_zip(zip_path, seed=1)
    other = read_image_zip(zip_path, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2 and not np.array_equal(other[0], data.train_images)


def test_missing_zip_and_unknown_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar10-jpeg.zip"):
        load_cifar("cifar10-jpeg", tmp_path, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="dataset must be one of"):
        load_cifar("mnist", tmp_path)


def test_plain_dataset_normalises_only():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    ds = CifarDataset(images, [0, 1, 2, 3], (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    x, y = ds[2]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 2
    expected = (torch.from_numpy(images[2]).permute(2, 0, 1).float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(x, expected)
    torch.testing.assert_close(ds.denormalize(x), torch.from_numpy(images[2]).permute(2, 0, 1).float() / 255)


def test_augmented_dataset_crops_from_padding_and_flips():
    images = np.arange(32 * 32 * 3, dtype=np.int64).reshape(1, 32, 32, 3) % 251 + 1  # no zero pixel
    ds = CifarDataset(images.astype(np.uint8), [0], (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), augment=True)
    torch.manual_seed(0)
    original = torch.from_numpy(images[0]).permute(2, 0, 1).float() / 255  # (3, 32, 32)
    padded = torch.nn.functional.pad(original, (4, 4, 4, 4))
    seen_flip, seen_shift = False, False
    for _ in range(40):
        x, _ = ds[0]
        assert x.shape == (3, 32, 32)
        # every sample is some 32x32 window of the zero-padded image, maybe mirrored
        found = [(t, l, f) for t in range(9) for l in range(9) for f in (False, True)
                 if torch.equal(x, (padded[:, t:t + 32, l:l + 32].flip(-1) if f else padded[:, t:t + 32, l:l + 32]))]
        assert found, "sample is not a crop of the padded image"
        seen_flip |= any(f for _, _, f in found)
        seen_shift |= any((t, l) != (4, 4) for t, l, _ in found)
    assert seen_flip and seen_shift


def test_dataset_rejects_bad_arrays():
    with pytest.raises(ValueError, match="uint8"):
        CifarDataset(np.zeros((2, 32, 32, 3), dtype=np.float32), [0, 1], (0,) * 3, (1,) * 3)
    with pytest.raises(ValueError, match="labels"):
        CifarDataset(np.zeros((2, 32, 32, 3), dtype=np.uint8), [0], (0,) * 3, (1,) * 3)


@pytest.mark.skipif(not REAL_ZIP.is_file(), reason="the shared CIFAR-10 JPEG zip is not on this machine")
def test_real_cifar10_jpeg_zip_layout():
    """Fast: reads the zip's directory only (decoding all 60k images takes ~20 s; the benchmark does it)."""
    with zipfile.ZipFile(REAL_ZIP) as zf:
        names = [n for n in zf.namelist() if n.lower().endswith(".jpg")]
        first = Image.open(io.BytesIO(zf.read(names[0])))
    counts = {}
    for n in names:
        split, cls = n.split("/")[-3:-1]
        counts.setdefault(split, {}).setdefault(cls, 0)
        counts[split][cls] += 1
    assert sorted(counts["train"]) == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                       "ship", "truck"]
    assert set(counts["train"].values()) == {5000} and set(counts["test"].values()) == {1000}
    assert first.size == (32, 32) and first.mode == "RGB"
