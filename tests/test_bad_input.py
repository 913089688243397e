"""Issue #16: every mistake caught before compute and recoverable, nothing of the user's overwritten,
no raw tracebacks. One section per point of the issue."""
import importlib
import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, Subset, TensorDataset

from encodenet_timm import DataError, EncodeNetConfig, EncodeNetWrapper
from encodenet_timm.checks import dataset_files, scan_files
from encodenet_timm.data import build_datasets, make_loaders
from encodenet_timm.loaders import full_last_batch

from conftest import make_model
from test_data_imagefolder import make_image_folder


# ---- #16.4 data problems named early -----------------------------------------------------------------
def _cfg(**keys) -> EncodeNetConfig:
    """Every stage 1 epoch (finetune off), 1 cluster per class: tiny data, only the error under test fires."""
    cfg = EncodeNetConfig(progress=False, device="cpu")
    cfg.baseline.epochs, cfg.autoencoder.epochs, cfg.transfer.epochs, cfg.finetune.epochs = 1, 1, 1, 0
    cfg.representatives.clusters_per_class = 1
    return cfg.override(keys)


def _forbid_stages(wrapper, monkeypatch):
    """Every stage method fails the test if called: the error must come before any training."""
    for name in ("fit_baseline", "select_representatives", "fit_autoencoder", "fit_transfer", "fit_finetune"):
        monkeypatch.setattr(wrapper, name, lambda *a, _n=name, **k: pytest.fail(f"{_n} ran"))


def _folder(tmp_path: Path, n: int = 4, size: int = 16) -> Path:
    """train/digit{0,1,2}/NNN.png: 3 classes of `n` real digits."""
    return make_image_folder(tmp_path / "data", {"train": n}, size=size) / "train"


def _image_folder(train: Path, **kw):
    from torchvision import transforms
    from torchvision.datasets import ImageFolder
    return ImageFolder(str(train), transforms.ToTensor(), **kw)


def _jpeg_bytes(size: int = 16) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _spoil(train: Path):
    """Three bad files of three kinds in a folder of good ones: (non-image .png, truncated .png, truncated .jpg)."""
    garbage = train / "digit0" / "001.png"
    garbage.write_bytes(b"not an image at all")
    truncated = train / "digit1" / "002.png"
    truncated.write_bytes(truncated.read_bytes()[:200])
    jpeg = train / "digit2" / "000.jpg"
    data = _jpeg_bytes(64)
    jpeg.write_bytes(data[:data.index(b"\xff\xda") + 100])  # cut 100 bytes into its compressed data
    return garbage, truncated, jpeg


def test_scan_names_what_verify_catches_and_decode_catches_the_rest(tmp_path):
    train = _folder(tmp_path)
    garbage, truncated, jpeg = _spoil(train)
    empty = train / "digit0" / "003.png"
    empty.write_bytes(b"")
    inner = train / "digit2" / "001.bmp"  # a truncated BMP: verify() passes it, decoding does not
    buf = io.BytesIO()
    Image.open(train / "digit2" / "001.png").save(buf, "BMP")
    inner.write_bytes(buf.getvalue()[:500])
    (train / "digit2" / "001.png").unlink()
    files = [str(p) for p in sorted(train.rglob("*.*"))]
    bad = {Path(p).name + p.split("/")[-2]: r for _, p, r in scan_files(files, "verify")}
    assert set(bad) == {"001.pngdigit0", "003.pngdigit0", "002.pngdigit1", "000.jpgdigit2"}
    assert "truncated JPEG" in bad["000.jpgdigit2"]
    decoded = {p for _, p, _ in scan_files(files, "decode")}
    assert decoded == {str(p) for p in (garbage, empty, truncated, jpeg, inner)}
    assert scan_files(files, "none") == []


def test_unreadable_files_are_named_before_any_training(tmp_path, monkeypatch):
    train = _folder(tmp_path)
    garbage, truncated, jpeg = _spoil(train)
    dataset = _image_folder(train)
    files = dataset_files(dataset)
    wrapper = EncodeNetWrapper(make_model("resnet10t", num_classes=3), _cfg())
    _forbid_stages(wrapper, monkeypatch)
    with pytest.raises(DataError, match="3 image file") as info:
        wrapper.fit(DataLoader(dataset, batch_size=4), run_dir=tmp_path / "run")
    message = str(info.value)
    for path in (garbage, truncated, jpeg):
        assert f"index {files.index(str(path))}: {path}" in message
    assert "data.skip_unreadable" in message and info.value.path == str(garbage)
    assert not (tmp_path / "run").exists()  # nothing written


def test_the_clis_image_folder_names_a_bad_file_before_training(tmp_path, monkeypatch):
    make_image_folder(tmp_path / "data", {"train": 4, "test": 1}, size=16)
    bad = tmp_path / "data" / "train" / "digit1" / "000.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")  # a PNG signature, then nothing readable
    data = build_datasets("imagefolder", tmp_path / "data", img_size=16, val_fraction=0)  # stats pass over it
    loaders = make_loaders(data, batch_size=4)
    wrapper = EncodeNetWrapper(make_model("resnet10t", num_classes=3), _cfg())
    _forbid_stages(wrapper, monkeypatch)
    with pytest.raises(DataError, match=str(bad)):
        wrapper.fit(loaders["train"], plain_loader=loaders["plain"])


def test_the_command_line_names_a_bad_file_in_one_line_before_training(tmp_path, capsys):
    from encodenet_timm.cli import main
    make_image_folder(tmp_path / "data", {"train": 3, "test": 1}, size=16)
    bad = tmp_path / "data" / "train" / "digit2" / "001.png"
    bad.write_bytes(b"not an image")
    out = tmp_path / "run"
    code = main(["fit", "--model", "resnet10t", "--dataset", "imagefolder", "--data-dir", str(tmp_path / "data"),
                 "--out", str(out), "--val-fraction", "0", "--img-size", "16", "--device", "cpu",
                 "--set", "progress=false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and str(bad) in err[0] and "--data.skip_unreadable true" in err[0]
    assert not (out / "run.json").exists() and not (out / "checkpoints").exists()


def test_a_read_that_fails_mid_epoch_names_the_file_and_index(tmp_path):
    train = _folder(tmp_path)
    bad = train / "digit1" / "001.png"
    bad.write_bytes(b"not an image")
    dataset = _image_folder(train)
    index = dataset_files(dataset).index(str(bad))
    wrapper = EncodeNetWrapper(make_model("resnet10t", num_classes=3), _cfg(**{"data.scan": "none"}))
    with pytest.raises(DataError, match=rf"^cannot read sample {index} of the dataset, {bad}"):
        wrapper.fit(DataLoader(dataset, batch_size=4))
    # from a DataLoader worker it comes back as DataError(<the worker's traceback as text>) (torch's
    # ExceptionWrapper.reraise; a real worker costs ~5 s to shut down after an error): the message stays one line
    worker = ("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
              "  File \"fetch.py\", line 52, in fetch\nencodenet_timm.errors.DataError: cannot read sample 5 (x.png)\n")
    assert str(DataError(worker)) == "cannot read sample 5 (x.png)"


def test_skip_unreadable_leaves_them_out_and_records_how_many(tmp_path, caplog):
    train = _folder(tmp_path)
    _spoil(train)
    dataset = _image_folder(train)
    wrapper = EncodeNetWrapper(make_model("resnet10t", num_classes=3),
                               _cfg(**{"data.skip_unreadable": True, "baseline.epochs": 0}))
    with caplog.at_level(logging.WARNING, logger="encodenet_timm.checks"):
        wrapper.fit(DataLoader(dataset, batch_size=4, shuffle=True), run_dir=tmp_path / "run")
    assert "leaving out 3 unreadable image file(s) of train_loader" in caplog.text
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["status"] == "complete"
    assert record["data"]["skipped"] == {"train": 3, "val": 0} and record["data"]["size"] == len(dataset) - 3
    assert wrapper.representatives.cluster_ids.numel() == len(dataset) - 3


def test_readable_scans_once_and_names_the_callers_index_after_skipping(tmp_path, monkeypatch):
    from encodenet_timm import checks
    from encodenet_timm.loaders import readable
    train = _folder(tmp_path)
    _spoil(train)
    dataset = _image_folder(train)
    calls, scan = [], checks.scan_files
    monkeypatch.setattr(checks, "scan_files", lambda files, mode: calls.append(len(files)) or scan(files, mode))
    loader, _, _, skipped = readable(DataLoader(dataset, batch_size=4, shuffle=True), None, None, skip=True)
    assert skipped == {"train": 3, "val": 0} and len(loader.dataset) == len(dataset) - 3
    assert readable(loader, None, None, skip=True)[0].dataset is loader.dataset and calls == [len(dataset)]
    later = train / "digit2" / "003.png"  # spoilt after the scan: its first read names it
    later.write_bytes(b"gone bad")
    index = dataset_files(dataset).index(str(later))
    with pytest.raises(DataError, match=rf"sample {index} of the dataset, {later}"):
        loader.dataset[len(loader.dataset) - 1]


def test_compare_names_a_bad_file_before_any_row_trains(tmp_path, monkeypatch):
    compare_module = importlib.import_module("encodenet_timm.compare")  # the package's `compare` is the function
    train = _folder(tmp_path)
    bad = _spoil(train)[0]
    loader = DataLoader(_image_folder(train), batch_size=4)
    monkeypatch.setattr(compare_module, "train_stage", lambda *a, **k: pytest.fail("a row trained"))
    with pytest.raises(DataError, match=str(bad)):
        compare_module.compare(lambda: make_model("resnet10t", num_classes=3), loader, loader, config=_cfg(),
                               seeds=(0,), out_dir=tmp_path / "cmp")
    assert not (tmp_path / "cmp").exists()


def test_an_empty_class_folder_is_named(tmp_path, monkeypatch):
    make_image_folder(tmp_path / "data", {"train": 2}, classes=(0, 1), size=16)
    empty = tmp_path / "data" / "train" / "digit2"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=f"class folder.*{empty}.*hold no images"):
        build_datasets("imagefolder", tmp_path / "data")
    dataset = _image_folder(tmp_path / "data" / "train", allow_empty=True)  # the user's own ImageFolder
    wrapper = EncodeNetWrapper(make_model("resnet10t", num_classes=3), _cfg())
    _forbid_stages(wrapper, monkeypatch)
    with pytest.raises(ValueError, match=r"classes \[2\] \('digit2'\) have no images"):
        wrapper.fit(DataLoader(dataset, batch_size=2))


def test_a_last_batch_of_one_does_not_crash_batchnorm(digits):
    model = make_model("resnet10t")  # 1x1 features in its last stage at 32x32: BatchNorm needs 2+ images
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        model.train()(torch.randn(1, 3, 32, 32))
    train, _ = digits
    dataset = Subset(train, range(2 * 8 + 1))  # k * B + 1
    cfg = _cfg(**{"transfer.epochs": 0, "autoencoder.epochs": 0})
    history = EncodeNetWrapper(model, cfg).fit(DataLoader(dataset, batch_size=8, shuffle=True))
    assert len(history["baseline"]) == 1


def test_full_last_batch_keeps_order_and_respects_drop_last():
    dataset = TensorDataset(torch.arange(17).float()[:, None], torch.zeros(17, dtype=torch.long))
    loader = DataLoader(dataset, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(3))
    full = full_last_batch(loader)
    assert full.drop_last and len(full) == 2 and full.sampler is loader.sampler
    order = [b[0].flatten().tolist() for b in DataLoader(dataset, batch_size=8, shuffle=True,
                                                         generator=torch.Generator().manual_seed(3))]
    assert [b[0].flatten().tolist() for b in full] == order[:2]
    own = DataLoader(dataset, batch_size=8, drop_last=True)
    assert full_last_batch(own) is own  # the user's drop_last as it is
    assert full_last_batch(DataLoader(dataset, batch_size=6)).drop_last is False  # last batch of 5
    shard = DataLoader(dataset, batch_size=4, sampler=DistributedSampler(dataset, num_replicas=2, rank=0))
    assert full_last_batch(shard).drop_last  # 9 images per rank: one left over per rank


def test_a_custom_batch_sampler_with_a_batch_of_one_says_what_to_set(digits):
    train, _ = digits
    dataset = Subset(train, range(17))
    batches = BatchSampler(range(17), batch_size=8, drop_last=False)
    wrapper = EncodeNetWrapper(make_model("resnet10t"), _cfg())
    with pytest.raises(ValueError, match="baseline: batch 2 of epoch 0 holds one image.*drop_last=True"):
        wrapper.fit(DataLoader(dataset, batch_sampler=batches))


@pytest.fixture(scope="module")
def finished_run(digits, tmp_path_factory):
    """A complete run on 30 digits (3 per class), every stage 1 epoch; its run dir and its dataset."""
    train, _ = digits
    labels = train.tensors[1]
    idx = [i for c in range(10) for i in torch.nonzero(labels == c).flatten()[:3].tolist()]
    run_dir = tmp_path_factory.mktemp("resume") / "run"
    EncodeNetWrapper(make_model("resnet10t"), _cfg()).fit(DataLoader(Subset(train, idx), batch_size=10),
                                                          run_dir=run_dir)
    return run_dir, train, idx


@pytest.mark.parametrize("change, expected", [
    (lambda idx: idx[:-1], "size 30 -> 29"),
    (lambda idx: idx[::-1], "labels are in another order"),
    (lambda idx: idx[:-1] + [idx[0]], "class counts class 0: 3 -> 4, class 9: 3 -> 2"),
])
def test_resume_with_changed_data_says_what_changed(finished_run, monkeypatch, change, expected):
    run_dir, train, idx = finished_run
    before = (run_dir / "run.json").read_bytes()
    wrapper = EncodeNetWrapper(make_model("resnet10t"), _cfg())
    _forbid_stages(wrapper, monkeypatch)
    with pytest.raises(DataError, match=f"training data changed.*{expected}"):
        wrapper.fit(DataLoader(Subset(train, change(idx)), batch_size=10), run_dir=run_dir, resume=True)
    assert (run_dir / "run.json").read_bytes() == before  # nothing written


def test_resume_with_the_same_data_is_accepted(finished_run):
    """Also for a run written before data.* and the data fingerprint existed: neither stops it."""
    run_dir, train, idx = finished_run
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    del config["data"]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    record = json.loads((run_dir / "run.json").read_text())
    del record["data"]
    (run_dir / "run.json").write_text(json.dumps(record))
    EncodeNetWrapper(make_model("resnet10t"), _cfg()).fit(DataLoader(Subset(train, idx), batch_size=10),
                                                          run_dir=run_dir, resume=True)
    assert json.loads((run_dir / "run.json").read_text())["status"] == "complete"


class _Dicts(Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return {"image": torch.zeros(3, 32, 32), "label": i % 2}


class _Triples(_Dicts):
    def __getitem__(self, i):
        return torch.zeros(3, 32, 32), i % 2, f"img{i}.png"


@pytest.mark.parametrize("dataset, named", [(_Dicts(), r"dicts \(keys \['image', 'label'\]\)"),
                                            (_Triples(), "3-tuples")])
def test_a_dataset_of_dicts_or_triples_is_told_what_fit_needs(dataset, named, tmp_path, monkeypatch):
    wrapper = EncodeNetWrapper(make_model("resnet10t", num_classes=2), _cfg())
    _forbid_stages(wrapper, monkeypatch)
    with pytest.raises(TypeError, match=rf"{named}; fit needs \(image, label\) pairs.*__getitem__"):
        wrapper.fit(DataLoader(dataset, batch_size=4), run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()
