import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

from encodenet_timm import EncodeNetConfig, EncodeNetWrapper
from encodenet_timm.data import CifarDataset
from encodenet_timm.data import DataSplits, make_loaders
from encodenet_timm.data.device import device_splits, to_device_dataset
from encodenet_timm.device_data import DeviceArrayDataset, DeviceBatch, device_collate, is_device_dataset

from conftest import make_model

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


def _arrays(n=40, h=8, w=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8), rng.integers(0, 10, n)


def _batches(dataset, **kw):
    return list(DataLoader(dataset, batch_size=16, collate_fn=device_collate, **kw))


def test_plain_device_batches_equal_cifar_dataset_exactly():
    images, labels = _arrays()
    cifar = CifarDataset(images, labels, MEAN, STD)
    dev = DeviceArrayDataset(images, labels, MEAN, STD)
    for (xa, ya), (xb, yb) in zip(DataLoader(cifar, batch_size=16), _batches(dev)):
        assert xb.shape == xa.shape and xb.dtype == torch.float32 and torch.equal(xa, xb)
        assert torch.equal(ya, yb)
    x, y = dev[3]
    assert torch.equal(x, cifar[3][0]) and y == cifar[3][1]
    # (N, C, H, W) input gives the same
    nchw = DeviceArrayDataset(images.transpose(0, 3, 1, 2), labels, MEAN, STD, layout="nchw")
    assert torch.equal(nchw.__getitems__([1, 5])[0], dev.__getitems__([1, 5])[0])


def test_to_device_dataset_converts_cifar_subsets_and_digits(digits):
    images, labels = _arrays()
    for augment in (False, True):
        sub = Subset(CifarDataset(images, labels, MEAN, STD, augment=augment), [5, 2, 9, 7])
        moved = to_device_dataset(sub, "cpu")
        assert isinstance(moved, Subset) and is_device_dataset(moved) and moved.dataset.augment == augment
        if not augment:
            assert torch.equal(next(iter(DataLoader(sub, batch_size=4)))[0], moved.__getitems__([0, 1, 2, 3])[0])
    train, _ = digits
    moved = to_device_dataset(train, "cpu")
    assert isinstance(moved, DeviceArrayDataset)
    xa, ya = next(iter(DataLoader(train, batch_size=16)))
    xb, yb = _batches(moved)[0]
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # over budget: the per-sample dataset is kept
    assert to_device_dataset(train, "cpu", budget_bytes=10) is train


def test_augmented_batches_are_crops_of_the_padded_image_with_the_right_statistics():
    h = w = 6
    pad = 2
    img = np.arange(h * w * 3, dtype=np.uint8).reshape(1, h, w, 3) + 1  # every pixel distinct, none 0
    dev = DeviceArrayDataset(img, [0], (0.0, 0.0, 0.0), (1 / 255,) * 3, augment=True, pad=pad)  # x = raw value
    torch.manual_seed(0)
    n = 4000
    x, y = dev.__getitems__([0] * n)
    assert x.shape == (n, 3, h, w) and torch.equal(y, torch.zeros(n, dtype=torch.long))
    padded = torch.nn.functional.pad(torch.from_numpy(img).permute(0, 3, 1, 2).float(), (pad,) * 4)[0]
    crops = {}
    for t in range(2 * pad + 1):
        for l in range(2 * pad + 1):
            c = padded[:, t:t + h, l:l + w]
            crops[(t, l, False)], crops[(t, l, True)] = c, c.flip(-1)
    stack = torch.stack(list(crops.values())).round()  # (50, 3, h, w)
    keys = list(crops)
    match = (x.round()[:, None] == stack[None]).flatten(2).all(-1)  # (n, 50)
    assert bool(match.any(1).all()), "every output is a (possibly flipped) crop of the padded image"
    which = [keys[int(i)] for i in match.float().argmax(1)]
    flips = np.mean([f for _, _, f in which])
    assert abs(flips - 0.5) < 0.04
    for axis in (0, 1):
        freq = np.bincount([k[axis] for k in which], minlength=2 * pad + 1) / n
        assert np.all(np.abs(freq - 1 / (2 * pad + 1)) < 0.03), freq


def test_seeded_augmentation_repeats_and_differs_across_seeds():
    images, labels = _arrays()
    dev = DeviceArrayDataset(images, labels, MEAN, STD, augment=True)

    def epoch(seed):
        torch.manual_seed(seed)
        return torch.cat([x for x, _ in _batches(dev, shuffle=True, generator=torch.Generator().manual_seed(1))])
    assert torch.equal(epoch(0), epoch(0))
    assert not torch.equal(epoch(0), epoch(1))


def test_distributed_sampler_and_make_loaders_keep_the_standard_loader():
    images, labels = _arrays(n=32)
    dev = DeviceArrayDataset(images, labels, MEAN, STD)
    shards = [list(DataLoader(dev, batch_size=4, collate_fn=device_collate,
                              sampler=DistributedSampler(dev, num_replicas=2, rank=r, shuffle=True, seed=0)))
              for r in range(2)]
    seen = torch.cat([y for s in shards for _, y in s])
    assert sorted(seen.tolist()) == sorted(labels.tolist())
    data = DataSplits(train=dev, plain=dev, val=None, test=None, classes=[str(i) for i in range(10)],
                      mean=MEAN, std=STD)
    loaders = make_loaders(data, batch_size=8, workers=2, pin_memory=True)
    assert loaders["train"].num_workers == 0 and not loaders["train"].pin_memory
    assert loaders["train"].collate_fn is device_collate
    assert isinstance(dev.__getitems__([0, 1]), DeviceBatch)


def _fit(train, device_path, **cfg_kw):
    ds = to_device_dataset(train, "cpu") if device_path else train
    assert is_device_dataset(ds) == device_path
    kw = {"collate_fn": device_collate} if device_path else {}
    loader = DataLoader(ds, batch_size=30, shuffle=True, generator=torch.Generator().manual_seed(0), **kw)
    cfg = EncodeNetConfig(device="cpu", progress=False, **cfg_kw)
    for stage in ("baseline", "autoencoder", "transfer"):
        getattr(cfg, stage).epochs = 1
    cfg.representatives.clusters_per_class = 2
    torch.set_num_threads(1)
    wrapper = EncodeNetWrapper(make_model("resnet20_cifar"), cfg)
    wrapper.fit(loader)
    return wrapper


def test_wrapper_fit_on_the_device_path_gives_the_per_sample_weights_bit_for_bit(digits):
    """Every stage (check_data's probe, the feature pass, the representative gather, _ClusterTargets,
    the autoencoder, transfer) reads the device dataset; with no augmentation it is the same data."""
    train, _ = digits
    sub = Subset(train, list(range(120)))
    a, b = _fit(sub, False), _fit(sub, True)
    assert torch.equal(a.representatives.images, b.representatives.images)
    for (k, va), (_, vb) in zip(a.export().state_dict().items(), b.export().state_dict().items()):
        assert torch.equal(va, vb), k


def test_resume_is_exact_with_device_augmentation(tmp_path):
    """A run killed after its first autoencoder epoch and resumed ends with the uninterrupted weights."""
    images, labels = _arrays(n=60, h=32, w=32)
    labels = np.arange(60) % 10
    dev = DeviceArrayDataset(images, labels, MEAN, STD, augment=True)

    def run(run_dir, resume=False, fail_after=None):
        loader = DataLoader(dev, batch_size=20, shuffle=True, generator=torch.Generator().manual_seed(0),
                            collate_fn=device_collate)
        cfg = EncodeNetConfig(device="cpu", progress=False)
        for stage in ("baseline", "autoencoder", "transfer"):
            getattr(cfg, stage).epochs = 2
        cfg.representatives.clusters_per_class = 1
        torch.set_num_threads(1)
        wrapper = EncodeNetWrapper(make_model("resnet20_cifar"), cfg)
        if fail_after is not None:
            original = wrapper._checkpoint

            def checkpoint(stage, epoch, epochs, train=None):
                original(stage, epoch, epochs, train)
                if (stage, epoch) == fail_after:
                    raise KeyboardInterrupt
            wrapper._checkpoint = checkpoint
        wrapper.fit(loader, run_dir=run_dir, resume=resume)
        return wrapper.export().state_dict()

    straight = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", fail_after=("autoencoder", 1))
    resumed = run(tmp_path / "b", resume=True)
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k


def test_device_splits_moves_every_split(digits):
    train, test = digits
    data = DataSplits(train=Subset(train, [0, 1, 2]), plain=Subset(train, [0, 1, 2]), val=None, test=test,
                      classes=[str(i) for i in range(10)], mean=None, std=None)
    moved = device_splits(data, "cpu")
    assert all(is_device_dataset(d) for d in (moved.train, moved.plain, moved.test)) and moved.val is None


def test_bad_arrays_are_refused():
    images, labels = _arrays()
    with pytest.raises(ValueError, match="mean and std"):
        DeviceArrayDataset(images, labels)
    with pytest.raises(ValueError, match="labels"):
        DeviceArrayDataset(images, labels[:3], MEAN, STD)
    with pytest.raises(ValueError, match="normalised"):
        DeviceArrayDataset(images.astype(np.float32), labels, MEAN, STD)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device_batches_match_the_cpu_path_and_train():
    images, labels = _arrays(n=60, h=32, w=32)
    labels = np.arange(60) % 10
    cifar = CifarDataset(images, labels, MEAN, STD)
    dev = DeviceArrayDataset(images, labels, MEAN, STD, device="cuda")
    x, y = dev.__getitems__(list(range(60)))
    assert x.is_cuda and torch.allclose(x.cpu(), torch.stack([cifar[i][0] for i in range(60)]), atol=1e-6)
    aug = DeviceArrayDataset(images, labels, MEAN, STD, augment=True, device="cuda")
    loader = DataLoader(aug, batch_size=20, shuffle=True, generator=torch.Generator().manual_seed(0),
                        collate_fn=device_collate)
    cfg = EncodeNetConfig(device="cuda", progress=False, amp="auto", channels_last=True)
    for stage in ("baseline", "autoencoder", "transfer"):
        getattr(cfg, stage).epochs = 1
    cfg.representatives.clusters_per_class = 1
    history = EncodeNetWrapper(make_model("resnet20_cifar"), cfg).fit(loader)
    assert np.isfinite(history["transfer"][0]["loss"])


def test_image_folder_is_decoded_once_and_matches_the_per_sample_splits(tmp_path):
    from test_data_imagefolder import make_image_folder
    from encodenet_timm.data import build_datasets
    root = make_image_folder(tmp_path, {"train": 6, "test": 2}, size=28)
    data = build_datasets("imagefolder", root, img_size=24, val_fraction=0.25, seed=0)
    moved = device_splits(data, "cpu")
    assert all(is_device_dataset(d) for d in (moved.train, moved.plain, moved.val, moved.test))
    assert moved.train.dataset.augment and not moved.plain.dataset.augment and moved.train.dataset.pad == 3
    for split in ("plain", "val", "test"):
        per_sample, on_device = getattr(data, split), getattr(moved, split)
        xa = torch.stack([per_sample[i][0] for i in range(len(per_sample))])
        xb, yb = on_device.__getitems__(list(range(len(on_device))))
        torch.testing.assert_close(xb, xa, rtol=0, atol=1e-6)
        assert yb.tolist() == [int(per_sample[i][1]) for i in range(len(per_sample))]
    assert moved.train.dataset.classes == data.classes
    small = device_splits(data, "cpu", budget_bytes=100)  # over budget: the per-sample splits stay
    assert not is_device_dataset(small.train) and not is_device_dataset(small.test)


def test_a_device_dataset_is_checked_once_whole_not_per_batch():
    """The loop's batch check runs once on a device dataset (its first plain image, every label behind
    the Subsets), then not per batch: no host read of the device per step. A bad label anywhere is
    found before the first step; other loaders keep the per-batch check."""
    from encodenet_timm.checks import check_once

    images, labels = _arrays(n=40)
    labels[33] = 12
    ds = DeviceArrayDataset(images, labels, MEAN, STD, augment=True)
    calls = []

    def check(x, y):
        calls.append((tuple(x.shape), y.tolist()))
        if int(y.max()) >= 10:
            raise ValueError("labels must lie in [0, 10)")
    inner = Subset(ds, list(range(10, 40)))
    ok = Subset(inner, [5, 0, 1])  # base indices 15, 10, 11
    rng = torch.get_rng_state()
    assert check_once(check, DataLoader(ok, batch_size=2, collate_fn=device_collate)) is None
    assert calls == [((1, 3, 8, 8), labels[[15, 10, 11]].tolist())]
    assert torch.equal(torch.get_rng_state(), rng)  # the plain image draws no crop
    with pytest.raises(ValueError, match="labels must lie"):
        check_once(check, DataLoader(inner, batch_size=2, collate_fn=device_collate))
    per_sample = DataLoader(CifarDataset(images, labels, MEAN, STD), batch_size=4)
    assert check_once(check, per_sample) is check
    plain = DeviceArrayDataset(images, labels, MEAN, STD)
    assert torch.equal(ds.plain_image(15), plain.__getitems__([15])[0])
    with pytest.raises(ValueError, match="NaN"):
        DeviceArrayDataset(np.full((2, 4, 4, 3), np.nan, np.float32), [0, 1])
