import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from encodenet_timm.config import StageConfig
from encodenet_timm.training import LoopOptions, train_stage
from timm.task import ClassificationTask

from conftest import make_model


def test_loop_follows_the_timm_schedule_and_reduces_loss():
    torch.manual_seed(0)
    model = make_model("resnet10t", num_classes=2)
    x = torch.randn(64, 3, 32, 32)
    y = (x[:, 0].mean((1, 2)) > 0).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    task = ClassificationTask(model, verbose=False)
    cfg = StageConfig(epochs=4, lr=0.05, warmup_epochs=1)
    hist = train_stage(task, loader, cfg, stage="test", device=torch.device("cpu"), progress=False)
    assert len(hist) == 4 and hist[-1]["loss"] < hist[0]["loss"]
    assert hist[-1]["lr"] == pytest.approx(0.0, abs=1e-6)  # cosine decays to min_lr=0
    assert 0.0 <= hist[-1]["accuracy"] <= 1.0


def test_frozen_everything_is_an_error():
    model = make_model("resnet10t").requires_grad_(False)
    loader = DataLoader(TensorDataset(torch.randn(4, 3, 32, 32), torch.zeros(4, dtype=torch.long)), batch_size=2)
    with pytest.raises(ValueError, match="nothing to train"):
        train_stage(ClassificationTask(model, verbose=False), loader, StageConfig(epochs=1), stage="x",
                    device=torch.device("cpu"), progress=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
def test_gpu_training_with_amp(amp):
    torch.manual_seed(0)
    model = make_model("resnet10t", num_classes=2).cuda()
    x = torch.randn(64, 3, 32, 32)
    y = (x[:, 0].mean((1, 2)) > 0).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    hist = train_stage(ClassificationTask(model, device=torch.device("cuda"), verbose=False), loader,
                       StageConfig(epochs=3, lr=0.05), stage="gpu", device=torch.device("cuda"), amp=amp,
                       channels_last=True, progress=False)
    assert hist[-1]["loss"] < hist[0]["loss"]


@pytest.mark.parametrize("stop_at, generator", [((1, 0), True), ((1, 2), False), ((2, 1), True)],
                         ids=["epoch-end", "inside-an-epoch-global-rng", "stop-signal"])
def test_resume_from_a_checkpoint_state_is_bitwise_exact(stop_at, generator):
    """Stop after (epochs, steps) (copying what a checkpoint holds), resume in fresh objects: the weights
    and per-epoch losses of 3 uninterrupted epochs. The shuffle comes from the loader's generator or
    (no generator) from the global RNG, which dropout also draws from. "stop-signal": `stop` asks for it,
    the loop checkpoints after that step and raises `Interrupted`."""
    import copy
    import signal

    from encodenet_timm.errors import Interrupted

    x = torch.randn(48, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.arange(48) % 2
    cfg = StageConfig(epochs=3, lr=0.05, warmup_epochs=1, opt="sgd")
    by_signal = stop_at == (2, 1)

    def run(model, resume=None, stop_after=None):
        loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True,
                            generator=torch.Generator().manual_seed(123) if generator else None)
        saved, steps = {}, [0]
        model.register_forward_pre_hook(lambda *_: steps.__setitem__(0, steps[0] + torch.is_grad_enabled()))

        def on_checkpoint(state):
            assert state.step == 0 or state.ranks[0]["sums"][2] == 16 * state.step  # images seen this epoch
            if (state.epoch, state.step) == stop_after:
                saved.update(state=copy.deepcopy(state), model=copy.deepcopy(model.state_dict()))
                if not by_signal:
                    raise KeyboardInterrupt  # the process dies here

        def stop():  # SIGTERM from the step that ends 2 epochs + 1 step on (3 steps an epoch)
            return signal.SIGTERM if stop_after is not None and steps[0] >= 3 * stop_after[0] + stop_after[1] else 0
        try:
            hist = train_stage(ClassificationTask(model, verbose=False), loader, cfg, stage="t",
                               device=torch.device("cpu"), progress=False, seed=7, resume=resume,
                               on_checkpoint=on_checkpoint, checkpoint_every=0 if by_signal else 1,
                               stop=stop if by_signal else None)
        except KeyboardInterrupt:
            return saved
        except Interrupted as e:
            assert (e.signal, e.stage, e.epoch, e.step) == (signal.SIGTERM, "t", *stop_after)
            return saved
        return hist

    full = make_model("resnet10t", num_classes=2, drop_rate=0.2)
    hist_full = run(full)
    saved = run(make_model("resnet10t", num_classes=2, drop_rate=0.2), stop_after=stop_at)
    assert (saved["state"].epoch, saved["state"].step) == stop_at
    resumed = make_model("resnet10t", num_classes=2, drop_rate=0.2)
    resumed.load_state_dict(saved["model"])
    torch.manual_seed(99)  # whatever the global RNG holds now, the checkpoint's states are restored
    hist_resumed = run(resumed, resume=saved["state"])
    assert [h["loss"] for h in hist_resumed] == [h["loss"] for h in hist_full]
    assert [h["accuracy"] for h in hist_resumed] == [h["accuracy"] for h in hist_full]
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_zero_epochs_skips_the_stage_and_negative_is_an_error():
    model = make_model("resnet20_cifar")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loader = DataLoader(TensorDataset(torch.randn(8, 3, 32, 32), torch.arange(8) % 10), batch_size=4)
    task = ClassificationTask(model, verbose=False)
    assert train_stage(task, loader, StageConfig(epochs=0, sched="cosine"), stage="transfer",
                       device=torch.device("cpu"), progress=False) == []
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="epochs must be >= 0"):
        train_stage(task, loader, StageConfig(epochs=-1), stage="transfer", device=torch.device("cpu"))


def test_options_or_their_keywords_not_both():
    model = make_model("resnet10t", num_classes=2)
    loader = DataLoader(TensorDataset(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1])), batch_size=2)
    task = ClassificationTask(model, verbose=False)
    cfg = StageConfig(epochs=1, sched="none")
    with pytest.raises(TypeError, match="not both"):
        train_stage(task, loader, cfg, stage="t", options=LoopOptions(torch.device("cpu")), progress=False)
    with pytest.raises(TypeError):
        train_stage(task, loader, cfg, stage="t", device=torch.device("cpu"), no_such_option=True)


def _read_run(read_every, *, nan_at=None, checkpoints=None):
    """4 epochs of 3 steps (48 images, batch 16) with a read of the losses every `read_every` steps;
    `nan_at`: the global step whose loss is NaN."""
    torch.manual_seed(0)
    model = make_model("resnet10t", num_classes=2)
    x = torch.randn(48, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(x, torch.arange(48) % 2), batch_size=16, shuffle=True,
                        generator=torch.Generator().manual_seed(1))
    task = ClassificationTask(model, verbose=False)
    if nan_at is not None:
        steps = [0]
        forward = task.forward

        def poisoned(x, y):
            out = forward(x, y)
            steps[0] += 1
            return {**out, "loss": out["loss"] * float("nan")} if steps[0] == nan_at + 1 else out
        task.forward = poisoned
    hist = train_stage(task, loader, StageConfig(epochs=4, lr=0.05, opt="sgd"), stage="t", seed=3,
                       options=LoopOptions(torch.device("cpu"), progress=False, read_every=read_every),
                       on_checkpoint=None if checkpoints is None else checkpoints.append)
    return model, hist


def test_reading_the_losses_every_k_steps_changes_nothing_computed():
    """What a GPU run does by default (READ_EVERY_ACCELERATOR): the losses stay on the device between
    reads. Weights and history equal reading every step, bit for bit, and an epoch's last step is
    always read (3 steps an epoch, reads every 2 or 5)."""
    model, hist = _read_run(1)
    for k in (2, 5):
        other, other_hist = _read_run(k)
        assert [(h["loss"], h["accuracy"]) for h in other_hist] == [(h["loss"], h["accuracy"]) for h in hist]
        for name, v in model.state_dict().items():
            assert torch.equal(v, other.state_dict()[name]), (k, name)
    assert LoopOptions(torch.device("cpu")).steps_between_reads() == 1
    assert LoopOptions(torch.device("meta")).steps_between_reads() > 1
    with pytest.raises(ValueError, match="read_every"):
        LoopOptions(torch.device("cpu"), read_every=0).steps_between_reads()


@pytest.mark.parametrize("read_every", [1, 4])
def test_a_nan_loss_is_named_at_its_step_and_no_checkpoint_holds_its_update(read_every):
    """NaN at global step 7 (epoch 2, step 1): every step on CPU raises before that update; with reads
    every 4 steps the error names the same step, at the read after it, and the checkpoints written are
    those of epochs 1 and 2 only, whose weights are finite."""
    from encodenet_timm.errors import NonFiniteLossError

    checkpoints = []
    with pytest.raises(NonFiniteLossError) as info:
        _read_run(read_every, nan_at=7, checkpoints=checkpoints)
    assert (info.value.epoch, info.value.step) == (2, 1)
    assert [c.epoch for c in checkpoints] == [1, 2]


@pytest.mark.parametrize("amp, fused_while_training", [("bf16", False), ("none", True)])
def test_cpu_bf16_trains_timm_attention_unfused_and_switches_it_back(amp, fused_while_training):
    """torch's CPU flash-attention backward is slow in bf16: a bf16 stage on the CPU runs timm's attention as
    explicit matmul + softmax, and every module is as it was after the stage (fp32 keeps the fused path)."""
    model = make_model("vit_tiny_patch16_224")
    blocks = [m for m in model.modules() if getattr(m, "fused_attn", None) is True]
    assert blocks  # timm fuses attention by default
    seen = []
    blocks[0].register_forward_pre_hook(lambda m, args: seen.append(m.fused_attn) if m.training else None)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g))
    hist = train_stage(ClassificationTask(model, verbose=False), DataLoader(data, batch_size=8),
                       StageConfig(epochs=1, lr=0.01, opt="sgd", sched="none"), stage="t",
                       options=LoopOptions(torch.device("cpu"), amp=amp, progress=False))
    assert len(seen) == 2 and set(seen) == {fused_while_training} and hist[0]["loss"] > 0
    assert all(m.fused_attn is True for m in blocks)
