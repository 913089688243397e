"""benchmarks/tools/gpu_paths.py: the CPU rows run and are recorded; GPU-only rows are skipped with a reason."""
import json


from conftest import load_benchmark


def test_smoke_on_cpu(tmp_path):
    res = load_benchmark("tools/gpu_paths").main(["--device", "cpu", "--smoke", "--out-dir", str(tmp_path)])
    rows = {(r["amp"], r["channels_last"]): r for r in res["throughput"]}
    for key in (("none", False), ("none", True)):  # fp32, NCHW and NHWC: measured
        assert rows[key]["img_per_s"] > 0 and rows[key]["seconds"] > 0
    assert all("skipped" in r for r in res["throughput"] if r["amp"] != "none")  # AMP needs CUDA
    cpu = res["clustering"][0]
    assert cpu["faiss_gpu"] == "never" and cpu["seconds"] > 0 and cpu["points"] == 120
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["machine"]["device"] == "cpu" and (tmp_path / "results.md").read_text().startswith("# GPU paths")
