"""compare(): EncodeNet against same-size controls at equal extra compute, end to end on real digits."""
import importlib
import json

import numpy as np
import pytest
import timm
import torch
from scipy import stats
from torch.utils.data import DataLoader, Subset
from torch.utils.flop_counter import FlopCounterMode

from encodenet_timm import EncodeNetConfig, compare
from encodenet_timm.cli import main as cli_main
from encodenet_timm.compare import CompareResult, count_compute, paired_difference

compare_mod = importlib.import_module("encodenet_timm.compare")  # the package's `compare` is the function
wrapper_mod = importlib.import_module("encodenet_timm.wrapper")
N_TRAIN = 120


def _config(**kw) -> EncodeNetConfig:
    return EncodeNetConfig().override({"progress": False, "baseline.epochs": 2, "baseline.lr": 0.1,
                                       "autoencoder.epochs": 1, "transfer.epochs": 1, "finetune.epochs": 1,
                                       "representatives.clusters_per_class": 2, **kw})


def _model():
    return timm.create_model("resnet20_cifar", num_classes=10)


@pytest.fixture
def loaders(digits):
    train, test = digits
    g = torch.Generator().manual_seed(0)
    return (DataLoader(Subset(train, range(N_TRAIN)), batch_size=40, shuffle=True, generator=g),
            DataLoader(Subset(train, range(N_TRAIN, N_TRAIN + 150)), batch_size=150),
            DataLoader(Subset(test, range(150)), batch_size=150))


def test_paired_difference_is_scipys_paired_t_test():
    a, b = [0.71, 0.69, 0.74, 0.70], [0.70, 0.70, 0.71, 0.66]
    d = paired_difference(a, b)
    ref = stats.ttest_rel(a, b)
    assert d["mean"] == pytest.approx(np.mean(np.subtract(a, b)))
    assert d["t"] == pytest.approx(ref.statistic) and d["p"] == pytest.approx(ref.pvalue)
    assert paired_difference([0.5], [0.4])["p"] is None  # one seed: nothing to test
    assert paired_difference([0.5, 0.6], [0.4, 0.5])["p"] is None  # identical differences: no variance


def test_compare_end_to_end_on_digits(loaders, tmp_path, monkeypatch, one_thread):
    torch.set_num_threads(1)
    train, val, test = loaders
    out = tmp_path / "cmp"
    res = compare(_model, train, val, config=_config(), seeds=(0, 1), test_loader=test, out_dir=out)
    rows = ["baseline", "encodenet", "continued", "kd", "ema", "equal"]
    assert res.rows == rows and res.seeds == [0, 1]
    X = res.compute["extra_epochs"]
    assert 1.0 < X < 10.0
    for row in rows:
        for seed in (0, 1):
            rec = res.records[row][seed]
            assert 0.0 <= rec["val_accuracy"] <= 1.0 and 0.0 <= rec["test_accuracy"] <= 1.0, row
            # each control trains X supervised epochs of FLOPs beyond the baseline, to the image
            expected = 0.0 if row == "baseline" else X
            assert rec["extra_epochs"] == pytest.approx(expected, rel=0.02, abs=0.01), row
    # the baseline trains from a fresh seeded model: seeds differ, and the same seed repeats
    assert res.records["baseline"][0]["val_loss"] != res.records["baseline"][1]["val_loss"]
    # deltas: encodenet - each other row, per seed, on test (test_loader given)
    deltas = res.deltas()
    assert set(deltas) == {"baseline", "continued", "kd", "ema", "equal"}
    for other, d in deltas.items():
        expect = np.subtract(res.accuracy("encodenet", "test"), res.accuracy(other, "test"))
        assert d["diffs"] == pytest.approx(expect.tolist())
    assert all(other in res.verdict for other in deltas) and res.verdict.startswith("EncodeNet ")
    assert res.best == max(rows, key=lambda r: np.mean(res.accuracy(r)))
    assert "| encodenet |" in res.table() and "test accuracy" in res.table()
    # the best model is a plain timm model holding the row's weights: it scores what the record says
    model = res.model(seed=1)
    plain = _model()
    assert type(model) is type(plain) and model.state_dict().keys() == plain.state_dict().keys()
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in plain.parameters())
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in val)
    assert correct / len(val.dataset) == pytest.approx(res.records[res.best][1]["val_accuracy"])
    # files
    res.save(out / "report")
    saved = json.loads((out / "report" / "results.json").read_text())
    assert set(saved["rows"]) == set(rows) and saved["verdict"] == res.verdict
    assert saved["versions"]["torch"] and saved["compute"]["extra_epochs"] == X
    assert "Verdict" in (out / "report" / "results.md").read_text()
    assert (out / "report" / "accuracy_vs_compute.png").stat().st_size > 1000
    assert len(list((out / "runs").glob("*.json"))) == 12 and len(list((out / "weights").glob("*"))) == 12
    # resumable per (row, seed): a second call trains nothing and returns the same numbers
    before = {p.name: p.read_text() for p in (out / "runs").glob("*.json")}
    calls = []
    for module in (compare_mod, wrapper_mod):
        monkeypatch.setattr(module, "train_stage", lambda *a, **k: calls.append(1))
    again = compare(_model, train, val, config=_config(), seeds=(0, 1), test_loader=test, out_dir=out)
    assert not calls and again.records == res.records
    assert {p.name: p.read_text() for p in (out / "runs").glob("*.json")} == before
    # other settings in the same directory are refused, not mixed in
    with pytest.raises(ValueError, match="other settings"):
        compare(_model, train, val, config=_config(**{"transfer.lr": 0.5}), seeds=(0,), test_loader=test,
                out_dir=out)


def test_each_row_trains_the_recipes_extra_flops_within_5_percent(loaders, monkeypatch, one_thread):
    """FLOPs measured on the real training of every row (FlopCounterMode) against the counted X."""
    torch.set_num_threads(1)
    train, val, _ = loaders
    measured = {}

    def counted(name, method):
        def run(self, *args, **kwargs):
            with FlopCounterMode(display=False) as counter:
                method(self, *args, **kwargs)
            measured[name] = float(counter.get_total_flops())
        return run

    for name in ("baseline", "encodenet", "continued", "kd_row", "equal"):
        monkeypatch.setattr(compare_mod._Rows, name, counted(name, getattr(compare_mod._Rows, name)))
    monkeypatch.setattr(compare_mod, "evaluate", lambda *a, **k: {"accuracy": 0.5, "loss": 1.0})  # no FLOPs
    res = compare(_model, train, val, config=_config(**{"autoencoder.epochs": 2}), seeds=(0,))
    c = res.compute
    per_epoch = c["train_step"] * N_TRAIN
    X = c["extra_epochs"]
    assert measured["baseline"] / per_epoch == pytest.approx(2.0, rel=0.01)
    assert measured["encodenet"] / per_epoch == pytest.approx(X, rel=0.05)  # the count matches the real fit
    assert measured["continued"] / per_epoch == pytest.approx(X, rel=0.05)
    assert measured["kd_row"] / per_epoch == pytest.approx(X, rel=0.05)
    assert (measured["equal"] - measured["baseline"]) / per_epoch == pytest.approx(X, rel=0.05)


def test_count_compute_adds_up_the_stages(loaders):
    train, _, _ = loaders
    cfg = _config(**{"autoencoder.epochs": 3, "transfer.epochs": 2, "finetune.epochs": 0})
    c = count_compute(_model(), cfg, train)
    per = c["per_image_per_epoch"]
    assert per["finetune"] == 0.0 and per["autoencoder"] > per["transfer"] > 0
    assert c["extra_epochs"] == pytest.approx((per["features"] + 3 * per["autoencoder"] + 2 * per["transfer"])
                                              / c["train_step"])
    assert c["kd_step"] > c["train_step"]  # the teacher's forward pass is extra


def test_a_trained_baseline_drops_equal_and_says_so(loaders, one_thread):
    torch.set_num_threads(1)
    train, val, _ = loaders
    torch.manual_seed(0)
    trained = _model()
    res = compare(lambda: trained, train, val, config=_config(**{"baseline.epochs": 0}), seeds=(0,),
                  controls=("continued", "equal"))
    assert res.rows == ["baseline", "encodenet", "continued"]
    assert any("equal was left out" in n for n in res.notes)
    assert "1 seed: no test" in res.verdict
    with torch.no_grad():  # the baseline row is the model as given
        state = res.model("baseline").state_dict()
        assert all(torch.equal(v, trained.state_dict()[k]) for k, v in state.items())


def test_bad_arguments_fail_before_any_training(loaders, monkeypatch):
    train, val, _ = loaders
    monkeypatch.setattr(compare_mod, "count_compute", lambda *a, **k: pytest.fail("computed before the check"))
    with pytest.raises(ValueError, match="unknown controls.*'swa'"):
        compare(_model, train, val, controls=("continued", "swa"))
    with pytest.raises(ValueError, match="seeds is empty"):
        compare(_model, train, val, seeds=())
    with pytest.raises(ValueError, match="taken by compare"):
        compare(_model, train, val, variants={"kd": EncodeNetConfig()})
    with pytest.raises(TypeError, match="timm-style classifier"):
        compare(lambda: torch.nn.Linear(2, 2), train, val)
    with pytest.raises(TypeError, match="DataLoader"):
        compare(_model, train, [1, 2, 3])
    bad = DataLoader(Subset(train.dataset.dataset, range(N_TRAIN)), batch_size=50)
    with pytest.raises(ValueError, match="clusters_per_class=50"):
        compare(_model, bad, val, config=_config(**{"representatives.clusters_per_class": 50}))


def test_result_round_trips_without_weights_kept():
    rec = {"val_accuracy": 0.5, "test_accuracy": None, "extra_epochs": 0.0}
    res = CompareResult(records={"baseline": {0: rec}, "encodenet": {0: {**rec, "val_accuracy": 0.6}}},
                        compute={"extra_epochs": 1.0, "note": ""}, seeds=[0], controls=[], config={}, notes=[])
    assert res.best == "encodenet" and not res.has_test
    with pytest.raises(ValueError, match="model_fn"):
        res.model()
    with pytest.raises(ValueError, match="split must be"):
        res.deltas("test")


def test_cli_compare_and_resume(tmp_path, capsys, one_thread):
    torch.set_num_threads(1)
    out = tmp_path / "cmp"
    argv = ["compare", "--model", "resnet20_cifar", "--dataset", "digits", "--per-class", "15", "--batch-size", "50",
            "--out", str(out), "--seeds", "0", "--controls", "continued,ema", "--progress", "false",
            "--baseline.epochs", "1", "--autoencoder.epochs", "1", "--transfer.epochs", "1", "--finetune.epochs", "1",
            "--representatives.clusters_per_class", "2"]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert "| continued |" in printed and "| ema |" in printed and "EncodeNet " in printed
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["rows"]) == {"baseline", "encodenet", "continued", "ema"}
    assert cli_main(argv) == 2  # not over an existing comparison
    assert "already holds a comparison" in capsys.readouterr().err
    assert cli_main(["compare", "--out", str(out), "--resume", "--seeds", "1"]) == 2  # settings come from the dir
    (out / "runs" / "ema-seed0.json").unlink()  # as if stopped before its last row
    assert cli_main(["compare", "--out", str(out), "--resume"]) == 0
    assert json.loads((out / "results.json").read_text())["rows"].keys() == saved["rows"].keys()
    assert cli_main(argv[:-2] + ["--out", str(tmp_path / "c2"), "--baseline.epochs", "0"]) == 2  # random baseline
    assert "baseline.epochs" in capsys.readouterr().err


def test_a_record_made_before_a_config_key_existed_stays_valid():
    """A key added to EncodeNetConfig since a record was written counts at its default (records committed
    by long benchmark runs survive a new option); a changed value still does not match."""
    config = EncodeNetConfig().to_dict()
    new = {"model": "m", "config": config, "variants": {"v": config}, "X": 2.0}
    old_config = {k: v for k, v in config.items() if k != "compile"}  # as if written before `compile` existed
    old = {**new, "config": old_config, "variants": {"v": old_config}}
    assert compare_mod._settled(old) == compare_mod._settled(new)
    changed = {**new, "config": {**config, "seed": 1}}
    assert compare_mod._settled(changed) != compare_mod._settled(new) and compare_mod._settled(None) is None


def test_a_seed_another_process_is_training_is_refused_before_training(loaders, tmp_path, monkeypatch):
    """Processes given different seeds may share one out_dir (each seed's rows under out/locks/seed<k>);
    a second process on a seed being trained is told so, and nothing trains."""
    import multiprocessing as mp

    from encodenet_timm.files import DirLock
    from encodenet_timm.errors import RunDirInUseError

    train, val, _ = loaders
    ctx = mp.get_context("fork")
    held, done = ctx.Event(), ctx.Event()

    def hold():
        lock = DirLock(tmp_path / "cmp" / "locks" / "seed0").acquire()
        held.set()
        done.wait(60)
        lock.release()
    child = ctx.Process(target=hold)
    child.start()
    try:
        assert held.wait(60)
        monkeypatch.setattr(compare_mod._Rows, "baseline", lambda *a: pytest.fail("trained a locked seed"))
        with pytest.raises(RunDirInUseError, match=rf"seed 0 of .*cmp is being trained by another process.*"
                                                   rf"process {child.pid}"):
            compare(_model, train, val, config=_config(), controls=("continued",), seeds=(0,),
                    out_dir=tmp_path / "cmp")
    finally:
        done.set()
        child.join(60)
    assert not (tmp_path / "cmp" / "runs").exists()
