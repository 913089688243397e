"""Smoke test: benchmarks/scale_clustering.py at a tiny size into tmp_path."""
import json

import numpy as np
import pytest

from conftest import load_benchmark


@pytest.mark.slow  # a recorded benchmark's smoke run
def test_scale_clustering_smoke(tmp_path):
    bench = load_benchmark("scale_clustering")
    out = tmp_path / "out"
    argv = ["--classes", "3", "--per-class", "12", "--dim", "8", "--k", "2", "--niter", "5", "--nredo", "1",
            "--block-rows", "7", "--store-dir", str(tmp_path / "stores"), "--out-dir", str(out)]
    entry = bench.main(argv)  # one fresh subprocess clusters from the store (each costs seconds of imports)
    assert entry["key"] == "3x12x8-float32" and entry["rows"] == 36 and entry["matrix_bytes"] == 36 * 8 * 4
    m = entry["modes"]["disk"]
    assert m["num_clusters"] == 6 and m["cluster_s"] >= 0 and entry["write_s"] >= 0
    assert m["peak_rss_mib"] > 0 and m["ru_maxrss_mib"] > 0 and m["peak_rss_mib"] >= m["rss_after_import_mib"]
    assert list((tmp_path / "stores").iterdir()) == []  # the store was deleted
    saved = json.loads((out / "results.json").read_text())
    assert [r["key"] for r in saved["runs"]] == ["3x12x8-float32"]
    assert {"machine", "versions", "command", "write_s", "modes"} <= set(saved["runs"][0])
    assert "| 36 | 3 | 8 | float32 | disk | 1 KiB |" in (out / "results.md").read_text()
    other = dict(entry, key="3x12x8-float16", dtype="float16")
    bench.save(out, other)  # a second shape is added next to the first; the same key again replaces it
    bench.save(out, other)
    saved = json.loads((out / "results.json").read_text())
    assert [r["key"] for r in saved["runs"]] == ["3x12x8-float16", "3x12x8-float32"]


def test_ram_and_disk_modes_give_the_same_clusters(tmp_path):
    bench = load_benchmark("scale_clustering")
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(3), 10))
    np.save(tmp_path / "labels.npy", labels)
    bench.write_store(tmp_path / "store", labels, dim=6, dtype="float16", centres=2, block_rows=4, seed=0)
    res = {mode: bench.cluster_child(tmp_path, mode, 2, 5, 1, 0) for mode in ("disk", "ram")}  # in this process
    assert res["disk"]["num_clusters"] == res["ram"]["num_clusters"] == 6
    np.testing.assert_array_equal(np.load(tmp_path / "cluster_ids-disk.npy"), np.load(tmp_path / "cluster_ids-ram.npy"))
