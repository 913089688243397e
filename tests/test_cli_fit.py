"""``encodenet fit``: the run directory, its resume rules, signals and seeds (`encodenet_timm.cli.fit`)."""
import json
import os
import shutil
import stat

import pytest
import torch
import yaml
from matplotlib.image import imread
from safetensors.torch import load_file

from encodenet_timm.cli import main
from test_data_imagefolder import make_image_folder

from conftest import PICTURES, TINY, run


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

