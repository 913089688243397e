"""torch.distributed: every stage under torchrun (gloo, 2 CPU processes) against a 1-process run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Subset

from encodenet_timm import EncodeNetConfig, EncodeNetWrapper
from encodenet_timm import distributed, loaders

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "distributed_fit.py"


def _torchrun(nproc: int, out: Path, batch_size: int, *extra: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(EXAMPLE),
           "--out", str(out), "--batch-size", str(batch_size), "--train-size", "512", "--epochs", "1", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The example run on the same 512 digits: 2 ranks x 32 images per step, features on disk ("two")
    or gathered in rank 0's RAM ("two_ram"), and 1 rank x 64 (features in RAM): the same global batch."""
    root = tmp_path_factory.mktemp("ddp")
    _torchrun(2, root / "two", 32, "--all-ranks", "--feature-store", str(root / "store"))
    _torchrun(2, root / "two_ram", 32)
    _torchrun(2, root / "two_device", 32, "--device-data")  # #15: the digits held and batched on the device
    _torchrun(1, root / "one", 64)
    return root


def test_ranks_hold_identical_weights(runs):
    a, b = load_file(str(runs / "two" / "rank0.safetensors")), load_file(str(runs / "two" / "rank1.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_features_on_disk_or_in_ram_give_the_same_run(runs):
    for name in ("model.safetensors", "representatives.safetensors"):
        disk, ram = load_file(str(runs / "two" / name)), load_file(str(runs / "two_ram" / name))
        assert disk.keys() == ram.keys() and all(torch.equal(disk[k], ram[k]) for k in disk), name


def test_device_data_gives_the_same_two_rank_run(runs):
    for name in ("model.safetensors", "representatives.safetensors"):
        a, b = load_file(str(runs / "two" / name)), load_file(str(runs / "two_device" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_two_ranks_match_one_process(runs):
    two, one = load_file(str(runs / "two" / "model.safetensors")), load_file(str(runs / "one" / "model.safetensors"))
    assert two.keys() == one.keys()
    for k in two:  # the same math; only the order of float sums differs
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-4, msg=k)
    h2 = json.loads((runs / "two" / "history.json").read_text())
    h1 = json.loads((runs / "one" / "history.json").read_text())
    assert (h2["world_size"], h1["world_size"]) == (2, 1)
    for stage in ("baseline", "autoencoder", "transfer", "finetune"):
        assert len(h2["history"][stage]) == len(h1["history"][stage]) == 1
        assert h2["history"][stage][0]["loss"] == pytest.approx(h1["history"][stage][0]["loss"], rel=1e-4)


def test_representatives_match_one_process(runs):
    two = load_file(str(runs / "two" / "representatives.safetensors"))
    one = load_file(str(runs / "one" / "representatives.safetensors"))
    for k in ("labels", "cluster_ids", "rep_indices", "cluster_labels"):
        assert torch.equal(two[k], one[k]), k
    torch.testing.assert_close(two["entropy"], one["entropy"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(two["images"], one["images"], rtol=0, atol=0)
    assert not (runs / "store").exists() or not any((runs / "store").iterdir())  # the on-disk store is removed


def _torchrun_cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "encodenet_timm.cli", "fit", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow  # about a minute: two torchrun launches of the CLI
def test_cli_fit_and_resume_under_torchrun(tmp_path):
    out = tmp_path / "run"
    done = _torchrun_cli("--model", "resnet10t", "--dataset", "digits", "--per-class", "20", "--batch-size", "16",
                         "--out", str(out), "--progress", "false", "--set", "baseline.epochs=1",
                         "--set", "autoencoder.epochs=1", "--set", "transfer.epochs=1", "--set", "finetune.epochs=1",
                         "--set", "representatives.clusters_per_class=2")
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("test accuracy") == 1  # rank 0 reports, once
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "complete" and all(
        record["stages"][s]["status"] == "complete" for s in ("baseline", "autoencoder", "transfer", "finetune"))
    weights = load_file(str(out / "model.safetensors"))
    # resuming the finished run: every rank restores it from rank 0's checkpoints and nothing is retrained
    done = _torchrun_cli("--out", str(out), "--resume")
    assert done.returncode == 0, done.stderr[-4000:]
    again = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(weights[k], again[k]) for k in weights)
    assert len(json.loads((out / "run.json").read_text())["resumed"]) == 1


@pytest.mark.parametrize("restart", [pytest.param("relaunch", marks=pytest.mark.slow),
                                     pytest.param("max-restarts", marks=pytest.mark.slow)])
def test_a_rank_killed_in_a_stage_stops_the_other_and_the_run_continues_to_the_uninterrupted_result(
        runs, tmp_path, restart):
    """Rank 1 SIGKILLs itself in step 5 of the autoencoder's epoch (checkpoints every 3 steps): rank 0
    stops with a clear message instead of waiting, and the same launch again ("relaunch") or torchrun's
    own restart ("max-restarts", slow; `init_group` keys the restarted group by the attempt) continues
    from the checkpoint inside the epoch to the weights of the uninterrupted 2-rank run ("two_ram"), bit
    for bit."""
    worker = Path(__file__).with_name("ddp_kill_worker.py")
    run_dir, marker = tmp_path / "run", tmp_path / "killed-once"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           *(["--max-restarts", "1"] if restart == "max-restarts" else []), str(worker), str(marker),
           "--out", str(tmp_path / "out"), "--batch-size", "32", "--train-size", "512", "--epochs", "1",
           "--run-dir", str(run_dir), "--checkpoint-every", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", distributed.TIMEOUT_ENV: "60"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert marker.exists() and "rank 0 lost the other ranks in autoencoder" in done.stderr, done.stderr[-4000:]
    if restart == "relaunch":
        assert done.returncode != 0
        record = json.loads((run_dir / "run.json").read_text())
        assert record["status"] == "failed" and record["error"].startswith("RankLostError")
        assert [d.name for d in (run_dir / "checkpoints" / "autoencoder").iterdir()] == ["epoch-0000-step-0000003"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "complete" and len(record["resumed"]) == 1
    killed = load_file(str(tmp_path / "out" / "model.safetensors"))
    straight = load_file(str(runs / "two_ram" / "model.safetensors"))
    assert killed.keys() == straight.keys() and all(torch.equal(killed[k], straight[k]) for k in killed)


@pytest.mark.slow  # two torchrun ranks: the default run keeps test_ranks_hold_identical_weights
def test_a_nan_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    worker = Path(__file__).with_name("ddp_nan_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker),
           str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in records:  # rank 0's own loss was finite: it stops because the mean over ranks is not
        assert (r["raised"], r["stage"], r["epoch"], r["step"]) == ("NonFiniteLossError", "baseline", 0, 3), r


@pytest.fixture
def one_rank_group(tmp_path):
    """A 1-process gloo group in this process (every distributed code path, world size 1)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
    assert not distributed.is_distributed()


def _reps(digits, **overrides):
    train = Subset(digits[0], range(300))
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    cfg = EncodeNetConfig(progress=False).override({"representatives.clusters_per_class": 3, **overrides})
    return EncodeNetWrapper(model, cfg).select_representatives(DataLoader(train, batch_size=64))


def test_group_representatives_equal_plain_process(digits, one_rank_group, tmp_path):
    in_group = _reps(digits, **{"representatives.feature_store": str(tmp_path / "store")})
    dist.destroy_process_group()
    try:
        plain = _reps(digits)
    finally:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg2'}", rank=0, world_size=1)
    for k in ("labels", "cluster_ids", "entropy", "rep_indices", "cluster_labels", "images"):
        assert torch.equal(getattr(in_group, k), getattr(plain, k)), k


def test_train_loader_shards_cover_the_dataset(digits, one_rank_group):
    loader = DataLoader(Subset(digits[0], range(100)), batch_size=16, shuffle=True)
    sharded = loaders.train_loader(loader, seed=3)
    assert isinstance(sharded.sampler, torch.utils.data.DistributedSampler) and sharded.batch_size == 16
    loaders.set_epoch(sharded, 1)
    first = list(sharded.sampler)
    loaders.set_epoch(sharded, 2)
    assert sorted(first) == list(range(100)) and list(sharded.sampler) != first  # reshuffled per epoch
    assert loaders.train_loader(sharded, seed=0) is sharded  # a DistributedSampler is kept


def test_shard_batches_keeps_batches_whole(digits, one_rank_group):
    loader = DataLoader(Subset(digits[0], range(100)), batch_size=32)
    sharded = loaders.shard_batches(loader)
    assert loaders.batch_starts(sharded) == [0, 32, 64, 96]
    assert [len(y) for _, y in sharded] == [32, 32, 32, 4]


def test_without_a_group_everything_is_the_identity(digits):
    loader = DataLoader(Subset(digits[0], range(10)), batch_size=4, shuffle=True)
    assert not distributed.is_distributed() and distributed.world_size() == 1 and distributed.is_main()
    assert loaders.train_loader(loader, seed=0) is loader and loaders.shard_batches(loader) is loader
    assert distributed.all_reduce_sum([1.5, 2], torch.device("cpu")) == [1.5, 2.0]
    assert distributed.broadcast_object({"a": 1}) == {"a": 1} and distributed.gather_objects(3) == [3]
    assert np.isnan(distributed.all_reduce_sum([float("nan")], torch.device("cpu"))[0])


def test_a_failed_collective_is_told_from_other_errors_and_the_timeout_is_checked(monkeypatch):
    gloo = RuntimeError("[gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:7074: Connection reset by peer")
    assert distributed.is_collective_error(gloo)
    assert not distributed.is_collective_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not distributed.is_collective_error(ValueError("Connection reset by peer"))
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match="ENCODENET_DIST_TIMEOUT must be a number of seconds > 0, got 'soon'"):
        distributed.init_group("gloo")
    assert not distributed.is_distributed()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_two_gpus_with_nccl(tmp_path):
    """The example on 2 GPUs (NCCL, FAISS on GPU when the build has it): the ranks stay in sync."""
    _torchrun(2, tmp_path / "gpu", 32, "--all-ranks")
    a = load_file(str(tmp_path / "gpu" / "rank0.safetensors"))
    b = load_file(str(tmp_path / "gpu" / "rank1.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
