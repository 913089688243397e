"""``encodenet evaluate`` on a finished run (`encodenet_timm.cli.evaluate`)."""
import json

import pytest

from conftest import run


def test_evaluate(digits_run, capsys):
    code, out, _ = run(capsys, "evaluate", digits_run, "--split", "val", "--batch-size", "100")
    assert code == 0 and "val accuracy" in out
    results = json.loads((digits_run / "eval.json").read_text())
    assert results["val"]["images"] == 60 and 0.0 <= results["val"]["accuracy"] <= 1.0
    before = results["test"]
    code, out, _ = run(capsys, "evaluate", digits_run)
    assert code == 0 and f"{before['accuracy']:.4f}" in out
    assert json.loads((digits_run / "eval.json").read_text())["test"]["accuracy"] == pytest.approx(before["accuracy"])

