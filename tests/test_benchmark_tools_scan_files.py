"""benchmarks/tools/scan_files.py: every scan mode is timed on real JPEGs and recorded (tiny)."""
import json

from conftest import load_benchmark


def test_smoke(tmp_path):
    res = load_benchmark("tools/scan_files").main(["--images", "40", "--size", "32", "--out-dir", str(tmp_path)])
    assert set(res["rows"]) == {"verify, first call", "verify", "decode", "plain PIL decode, one thread"}
    assert all(r["seconds"] > 0 and r["imagenet_minutes"] > 0 for r in res["rows"].values())
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["images"] == 40 and saved["size"] == [32, 32]
    assert (tmp_path / "results.md").read_text().startswith("# The image-file scan")
