"""Run directories and checkpoints: atomic files, complete-only checkpoints, exact kill-and-resume."""
import json
import multiprocessing
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.data import DataLoader, Dataset, Subset

from encodenet_timm import EncodeNetConfig, EncodeNetWrapper, NonFiniteLossError
from encodenet_timm.errors import Interrupted
from encodenet_timm.checkpoint import MANIFEST
from encodenet_timm.run_dir import RunDir, model_fingerprint
from encodenet_timm.files import load_state_into, load_tensors, save_tensors, write_atomic
from encodenet_timm.data import digits_datasets
from encodenet_timm.training import TrainState
from encodenet_timm.wrapper import RUN_STAGES

from conftest import make_model

STAGES = ("baseline", "representatives", "autoencoder", "transfer")


def _info(model):
    return {"model": model_fingerprint(model), "seed": 0, "versions": {}, "machine": {}}


def _save(run, stage, epoch, epochs=2, value=0.0):
    train = TrainState(epoch, 3 * epoch, [{"epoch": e} for e in range(epoch)],
                       optimizer={"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]})
    return run.save(stage, epoch, epochs, tensors={"model": {"w": torch.full((3,), value)}}, state={}, train=train)


def test_atomic_write_leaves_the_old_file_when_the_writer_dies(tmp_path):
    path = tmp_path / "f.json"
    path.write_text("old")

    def dies(p):
        p.write_text("half")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, dies)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["f.json"]


def test_only_checkpoints_with_a_manifest_are_complete(tmp_path):
    run = RunDir(tmp_path, STAGES)
    first = _save(run, "baseline", 1, value=1.0)
    assert run.latest().directory == first.directory and not first.stage_complete
    state = run.checkpoint("baseline").train_state()
    assert (state.epoch, state.num_updates, len(state.history)) == (1, 3, 1)
    assert state.optimizer["param_groups"][0]["lr"] == 0.1
    # epoch 2 half written: its files exist but the manifest was never written
    half = run.stage_dir("baseline") / "epoch-0002"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\0" * 10)
    assert run.latest().epoch == 1
    second = _save(run, "baseline", 2, value=2.0)
    assert second.stage_complete and not first.directory.exists()  # older epochs are removed
    assert torch.equal(run.latest().tensors("model")["w"], torch.full((3,), 2.0))
    _save(run, "representatives", 1, epochs=1)
    assert run.latest().stage == "representatives" and run.checkpoint("baseline").epoch == 2
    assert json.loads(run.record_path.read_text())["stages"]["baseline"]["status"] == "complete"
    # a finished stage is never continued: it keeps no optimizer state (#16.7)
    assert not run.checkpoint("baseline").has("optimizer.pt") and not (second.directory / "optimizer.pt").exists()


def test_a_corrupted_checkpoint_file_is_refused(tmp_path):
    run = RunDir(tmp_path, STAGES)
    ckpt = _save(run, "baseline", 1)
    path = ckpt.directory / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-4] + b"abcd")  # same size, different bytes
    with pytest.raises(ValueError, match="corrupted or truncated"):
        ckpt.tensors("model")
    (ckpt.directory / "optimizer.pt").write_bytes(os.urandom(64))
    with pytest.raises(ValueError, match="corrupted or truncated"):
        ckpt.train_state()


def test_load_tensors_and_load_state_into_name_the_problem(tmp_path):
    model = make_model("resnet10t")
    path = tmp_path / "m.safetensors"
    save_tensors(path, model.state_dict())
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupted or truncated"):
        load_tensors(tmp_path / "cut.safetensors")
    with pytest.raises(FileNotFoundError):
        load_tensors(tmp_path / "none.safetensors")
    other = make_model("resnet18")
    with pytest.raises(ValueError, match="another model.*missing keys"):
        load_state_into(other, load_tensors(path), str(path))
    with pytest.raises(ValueError, match=r"'fc.weight' has shape \(10, 512\) in the file but \(7, 512\)"):
        load_state_into(make_model("resnet10t", num_classes=7), load_tensors(path), str(path))
    again = make_model("resnet10t", num_classes=10, drop_rate=0.0)
    load_state_into(again, load_tensors(path), str(path))


def test_run_dir_refuses_a_fresh_run_over_checkpoints_and_a_resume_of_something_else(tmp_path):
    model = make_model("resnet10t")
    run = RunDir(tmp_path / "run", STAGES)
    with pytest.raises(ValueError, match="holds no run to resume"):
        run.begin({"seed": 0}, _info(model), resume=True)
    config = {"seed": 0, "progress": True, "baseline": {"lr": 0.1}, "transfer": {"lr": 0.1}}
    run.begin(config, _info(model), resume=False)
    _save(run, "baseline", 1)
    with pytest.raises(ValueError, match="already holds checkpoints.*resume=True.*new run directory"):
        RunDir(tmp_path / "run", STAGES).begin({"seed": 0}, _info(model), resume=False)
    # a stage that has begun, and a key every stage reads, cannot change (#16.2); the message says what can
    with pytest.raises(ValueError, match=r"another config \(baseline.lr: 0.1 -> 0.2 \[baseline has begun: 1 of 2 "
                                         r"epochs done\]\).*\(here: representatives, autoencoder, transfer\).*"
                                         r"To rerun baseline with new settings, delete .*checkpoints/baseline first"):
        RunDir(tmp_path / "run", STAGES).begin({**config, "baseline": {"lr": 0.2}}, _info(model), resume=True)
    with pytest.raises(ValueError, match=r"seed: 0 -> 1 \[read by every stage, and the run has begun\]"):
        RunDir(tmp_path / "run", STAGES).begin({**config, "seed": 1}, _info(model), resume=True)
    with pytest.raises(ValueError, match="another model.*model.architecture: 'resnet10t' -> 'resnet18'"):
        RunDir(tmp_path / "run", STAGES).begin(config, _info(make_model("resnet18")), resume=True)
    again = RunDir(tmp_path / "run", STAGES)
    again.begin({**config, "progress": False}, _info(model), resume=True)  # progress ignored
    assert len(again.record["resumed"]) == 1 and again.latest().epoch == 1 and "config_changes" not in again.record
    assert (tmp_path / "run" / "checkpoints" / "baseline" / "epoch-0001" / MANIFEST).is_file()
    # a stage that has not begun may change: recorded in run.json, written to config.yaml
    third = RunDir(tmp_path / "run", STAGES)
    third.begin({**config, "transfer": {"lr": 0.3}}, _info(model), resume=True)
    record = json.loads(third.record_path.read_text())
    assert [c["changes"] for c in record["config_changes"]] == [["transfer.lr: 0.1 -> 0.3"]]
    assert record["config"]["transfer"]["lr"] == 0.3 == yaml.safe_load(third.config_path.read_text())["transfer"]["lr"]
    # config.yaml edited by hand is found, not believed
    third.config_path.write_text(third.config_path.read_text().replace("0.3", "0.5"))
    with pytest.raises(ValueError, match=r"config.yaml was edited after the run began \(transfer.lr: 0.3 -> 0.5\)"):
        RunDir(tmp_path / "run", STAGES).begin({**config, "transfer": {"lr": 0.5}}, _info(model), resume=True)


# ---- fit(run_dir=...) on real digits: kill and resume, NaN loss, repeatability -------------------------
_METHODS = {"fit_baseline": "baseline", "select_representatives": "representatives",
            "fit_autoencoder": "autoencoder", "fit_transfer": "transfer", "fit_finetune": "finetune"}
_FIT_STAGES = ("baseline", "autoencoder", "transfer", "finetune")


class _KillInStage(Dataset):
    """Reads through to `dataset`; sends `signum` (SIGKILL, SIGTERM, SIGINT) to this process at the
    `kill_at`-th image read inside `stage` (the stage is read from the calling wrapper method on the
    stack). `twice`: a second SIGTERM comes while the checkpoint after the first is being written."""

    def __init__(self, dataset, stage=None, kill_at=0, signum=signal.SIGKILL, twice=False):
        self.dataset, self.stage, self.kill_at, self.reads = dataset, stage, kill_at, 0
        self.signum, self.twice = signum, twice

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_name not in _METHODS:
            frame = frame.f_back
        if frame is not None and _METHODS[frame.f_code.co_name] == self.stage:
            self.reads += 1
            if self.reads == self.kill_at:
                if self.twice:
                    _signal_in_next_save()
                os.kill(os.getpid(), self.signum)
        return self.dataset[i]


def _signal_in_next_save():
    """The next torch.save (a checkpoint's optimizer.pt) is preceded by a SIGTERM to this process."""
    save = torch.save

    def signal_then_save(obj, path):
        torch.save = save
        os.kill(os.getpid(), signal.SIGTERM)
        save(obj, path)
    torch.save = signal_then_save


def _digits_fit(run_dir, resume=False, kill_stage=None, kill_at=0, *, config=None, hook=None, checkpoint_every=0,
                signum=signal.SIGKILL, twice=False):
    """resnet20_cifar split before its last stage, through every stage (2 epochs each, finetune too) on
    60 real digits, on 1 thread.

    `kill_stage`: `signum` at the `kill_at`-th image read in that stage (`_KillInStage`); "checkpoint":
    SIGKILL half-way through the `kill_at`-th torch.save (optimizer.pt, position.pt inside an epoch; in a
    child process only: it replaces torch.save).
    """
    if kill_stage == "checkpoint":
        save, saves = torch.save, [0]

        def dying_save(obj, path):
            saves[0] += 1
            if saves[0] < kill_at:
                return save(obj, path)
            Path(path).write_bytes(b"half a file")
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = dying_save
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train, test = digits_datasets(size=32, seed=0)
        labels = train.tensors[1]
        idx = [i for c in range(10) for i in torch.nonzero(labels == c).flatten()[:6].tolist()]  # 6 per class
        loader = DataLoader(_KillInStage(Subset(train, idx), kill_stage, kill_at, signum, twice), batch_size=20,
                            shuffle=True, generator=torch.Generator().manual_seed(0))
        val_loader = DataLoader(Subset(test, range(40)), batch_size=40)
        cfg = config or EncodeNetConfig(device="cpu", progress=False, split="last_stage")  # with a tail to restore
        for stage in _FIT_STAGES:
            getattr(cfg, stage).epochs = 2
        cfg.representatives.clusters_per_class = 2
        wrapper = EncodeNetWrapper(make_model("resnet20_cifar"), cfg)
        if hook is not None:
            hook(wrapper)
        return wrapper, wrapper.fit(loader, val_loader, run_dir=run_dir, resume=resume,
                                    checkpoint_every=checkpoint_every)
    finally:
        torch.set_num_threads(threads)


def _stopping_fit(*args, **kwargs):
    """`_digits_fit`; `Interrupted` exits with 128 + its signal, as the CLI does."""
    try:
        _digits_fit(*args, **kwargs)
    except Interrupted as e:
        sys.exit(128 + e.signal)


def _killed_child(run_dir, resume, stage, kill_at, signum=signal.SIGKILL, checkpoint_every=0, twice=False):
    """`_stopping_fit` in a new process that sends itself `signum` inside `stage`. The processes are
    forked from a server that imported torch, scikit-learn and this module once (multiprocessing's
    forkserver), to start fast."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__, "sklearn.datasets"])  # digits_datasets imports sklearn (3 s)
    child = ctx.Process(target=_stopping_fit, args=(str(run_dir), resume, stage, kill_at),
                        kwargs=dict(checkpoint_every=checkpoint_every, signum=signum, twice=twice))
    child.start()
    child.join(timeout=300)
    expected = -signal.SIGKILL if signum == signal.SIGKILL else 128 + signum
    assert child.exitcode == expected, f"{signum!r} in {stage}: exit code {child.exitcode}, not {expected}"


def _same_weights(a, b):
    ta, tb = load_tensors(a), load_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def _metrics(history):
    """The history without wall-clock times."""
    if isinstance(history, dict):
        return {k: _metrics(v) for k, v in history.items() if k != "seconds"}
    if isinstance(history, list):
        return [_metrics(v) for v in history]
    return history


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted `_digits_fit` run: (run_dir, history)."""
    run = tmp_path_factory.mktemp("straight") / "run"
    _, history = _digits_fit(run)
    return run, history


@pytest.mark.skipif("forkserver" not in multiprocessing.get_all_start_methods(), reason="needs forkserver (POSIX)")
def test_kill_or_stop_in_every_stage_and_resume_gives_the_uninterrupted_weights(straight, tmp_path):
    """SIGKILL and SIGTERM in the middle of an epoch of each training stage in turn, SIGKILL in the
    representatives and while a checkpoint is being written, a second SIGTERM while the stop's checkpoint
    is written (each resume is a new process, with or without checkpoints inside epochs), then finish:
    model.safetensors and the metrics equal those of an uninterrupted run, bit for bit."""
    straight_dir, expected = straight
    run = tmp_path / "killed"
    kill, term = signal.SIGKILL, signal.SIGTERM
    # 60 images, batches of 20: a training epoch is 3 steps and reads 60 images, the feature pass 60 (+ 20
    # representatives). A process reads from where it resumed: a SIGKILL leaves the newest checkpoint (one
    # every step with checkpoint_every=1), a SIGTERM finishes the step it comes in and checkpoints there.
    # (stage, signal, at image read, checkpoint_every, twice) -> (stage, epochs, steps) of the newest checkpoint
    chain = [(("checkpoint", kill, 6, 1, False), ("baseline", 1, 0)),    # writing the one after step 1 of epoch 2
             (("baseline", term, 30, 0, False), ("baseline", 1, 2)),      # in step 2: stop after it
             (("representatives", kill, 30, 0, False), ("baseline", 2, 0)),
             (("autoencoder", term, 30, 0, False), ("autoencoder", 0, 2)),
             (("autoencoder", kill, 50, 1, False), ("autoencoder", 1, 1)),
             (("transfer", term, 30, 0, True), ("transfer", 0, 2)),       # a second SIGTERM during the write
             (("transfer", kill, 50, 1, False), ("transfer", 1, 1)),
             (("finetune", term, 90, 0, False), ("finetune", 1, 2)),
             (("finetune", kill, 10, 1, False), ("finetune", 1, 2))]      # in the last step of all
    for i, ((stage, signum, kill_at, every, twice), newest) in enumerate(chain):
        _killed_child(run, i > 0, stage, kill_at, signum, every, twice)
        latest = RunDir(run, RUN_STAGES).latest()
        assert (latest.stage, latest.epoch, latest.step) == newest, (i, stage)
        complete = [d.name for d in latest.directory.parent.iterdir() if (d / MANIFEST).is_file()]
        assert complete == [latest.directory.name], complete  # older ones pruned once it was complete
        record = json.loads((run / "run.json").read_text())
        assert len(record["resumed"]) == i and not (run / "model.safetensors").exists()
        if signum == kill:  # nothing recorded it
            assert record["status"] == "running" and "resume" not in record
        else:
            assert record["status"] == "interrupted" and record["stages"][stage]["status"] == "interrupted"
            assert "SIGTERM" in record["error"] and record["resume"] == f"fit(..., run_dir={str(run)!r}, resume=True)"
        if stage == "checkpoint":  # its files were being written: there, but no manifest
            half = run / "checkpoints" / "baseline" / "epoch-0001-step-0000001"
            assert (half / "model.safetensors").is_file() and not (half / MANIFEST).exists()
    _, history = _digits_fit(run, resume=True)
    _same_weights(run / "model.safetensors", straight_dir / "model.safetensors")
    assert _metrics(history) == _metrics(expected)
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "complete" and len(record["resumed"]) == len(chain)


def test_same_seed_and_config_give_identical_metrics_and_weights(straight, tmp_path):
    run, history = straight
    wrapper, again = _digits_fit(tmp_path / "again")
    assert _metrics(again) == _metrics(history)
    _same_weights(tmp_path / "again" / "model.safetensors", run / "model.safetensors")
    # the record says what produced the result
    record = json.loads((run / "run.json").read_text())
    assert record["seed"] == 0 and record["status"] == "complete"
    assert {"python", "torch", "timm", "numpy", "faiss", "encodenet_timm"} <= set(record["versions"])
    assert {"platform", "cpu_count", "device"} <= set(record["machine"])
    assert record["model"]["architecture"] == "resnet20_cifar" and record["model"]["num_params"] > 0
    assert [record["stages"][s]["status"] for s in _METHODS.values()] == ["complete"] * 5
    assert EncodeNetConfig.from_yaml(run / "config.yaml") == wrapper.config
    for stage in ("transfer", "representatives"):
        assert _metrics(record["stages"][stage]["history"]) == _metrics(history[stage])


def test_nan_loss_stops_the_stage_and_keeps_the_last_good_checkpoint(straight, tmp_path):
    def nan_in_the_second_epoch(wrapper):
        calls = [0]

        def hook(module, args, out):
            calls[0] += torch.is_grad_enabled()  # training forwards only: evaluation runs without grad
            return out * float("nan") if calls[0] > 4 else out  # 3 steps per epoch: epoch 1, step 1
        wrapper.model.get_classifier().register_forward_hook(hook)

    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="baseline stage: loss became nan at epoch 1, step 1"):
        _digits_fit(run, hook=nan_in_the_second_epoch)
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "failed" and "NonFiniteLossError" in record["error"]
    assert record["stages"]["baseline"]["status"] == "failed"
    last = RunDir(run, ("baseline",)).latest()
    assert (last.stage, last.epoch) == ("baseline", 1)
    _digits_fit(run, resume=True)  # the cause gone, the run goes on from the good epoch
    _same_weights(run / "model.safetensors", straight[0] / "model.safetensors")


def test_run_dir_errors(straight, tmp_path):
    run, history = straight
    with pytest.raises(ValueError, match="already holds checkpoints.*resume=True"):
        _digits_fit(run)
    with pytest.raises(ValueError, match="holds no run to resume"):
        _digits_fit(tmp_path / "empty", resume=True)
    other = EncodeNetConfig(device="cpu", progress=False, split="last_stage", seed=1)
    with pytest.raises(ValueError, match=r"another config \(seed: 0 -> 1 \[read by every stage.*\(here: none\)"):
        _digits_fit(run, resume=True, config=other)
    wrapper = EncodeNetWrapper(make_model("resnet10t"), EncodeNetConfig.from_yaml(run / "config.yaml"))
    with pytest.raises(ValueError, match="another model.*'resnet20_cifar' -> 'resnet10t'"):
        wrapper.fit(DataLoader(digits_datasets()[0], batch_size=64), run_dir=run, resume=True)
    # a complete run resumes to the same result without training
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    _, again = _digits_fit(copy, resume=True)
    assert _metrics(again) == _metrics(history)
    _same_weights(copy / "model.safetensors", run / "model.safetensors")
    # a checkpoint file changed on disk is refused
    weights = next((copy / "checkpoints" / "finetune").glob("epoch-*/model.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(ValueError, match="corrupted or truncated"):
        _digits_fit(copy, resume=True)
