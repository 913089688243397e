"""encodenet_timm.checks: every kind of bad input gets a clear error before compute is spent (issue #5, item 3)."""
import os

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, TensorDataset

from encodenet_timm import EncodeNetConfig, EncodeNetWrapper, NonFiniteLossError
from encodenet_timm.files import save_tensors
from encodenet_timm.checks import check_batch

from conftest import make_model


def _cfg(**stages):
    cfg = EncodeNetConfig(progress=False, device="cpu")
    cfg.baseline.epochs, cfg.autoencoder.epochs, cfg.transfer.epochs = 1, 1, 1
    cfg.representatives.clusters_per_class = 1  # tiny datasets: only the error under test fires
    for name, epochs in stages.items():
        getattr(cfg, name).epochs = epochs
    return cfg


def _loader(x, y, batch_size=8):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


class _NoTargets(Dataset):
    """A map-style dataset that does not expose its labels (no .targets): only batches reveal them."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[i]


def _digits_without(digits, cls, n=300):
    train, _ = digits
    return Subset(train, [i for i in range(n) if int(train[i][1]) != cls])


def _forbid_stages(wrapper, monkeypatch, allowed=()):
    """Make every stage method but `allowed` fail the test if called: the error must come before them."""
    for name in ("fit_baseline", "select_representatives", "fit_autoencoder", "fit_transfer", "fit_finetune"):
        if name not in allowed:
            monkeypatch.setattr(wrapper, name, lambda *a, _n=name, **k: pytest.fail(f"{_n} ran"))


def test_labels_out_of_range(monkeypatch):
    wrapper = EncodeNetWrapper(make_model("resnet10t"), _cfg())
    _forbid_stages(wrapper, monkeypatch)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\).*found 0\.\.12"):
        wrapper.fit(_loader(torch.randn(16, 3, 32, 32), torch.arange(16) % 13))


def test_labels_out_of_range_in_a_dataset_without_targets():
    wrapper = EncodeNetWrapper(make_model("resnet10t"), _cfg())
    loader = DataLoader(_NoTargets(TensorDataset(torch.randn(16, 3, 32, 32), torch.full((16,), 12))), batch_size=8)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        wrapper.fit(loader)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):  # every batch of a stage is checked
        wrapper.fit_baseline(loader)
    assert wrapper.history == {}


def test_model_num_classes_differs_from_the_datasets_classes(monkeypatch):
    dataset = TensorDataset(torch.randn(20, 3, 32, 32), torch.arange(20) % 5)
    dataset.classes = ["a", "b", "c", "d", "e"]  # as torchvision datasets expose them
    wrapper = EncodeNetWrapper(make_model("resnet10t", num_classes=10), _cfg())
    _forbid_stages(wrapper, monkeypatch)
    with pytest.raises(ValueError, match="5 classes but the model has num_classes=10.*num_classes=5"):
        wrapper.fit(DataLoader(dataset, batch_size=8))


def test_class_with_no_images_is_found_before_training(digits, monkeypatch):
    wrapper = EncodeNetWrapper(make_model("resnet10t"), _cfg())
    _forbid_stages(wrapper, monkeypatch)
    with pytest.raises(ValueError, match=r"classes \[7\] have no images"):
        wrapper.fit(DataLoader(_digits_without(digits, 7), batch_size=64))


def test_class_with_no_images_without_targets_stops_before_the_autoencoder(digits, monkeypatch):
    wrapper = EncodeNetWrapper(make_model("resnet10t"), _cfg(baseline=0))
    _forbid_stages(wrapper, monkeypatch, allowed=("select_representatives",))
    with pytest.raises(ValueError, match=r"classes \[7\] have no images"):
        wrapper.fit(DataLoader(_NoTargets(_digits_without(digits, 7)), batch_size=64))
    with pytest.raises(ValueError, match=r"classes \[7\] have no images"):  # the stage on its own
        wrapper.select_representatives(DataLoader(_digits_without(digits, 7), batch_size=64))


def test_fewer_images_than_clusters(digits, monkeypatch):
    train, _ = digits
    idx = [i for i in range(300) if int(train[i][1]) != 3]
    idx += [i for i in range(len(train)) if int(train[i][1]) == 3][:2]  # class 3 has 2 images
    cfg = _cfg()
    cfg.representatives.clusters_per_class = 5
    wrapper = EncodeNetWrapper(make_model("resnet10t"), cfg)
    _forbid_stages(wrapper, monkeypatch)
    with pytest.raises(ValueError, match=r"clusters_per_class=5 .* class 3 has 2; lower .* at most 2, or .*'auto'"):
        wrapper.fit(DataLoader(Subset(train, idx), batch_size=64))
    wrapper = EncodeNetWrapper(make_model("resnet10t"), cfg)  # the stage on its own says the same
    with pytest.raises(ValueError, match="class 3 has 2"):
        wrapper.select_representatives(DataLoader(_NoTargets(Subset(train, idx)), batch_size=64))


def test_wrong_channel_count(monkeypatch):
    wrapper = EncodeNetWrapper(make_model("resnet10t"), _cfg())
    loader = _loader(torch.randn(16, 1, 32, 32), torch.arange(16) % 10)
    with pytest.raises(ValueError, match="1 channels but the model takes 3"):
        wrapper.fit_baseline(loader)
    _forbid_stages(wrapper, monkeypatch)
    with pytest.raises(ValueError, match="1 channels but the model takes 3"):
        wrapper.fit(loader)


def test_image_size_the_model_cannot_take(monkeypatch):
    wrapper = EncodeNetWrapper(make_model("vit_tiny_patch16_224"), _cfg())  # built for 32x32 only
    _forbid_stages(wrapper, monkeypatch)
    with pytest.raises(ValueError, match=r"cannot take images of size \(3, 64, 64\).*doesn't match"):
        wrapper.fit(_loader(torch.randn(16, 3, 64, 64), torch.arange(16) % 10))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_inputs(bad):
    x = torch.randn(16, 3, 32, 32)
    x[9, 0, 0, 0] = bad  # not in the first sample: found in the baseline's second batch, before its compute
    wrapper = EncodeNetWrapper(make_model("resnet10t"), _cfg())
    with pytest.raises(ValueError, match="NaN or inf"):
        wrapper.fit(_loader(x, torch.arange(16) % 10))


def test_empty_loader_or_not_a_loader():
    wrapper = EncodeNetWrapper(make_model("resnet10t"), _cfg())
    with pytest.raises(ValueError, match="train_loader is empty"):
        wrapper.fit(_loader(torch.randn(0, 3, 32, 32), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(TypeError, match="DataLoader"):
        wrapper.fit_baseline([(torch.randn(2, 3, 32, 32), torch.zeros(2, dtype=torch.long))])


class _Stream(IterableDataset):
    def __iter__(self):
        for i in range(4):
            yield torch.randn(3, 32, 32), i


def test_iterable_dataset():
    wrapper = EncodeNetWrapper(make_model("resnet10t"), _cfg())
    for stage in (wrapper.fit, wrapper.fit_autoencoder, wrapper.select_representatives):
        with pytest.raises(TypeError, match="map-style.*IterableDataset"):
            stage(DataLoader(_Stream(), batch_size=2))


def test_nan_loss_names_stage_and_epoch():
    cfg = _cfg()
    cfg.baseline.lr, cfg.baseline.sched = 1e30, "none"  # the first update blows the weights up
    wrapper = EncodeNetWrapper(make_model("resnet10t"), cfg)
    loader = _loader(torch.randn(32, 3, 32, 32), torch.arange(32) % 10, batch_size=4)
    with pytest.raises(NonFiniteLossError, match="baseline stage: loss became .* at epoch 0, step [1-7]"):
        wrapper.fit_baseline(loader)
    # with a run directory, the last good checkpoint is kept: tests/test_checkpoint.py


def test_module_that_is_not_a_timm_classifier():
    with pytest.raises(TypeError, match="lacks forward_features"):
        EncodeNetWrapper(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.LazyLinear(10)))
    with pytest.raises(TypeError, match="timm classifier"):
        EncodeNetWrapper(lambda x: x)


def test_config_with_an_unknown_key_or_a_wrong_type():
    with pytest.raises(ValueError, match="unknown config key 'transfer.lrr'"):
        EncodeNetConfig.from_yaml("transfer:\n  lrr: 0.1\n")
    with pytest.raises(ValueError, match="'transfer.epochs' must be an int, got 'ten'"):
        EncodeNetConfig.from_dict({"transfer": {"epochs": "ten"}})
    cfg = _cfg()
    cfg.transfer.lr = "fast"  # set on the dataclass: caught when the wrapper is built
    with pytest.raises(ValueError, match="'transfer.lr' must be a number, got 'fast'"):
        EncodeNetWrapper(make_model("resnet10t"), cfg)
    with pytest.raises(TypeError, match="EncodeNetConfig"):
        EncodeNetWrapper(make_model("resnet10t"), {"seed": 1})


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "model.safetensors"
    save_tensors(path, make_model("resnet20_cifar").state_dict())
    return path


def test_corrupted_checkpoint(weights):
    weights.write_bytes(os.urandom(weights.stat().st_size))
    with pytest.raises(ValueError, match="corrupted or truncated"):
        EncodeNetWrapper(make_model("resnet20_cifar"), _cfg()).load_weights(weights)


def test_truncated_checkpoint(weights):
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupted or truncated"):
        EncodeNetWrapper(make_model("resnet20_cifar"), _cfg()).load_weights(weights)


def test_checkpoint_from_another_model(weights, tmp_path):
    with pytest.raises(ValueError, match=r"another model.*missing keys \['conv1.0.weight'"):
        EncodeNetWrapper(make_model("resnet10t"), _cfg()).load_weights(weights)
    with pytest.raises(ValueError, match=r"'fc.weight' has shape \(10, 64\) in the file but \(100, 64\)"):
        EncodeNetWrapper(make_model("resnet20_cifar", num_classes=100), _cfg()).load_weights(weights)
    wrapper = EncodeNetWrapper(make_model("resnet20_cifar"), _cfg())  # the right model loads it bitwise
    other = make_model("resnet20_cifar")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    save_tensors(tmp_path / "other.safetensors", other.state_dict())
    wrapper.load_weights(tmp_path / "other.safetensors")
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in wrapper.model.state_dict().items())


def test_check_batch_accepts_good_and_names_what_is_wrong():
    ok = dict(num_classes=10, in_chans=3)
    check_batch(torch.randn(2, 3, 8, 8), torch.tensor([0, 9]), **ok)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        check_batch(torch.randn(3, 8, 8), torch.tensor([0]), **ok)
    with pytest.raises(ValueError, match="integer"):
        check_batch(torch.randn(2, 3, 8, 8), torch.tensor([0.0, 1.0]), **ok)
    with pytest.raises(ValueError, match=r"found -1\.\.0"):
        check_batch(torch.randn(2, 3, 8, 8), torch.tensor([-1, 0]), **ok)
    with pytest.raises(ValueError, match="inf"):
        check_batch(torch.full((2, 3, 8, 8), float("inf")), torch.tensor([0, 1]), **ok)
    with pytest.raises(ValueError, match="decoder was built for"):
        check_batch(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]), image_size=(16, 16), **ok)
