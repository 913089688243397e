"""benchmarks/data_path.py: the CPU rows of both data paths run and are recorded (tiny, synthetic)."""
import json

from conftest import load_benchmark


def test_smoke_on_cpu(tmp_path):
    res = load_benchmark("data_path").main(["--device", "cpu", "--smoke", "--threads", "1", "--out-dir", str(tmp_path)])
    assert res["loader"]["per_sample"]["images"] == res["loader"]["device"]["images"] == 200
    assert res["loader"]["device"]["img_per_s"] > 0 and res["training"]["img_per_s"] > 0
    for path in ("per_sample", "device"):
        assert res["stages"][path]["baseline"] > 0 and res["stages"][path]["autoencoder_over_baseline"] > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["machine"]["device"] == "cpu" and (tmp_path / "results.md").read_text().startswith("# Data path")
