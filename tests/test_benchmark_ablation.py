"""End to end: benchmarks/ablation.py on a tiny synthetic zip in the cifar10-jpeg layout (smoke regime)."""
import json


from conftest import load_benchmark
from test_data_cifar import make_image_zip


def test_every_variant_is_a_valid_config_on_the_paper_preset():
    ab = load_benchmark("ablation")
    import timm
    model = timm.create_model("resnet20_cifar", num_classes=10)
    regime = ab.REGIMES["short"]
    for name in ab.VARIANTS:
        cfg = ab.variant_config(regime, model, name, seed=3)
        assert cfg.seed == 3 and cfg.autoencoder.epochs in (0, regime.autoencoder.epochs)
        assert cfg.transfer.epochs == regime.transfer.epochs
    assert ab.variant_config(regime, model, "paper", 0).split == "features"
    assert ab.variant_config(regime, model, "split_last", 0).split == "layer2"
    assert ab.variant_config(regime, model, "finetune", 0).finetune.epochs == regime.finetune.epochs
    assert ab.variant_config(regime, model, "paper", 0).finetune.epochs == 0


def test_choice_uses_validation_only():
    ab = load_benchmark("ablation")
    runs = {"paper": {0: {"val_accuracy": 0.5}, 1: {"val_accuracy": 0.5}},
            "ce": {0: {"val_accuracy": 0.7}, 1: {"val_accuracy": 0.4}},
            "centroid": {0: {"val_accuracy": 0.6}, 1: {"val_accuracy": 0.6}},
            "baseline_equal": {0: {"val_accuracy": 0.9}, 1: {"val_accuracy": 0.9}}}  # a control: never chosen
    assert ab.choose(runs, [0, 1]) == "centroid"


def test_ablation_pipeline_end_to_end(tmp_path, one_thread):
    ab = load_benchmark("ablation")
    make_image_zip(tmp_path / "cifar10-jpeg.zip", classes=("a", "b", "c", "d"), n_train=12, n_test=5)
    out = tmp_path / "out"
    argv = ["--data-dir", str(tmp_path), "--cache-dir", str(tmp_path / "cache"), "--regime", "smoke",
            "--seeds", "0", "1", "--variants", "paper,split_last,ce", "--out-dir", str(out), "--threads", "1"]
    res = ab.main(argv)
    assert res["seeds"] == [0, 1]
    assert set(res["validation"]) == {"baseline", "paper", "split_last", "ce", "baseline_equal",
                                      "baseline_continued", "kd"}
    X = res["compute"]["control_extra_epochs"]
    assert X >= max(v["extra_epochs"] for v in res["compute"]["variants"].values())
    assert res["validation"]["baseline_equal"]["extra_epochs"] == X
    for row, v in res["validation"].items():
        assert v["n"] == 2 and all(0.0 <= a <= 1.0 for a in v["per_seed"]), row
    test = res["test"]
    assert test["chosen"] in ("paper", "split_last", "ce")
    assert set(test["accuracy"]) == {test["chosen"], "paper", "baseline", "baseline_equal",
                                     "baseline_continued", "kd"}
    assert f"{test['chosen']} - baseline_equal" in test["paired"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["versions"]["torch"] and saved["machine"]["cpu_count"] >= 1
    md = (out / "results.md").read_text()
    assert "Chosen on validation" in md and "| split_last |" in md
    assert (out / "accuracy_vs_compute.png").stat().st_size > 1000
    # finished runs are skipped on a rerun, and the numbers do not move
    before = {p.name: p.read_text() for p in (out / "runs").glob("*.json")}
    assert ab.main(argv)["validation"] == res["validation"]
    assert {p.name: p.read_text() for p in (out / "runs").glob("*.json")} == before
