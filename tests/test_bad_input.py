"""Bad input, faults and misuse (issue #16): each case names its culprit, comes before compute where it
can, and leaves the user's files as they were."""
import json

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from encodenet_timm import EncodeNetConfig, EncodeNetWrapper
from encodenet_timm.cli import main

from conftest import make_model


def _run(capsys, *argv):
    """(exit code, stdout, stderr) of ``encodenet *argv`` run in-process."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---- #16.2 a failed run can be repaired and continued ---------------------------------------------------
_SMALL = ["--model", "resnet20_cifar", "--dataset", "digits", "--per-class", "10", "--val-fraction", "0",
          "--batch-size", "32", "--device", "cpu", "--set", "progress=false", "--representatives.clusters_per_class",
          "2", "--baseline.epochs", "1", "--autoencoder.epochs", "1", "--transfer.epochs", "1",
          "--finetune.epochs", "1"]


def test_a_failed_run_is_repaired_by_changing_a_stage_that_has_not_begun(capsys, tmp_path):
    out = tmp_path / "run"
    code, _, err = _run(capsys, "fit", "--out", out, *_SMALL, "--transfer.lr", "1e30")  # diverges at once
    assert code == 1 and "NonFiniteLossError" in err and "transfer stage" in err
    # the failure says how to go on, and which settings may change
    assert f"encodenet fit --out {out} --resume" in err and "settings of transfer, finetune may change" in err
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "failed" and record["stages"]["transfer"]["status"] == "failed"
    assert "resume=True" in record["how_to_continue"]
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # a finished stage cannot change: refused with the reason, nothing written
    code, _, err = _run(capsys, "fit", "--out", out, "--resume", "--baseline.lr", "0.2")
    assert code == 2 and "baseline.lr: 0.05 -> 0.2 [baseline is finished]" in err
    assert "here: transfer, finetune" in err
    # a hand-edited config.yaml is found, not believed
    text = (out / "config.yaml").read_text()
    (out / "config.yaml").write_text(text.replace("clusters_per_class: 2", "clusters_per_class: 3"))
    code, _, err = _run(capsys, "fit", "--out", out, "--resume", "--transfer.lr", "0.02")
    assert code == 2 and "config.yaml was edited after the run began" in err
    assert "representatives.clusters_per_class: 2 -> 3" in err
    (out / "config.yaml").write_text(text)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # the repair: transfer had not begun, so its lr may change; the change is recorded
    code, _, err = _run(capsys, "fit", "--out", out, "--resume", "--transfer.lr", "0.02")
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
