"""Issue #16: every mistake is caught before compute, nothing of the user's is overwritten, no raw tracebacks.

Each test checks the error (type or exit status), that the message names the culprit, and, where the check
comes first, that nothing was trained or written before it.
"""
import fcntl
import importlib
import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, Subset, TensorDataset

import encodenet_timm.cli.config as cli_config
import encodenet_timm.cli.spec as cli
from encodenet_timm import DataError, EncodeNetConfig, EncodeNetWrapper
from encodenet_timm.run_dir import RunDir, check_new_dir
from encodenet_timm.files import LOCK_FILE, DirLock
from encodenet_timm.file_checks import dataset_files
from encodenet_timm.cli import main
from encodenet_timm.data import build_datasets, make_loaders
from encodenet_timm.errors import RunDirInUseError
from encodenet_timm.loaders import full_last_batch

from conftest import make_model
from test_data_imagefolder import make_image_folder

REPO = Path(__file__).resolve().parents[1]
NEW = ["fit", "--model", "resnet20_cifar", "--dataset", "digits", "--device", "cpu"]
# the smallest complete fit: 5 digits per class, one epoch per training stage, no fine-tune
TINY = ["--per-class", "5", "--val-fraction", "0", "--batch-size", "50", "--progress", "false",
        "--baseline.epochs", "1", "--representatives.clusters_per_class", "1", "--autoencoder.epochs", "1",
        "--transfer.epochs", "1", "--finetune.epochs", "0"]


def run(capsys, *argv):
    """(exit code, stdout, stderr) of ``encodenet *argv`` run in-process."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def listing(directory: Path):
    """Every path under `directory` with its bytes: what a refused command must leave as it was."""
    return {str(p.relative_to(directory)): p.read_bytes() if p.is_file() else None for p in directory.rglob("*")}


@pytest.fixture
def no_data(monkeypatch):
    """Fail the test if a command reads any data: its checks must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("data was read before the check")
    monkeypatch.setattr(cli, "build_datasets", refuse)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished (tiny) digits run directory."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert main([*NEW, "--out", str(out), *TINY]) == 0
    return out


def fake_run(directory: Path, config_text: str = None) -> Path:
    """A run directory as far as `_load_run` reads it: cli.json and config.yaml (no weights, no training)."""
    directory.mkdir(parents=True)
    (directory / "cli.json").write_text(json.dumps({"model": "resnet20_cifar", "dataset": "digits"}))
    (directory / "config.yaml").write_text(EncodeNetConfig().to_yaml() if config_text is None else config_text)
    return directory


# ---- #16.3 nothing the user owns is overwritten -----------------------------------------------------------
def test_fit_refuses_a_directory_of_the_users(capsys, tmp_path, no_data):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    (out / "config.yaml").write_text("my: own config\n")  # a name a run writes, but no run.json: not a run
    before = listing(out)
    code, _, err = run(capsys, *NEW, "--out", out)
    assert code == 2 and str(out) in err and "notes.txt" in err and "empty or new directory" in err
    assert listing(out) == before  # no cli.json, no .lock
    code, _, err = run(capsys, "compare", *NEW[1:], "--out", out, "--baseline.epochs", "1")
    assert code == 2 and "notes.txt" in err and listing(out) == before


def test_library_fit_refuses_a_directory_of_the_users(tmp_path):
    (tmp_path / "run.json").write_text("{}")
    (tmp_path / "data.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match=r"not empty and not a run directory.*'data.csv'"):
        RunDir(tmp_path, ["baseline"]).begin({"seed": 0}, {"model": {}}, resume=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.csv", "run.json"]
    # what a run that stopped before it began leaves is ours: a new run may start there
    (tmp_path / "data.csv").unlink()
    for name in ("cli.json", ".config.yaml.123.tmp", "checkpoints"):
        (tmp_path / name).write_text("")
    check_new_dir(tmp_path)


def test_fit_into_an_existing_run_needs_resume(capsys, tiny_run, no_data):
    before = listing(tiny_run)
    code, _, err = run(capsys, *NEW, "--out", tiny_run)
    assert code == 2 and str(tiny_run) in err and "--resume" in err
    assert listing(tiny_run) == before


def test_export_never_overwrites_the_weights_or_a_users_file(capsys, tiny_run, tmp_path):
    code, _, err = run(capsys, "export", tiny_run, "--to", tmp_path / "model.json")  # the sidecar's own name
    assert code == 2 and "model.json" in err and "must not end in .json" in err
    assert not list(tmp_path.iterdir())
    mine = tmp_path / "mine.safetensors"
    mine.write_bytes(b"my weights")
    code, _, err = run(capsys, "export", tiny_run, "--to", mine)
    assert code == 2 and str(mine) in err and "not an earlier 'encodenet export'" in err
    assert mine.read_bytes() == b"my weights" and not (tmp_path / "mine.json").exists()
    sidecar = tmp_path / "w.json"
    sidecar.write_text('{"mine": true}')
    code, _, err = run(capsys, "export", tiny_run, "--to", tmp_path / "w.safetensors")
    assert code == 2 and str(sidecar) in err and sidecar.read_text() == '{"mine": true}'
    assert not (tmp_path / "w.safetensors").exists()
    code, _, err = run(capsys, "export", tiny_run, "--to", tiny_run / "model.safetensors")  # the run's own file
    assert code == 2 and "model.safetensors" in err and not (tiny_run / "model.json").exists()
    code, _, err = run(capsys, "export", tiny_run, "--to", tmp_path)
    assert code == 2 and "is a directory" in err
    # an earlier export is replaced
    target = tmp_path / "new" / "digits"  # no suffix: the sidecar is digits.json
    for _ in range(2):
        code, _, err = run(capsys, "export", tiny_run, "--to", target)
        assert code == 0, err
    assert json.loads(target.with_suffix(".json").read_text())["model"] == "resnet20_cifar"


def test_evaluate_other_weights_keeps_the_runs_own_result(capsys, tiny_run, tmp_path):
    own = (tiny_run / "eval.json").read_bytes()
    other = tmp_path / "a" / "kd-seed0.safetensors"
    other.parent.mkdir()
    shutil.copy(tiny_run / "model.safetensors", other)
    code, out, err = run(capsys, "evaluate", tiny_run, "--weights", other)
    assert code == 0, err
    assert (tiny_run / "eval.json").read_bytes() == own
    result = json.loads((tiny_run / "eval-kd-seed0.json").read_text())
    assert result["weights"] == str(other.resolve()) and result["test"]["images"] == 450
    assert "eval-kd-seed0.json" in out
    same_name = tmp_path / "b" / "kd-seed0.safetensors"  # other weights with the same name: a file of their own
    same_name.parent.mkdir()
    shutil.copy(other, same_name)
    assert run(capsys, "evaluate", tiny_run, "--weights", same_name)[0] == 0
    assert json.loads((tiny_run / "eval-kd-seed0-2.json").read_text())["weights"] == str(same_name.resolve())
    assert (tiny_run / "eval.json").read_bytes() == own
    code, _, err = run(capsys, "evaluate", tiny_run, "--weights", tmp_path / "missing.safetensors")
    assert code == 2 and "missing.safetensors" in err
    for name in ("eval-kd-seed0.json", "eval-kd-seed0-2.json"):
        (tiny_run / name).unlink()


def _hold_lock(directory: Path) -> subprocess.Popen:
    """A process holding `directory`'s lock as `DirLock` takes it (flock, its pid in the file) until it is
    killed; plain Python, so it starts at once."""
    code = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB); os.ftruncate(fd, 0); "
            "os.write(fd, f'process {os.getpid()} on here'.encode()); print('locked', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code, str(directory / LOCK_FILE)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_two_processes_cannot_write_one_run_dir(capsys, tiny_run, monkeypatch, tmp_path):
    unfinished = tmp_path / "unfinished"  # a run that --resume would train on (a finished one is left alone, #25.3)
    shutil.copytree(tiny_run, unfinished)
    record = json.loads((unfinished / "run.json").read_text())
    (unfinished / "run.json").write_text(json.dumps({**record, "status": "interrupted"}))
    holder = _hold_lock(unfinished)
    try:
        record = (unfinished / "run.json").read_bytes()
        with monkeypatch.context() as m:
            m.setattr(cli, "build_datasets", lambda *a, **k: pytest.fail("data read before the lock"))
            code, _, err = run(capsys, "fit", "--out", unfinished, "--resume")
        assert code == 1 and "RunDirInUseError" in err and str(unfinished) in err
        assert f"process {holder.pid} on" in err  # names the holder
        assert (unfinished / "run.json").read_bytes() == record
        with pytest.raises(RunDirInUseError, match=str(holder.pid)):
            RunDir(unfinished, ["baseline"]).begin({}, {}, resume=True)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (unfinished / LOCK_FILE).is_file()  # the killed holder's stale file does not block
    code, _, err = run(capsys, "fit", "--out", unfinished, "--resume")
    assert code == 0, err
    assert json.loads((unfinished / "run.json").read_text())["status"] == "complete"


def test_the_lock_is_reentrant_in_one_process(tmp_path):
    with DirLock(tmp_path):
        with DirLock(tmp_path):  # the CLI holds it around fit, which takes it too
            pass
        assert f"process {os.getpid()}" in (tmp_path / LOCK_FILE).read_text()
        other = os.open(tmp_path / LOCK_FILE, os.O_RDWR)  # a second open file: flock sees another holder
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(other)
    other = os.open(tmp_path / LOCK_FILE, os.O_RDWR)  # released once the outer one is
    try:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(other)


# ---- #16.5 one-line CLI errors -----------------------------------------------------------------------------
def _one_line(err: str) -> bool:
    return len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_out_that_cannot_be_written(capsys, tmp_path, monkeypatch, no_data):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    code, _, err = run(capsys, *NEW, "--out", a_file / "run")
    assert code == 2 and _one_line(err) and f"{a_file} is a file" in err
    read_only = tmp_path / "ro"
    read_only.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != read_only and real_access(p, mode))  # root writes anyway
    code, _, err = run(capsys, *NEW, "--out", read_only / "run")
    assert code == 2 and _one_line(err) and f"cannot write to {read_only}" in err
    assert not list(read_only.iterdir())
    fake_run(read_only / "run")
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != read_only / "run" and real_access(p, mode))
    code, _, err = run(capsys, "fit", "--out", read_only / "run", "--resume")
    assert code == 2 and _one_line(err) and "cannot read the run dir" in err


@pytest.mark.parametrize("where", ["--config", "config.yaml"])
def test_yaml_syntax_errors_name_file_and_line(capsys, tmp_path, where, no_data):
    broken = "seed: 0\ntransfer:\n  lr: [0.1\n  epochs: 2\n"
    if where == "--config":
        path = tmp_path / "run.yaml"
        path.write_text(broken)
        commands = [[*NEW, "--out", tmp_path / "r", "--config", path], ["config", "--dump", "--config", path]]
    else:  # a run's config.yaml, damaged
        path = fake_run(tmp_path / "run", broken) / "config.yaml"
        commands = [["fit", "--out", path.parent, "--resume"], ["evaluate", path.parent],
                    ["export", path.parent, "--to", tmp_path / "w.safetensors"]]
    for argv in commands:
        code, _, err = run(capsys, *argv)
        assert code == 2 and _one_line(err), err
        assert str(path) in err and "not valid YAML at line" in err, err
    assert not (tmp_path / "r").exists() and not (tmp_path / "w.safetensors").exists()
    code, _, err = run(capsys, "config", "--dump", "--set", "transfer.lr=[0.1")  # a flag's value too
    assert code == 2 and _one_line(err) and "'[0.1'" in err


def test_a_damaged_cli_json_is_named(capsys, tmp_path, no_data):
    run_dir = fake_run(tmp_path / "run")
    (run_dir / "cli.json").write_text('{"model": ')
    code, _, err = run(capsys, "evaluate", run_dir)
    assert code == 2 and _one_line(err) and "cli.json is corrupted" in err


@pytest.mark.parametrize("device", ["tpu", "cuda:7", "cpu:x"])
def test_unknown_device(capsys, tmp_path, device, no_data):
    code, _, err = run(capsys, *NEW, "--out", tmp_path / "r", "--device", device)
    assert code == 2 and _one_line(err) and repr(device) in err
    assert not (tmp_path / "r").exists()
    code, _, err = run(capsys, "evaluate", fake_run(tmp_path / "run"), "--device", device)
    assert code == 2 and _one_line(err) and repr(device) in err


def test_bad_model_arg(capsys, tmp_path):
    code, _, err = run(capsys, *NEW, "--out", tmp_path / "r", "--model-arg", "depth")
    assert code == 2 and _one_line(err) and "--model-arg" in err and "'depth'" in err
    code, _, err = run(capsys, *NEW, "--out", tmp_path / "r", "--model-arg", "bogus_width=3", "--per-class", "2",
                       "--val-fraction", "0")
    assert code == 2 and _one_line(err) and "bogus_width" in err and "resnet20_cifar" in err
    assert not (tmp_path / "r").exists()  # refused when the model is built: before anything is written


@pytest.mark.parametrize("value", ["0", "-3", "3.5", "big"])
def test_bad_img_size(capsys, tmp_path, value, no_data):
    code, _, err = run(capsys, *NEW, "--out", tmp_path / "r", "--img-size", value)
    assert code == 2 and "--img-size" in err and value in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_yaml_and_flags_read_numbers_alike(capsys, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("baseline:\n  lr: 1e-3\ntransfer:\n  clip_grad: 5e0\n")
    assert yaml.safe_load(path.read_text())["baseline"]["lr"] == "1e-3"  # what YAML 1.1 alone gives
    from_file = EncodeNetConfig.from_yaml(path)
    assert from_file.baseline.lr == 0.001 and isinstance(from_file.baseline.lr, float)
    assert from_file.transfer.clip_grad == 5.0
    _, dumped, _ = run(capsys, "config", "--dump", "--config", path)
    _, flagged, _ = run(capsys, "config", "--dump", "--baseline.lr", "1e-3", "--transfer.clip_grad", "5e0")
    assert dumped == flagged and EncodeNetConfig.from_yaml(flagged) == from_file
    with pytest.raises(ValueError, match="'baseline.epochs' must be an int"):  # ints stay ints
        EncodeNetConfig.from_yaml("baseline:\n  epochs: 1e1\n")


def test_anything_unexpected_is_one_line(capsys, monkeypatch):
    def broken(args):
        raise RuntimeError("something inside broke")
    monkeypatch.setattr(cli_config, "_cmd_config", broken)  # build_parser binds the command when main calls it
    code, _, err = run(capsys, "config", "--dump")
    assert code == 1 and _one_line(err) and "RuntimeError: something inside broke" in err
    assert "ENCODENET_TRACEBACK=1" in err
    monkeypatch.setenv("ENCODENET_TRACEBACK", "1")
    with pytest.raises(RuntimeError, match="inside broke"):
        main(["config", "--dump"])


def test_no_traceback_end_to_end(tmp_path):
    """The console entry point, in a process of its own: a YAML error is one line on stderr and exit 2."""
    path = tmp_path / "run.yaml"
    path.write_text("transfer: {lr: 0.1\n")
    result = subprocess.run([sys.executable, "-m", "encodenet_timm.cli", "fit", "--model", "resnet20_cifar",
                             "--dataset", "digits", "--out", str(tmp_path / "r"), "--config", str(path)],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 2 and _one_line(result.stderr), result.stderr
    assert str(path) in result.stderr and not (tmp_path / "r").exists()


# ---- #16.2 a failed run can be repaired and continued ---------------------------------------------------
_SMALL = ["--model", "resnet20_cifar", "--dataset", "digits", "--per-class", "10", "--val-fraction", "0",
          "--batch-size", "32", "--device", "cpu", "--set", "progress=false", "--representatives.clusters_per_class",
          "2", "--baseline.epochs", "1", "--autoencoder.epochs", "1", "--transfer.epochs", "1",
          "--finetune.epochs", "1"]


def test_a_failed_run_is_repaired_by_changing_a_stage_that_has_not_begun(capsys, tmp_path):
    out = tmp_path / "run"
    code, _, err = run(capsys, "fit", "--out", out, *_SMALL, "--transfer.lr", "1e30")  # diverges at once
    assert code == 1 and "NonFiniteLossError" in err and "transfer stage" in err
    # the failure says how to go on, and which settings may change
    assert f"encodenet fit --out {out} --resume" in err and "settings of transfer, finetune may change" in err
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "failed" and record["stages"]["transfer"]["status"] == "failed"
    assert f"encodenet fit --out {out} --resume" in record["how_to_continue"]
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # a finished stage cannot change: refused with the reason, nothing written
    code, _, err = run(capsys, "fit", "--out", out, "--resume", "--baseline.lr", "0.2")
    assert code == 2 and "baseline.lr: 0.05 -> 0.2 [baseline is finished]" in err
    assert "here: transfer, finetune" in err
    # a hand-edited config.yaml is found, not believed
    text = (out / "config.yaml").read_text()
    (out / "config.yaml").write_text(text.replace("clusters_per_class: 2", "clusters_per_class: 3"))
    code, _, err = run(capsys, "fit", "--out", out, "--resume", "--transfer.lr", "0.02")
    assert code == 2 and "config.yaml was edited after the run began" in err
    assert "representatives.clusters_per_class: 2 -> 3" in err
    (out / "config.yaml").write_text(text)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # the repair: transfer had not begun, so its lr may change; the change is recorded
    code, _, err = run(capsys, "fit", "--out", out, "--resume", "--transfer.lr", "0.02")
    assert code == 0, err
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "complete" and "how_to_continue" not in record
    assert [c["changes"] for c in record["config_changes"]] == [["transfer.lr: 1e+30 -> 0.02"]]
    assert record["config"]["transfer"]["lr"] == 0.02 and "lr: 0.02" in (out / "config.yaml").read_text()
    # #16.7: the finished run keeps the final weights and the last stage's checkpoint, no optimizer state
    kept = sorted(p.relative_to(out).parts[1] for p in (out / "checkpoints").glob("*/epoch-*"))
    assert kept == ["finetune"] and not list(out.rglob("optimizer.pt"))


# ---- #16.1 the whole config is checked before any training -----------------------------------------------
def test_a_value_set_by_hand_on_wrapper_config_is_checked_before_training(tmp_path):
    wrapper = EncodeNetWrapper(make_model("resnet10t", num_classes=10),
                               EncodeNetConfig.from_dict({"device": "cpu", "progress": False, "baseline": {"epochs": 1}}))
    loader = DataLoader(TensorDataset(torch.randn(20, 3, 32, 32), torch.arange(20) % 10), batch_size=10)
    for key, value, message in [("transfer.lr", -1.0, "transfer.lr.*a finite number > 0"),
                                ("finetune.opt", "sgdd", "finetune.opt"),
                                ("autoencoder.clip_grad", -1.0, "autoencoder.clip_grad")]:
        section, name = key.split(".")
        stage = getattr(wrapper.config, section)
        good = getattr(stage, name)
        setattr(stage, name, value)  # after __init__ validated the config
        with pytest.raises(ValueError, match=message):
            wrapper.fit(loader, run_dir=tmp_path / "run")
        with pytest.raises(ValueError, match=message):  # a stage run alone checks it too
            wrapper.fit_baseline(loader)
        assert wrapper.history == {} and not (tmp_path / "run").exists()  # nothing trained or written
        setattr(stage, name, good)


def test_a_feature_store_that_cannot_be_written_is_refused_when_the_wrapper_is_built(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match=r"representatives.feature_store.*is a file, not a directory"):
        EncodeNetWrapper(make_model("resnet10t", num_classes=10),
                         EncodeNetConfig.from_dict({"device": "cpu", "representatives": {
                             "feature_store": str(blocker / "features")}}))


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
    from encodenet_timm import file_checks
    from encodenet_timm.loaders import readable
    train = _folder(tmp_path)
    _spoil(train)
    dataset = _image_folder(train)
    calls, scan = [], file_checks.scan_files
    monkeypatch.setattr(file_checks, "scan_files", lambda files, mode: calls.append(len(files)) or scan(files, mode))
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
    # rows train in rows.py (baseline and controls, through controls.train_row) and the wrapper (EncodeNet)
    for module, name in (("encodenet_timm.rows", "train_row"), ("encodenet_timm.wrapper", "train_stage")):
        monkeypatch.setattr(importlib.import_module(module), name, lambda *a, **k: pytest.fail("a row trained"))
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
    for key in ("data", "config", "config_sha256"):  # what run.json did not hold then
        del record[key]
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


# ---- #24 the last mistakes: an option that fails late, config changes not used, errors that point the wrong way ---
def _built(**keys) -> EncodeNetWrapper:
    return EncodeNetWrapper(make_model("resnet10t", num_classes=10), _cfg(**keys))


_TWENTY = DataLoader(TensorDataset(torch.randn(20, 3, 32, 32), torch.arange(20) % 10), batch_size=10)


def test_float_labels_are_told_their_dtype(monkeypatch):
    """#24.6"""
    wrapper = _built()
    _forbid_stages(wrapper, monkeypatch)
    loader = DataLoader(TensorDataset(torch.randn(20, 3, 32, 32), (torch.arange(20) % 10).float()), batch_size=10)
    with pytest.raises(ValueError, match=r"labels must be .*integer.*got torch.float32 .*\.long\(\)"):
        wrapper.fit(loader)


def test_uint8_images_get_one_message_on_every_path(monkeypatch):
    """#24.7, #24.16: fit's check, a stage run alone, evaluation, the feature pass, reconstruct."""
    images = torch.randint(0, 255, (20, 3, 32, 32), dtype=torch.uint8)
    loader = DataLoader(TensorDataset(images, torch.arange(20) % 10), batch_size=10)
    said = r"images are torch.uint8.*convert them to float"
    wrapper = _built()
    calls = [lambda: wrapper.fit(loader), lambda: wrapper.fit_baseline(loader), lambda: wrapper.evaluate(loader),
             lambda: wrapper.select_representatives(loader), lambda: wrapper.reconstruct(images[:2])]
    for call in calls:
        with pytest.raises(ValueError, match=said):
            call()
    assert wrapper.history == {}


def test_images_laid_out_channels_last_are_told_to_permute(monkeypatch):
    """#24.17: (B, H, W, C) images are not told to build the model with in_chans=32."""
    wrapper = _built()
    _forbid_stages(wrapper, monkeypatch)
    loader = DataLoader(TensorDataset(torch.randn(20, 32, 32, 3), torch.arange(20) % 10), batch_size=10)
    with pytest.raises(ValueError, match=r"\(B, H, W, C\).*permute\(0, 3, 1, 2\)") as info:
        wrapper.fit(loader)
    assert "in_chans=32" not in str(info.value)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_a_model_in_another_dtype_is_told_its_dtype(dtype):
    """#24.8: not "Set config.input_size"."""
    with pytest.raises(ValueError, match=rf"parameters are {dtype}.*model.float\(\)") as info:
        EncodeNetWrapper(make_model("resnet10t").to(dtype), _cfg())
    assert "input_size" not in str(info.value)


def test_a_compiled_model_is_told_to_pass_the_uncompiled_one():
    """#24.9"""
    with pytest.raises(TypeError, match=r"torch.compile.*uncompiled model.*config.compile"):
        EncodeNetWrapper(torch.compile(make_model("resnet10t")), _cfg())


def test_a_model_on_the_meta_device_is_told_to_materialise_it():
    """#24.10"""
    import timm
    with torch.device("meta"):
        model = timm.create_model("resnet10t", num_classes=10)
    with pytest.raises(ValueError, match=r"meta device.*to_empty"):
        EncodeNetWrapper(model, _cfg())


def test_a_vit_built_for_another_size_is_told_the_model_arg(capsys, tmp_path):
    """#24.11: --img-size 32 without --model-arg img_size=32: exit 2, the flag that fixes it."""
    out = tmp_path / "r"
    code, _, err = run(capsys, "fit", "--model", "vit_tiny_patch16_224", "--dataset", "digits", "--device", "cpu",
                       "--out", out, "--per-class", "2", "--val-fraction", "0", "--img-size", "32")
    assert code == 2 and _one_line(err) and "--model-arg img_size=32" in err and "224x224" in err
    assert not (out / "run.json").exists()


def test_a_negative_seed_is_refused_naming_the_key(capsys, tmp_path, no_data):
    """#24.4"""
    with pytest.raises(ValueError, match="config key 'seed' must be an int in"):
        EncodeNetConfig(seed=-1)
    wrapper = _built()
    wrapper.config.seed = -1
    with pytest.raises(ValueError, match="config key 'seed'"):
        wrapper.fit(_TWENTY)
    assert wrapper.history == {}
    code, _, err = run(capsys, *NEW, "--out", tmp_path / "r", "--seed", "-1")
    assert code == 2 and _one_line(err) and "'seed'" in err and "-1" in err


def test_num_classes_as_a_model_arg_is_told_it_comes_from_the_data(capsys, tmp_path, no_data):
    """#24.12"""
    code, _, err = run(capsys, *NEW, "--out", tmp_path / "r", "--model-arg", "num_classes=5")
    assert code == 2 and _one_line(err) and "number of classes comes from the data" in err
    assert "does not take it" not in err and not (tmp_path / "r").exists()


_COMPARE_RANDOM = ["compare", "--model", "resnet20_cifar", "--dataset", "digits", "--device", "cpu", "--per-class",
                   "10", "--val-fraction", "0.3", "--batch-size", "50", "--progress", "false", "--seeds", "0",
                   "--controls", "continued", "--baseline.epochs", "0", "--representatives.clusters_per_class", "1",
                   "--autoencoder.epochs", "1", "--transfer.epochs", "1", "--finetune.epochs", "0"]


def test_compare_from_a_random_baseline_is_refused_unless_allowed(capsys, tmp_path, monkeypatch, caplog):
    """#24.15: `compare` with baseline.epochs = 0 and a random-init model put every row at chance and gave a
    verdict without a word. The CLI refuses it before reading any data (exit 2, one line that says why and
    how to go on); --allow-untrained-baseline lets it run, and compare then warns that the baseline it
    compares from is at chance. (The library's own refusal: test_compare.py's
    test_an_untrained_baseline_is_refused_before_any_other_row.)"""
    real = cli.build_datasets
    monkeypatch.setattr(cli, "build_datasets", lambda *a, **k: pytest.fail("data was read before the check"))
    code, _, err = run(capsys, *_COMPARE_RANDOM, "--out", tmp_path / "refused")
    assert code == 2 and _one_line(err) and "Traceback" not in err
    assert "random weights" in err and "--baseline.epochs N" in err and "--allow-untrained-baseline" in err
    assert not (tmp_path / "refused").exists()
    monkeypatch.setattr(cli, "build_datasets", real)
    torch.set_num_threads(1)
    with caplog.at_level(logging.WARNING, logger="encodenet_timm.compare"):
        code, out, err = run(capsys, *_COMPARE_RANDOM, "--out", tmp_path / "allowed", "--allow-untrained-baseline")
    assert code == 0, err
    assert "within 5 points of chance" in caplog.text and "compared anyway" in caplog.text
    assert "EncodeNet (the default recipe)" in out  # the verdict, with the warning above it
    saved = json.loads((tmp_path / "allowed" / "compare.json").read_text())
    assert saved["run"]["allow_untrained_baseline"] is True and saved["config"]["baseline"]["epochs"] == 0


@pytest.mark.parametrize("key, value, said", [
    ("split", "layer99", "split: 'last_stage' -> 'layer99'"),  # #24.2: not a stage of the model
    ("split", "features", "split: 'last_stage' -> 'features'"),  # #24.3: valid, but the wrapper was built for another
    ("input_size", (3, 16, 16), "input_size: None -> (3, 16, 16)"),
    ("channels_last", True, "channels_last: False -> True"),
    ("device", "meta", "device: 'cpu' -> 'meta'"),
    ("decoder.width", 0.5, "decoder.width: 1.0 -> 0.5"),
])
def test_a_key_the_wrapper_was_built_with_changed_by_hand_is_refused_before_anything_runs(key, value, said, tmp_path,
                                                                                          monkeypatch):
    """#24.2, #24.3: a change to a key __init__ consumed would be recorded but not used: refused, nothing written."""
    wrapper = _built()
    _ = wrapper.decoder  # built already (as flops() or reconstruct build it): its settings are fixed too
    section, _, name = key.rpartition(".")
    setattr(getattr(wrapper.config, section) if section else wrapper.config, name, value)
    calls = {"fit": lambda: wrapper.fit(_TWENTY, run_dir=tmp_path / "run"),
             "a stage alone": lambda: wrapper.fit_baseline(_TWENTY)}
    for what, call in calls.items():
        with pytest.raises(ValueError, match=re.escape(said) + ".*EncodeNetWrapper\\(model, config\\)"):
            call()
    assert wrapper.history == {} and not (tmp_path / "run").exists()


def test_a_run_records_the_split_it_ran_with(tmp_path):
    """#24.3: what config.yaml and run.json say is what ran."""
    wrapper = EncodeNetWrapper(make_model("resnet10t", num_classes=10), _cfg(split="features"))
    assert wrapper.after_split == []
    wrapper.fit(_TWENTY, run_dir=tmp_path / "run")
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["split"] == "features"
    assert json.loads((tmp_path / "run" / "run.json").read_text())["config"]["split"] == "features"


def test_an_input_size_the_data_contradicts_is_refused_before_training(monkeypatch):
    """#24.5: config.input_size=(3, 32, 32), the data 64x64."""
    wrapper = _built(input_size=(3, 32, 32))
    _forbid_stages(wrapper, monkeypatch)
    loader = DataLoader(TensorDataset(torch.randn(20, 3, 64, 64), torch.arange(20) % 10), batch_size=10)
    with pytest.raises(ValueError, match=re.escape("config.input_size is (3, 32, 32) but the images are "
                                                   "(3, 64, 64)") + ".*input_size=None"):
        wrapper.fit(loader)


def test_a_plain_loader_of_another_length_is_refused_before_training(monkeypatch):
    """#24.18"""
    wrapper = _built()
    _forbid_stages(wrapper, monkeypatch)
    plain = DataLoader(TensorDataset(torch.randn(10, 3, 32, 32), torch.arange(10) % 10), batch_size=10)
    with pytest.raises(ValueError, match=r"plain_loader's dataset has 10 images but train_loader's has 20"):
        wrapper.fit(_TWENTY, plain_loader=plain)


def test_fit_transfer_on_a_fresh_wrapper_warns(caplog):
    """#24.14"""
    wrapper = _built(**{"transfer.epochs": 1})
    with caplog.at_level(logging.WARNING, logger="encodenet_timm.wrapper"):
        wrapper.fit_transfer(_TWENTY)
    assert "no autoencoder" in caplog.text and "fit()" in caplog.text


def test_reconstruct_before_the_autoencoder_is_trained_is_refused():
    """#24.19"""
    with pytest.raises(ValueError, match=r"reconstruct needs the trained autoencoder.*fit_autoencoder"):
        _built().reconstruct(torch.randn(2, 3, 32, 32))


_IMAGES = ["--img-size", "16", "--batch-size", "4", "--val-fraction", "0", "--device", "cpu", "--progress", "false",
           "--baseline.epochs", "1", "--representatives.clusters_per_class", "1", "--autoencoder.epochs", "1",
           "--transfer.epochs", "1", "--finetune.epochs", "0"]


def test_the_files_skip_unreadable_leaves_out_are_left_out_of_every_later_step(capsys, tmp_path):
    """#24.1: the pictures, the evaluation and a resume see the training set fit trained on."""
    make_image_folder(tmp_path / "data", {"train": 4, "test": 1}, size=16)
    bad = tmp_path / "data" / "train" / "digit1" / "002.png"
    bad.write_bytes(bad.read_bytes()[:200])  # one truncated PNG among good ones
    out = tmp_path / "run"
    new = ["fit", "--model", "resnet10t", "--dataset", "imagefolder", "--data-dir", tmp_path / "data", "--out", out,
           "--data.skip_unreadable", "true", *_IMAGES]
    for argv in (new, ["fit", "--out", out, "--resume"]):
        code, _, err = run(capsys, *argv)
        assert code == 0, err
        assert all((out / name).is_file() for name in ("representatives.png", "reconstructions.png", "curves.png"))
        assert json.loads((out / "eval.json").read_text())["test"]["images"] == 3
        record = json.loads((out / "run.json").read_text())
        assert record["status"] == "complete" and record["data"]["skipped"] == {"train": 1, "val": 0}
        assert record["data"]["size"] == 11


def test_a_truncated_checkpoint_says_which_folder_to_delete_and_the_run_goes_on(digits, tmp_path):
    """#24.13: the newest checkpoint is damaged: the message names the file and the folder to delete, and after
    deleting it the resume continues from the checkpoint before it."""
    train, _ = digits
    loader = DataLoader(Subset(train, range(30)), batch_size=10)
    out = tmp_path / "run"
    with pytest.raises(Exception, match="transfer stage: loss became"):  # fails in transfer: 4 stages checkpointed
        EncodeNetWrapper(make_model("resnet10t"), _cfg(**{"transfer.lr": 1e30})).fit(loader, run_dir=out)
    newest = next((out / "checkpoints" / "autoencoder").glob("epoch-*"))
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    before = next((out / "checkpoints" / "representatives").glob("epoch-*"))
    with pytest.raises(ValueError) as info:
        EncodeNetWrapper(make_model("resnet10t"), _cfg()).fit(loader, run_dir=out, resume=True)
    message = str(info.value)
    assert str(weights) in message and "corrupted or truncated" in message and "\n" not in message
    assert f"delete {newest} and resume again" in message and f"continues from {before}" in message
    shutil.rmtree(newest)
    EncodeNetWrapper(make_model("resnet10t"), _cfg()).fit(loader, run_dir=out, resume=True)
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
