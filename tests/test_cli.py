import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Tuple

import numpy as np
import pytest
import timm
import torch
import yaml
from matplotlib.image import imread
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from encodenet_timm import EncodeNetConfig, EncodeNetWrapper
from encodenet_timm.cli import main
from encodenet_timm.config import ControlsConfig
from encodenet_timm.data import build_datasets
from test_data_imagefolder import make_image_folder

# tiny training: one epoch per EncodeNet stage, 2 clusters per class, CPU
TINY = ["--batch-size", "32", "--device", "cpu", "--set", "progress=false", "--representatives.clusters_per_class",
        "2", "--autoencoder.epochs", "1", "--transfer.epochs", "1"]
PICTURES = ("representatives.png", "reconstructions.png", "curves.png")


def run(capsys, *argv):
    """(exit code, stdout, stderr) of ``encodenet *argv`` run in-process."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A finished digits run: resnet20_cifar, 3 baseline epochs (adamw) on 60 images per class."""
    out = tmp_path_factory.mktemp("runs") / "digits"
    code = main(["fit", "--model", "resnet20_cifar", "--dataset", "digits", "--out", str(out), "--per-class", "60",
                 "--baseline.epochs", "3", "--baseline.opt", "adamw", "--baseline.lr", "3e-3",
                 "--set", "transfer.lr=0.02", *TINY])
    assert code == 0
    return out


# ---- help and config ------------------------------------------------------------------------------------
def test_help(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    assert all(word in out for word in ("fit", "evaluate", "export", "config", "example"))
    for command in ("fit", "evaluate", "export", "config"):
        code, out, _ = run(capsys, command, "--help")
        assert code == 0 and "example" in out, command
    _, out, _ = run(capsys, "fit", "--help")
    for option in ("--model", "--dataset", "--data-dir", "--out", "--resume", "--val-fraction", "--batch-size",
                   "--workers", "--img-size", "--no-download", "--set", "--transfer.lr", "--device"):
        assert option in out, option


def test_help_says_what_every_config_key_does(capsys):
    """Issue #25.3: each config key's help is its meaning and allowed values (the comment beside its field in
    config.py), its type and its default, not "default: X" alone."""
    from encodenet_timm.config import describe_keys
    for command in ("fit", "compare", "config"):
        code, out, _ = run(capsys, command, "--help")
        flat = "".join(out.split())  # argparse wraps lines (and breaks words at hyphens)
        for key, words in describe_keys().items():
            assert not words.startswith("("), f"{key} has no comment in config.py"
            assert "".join(f"--{key.replace('_', '-')} V {words}".split()) in flat, (command, key)
    _, out, _ = run(capsys, "compare", "--help")
    flat = "".join(out.split())
    for key, words in describe_keys(ControlsConfig()).items():  # compare's --controls.KEY: the same
        assert not words.startswith("("), f"ControlsConfig.{key} has no comment in config.py"
        assert "".join(f"--controls.{key.replace('_', '-')} V {words}".split()) in flat, key
    assert describe_keys()["transfer.lr"] == "peak learning rate (a number; default 0.01)"


def test_options_take_dashes_and_underscores_and_help_shows_dashes(capsys):
    """Issue #25.3: ``--batch-size`` sat beside ``--channels_last``; now every option takes both spellings,
    config keys included (``--transfer.warmup-epochs``, ``--set transfer.warmup-epochs=2``)."""
    from encodenet_timm.cli import build_parser
    parser = build_parser()
    dashes = parser.parse_args(["fit", "--out", "r", "--batch-size", "8", "--channels-last", "true",
                                "--transfer.warmup-epochs", "2", "--model-arg", "in_chans=1", "--val-fraction=0.2"])
    underscores = parser.parse_args(["fit", "--out", "r", "--batch_size", "8", "--channels_last", "true",
                                     "--transfer.warmup_epochs", "2", "--model_arg", "in_chans=1",
                                     "--val_fraction=0.2"])
    assert vars(dashes) == vars(underscores)
    assert (dashes.batch_size, dashes.val_fraction, dashes.model_arg) == (8, 0.2, ["in_chans=1"])  # values as given
    for spelling in (["--transfer.warmup_epochs", "2"], ["--transfer.warmup-epochs", "2"],
                     ["--set", "transfer.warmup_epochs=2"], ["--set", "transfer.warmup-epochs=2"]):
        code, out, _ = run(capsys, "config", "--dump", *spelling)
        assert code == 0 and EncodeNetConfig.from_yaml(out).transfer.warmup_epochs == 2, spelling
    compare_dashes = parser.parse_args(["compare", "--out", "c", "--controls.warmup-epochs", "2", "--trials", "2",
                                        "--checkpoint-every", "5", "--allow-untrained-baseline",
                                        "--controls-config", "c.yaml", "--controls.kd-student-bn", "train"])
    compare_underscores = parser.parse_args(["compare", "--out", "c", "--controls.warmup_epochs", "2", "--trials", "2",
                                             "--checkpoint_every", "5", "--allow_untrained_baseline",
                                             "--controls_config", "c.yaml", "--controls.kd_student_bn", "train"])
    assert vars(compare_dashes) == vars(compare_underscores)
    assert vars(compare_dashes)["ctl:warmup_epochs"] == "2" and compare_dashes.allow_untrained_baseline
    for command in ("fit", "compare", "evaluate", "export", "config"):
        _, out, _ = run(capsys, command, "--help")
        flags = set(re.findall(r"(?<![\w-])--[a-z][\w.-]*", out))
        assert flags and not [f for f in flags if "_" in f], command  # one spelling shown: dashes
    _, out, _ = run(capsys, "export", "--help")
    assert "--format timm" in out.split("\n\n")[0]  # the usage line names --format (#25.3)


def test_console_script_help():
    script = Path(sys.executable).parent / "encodenet"
    if not script.exists():
        pytest.skip("the console script is not installed (pip install -e .)")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "encodenet fit" in result.stdout


def test_config_dump_round_trips(capsys):
    code, out, _ = run(capsys, "config", "--dump")
    assert code == 0
    assert EncodeNetConfig.from_yaml(out) == EncodeNetConfig()
    assert out == EncodeNetConfig().to_yaml()


def test_config_dump_merges_file_and_flags(capsys, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("transfer:\n  lr: 0.2\n  epochs: 4\nseed: 3\n")
    code, out, _ = run(capsys, "config", "--dump", "--config", path, "--transfer.epochs", "7",
                       "--set", "autoencoder.lr=1e-4", "-o", "representatives.clusters_per_class=auto",
                       "--input_size", "[1, 28, 28]")
    assert code == 0
    config = EncodeNetConfig.from_yaml(out)
    assert config.seed == 3 and config.transfer.lr == 0.2 and config.transfer.epochs == 7
    assert config.autoencoder.lr == 1e-4 and config.representatives.clusters_per_class == "auto"
    assert config.input_size == (1, 28, 28)


@pytest.mark.parametrize("item, message", [("transfer.lrr=0.1", "transfer.lrr"),
                                           ("nope.lr=0.1", "nope.lr"),
                                           ("transfer.lr=fast", "transfer.lr"),
                                           ("transfer.lr", "KEY=VALUE")])
def test_bad_override_exits_2(capsys, tmp_path, item, message):
    for argv in (["config", "--dump", "--set", item],
                 ["fit", "--model", "resnet20_cifar", "--dataset", "digits", "--out", tmp_path / "r", "--set", item]):
        code, out, err = run(capsys, *argv)
        assert code == 2 and message in err and "Traceback" not in err
        assert not (tmp_path / "r").exists()


def test_clear_errors(capsys, tmp_path):
    code, _, err = run(capsys, "fit", "--model", "resnet20cifar", "--dataset", "digits", "--out", tmp_path / "r")
    assert code == 2 and "did you mean resnet20_cifar" in err
    code, _, err = run(capsys, "fit", "--model", "resnet20_cifar", "--dataset", "imagefolder",
                       "--data-dir", tmp_path / "missing", "--out", tmp_path / "r")
    assert code == 2 and "missing does not exist" in err
    code, _, err = run(capsys, "fit", "--dataset", "digits", "--out", tmp_path / "r")
    assert code == 2 and "--model" in err
    code, _, err = run(capsys, "evaluate", tmp_path)
    assert code == 2 and "cli.json" in err
    code, _, err = run(capsys, "fit", "--out", tmp_path, "--resume")
    assert code == 2 and "not a run directory" in err
    code, _, err = run(capsys, "fit", "--model", "resnet20_cifar")  # argparse: --out is required
    assert code == 2 and "--out" in err


# ---- a run directory ------------------------------------------------------------------------------------
def test_fit_writes_the_run_dir(digits_run):
    for name in ("cli.json", "config.yaml", "model.safetensors", "eval.json", *PICTURES):
        assert (digits_run / name).is_file(), name
    spec = json.loads((digits_run / "cli.json").read_text())
    assert spec["model"] == "resnet20_cifar" and spec["dataset"] == "digits" and spec["num_classes"] == 10
    assert spec["per_class"] == 60 and spec["val_fraction"] == 0.1 and spec["batch_size"] == 32
    config = yaml.safe_load((digits_run / "config.yaml").read_text())
    assert config["transfer"]["lr"] == 0.02 and config["baseline"]["opt"] == "adamw"
    assert config["input_size"] == [3, 32, 32] and config["representatives"]["clusters_per_class"] == 2
    test = json.loads((digits_run / "eval.json").read_text())["test"]
    assert test["images"] == 450 and test["accuracy"] > 0.3  # 10 classes: chance is 0.1
    for name in PICTURES:
        assert imread(digits_run / name).shape[0] > 50
    umask = os.umask(0)
    os.umask(umask)
    modes = {str(p.relative_to(digits_run)): stat.S_IMODE(p.stat().st_mode) for p in digits_run.rglob("*")
             if p.is_file()}
    assert modes and set(modes.values()) == {0o666 & ~umask}, modes  # weights too (#25.3: they were 0600)


def test_evaluate(digits_run, capsys):
    code, out, _ = run(capsys, "evaluate", digits_run, "--split", "val", "--batch-size", "100")
    assert code == 0 and "val accuracy" in out
    results = json.loads((digits_run / "eval.json").read_text())
    assert results["val"]["images"] == 60 and 0.0 <= results["val"]["accuracy"] <= 1.0
    before = results["test"]
    code, out, _ = run(capsys, "evaluate", digits_run)
    assert code == 0 and f"{before['accuracy']:.4f}" in out
    assert json.loads((digits_run / "eval.json").read_text())["test"]["accuracy"] == pytest.approx(before["accuracy"])


def test_export_loads_into_plain_timm(digits_run, capsys, tmp_path):
    target = tmp_path / "exported" / "digits.safetensors"
    code, out, _ = run(capsys, "export", digits_run, "--to", target)
    assert code == 0 and target.is_file()
    sidecar = json.loads(target.with_suffix(".json").read_text())
    assert sidecar["model"] == "resnet20_cifar" and sidecar["create_kwargs"] == {"num_classes": 10}
    snippet = out.split("To load it:\n", 1)[1]
    scope = {}
    exec(snippet, scope)  # the printed snippet runs as printed
    plain = scope["model"].eval()
    assert type(plain).__name__ == "CifarResNet"

    config = EncodeNetConfig.from_yaml(digits_run / "config.yaml")
    wrapper = EncodeNetWrapper(timm.create_model("resnet20_cifar", num_classes=10), config)
    wrapper.load_weights(digits_run / "model.safetensors")
    test = build_datasets("digits", val_fraction=0.1, per_class=60, seed=config.seed).test
    x, y = next(iter(DataLoader(test, batch_size=64)))
    wrapper.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), wrapper(x))
    assert set(load_file(str(target))) == set(plain.state_dict())


def test_rerun_and_resume_rules(digits_run, capsys, tmp_path):
    code, _, err = run(capsys, "fit", "--model", "resnet20_cifar", "--dataset", "digits", "--out", digits_run)
    assert code == 2 and "--resume" in err
    code, _, err = run(capsys, "fit", "--out", digits_run, "--resume", "--model", "resnet18", "--batch-size", "8")
    assert code == 2 and "--model" in err and "--batch-size" in err
    code, _, err = run(capsys, "fit", "--out", digits_run, "--resume", "--set", "transfer.lr=0.5")
    assert code == 2 and "transfer.lr" in err


def test_resume_of_a_finished_run_says_so_and_touches_nothing(digits_run, capsys, tmp_path):
    """Issue #25.3: ``fit --resume`` on a complete run re-ran the last epoch's bookkeeping and evaluated
    again; now it says "already complete" and exits 0, every file as it was."""
    copy = tmp_path / "copy"
    shutil.copytree(digits_run, copy)

    def files():
        return {str(p.relative_to(copy)): (p.stat().st_mtime_ns, p.read_bytes()) for p in copy.rglob("*")
                if p.is_file()}
    before = files()
    code, out, err = run(capsys, "fit", "--out", copy, "--resume", "--device", "cpu", "--checkpoint-every", "5")
    assert code == 0 and "already complete" in out and "encodenet evaluate" in out, err
    assert files() == before
    code, _, err = run(capsys, "fit", "--out", copy, "--resume", "--transfer.lr", "0.5")
    assert code == 2 and "complete" in err and "transfer.lr" in err
    assert files() == before


def test_fit_on_an_image_folder(capsys, tmp_path):
    root = make_image_folder(tmp_path / "data", {"train": 16, "val": 4})
    out = tmp_path / "run"
    code, printed, err = run(capsys, "fit", "--model", "resnet20_cifar", "--dataset", "imagefolder",
                             "--data-dir", root, "--out", out, "--val-fraction", "0", "--img-size", "32",
                             "--baseline.epochs", "1", *TINY)
    assert code == 0, err
    spec = json.loads((out / "cli.json").read_text())
    assert spec["num_classes"] == 3 and spec["classes"] == ["digit0", "digit1", "digit2"]
    assert len(spec["mean"]) == 3 and spec["data_dir"] == str(root.resolve())
    assert json.loads((out / "eval.json").read_text())["test"]["images"] == 12  # val/ is the test split here
    assert all((out / name).is_file() for name in PICTURES)
    code, _, err = run(capsys, "evaluate", out, "--split", "val")
    assert code == 2 and "--val-fraction 0" in err


# a small seeded fit: 108 training digits, 4 steps an epoch
SEEDED = ["--model", "resnet20_cifar", "--dataset", "digits", "--per-class", "12", "--batch-size", "32",
          "--progress", "false", "--baseline.epochs", "1", "--autoencoder.epochs", "1", "--transfer.epochs", "1",
          "--finetune.epochs", "0", "--representatives.clusters_per_class", "2", "--seed", "3"]


@pytest.fixture(scope="module")
def seeded_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("seeded") / "run"
    assert main(["fit", "--out", str(out), *SEEDED]) == 0
    return load_file(str(out / "model.safetensors"))


def _same(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_and_sigint_stop_with_143_and_130_and_resume_to_the_same_weights(seeded_run, capsys, tmp_path,
                                                                                 monkeypatch, request):
    """A signal in the middle of an epoch: the step finishes, a checkpoint is written, the run is marked
    interrupted, the resume command printed, and the exit status is 128 + the signal. A torchrun restart
    of the same command continues the run; the result is the uninterrupted one, bit for bit."""
    import os
    import signal
    original = signal.getsignal(signal.SIGINT)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, original))
    # as in a terminal: in a background job SIGINT is SIG_IGN, and a run started there leaves it ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    before_int = signal.getsignal(signal.SIGINT)
    from timm.task import ClassificationTask

    from encodenet_timm.run_dir import RunDir
    from encodenet_timm.wrapper import RUN_STAGES

    out = tmp_path / "run"
    forward, calls = ClassificationTask.forward, [0]

    def signalled(signum, at):
        def forward_then_signal(self, *args):  # baseline, transfer (and finetune) training steps
            calls[0] += torch.is_grad_enabled()
            if calls[0] == at:
                os.kill(os.getpid(), signum)
            return forward(self, *args)
        calls[0] = 0
        monkeypatch.setattr(ClassificationTask, "forward", forward_then_signal)

    signalled(signal.SIGTERM, 2)  # in step 2 of the baseline's 4
    code, _, err = run(capsys, "fit", "--out", out, "--checkpoint-every", "3", *SEEDED)
    again = f"encodenet fit --out {out} --resume"
    assert code == 143 and "stopped by SIGTERM in baseline after step 2 of epoch 1" in err and again in err
    record = json.loads((out / "run.json").read_text())
    assert (record["status"], record["resume"], record["stages"]["baseline"]["status"]) == (
        "interrupted", again, "interrupted")
    latest = RunDir(out, RUN_STAGES).latest()
    assert (latest.stage, latest.epoch, latest.step) == ("baseline", 0, 2)
    assert json.loads((out / "cli.json").read_text())["checkpoint_every"] == 3
    signalled(signal.SIGINT, 3)  # the resumed baseline's steps 3 and 4, then step 1 of the transfer
    code, _, err = run(capsys, "fit", "--out", out, "--resume")
    assert code == 130 and "stopped by SIGINT in transfer after step 1 of epoch 1" in err and again in err
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    assert signal.getsignal(signal.SIGINT) is before_int  # fit put its handlers back
    monkeypatch.setattr(ClassificationTask, "forward", forward)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # torchrun --max-restarts reruns the first command
    code, _, err = run(capsys, "fit", "--out", out, "--checkpoint-every", "3", *SEEDED)
    assert code == 0, err
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "complete" and len(record["resumed"]) == 2 and "resume" not in record
    _same(load_file(str(out / "model.safetensors")), seeded_run)


def test_two_fits_with_the_same_seed_give_the_same_weights(seeded_run, tmp_path, capsys):
    """The model's random init is seeded too (issue #16.6): the CLI repeats itself as the API does."""
    assert main(["fit", "--out", str(tmp_path / "b"), *SEEDED]) == 0
    capsys.readouterr()
    _same(load_file(str(tmp_path / "b" / "model.safetensors")), seeded_run)


def test_the_run_dir_has_a_summary_csv_of_every_epoch(digits_run):
    """Issue #13.4: summary.csv, one row per epoch of every stage, the same numbers as run.json."""
    import csv
    stages = json.loads((digits_run / "run.json").read_text())["stages"]
    history = {stage: rec["history"] for stage, rec in stages.items() if isinstance(rec.get("history"), list)}
    with open(digits_run / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    expected = [(stage, r) for stage, records in history.items() if isinstance(records, list) for r in records]
    assert len(rows) == len(expected) and len(rows) >= 3
    assert [(r["stage"], int(r["epoch"])) for r in rows] == [(s, r["epoch"] + 1) for s, r in expected]
    assert [int(r["epoch"]) for r in rows if r["stage"] == "baseline"] == [1, 2, 3]  # as the log counts (#25.3)
    assert all(float(r["loss"]) == pytest.approx(e["loss"]) for r, (_, e) in zip(rows, expected))


def test_export_format_timm_round_trips_through_local_dir(digits_run, tmp_path, capsys):
    """Issue #13.5: ``encodenet export --format timm`` writes timm's folder; timm loads it bit for bit."""
    import timm
    from safetensors.torch import load_file
    code, out, _ = run(capsys, "export", digits_run, "--to", tmp_path / "exp", "--format", "timm")
    assert code == 0 and "local-dir:" in out
    config = json.loads((tmp_path / "exp" / "config.json").read_text())
    assert config["architecture"] == "resnet20_cifar" and len(config["label_names"]) == config["num_classes"] == 10
    model = timm.create_model(f"local-dir:{tmp_path / 'exp'}", pretrained=True)  # the zoo: registered on import
    saved = load_file(str(digits_run / "model.safetensors"))
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


def _timm_accuracies(model: torch.nn.Module, transform, images: np.ndarray, labels: np.ndarray) -> Tuple[float, float]:
    """Top-1 accuracy of `model` on grey images (N, H, W) in [0, 1] put through `transform` as float tensors
    (C, H, W) and as 8-bit PIL images: (tensors, PIL)."""
    from PIL import Image
    tensors = [torch.from_numpy(im)[None].expand(3, -1, -1) for im in images]  # (3, H, W) each
    pictures = [Image.fromarray(np.round(255 * im).astype(np.uint8)).convert("RGB") for im in images]
    with torch.no_grad():
        return tuple(float((model.eval()(torch.stack([transform(im) for im in inputs])).argmax(1).numpy()
                            == labels).mean()) for inputs in (tensors, pictures))


def test_both_exports_carry_the_runs_preprocessing_to_timm_alone(digits_run, tmp_path, capsys):
    """Issue #25.1: the run records the mean/std, input size, interpolation and crop its images went through,
    and both exports carry them: timm alone, with its own eval transform built from the export
    (`resolve_model_data_config` + `create_transform`), scores the package's test accuracy on the raw digits
    (given as float tensors: exactly; as 8-bit images, rounded: within a point). Before #25 it scored 11%."""
    from encodenet_timm.data.digits import digits_images
    spec = json.loads((digits_run / "cli.json").read_text())
    assert len(spec["mean"]) == len(spec["std"]) == 3 and spec["input_size"] == [3, 32, 32]
    assert (spec["interpolation"], spec["crop_pct"], spec["crop_mode"]) == ("bilinear", 1.0, "center")
    expected = json.loads((digits_run / "eval.json").read_text())["test"]["accuracy"]
    _, (images, labels) = digits_images(seed=0)  # the run's 450 test digits, 8x8, as scikit-learn has them

    code, out, _ = run(capsys, "export", digits_run, "--to", tmp_path / "folder", "--format", "timm")
    assert code == 0
    model = timm.create_model(f"local-dir:{tmp_path / 'folder'}", pretrained=True)
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    exact, rounded = _timm_accuracies(model, transform, images, labels)
    assert exact == pytest.approx(expected) and rounded == pytest.approx(expected, abs=0.01)

    code, out, _ = run(capsys, "export", digits_run, "--to", tmp_path / "digits.safetensors")
    assert code == 0
    keys = ("mean", "std", "input_size", "interpolation", "crop_pct", "crop_mode")
    assert {k: json.loads((tmp_path / "digits.json").read_text())[k] for k in keys} == {k: spec[k] for k in keys}
    scope = {}
    exec(out.split("To load it:\n", 1)[1], scope)  # the printed lines: model and transform
    exact, rounded = _timm_accuracies(scope["model"], scope["transform"], images, labels)
    assert exact == pytest.approx(expected) and rounded == pytest.approx(expected, abs=0.01)
