"""``encodenet compare``: a comparison, what it says, and its resume rules (`encodenet_timm.cli.compare`)."""
import json
import logging

import torch

from encodenet_timm.cli import main as cli_main


def test_cli_compare_and_resume(tmp_path, capsys, caplog):
    """... and says what it does (#25.4): the FLOPs count is labelled as a count, the verdict says the kept
    model is chosen on validation and how ties break, and --resume says which rows it kept and which it trains."""
    torch.set_num_threads(1)
    out = tmp_path / "cmp"
    argv = ["compare", "--model", "resnet20_cifar", "--dataset", "digits", "--per-class", "15", "--batch-size", "50",
            "--out", str(out), "--seeds", "0", "--controls", "continued,ema", "--progress", "false",
            "--baseline.epochs", "1", "--autoencoder.epochs", "1", "--transfer.epochs", "1", "--finetune.epochs", "1",
            "--representatives.clusters_per_class", "2", "--allow-untrained-baseline"]
    with caplog.at_level(logging.INFO, logger="encodenet_timm.compare"):
        assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert "| continued |" in printed and "| ema |" in printed and "EncodeNet " in printed
    assert "chosen on validation accuracy (a tie goes to the baseline, then to the first row" in printed
    assert "counting each stage's FLOPs on one batch (nothing is trained)" in caplog.text
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["rows"]) == {"baseline", "encodenet", "continued", "ema"}
    assert cli_main(argv) == 2  # not over an existing comparison
    assert "already holds a comparison" in capsys.readouterr().err
    assert cli_main(["compare", "--out", str(out), "--resume", "--seeds", "1"]) == 2  # settings come from the dir
    (out / "runs" / "ema-seed0.json").unlink()  # as if stopped before its last row
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="encodenet_timm.compare"):
        assert cli_main(["compare", "--out", str(out), "--resume"]) == 0
    assert "seed 0: kept (finished before): baseline, encodenet, continued; to train: ema" in caplog.text
    assert json.loads((out / "results.json").read_text())["rows"].keys() == saved["rows"].keys()
    assert cli_main(argv[:-3] + ["--out", str(tmp_path / "c2"), "--baseline.epochs", "0"]) == 2  # random baseline
    assert "baseline.epochs" in capsys.readouterr().err
    # a baseline near chance is refused by the library too, on the CLI path, before any other row trains
    assert cli_main(argv[:-3] + ["--out", str(tmp_path / "c3")]) == 2
    assert "looks untrained" in capsys.readouterr().err and not (tmp_path / "c3" / "runs" / "encodenet-seed0.json").exists()
