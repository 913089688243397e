"""End to end: benchmarks/ablation.py on a tiny synthetic zip in the cifar10-jpeg layout (smoke regime)."""
import json
from types import SimpleNamespace

import pytest
import timm

from encodenet_timm.compare import CompareResult

from conftest import load_benchmark
from test_data_cifar import make_image_zip


def test_every_variant_is_a_valid_config_at_the_regime_lengths():
    ab = load_benchmark("ablation")
    regime = ab.REGIMES["converged"]
    default = ab.regime_config(regime, seed=3, baseline_epochs=80)
    assert default.seed == 3 and default.baseline.epochs == 80 and default.split == "last_stage"
    assert (default.autoencoder.epochs, default.transfer.epochs, default.finetune.epochs) == (10, 10, 5)
    for name in ab.VARIANTS:
        cfg = ab.regime_config(regime, baseline_epochs=80, variant=name)
        assert cfg.baseline.epochs == 80 and cfg.transfer.epochs == regime.transfer.epochs, name
    paper = ab.regime_config(regime, variant="paper")
    assert paper.split == "features" and paper.finetune.epochs == 0 and paper.autoencoder.ce_weight == 0
    assert ab.regime_config(regime, variant="ae_double").autoencoder.epochs == 20
    assert ab.regime_config(regime, variant="ce_3").autoencoder.ce_weight == 3.0
    assert ab.regime_config(regime, variant="split_last_no_ae").autoencoder.epochs == 0
    assert timm.create_model("resnet20_cifar").feature_info  # last_stage splits inside it


def test_a_variant_chosen_over_the_default_is_paired_against_each_control_on_test():
    """The test section's second look: EncodeNet's choice (here a variant) minus the baseline and each control,
    per seed, Holm-corrected over those comparisons; nothing when validation chose the default recipe."""
    ab = load_benchmark("ablation")
    acc = {"baseline": [0.880, 0.876, 0.875], "encodenet": [0.878, 0.874, 0.879], "no_ae": [0.881, 0.879, 0.878],
           "continued": [0.879, 0.876, 0.876], "kd": [0.882, 0.880, 0.881]}
    result = SimpleNamespace(chosen="no_ae", default="encodenet", tests=list(acc), records=acc, chosen_trials={},
                             controls=["continued", "kd"], diverged=lambda row: None,
                             accuracy=lambda row, split: acc[row], _split=lambda split: split)
    result.comparisons = lambda *a, **k: CompareResult.comparisons(result, *a, **k)  # the real pairing and Holm
    lines = ab._choice_against_controls(result)
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in lines if line.startswith("| no_ae - ")}
    assert list(rows) == ["no_ae - baseline", "no_ae - continued", "no_ae - kd"]
    assert rows["no_ae - kd"][1] == "-0.17" and rows["no_ae - kd"][3] == "-0.10, -0.10, -0.30"
    p_values = [float(r[4].rstrip(" |")) for r in rows.values()]
    assert all(0 < p <= 1 for p in p_values) and "Holm" in lines[0]
    result.chosen = "encodenet"
    assert ab._choice_against_controls(result) == []


def test_the_longest_from_scratch_run_past_e_plus_x_is_the_equal_row_on_seed_0():
    """The 180-epoch evidence run (at least E + X) is set against each declared row's seed-0 test; a run shorter
    than E + X, one in another precision, or one whose test is still sealed is not."""
    ab = load_benchmark("ablation")
    result = SimpleNamespace(has_test=True, compute={"extra_epochs": 22.0},
                             records={"baseline": {0: {"history": [{}] * 120}}},
                             tests={"baseline": {0: 0.8799, 1: 0.87}, "encodenet": {0: 0.8783, 1: 0.86}})
    evid = {"runs": {"60": {"epochs": 60, "val_accuracy": 0.88, "test_accuracy": 0.87},
                     "180-none": {"epochs": 180, "val_accuracy": 0.85, "test_accuracy": 0.85},
                     "180": {"epochs": 180, "val_accuracy": 0.8888, "test_accuracy": 0.8844}}}
    lines = ab._equal_from_evidence(result, evid)
    assert "1.27x the rows' total (E + X = 120 + 22.00 epochs)" in lines[2] and "test 88.44%" in lines[2]
    assert [line for line in lines if line.startswith("| ") and "%" not in line] == [
        "| baseline | 87.99 | +0.45 |", "| encodenet | 87.83 | +0.61 |"]
    del evid["runs"]["180"]["test_accuracy"]  # sealed: nothing yet
    assert ab._equal_from_evidence(result, evid) == []
    evid["runs"]["140"] = {"epochs": 140, "val_accuracy": 0.88, "test_accuracy": 0.88}  # under E + X = 142
    assert ab._equal_from_evidence(result, evid) == []


def test_convergence_rule():
    ab = load_benchmark("ablation")
    runs = lambda accs: {str(e): {"val_accuracy": a} for e, a in accs.items()}
    assert ab.choose_epochs(runs({40: 0.60, 80: 0.64, 120: 0.643})) == 80  # 120 gains 0.3 points
    assert ab.choose_epochs(runs({40: 0.60, 80: 0.64, 120: 0.65})) is None  # 1 point: not converged
    assert ab.choose_epochs(runs({80: 0.64, 120: 0.641})) is None  # no E/2 run
    assert ab.choose_epochs(runs({40: 0.6, 60: 0.62, 80: 0.64, 120: 0.65, 180: 0.652})) == 120


def test_ablation_pipeline_end_to_end(tmp_path):
    ab = load_benchmark("ablation")
    make_image_zip(tmp_path / "cifar10-jpeg.zip", classes=("a", "b", "c", "d"), n_train=12, n_test=5)
    out = tmp_path / "out"
    argv = ["--data-dir", str(tmp_path), "--cache-dir", str(tmp_path / "cache"), "--regime", "smoke",
            "--seeds", "0", "1", "--variants", "paper,ce_3", "--out-dir", str(out), "--threads", "1",
            "--allow-untrained-baseline"]
    res = ab.main(argv)
    result = res["result"]
    assert result.seeds == [0, 1]
    assert result.rows == ["baseline", "encodenet", "paper", "ce_3", "continued", "kd", "ema", "equal"]
    X = result.compute["extra_epochs"]
    assert result.records["equal"][0]["extra_epochs"] > 0.95 * X
    tested = json.loads((out / "test.json").read_text())
    assert result.chosen in ("encodenet", "paper", "ce_3") and tested["choice"]["chosen"] == result.chosen
    declared = {"baseline", "continued", "kd", "ema", "equal", "paper", "encodenet", result.chosen}
    assert set(tested["test"]) == declared == set(result.tests)  # variants not chosen carry no test accuracy
    saved = json.loads((out / "results.json").read_text())
    assert saved["versions"]["torch"] and saved["machine"]["cpu_count"] >= 1
    md = (out / "ablation.md").read_text()
    assert "Chosen on validation" in md and "| ce_3 |" in md and "encodenet - continued" in md
    if result.chosen != "ce_3":
        assert "ce_3" not in md.split("## Test")[1]  # a variant not chosen never shows a test accuracy
    # a variant chosen over the default recipe is also paired against each control on test
    assert ("Holm over these comparisons" in md) == (result.chosen != "encodenet")
    assert (out / "accuracy_vs_compute.png").stat().st_size > 1000
    # an evidence run (from scratch, another length) is tested only once the rows' test has been read
    (out / "test.json").rename(out / "test.sealed")
    assert "test_accuracy" not in ab.main(argv + ["--phase", "evidence", "--epochs", "2"])["runs"]["2"]
    ab.main(argv + ["--phase", "report"])
    assert "test_accuracy" not in json.loads((out / "evidence.json").read_text())["runs"]["2"]
    (out / "test.sealed").rename(out / "test.json")
    ab.main(argv + ["--phase", "report"])
    evid = json.loads((out / "evidence.json").read_text())["runs"]
    assert 0 <= evid["2"]["test_accuracy"] <= 1 and "test accuracy (%)" in (out / "ablation.md").read_text()
    # finished runs are skipped on a rerun, and the numbers do not move
    before = {p.name: p.read_text() for p in (out / "runs").glob("*.json")}
    assert ab.main(argv)["result"].records == result.records
    assert {p.name: p.read_text() for p in (out / "runs").glob("*.json")} == before
    # --no-test: the rows of these seeds and no test read (a process sharing the regime's seeds)
    (out / "test.json").unlink()
    assert not ab.main(argv + ["--phase", "validate", "--no-test"])["result"].tests
    assert not (out / "test.json").exists()
    assert ab.main(argv + ["--phase", "validate"])["result"].tests == result.tests  # the last call reads it
    # --phase anchor: the finished baselines' test accuracy from their kept weights, the same as compare's test
    anchor = ab.main(argv + ["--phase", "anchor"])
    assert [anchor["test_accuracy"][s] for s in ("0", "1")] == result.accuracy("baseline", "test")
    assert anchor["holds"] is None and anchor["seeds_finished"] == 2  # 3 seeds decide
    assert json.loads((out / "anchor.json").read_text()) == anchor
    # --phase report trains nothing: it reports the rows finished on the seeds asked for
    assert ab.main(argv + ["--phase", "report"])["result"].tests == result.tests
    (out / "runs" / "kd-seed1.json").unlink()
    part = ab.main(argv + ["--phase", "report", "--seeds", "0"])["result"]
    assert part.seeds == [0] and "kd" in part.rows
    part = ab.main(argv + ["--phase", "report"])["result"]
    assert part.seeds == [0, 1] and "kd" not in part.rows and "partial" in part.notes[0] and not part.tests
    assert "partial" in (out / "ablation.md").read_text() and "Sanity anchor" in (out / "ablation.md").read_text()
    assert not (out / "runs" / "kd-seed1.json").exists()


@pytest.mark.slow  # a benchmark option the long runs use; the default run keeps the pipeline test
def test_evidence_runs_beside_in_another_precision(tmp_path):
    ab = load_benchmark("ablation")
    make_image_zip(tmp_path / "cifar10-jpeg.zip", classes=("a", "b", "c", "d"), n_train=12, n_test=5)
    out = tmp_path / "out"
    argv = ["--data-dir", str(tmp_path), "--cache-dir", str(tmp_path / "cache"), "--regime", "smoke", "--out-dir",
            str(out), "--threads", "1", "--phase", "evidence", "--epochs", "1"]
    ab.main(argv)
    found = ab.main(argv + ["--evidence-amp", "bf16"])["runs"]
    assert set(found) == {"1", "1-bf16"}  # the smoke regime trains in fp32: bf16 is a run of its own
    assert (found["1"]["precision"], found["1-bf16"]["precision"]) == ("fp32", "bf16")
    assert (out / "evidence" / "E1-bf16").is_dir() and ab.main(argv + ["--evidence-amp", "bf16"])["runs"] == found
    table = "\n".join(ab._length_table("t", found, None))
    assert "| 1 | " in table and "| 1 (bf16) | " in table
