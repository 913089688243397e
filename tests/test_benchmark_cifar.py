"""End to end: benchmarks/cifar.py on a tiny synthetic zip in the cifar10-jpeg layout (1 epoch per stage)."""
import json

import pytest
import torch

from conftest import load_benchmark
from test_data_cifar import make_image_zip


@pytest.mark.slow  # the pre-compare benchmark; ablation.py's smoke test covers compare in the default run
def test_benchmark_pipeline_end_to_end(tmp_path):
    bench = load_benchmark("cifar")
    make_image_zip(tmp_path / "cifar10-jpeg.zip", classes=("a", "b", "c", "d"), n_train=12, n_test=5)
    out = tmp_path / "out"
    argv = ["--dataset", "cifar10-jpeg", "--data-dir", str(tmp_path), "--cache-dir", str(tmp_path / "cache"),
            "--profile", "smoke", "--seeds", "0", "1", "--controls", "continued,kd", "--out-dir", str(out),
            "--threads", "1", "--allow-untrained-baseline"]
    result = bench.main(argv)
    assert result.rows == ["baseline", "encodenet", "paper", "continued", "kd"] and result.seeds == [0, 1]
    assert set(result.tests) == set(result.rows)  # every row is declared: its test read once, after the choice
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["rows"]) == set(result.rows) and saved["verdict"] == result.verdict
    assert set(saved["versions"]) >= {"python", "torch", "timm", "faiss", "numpy"}
    assert saved["config"]["split"] == "last_stage"  # encodenet is the package default
    assert saved["records"]["paper"]["0"]["history"]["autoencoder"]
    md = (out / "results.md").read_text()
    assert md.startswith("`python benchmarks/cifar.py") and "| paper |" in md and "Verdict" in md
    assert (out / "accuracy_vs_compute.png").stat().st_size > 1000
    before = {p.name: p.read_text() for p in (out / "runs").glob("*.json")}
    assert bench.main(argv).records == result.records  # finished rows are skipped
    assert {p.name: p.read_text() for p in (out / "runs").glob("*.json")} == before


def test_cuda_without_a_gpu_fails_clearly(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    bench = load_benchmark("cifar")
    make_image_zip(tmp_path / "cifar10-jpeg.zip")
    with pytest.raises(ValueError, match="CUDA is not available"):
        bench.main(["--dataset", "cifar10-jpeg", "--data-dir", str(tmp_path), "--profile", "smoke",
                    "--device", "cuda", "--out-dir", str(tmp_path / "out")])


def test_unknown_control_is_rejected():
    bench = load_benchmark("cifar")
    with pytest.raises(SystemExit):
        bench.parse_args(["--controls", "continued,distill"])
