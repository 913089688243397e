"""benchmarks/cpu_speed.py: its smoke mode (tiny synthetic data) writes the speed rows after every workload,
the profiles and the parity files."""
import json

import pytest

from conftest import load_benchmark


@pytest.mark.slow  # a recorded benchmark's smoke run
def test_cpu_speed_smoke_writes_rows_profiles_and_parity(tmp_path):
    cs = load_benchmark("cpu_speed")
    res = cs.main(["--smoke", "--settings", "fp32,bf16", "--workloads", "resnet20,autoencoder", "--profile",
                   "--out-dir", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["speed"] == json.loads(json.dumps(res["speed"]))
    assert [(r["workload"].split(",")[1].split(" ")[1], r["setting"]) for r in saved["speed"]] == [
        ("per-sample", "fp32"), ("per-sample", "bf16"), ("device", "fp32"), ("device", "bf16"),
        ("resnet20_cifar", "fp32"), ("resnet20_cifar", "bf16")]  # the autoencoder's workload names the model
    for r in saved["speed"]:
        assert r["img_per_s"] > 0 and len(r["per_round"]) == 1
    assert all(r["ratio_to_fp32"] == 1.0 for r in saved["speed"] if r["setting"] == "fp32")
    assert set(saved["profile"]) == {"resnet20_cifar", "autoencoder"}
    assert all("Self CPU" in t for t in saved["profile"].values())
    assert saved["machine"] and saved["versions"]["torch"]
    md = (tmp_path / "results.md").read_text()
    assert "| autoencoder stage, resnet20_cifar (CIFAR-10) | bf16 |" in md and "bf16 autoencoder" in md

    par = cs.main(["--smoke", "--parity", "--out-dir", str(tmp_path)])["parity"]
    assert set(par["val_accuracy"]) == {"fp32", "bf16"} and all(len(v) == 2 for v in par["val_accuracy"].values())
    diffs = par["bf16_minus_fp32"]["diffs"]
    assert diffs == pytest.approx([b - f for b, f in zip(par["val_accuracy"]["bf16"], par["val_accuracy"]["fp32"])])
    assert json.loads((tmp_path / "parity.json").read_text())["parity"]["epochs"] == 1
    assert "bf16 - fp32, paired by seed" in (tmp_path / "parity.md").read_text()
    assert json.loads((tmp_path / "results.json").read_text())["speed"] == saved["speed"]  # parity left speed alone
