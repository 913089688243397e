"""compare(): EncodeNet against same-size controls at equal extra compute, end to end on real digits."""
import importlib
import json

import numpy as np
import pytest
import timm
import torch
from torch.utils.data import DataLoader, Subset
from torch.utils.flop_counter import FlopCounterMode

from encodenet_timm import EncodeNetConfig, EncodeNetWrapper, compare
from encodenet_timm.cli import main as cli_main
from encodenet_timm.compare import CompareResult, count_compute
from encodenet_timm.config import ControlsConfig

compare_mod = importlib.import_module("encodenet_timm.compare")  # the package's `compare` is the function
rows_mod = importlib.import_module("encodenet_timm.rows")
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


# the toy baselines (120 digits, 2 epochs) sit near chance: the mechanics below do not depend on their accuracy
TOY = dict(allow_untrained_baseline=True)


def test_compare_end_to_end_on_digits(loaders, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    train, val, test = loaders
    out = tmp_path / "cmp"
    res = compare(_model, train, val, config=_config(), seeds=(0, 1), test_loader=test, out_dir=out, **TOY)
    rows = ["baseline", "encodenet", "continued", "kd", "ema", "equal"]
    assert res.rows == rows and res.seeds == [0, 1]
    X = res.compute["extra_epochs"]
    assert 1.0 < X < 10.0
    for row in rows:
        for seed in (0, 1):
            rec = res.records[row][seed]
            assert 0.0 <= rec["val_accuracy"] <= 1.0 and 0.0 <= res.tests[row][seed] <= 1.0, row
            assert "test_accuracy" not in rec and rec["precision"] == "fp32", row  # the test is sealed apart
            hist = rec["history"] if isinstance(rec["history"], list) else [
                e for stage in rec["history"].values() for e in stage]
            assert rec["train_seconds"] == pytest.approx(sum(e["seconds"] for e in hist)) and hist, row
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
    assert "2 seeds: means only" in res.verdict and "beats" not in res.verdict and "loses" not in res.verdict
    assert "no test below" not in res.verdict  # said once, in the bracket, not after every comparison
    # the sealed test: written apart from the runs, once, for the rows declared before the choice
    sealed = json.loads((out / "test.json").read_text())
    assert set(sealed["test"]) == set(rows) and sealed["choice"]["chosen"] == "encodenet"
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
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())  # removed once finished
    # resumable per (row, seed): a second call trains nothing and returns the same numbers
    before = {p.name: p.read_text() for p in (out / "runs").glob("*.json")}
    calls = []
    for module in (importlib.import_module("encodenet_timm.controls"), wrapper_mod):
        monkeypatch.setattr(module, "train_stage", lambda *a, **k: calls.append(1))
    again = compare(_model, train, val, config=_config(), seeds=(0, 1), test_loader=test, out_dir=out, **TOY)
    assert not calls and again.records == res.records and again.tests == res.tests
    assert {p.name: p.read_text() for p in (out / "runs").glob("*.json")} == before
    # a record written before records kept train_seconds gets it from its history, as CompareResult.load does
    old = json.loads((out / "runs" / "kd-seed1.json").read_text())
    del old["train_seconds"]
    (out / "runs" / "kd-seed1.json").write_text(json.dumps(old))
    kept = compare(_model, train, val, config=_config(), seeds=(0, 1), test_loader=test, out_dir=out, **TOY)
    assert not calls and kept.records["kd"][1]["train_seconds"] == res.records["kd"][1]["train_seconds"]
    # other settings of a row in the same directory are refused, not mixed in
    with pytest.raises(ValueError, match="other settings"):
        compare(_model, train, val, config=_config(**{"transfer.lr": 0.5}), seeds=(0,), test_loader=test,
                out_dir=out, **TOY)
    with pytest.raises(ValueError, match="other settings"):  # the controls' own settings are part of their rows
        compare(_model, train, val, config=_config(), seeds=(0,), test_loader=test, out_dir=out,
                controls_config=ControlsConfig(lr=0.02), **TOY)


@pytest.mark.slow  # FlopCounterMode over every row; the default run checks each record's extra epochs
def test_each_row_trains_the_recipes_extra_flops_within_5_percent(loaders, monkeypatch):
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

    for name in ("baseline", "encodenet", "continued", "kd", "equal"):
        monkeypatch.setattr(rows_mod.Rows, name, counted(name, getattr(rows_mod.Rows, name)))
    monkeypatch.setattr(rows_mod, "evaluate", lambda *a, **k: {"accuracy": 0.5, "loss": 1.0})  # no FLOPs
    res = compare(_model, train, val, config=_config(**{"autoencoder.epochs": 2}), seeds=(0,), **TOY)
    c = res.compute
    per_epoch = c["train_step"] * N_TRAIN
    X = c["extra_epochs"]
    assert measured["baseline"] / per_epoch == pytest.approx(2.0, rel=0.01)
    assert measured["encodenet"] / per_epoch == pytest.approx(X, rel=0.05)  # the count matches the real fit
    assert measured["continued"] / per_epoch == pytest.approx(X, rel=0.05)
    assert measured["kd"] / per_epoch == pytest.approx(X, rel=0.05)
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


def test_a_trained_baseline_drops_equal_and_says_so(loaders):
    torch.set_num_threads(1)
    train, val, _ = loaders
    torch.manual_seed(0)
    trained = _model()
    res = compare(lambda: trained, train, val, config=_config(**{"baseline.epochs": 0}), seeds=(0,),
                  controls=("continued", "equal"), **TOY)
    assert res.rows == ["baseline", "encodenet", "continued"]
    assert any("equal was left out" in n for n in res.notes)
    assert "1 seed: means only" in res.verdict
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
    rec = {"val_accuracy": 0.5, "extra_epochs": 0.0}
    res = CompareResult(records={"baseline": {0: rec}, "encodenet": {0: {**rec, "val_accuracy": 0.6}}},
                        compute={"extra_epochs": 1.0, "note": ""}, seeds=[0], controls=[], config={}, notes=[])
    assert res.best == "encodenet" and not res.has_test
    assert res.verdict.endswith("is 'encodenet'.")  # the verdict's last sentence ends like the others
    with pytest.raises(ValueError, match="model_fn"):
        res.model()
    with pytest.raises(ValueError, match="split must be"):
        res.deltas("test")


def test_plot_keeps_validation_and_test_on_separate_panels(tmp_path, monkeypatch):
    """A variant row has no test accuracy: it appears on the validation panel only, never on the test axis."""
    import matplotlib.figure
    from matplotlib.collections import PathCollection
    rec = {"extra_epochs": 1.0}
    records = {"baseline": {0: {**rec, "val_accuracy": 0.50}}, "encodenet": {0: {**rec, "val_accuracy": 0.60}},
               "ce_3": {0: {**rec, "val_accuracy": 0.70}}}
    res = CompareResult(records=records, compute={"extra_epochs": 1.0, "note": ""}, seeds=[0], controls=[],
                        config={}, notes=[], tests={"baseline": {0: 0.40}, "encodenet": {0: 0.45}})
    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: figures.append(fig))
    res.plot(tmp_path / "p.png")
    val_ax, test_ax = figures[0].axes
    xs = lambda ax: sorted(float(x) for c in ax.collections if isinstance(c, PathCollection)  # noqa: E731
                          for x, _ in c.get_offsets())  # the seeds' dots
    assert xs(val_ax) == [50.0, 60.0, 70.0] and xs(test_ax) == [40.0, 45.0]
    assert "test" in test_ax.get_xlabel() and "validation" in val_ax.get_xlabel()


def test_a_record_made_before_a_config_key_existed_stays_valid():
    """A key added to EncodeNetConfig since a record was written counts at its default (records committed
    by long benchmark runs survive a new option); a changed value still does not match. Records written
    before per-row fingerprints (the whole comparison's settings) are read as the part their row needs:
    a baseline or recipe row stays valid when only the controls changed; an old control row never does."""
    config = EncodeNetConfig().override({"baseline.epochs": 3})
    common = {"model": "m", "params": 5, "num_classes": 10, "data": {"train": 100, "val": 50},
              "precision": "fp32", "channels_last": False}
    old_config = {k: v for k, v in config.to_dict().items() if k != "compile"}  # written before `compile` existed
    old = {"model": "m", "params": 5, "num_classes": 10, "data": {"train": 100, "val": 50, "test": 70},
           "config": old_config, "variants": {"v": old_config}, "controls": ["kd"], "kd": [4.0, 0.3],
           "ema_decay": 0.9998, "X": 2.0}
    fp = lambda row, **kw: rows_mod.row_fingerprint(common, row, config=config, **kw)
    assert rows_mod.projected(old, "baseline") == fp("baseline")
    assert rows_mod.projected(old, "encodenet") == fp("encodenet", recipe=config)
    assert rows_mod.projected(old, "v") == fp("v", recipe=config)
    assert rows_mod.projected(old, "kd") != fp("kd", controls=ControlsConfig(), X=2.0)
    changed = {**old, "config": {**old_config, "transfer": {**old_config["transfer"], "lr": 0.5}}}
    assert rows_mod.projected(changed, "baseline") == fp("baseline")  # a recipe key: not the baseline's
    assert rows_mod.projected(changed, "encodenet") != fp("encodenet", recipe=config)
    assert rows_mod.projected(None, "baseline") is None
    kd = fp("kd", controls=ControlsConfig(), X=2.0)
    before_option = {**kd, "controls": {k: v for k, v in kd["controls"].items() if k != "kd_student_bn"}}
    assert rows_mod.projected(before_option, "kd") == kd  # a ControlsConfig key added since: at its default


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
        monkeypatch.setattr(rows_mod.Rows, "baseline", lambda *a: pytest.fail("trained a locked seed"))
        with pytest.raises(RunDirInUseError, match=rf"seed 0 of .*cmp is being trained by another process.*"
                                                   rf"process {child.pid}"):
            compare(_model, train, val, config=_config(), controls=("continued",), seeds=(0,),
                    out_dir=tmp_path / "cmp")
    finally:
        done.set()
        child.join(60)
    assert not (tmp_path / "cmp" / "runs").exists()


class _Stop(Exception):
    pass


def _timeless(history):
    """A history without its wall-clock seconds (per stage for EncodeNet rows)."""
    if isinstance(history, dict):
        return {k: _timeless(v) for k, v in history.items()}
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


# the controls' RowCheckpoints path (baseline, continued, kd) in the slow run; the default run resumes EncodeNet's
@pytest.mark.parametrize("stop_row", [pytest.param("baseline", marks=pytest.mark.slow),
                                      pytest.param("continued", marks=pytest.mark.slow),
                                      pytest.param("kd", marks=pytest.mark.slow), "encodenet"])
def test_a_row_stopped_inside_continues_from_its_checkpoint_to_the_same_weights(loaders, tmp_path, monkeypatch,
                                                                                  stop_row):
    """A process killed inside a row (here: an exception at its 3rd in-epoch checkpoint) loses at most
    `checkpoint_every` steps: the next compare continues the row from its checkpoint, to the weights and
    history of a run that was never stopped."""
    torch.set_num_threads(1)
    train, val, _ = loaders
    kw = dict(config=_config(**{"baseline.epochs": 3}), controls=("continued", "ema", "kd"), seeds=(0,),
              checkpoint_every=1, **TOY)
    clean = compare(_model, train, val, out_dir=tmp_path / "clean", **kw)
    controls_mod = importlib.import_module("encodenet_timm.controls")
    run_mod = importlib.import_module("encodenet_timm.run")
    saves = []
    real = controls_mod.RowCheckpoints.save if stop_row != "encodenet" else run_mod.Run.save

    def stopping(self, *a, **k):
        row = self.row if stop_row != "encodenet" else "encodenet"
        if row == stop_row:
            saves.append(1)
            if len(saves) == 3:
                raise _Stop
        return real(self, *a, **k)
    target = controls_mod.RowCheckpoints if stop_row != "encodenet" else run_mod.Run
    monkeypatch.setattr(target, "save", stopping)
    with pytest.raises(_Stop):
        compare(_model, train, val, out_dir=tmp_path / "stopped", **kw)
    monkeypatch.setattr(target, "save", real)
    assert any((tmp_path / "stopped" / "checkpoints").iterdir())  # the row's checkpoint is there
    again = compare(_model, train, val, out_dir=tmp_path / "stopped", **kw)
    for row in clean.rows:
        a, b = clean.model(row).state_dict(), again.model(row).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), row
        assert _timeless(clean.records[row][0]["history"]) == _timeless(again.records[row][0]["history"]), row
        assert clean.records[row][0]["val_accuracy"] == again.records[row][0]["val_accuracy"], row


def test_the_baseline_row_is_the_wrappers_baseline(loaders):
    """compare trains its baseline as EncodeNetWrapper.fit_baseline does: same task, seed and weights."""
    torch.set_num_threads(1)
    train, val, _ = loaders
    res = compare(_model, train, val, config=_config(), controls=(), seeds=(1,), rows=["baseline"], **TOY)
    torch.manual_seed(1)
    w = EncodeNetWrapper(_model(), _config(**{"seed": 1}), copy=False)
    w.fit_baseline(train)
    mine = res.model("baseline", 1).state_dict()
    assert all(torch.equal(mine[k], v.cpu()) for k, v in w.model.state_dict().items())
    assert res.rows == ["baseline"] and any("partial" in n for n in res.notes)
    assert "has not finished" in res.verdict


def test_trials_give_each_side_its_best_of_k_and_only_declared_rows_are_tested(loaders, tmp_path):
    torch.set_num_threads(1)
    train, val, test = loaders
    res = compare(_model, train, val, config=_config(), controls=("ema", "continued"), seeds=(0,), trials=2,
                  variants={"ce_3": _config(**{"autoencoder.ce_weight": 3.0}),
                            "ft_0": _config(**{"finetune.epochs": 0})},
                  described={"ce_3": "autoencoder loss MSE + 3 x CE"}, test_loader=test, out_dir=tmp_path / "cmp", **TOY)
    assert res.rows == ["baseline", "encodenet", "encodenet@t1", "ce_3", "ft_0", "continued", "continued@t1", "ema",
                        "ema@t1"]  # the controls in CONTROLS order, whatever order they were given in
    res.save(tmp_path / "cmp")
    loaded = CompareResult.load(tmp_path / "cmp")  # the same rows, table and verdict, read back from the folder
    assert "| autoencoder loss MSE + 3 x CE |" in loaded.table()  # ce_3, as the last report described it
    assert loaded.rows == res.rows and loaded.controls == res.controls
    assert loaded.table() == res.table() and loaded.verdict == res.verdict
    assert set(res.chosen_trials) == {"encodenet", "continued", "ema"}
    for side, row in res.chosen_trials.items():  # each side's best of 2 on validation
        assert row == max([side, f"{side}@t1"], key=lambda r: res.accuracy(r)[0])
    assert res.chosen == max(["encodenet", "encodenet@t1", "ce_3", "ft_0"], key=lambda r: res.accuracy(r)[0])
    cfg = json.loads((tmp_path / "cmp" / "runs" / "continued@t1-seed0.json").read_text())["fingerprint"]
    assert cfg["lr_factor"] == pytest.approx(1 / 3)
    # the sealed test: declared rows only; a variant or trial not chosen carries no test accuracy
    declared = {"baseline", "encodenet", "continued", "ema", res.chosen, *res.chosen_trials.values()}
    assert set(res.tests) == declared
    for row in set(res.rows) - declared:
        with pytest.raises(ValueError, match="only the rows declared before the choice"):
            res.accuracy(row, "test")
    assert "not tested" in res.table() and "best of 2 on validation" in res.verdict
    marked = [line for line in res.table().splitlines() if "(EncodeNet's choice)" in line]
    assert marked == ([] if res.chosen == "encodenet" else [l for l in marked if l.startswith(f"| {res.chosen} (")])
    assert len(marked) == (res.chosen != "encodenet")  # the marker names EncodeNet's pick, not the overall winner


def test_a_diverging_row_is_marked_and_left_out_of_the_verdict(loaders):
    torch.set_num_threads(1)
    train, val, _ = loaders
    res = compare(_model, train, val, config=_config(), controls=("continued", "ema"), seeds=(0,),
                  controls_config=ControlsConfig(lr=10.0, warmup_epochs=0, clip_grad=None), **TOY)
    assert res.diverged("continued") and res.diverged("ema")
    assert set(res.comparisons()) == {"baseline"}
    assert "continued diverged (seed 0: " in res.verdict and "is left out" in res.verdict
    assert "(diverged)" in res.table() and res.best not in ("continued", "ema")


def test_an_untrained_baseline_is_refused_before_any_other_row(loaders, monkeypatch):
    train, val, _ = loaders
    monkeypatch.setattr(rows_mod.Rows, "encodenet", lambda *a: pytest.fail("trained from a random baseline"))
    with pytest.raises(ValueError, match=r"looks untrained.*--baseline.epochs N.*allow_untrained_baseline=True"):
        compare(_model, train, val, config=_config(**{"baseline.epochs": 0}), controls=("continued",), seeds=(0,))


def test_sigterm_inside_a_row_checkpoints_it_and_interrupts(loaders, tmp_path, monkeypatch):
    """With an out_dir, SIGTERM inside a supervised row finishes the step, writes the row's checkpoint and
    raises Interrupted; the next compare continues the row from there."""
    import os
    import signal

    from encodenet_timm.errors import Interrupted
    torch.set_num_threads(1)
    train, val, _ = loaders
    controls_mod = importlib.import_module("encodenet_timm.controls")
    real, sent = controls_mod.RowCheckpoints.save, []

    def save_then_signal(self, *a, **k):
        real(self, *a, **k)
        if self.row == "continued" and not sent:
            sent.append(1)
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(controls_mod.RowCheckpoints, "save", save_then_signal)
    kw = dict(config=_config(), controls=("continued",), seeds=(0,), checkpoint_every=1, **TOY)
    with pytest.raises(Interrupted):
        compare(_model, train, val, out_dir=tmp_path / "cmp", **kw)
    assert signal.getsignal(signal.SIGTERM) is not None and sent  # the handlers before compare are back
    assert list((tmp_path / "cmp" / "checkpoints" / "continued-seed0" / "checkpoints" / "continued").iterdir())
    res = compare(_model, train, val, out_dir=tmp_path / "cmp", **kw)
    assert res.rows == ["baseline", "encodenet", "continued"]


def test_cli_compare_ctrl_c_prints_how_to_resume(tmp_path, capsys, monkeypatch):
    cli_mod = importlib.import_module("encodenet_timm.cli.compare")

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli_mod, "compare", interrupted)
    out = tmp_path / "cmp"
    code = cli_main(["compare", "--model", "resnet20_cifar", "--dataset", "digits", "--per-class", "5", "--out",
                     str(out), "--seeds", "0", "--baseline.epochs", "1", "--trials", "2"])
    assert code == 130
    assert f"interrupted; continue with: encodenet compare --out {out} --resume" in capsys.readouterr().err
    assert json.loads((out / "compare.json").read_text())["run"]["trials"] == 2
