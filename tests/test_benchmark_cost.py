"""benchmarks/cost.py: its smoke mode end to end (scikit-learn's digits, no shared data) and its k-means pair."""
import json

import numpy as np
import pytest

from conftest import load_benchmark


@pytest.mark.slow  # a recorded benchmark's smoke run
def test_cost_smoke_writes_every_stage_and_both_clustering_rows(tmp_path):
    cost = load_benchmark("cost")
    res = cost.main(["--smoke", "--threads", "1", "--epochs-per-stage", "2", "--out-dir", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["stages"] == json.loads(json.dumps(res["stages"]))
    assert saved["smoke"] and saved["threads"] == 1 and "digits" in saved["data"]["description"]
    stages = saved["stages"]
    assert list(stages) == list(cost.STAGES)
    for name, s in stages.items():
        assert len(s["seconds"]) == 2 and s["ratio"] > 0 and s["ratio_of_medians"] > 0 and s["flops_ratio"] > 0, name
    base = stages["baseline"]
    assert base["ratio"] == base["ratio_of_medians"] == base["flops_ratio"] == 1.0
    assert set(stages["representatives"]["parts"]) == {"features", "clustering", "pick"}
    assert len(saved["loadavg"]["rounds"]) == 2
    recipe = saved["recipe_extra_baseline_epochs"]
    assert recipe["default_epochs"] == {"autoencoder": 10, "transfer": 10, "finetune": 5}
    assert recipe["time"] > 0 and recipe["time_of_medians"] > 0 and recipe["flops"] > 0
    rows = saved["clustering"]["rows"]
    assert [r["features"] for r in rows] == ["pre-logits after 1 baseline epoch (real)", "synthetic Gaussian mixture"]
    for r in rows:
        for lib in ("faiss", "sklearn"):
            assert r[lib]["seconds"] > 0 and r[lib]["iterations"] > 0 and r[lib]["inertia"] >= 0, (r, lib)
        assert r["time_ratio_sklearn_over_faiss"] > 0
    assert len(saved["loadavg"]["before"]) == 3 and saved["versions"]["faiss"]
    md = (tmp_path / "results.md").read_text()
    assert "may be shared" in md and "| baseline | " in md and "| synthetic Gaussian mixture |" in md


def test_faiss_and_sklearn_solve_the_same_problem():
    cost = load_benchmark("cost")
    rng = np.random.default_rng(0)
    centres = 10.0 * rng.standard_normal((3, 8))
    x = (centres[np.arange(300) % 3] + rng.standard_normal((300, 8))).astype(np.float32)
    (cf, _, itf), (cs, _, its) = (fn(x, 3, 10, 2, 0) for fn in (cost.faiss_kmeans, cost.sklearn_kmeans))
    assert itf == 20 and 1 <= its <= 20  # FAISS runs every iteration; sklearn may stop when labels settle
    assert cost.inertia(x, cf) == pytest.approx(cost.inertia(x, cs), rel=1e-4)
    brute = ((x[:, None, :].astype(np.float64) - cf[None]) ** 2).sum(-1).min(1).sum()
    assert cost.inertia(x, cf) == pytest.approx(brute, rel=1e-9)


def test_cost_needs_two_epochs_per_stage(tmp_path):
    with pytest.raises(SystemExit):
        load_benchmark("cost").main(["--smoke", "--epochs-per-stage", "1", "--out-dir", str(tmp_path)])
