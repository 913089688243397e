"""The command line's parser: help, option spellings, errors that exit 2 (`encodenet_timm.cli.parser`, `.spec`)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from encodenet_timm import EncodeNetConfig
from encodenet_timm.config import ControlsConfig

from conftest import run


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

