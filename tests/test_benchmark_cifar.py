"""End to end: benchmarks/cifar.py on a tiny synthetic zip in the cifar10-jpeg layout (1 epoch per stage)."""
import json

import pytest
import torch

from conftest import load_benchmark
from test_data_cifar import make_image_zip

METHODS = ["baseline", "baseline_equal", "kd", "encodenet"]


def test_benchmark_pipeline_end_to_end(tmp_path, one_thread):
    bench = load_benchmark("cifar")
    make_image_zip(tmp_path / "cifar10-jpeg.zip", classes=("a", "b", "c", "d"), n_train=12, n_test=5)
    out = tmp_path / "out"
    argv = ["--dataset", "cifar10-jpeg", "--data-dir", str(tmp_path), "--cache-dir", str(tmp_path / "cache"),
            "--profile", "smoke", "--seeds", "0", "1", "--methods", ",".join(METHODS), "--out-dir", str(out),
            "--threads", "1"]
    results = bench.main(argv)

    saved = json.loads((out / "results.json").read_text())
    assert saved["complete"] and saved["methods"] == METHODS and saved["seeds"] == [0, 1]
    for key in ("command", "argv", "profile_config", "versions", "machine", "flops", "summary", "comparisons",
                "wall_seconds", "runs"):
        assert saved[key], key
    assert set(saved["versions"]) >= {"python", "torch", "timm", "faiss", "numpy"}
    assert {"platform", "cpu_count"} <= set(saved["machine"])
    fl = saved["flops"]
    assert set(fl["per_image"]) == {"train_step", "eval_forward", "feature_pass", "kd_step", "autoencoder_step",
                                    "transfer_step"}
    assert all(v > 0 for v in fl["per_image"].values())
    assert fl["extra_epochs"] == max(1, round(fl["encodenet_extra_in_epochs"])) and fl["kd_epochs"] >= 1
    for method in METHODS:
        s = saved["summary"][method]
        assert s["best"]["n"] == s["last"]["n"] == 2 and 0.0 <= s["last"]["mean"] <= 1.0
        for seed in ("0", "1"):
            run = saved["runs"][method][seed]
            assert 0.0 <= run["last"] <= run["best"] <= 1.0
            assert run["wall_seconds"] > 0 and run["stages"]
    assert len(saved["runs"]["baseline_equal"]["0"]["epochs"]) == 1 + fl["extra_epochs"]
    assert len(saved["runs"]["kd"]["0"]["epochs"]) == fl["kd_epochs"]
    assert set(saved["runs"]["encodenet"]["0"]["stages"]) == {"representatives", "autoencoder", "transfer"}
    for name in ("encodenet - baseline_equal", "encodenet - kd"):
        c = saved["comparisons"][name]["last"]
        assert c["n"] == 2 and len(c["diffs"]) == 2 and c["mean"] is not None
    assert results["summary"] == saved["summary"]

    md = (out / "results.md").read_text()
    assert all(f"| {m} |" in md for m in METHODS) and "encodenet - kd" in md
    for png in ("accuracy_curves.png", "representatives-seed0.png", "reconstructions-seed0.png"):
        assert (out / png).stat().st_size > 1000, png

    # a rerun skips every finished (method, seed) and aggregates the same numbers
    runs_before = {p.name: p.read_text() for p in (out / "runs").glob("*.json")}
    again = bench.main(argv)
    assert again["summary"] == saved["summary"]
    assert {p.name: p.read_text() for p in (out / "runs").glob("*.json")} == runs_before


def test_cuda_without_a_gpu_fails_clearly(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    bench = load_benchmark("cifar")
    make_image_zip(tmp_path / "cifar10-jpeg.zip")
    with pytest.raises(ValueError, match="CUDA is not available"):
        bench.main(["--dataset", "cifar10-jpeg", "--data-dir", str(tmp_path), "--profile", "smoke",
                    "--device", "cuda", "--out-dir", str(tmp_path / "out")])


def test_unknown_method_is_rejected():
    bench = load_benchmark("cifar")
    with pytest.raises(SystemExit):
        bench.parse_args(["--methods", "baseline,distill"])
