import pytest
import timm
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

from encodenet_timm import EncodeNetConfig, EncodeNetWrapper

from conftest import make_model


def _cfg(**stages):
    cfg = EncodeNetConfig.paper(progress=False)  # these tests check the paper's stages (frozen encoder)
    cfg.baseline.epochs, cfg.autoencoder.epochs, cfg.transfer.epochs = 0, 1, 1
    for name, epochs in stages.items():
        getattr(cfg, name).epochs = epochs
    return cfg


def _small(digits, n=200, batch_size=50):
    train, _ = digits
    sub = Subset(train, list(range(n)))
    return DataLoader(sub, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def fitted(digits):
    """resnet10t trained end to end on real digits (train 1,347 / test 450 images)."""
    train, test = digits
    torch.manual_seed(0)
    train_loader = DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    test_loader = DataLoader(test, batch_size=256)
    model = make_model("resnet10t")
    cfg = _cfg(baseline=5, autoencoder=2, transfer=2)
    wrapper = EncodeNetWrapper(model, cfg)
    history = wrapper.fit(train_loader, test_loader)
    return model, wrapper, history, test_loader


def test_end_to_end_on_real_digits_beats_chance(fitted):
    model, wrapper, history, test_loader = fitted
    assert set(history) == {"baseline", "representatives", "autoencoder", "transfer"}
    assert [len(history[s]) for s in ("baseline", "autoencoder", "transfer")] == [5, 2, 2]
    for stage in ("baseline", "transfer"):
        assert {"loss", "accuracy", "seconds", "val_accuracy", "val_loss"} <= set(history[stage][-1])
    assert "accuracy" not in history["autoencoder"][0] and history["autoencoder"][0]["seconds"] > 0
    assert history["autoencoder"][1]["loss"] < history["autoencoder"][0]["loss"]
    result = wrapper.evaluate(test_loader)
    assert set(result) == {"accuracy", "loss"}
    assert result["accuracy"] > 0.8  # chance is 0.1
    assert history["representatives"]["num_clusters"] == 50


def test_wrapper_leaves_the_users_model_untouched(fitted):
    model, wrapper, _, _ = fitted
    fresh = make_model("resnet10t")
    for (k, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), k


def test_export_is_a_plain_timm_model_with_the_same_predictions(fitted, tmp_path):
    model, wrapper, _, test_loader = fitted
    plain = wrapper.export()
    assert type(plain) is type(model)
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in model.parameters())
    assert not [m for m in plain.modules() if type(m).__module__.startswith("encodenet_timm")]
    x, _ = next(iter(test_loader))
    with torch.no_grad():
        wrapper.model.eval()
        torch.testing.assert_close(plain(x), wrapper(x).cpu())
    # loads with timm alone, through safetensors
    from safetensors.torch import load_file, save_file
    save_file(plain.state_dict(), str(tmp_path / "m.safetensors"))
    again = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    again.load_state_dict(load_file(str(tmp_path / "m.safetensors")))
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), plain(x))


def test_reconstruct_and_flops(fitted):
    _, wrapper, _, test_loader = fitted
    x, _ = next(iter(test_loader))
    out = wrapper.reconstruct(x[:5])
    assert out.shape == x[:5].shape and torch.isfinite(out).all()
    flops = wrapper.flops()
    assert 0 < flops["decoder"] <= flops["encoder"] and flops["ratio"] <= 1.0
    assert isinstance(wrapper.encoder, torch.nn.Module) and isinstance(wrapper.head, torch.nn.Module)


def test_representatives_are_min_entropy_members_of_their_cluster(fitted):
    _, wrapper, _, _ = fitted
    reps = wrapper.representatives
    for c in range(reps.num_clusters):
        members = torch.nonzero(reps.cluster_ids == c).flatten()
        assert reps.rep_indices[c] == members[reps.entropy[members].argmin()]
        assert (reps.labels[members] == reps.cluster_labels[c]).all()


def test_transfer_freezes_the_encoder_bitwise(digits):
    wrapper = EncodeNetWrapper(make_model("resnet10t"), _cfg(transfer=2))
    loader = _small(digits)
    enc_before = {k: v.clone() for k, v in wrapper.encoder.state_dict().items()}
    head_before = {k: v.clone() for k, v in wrapper.head.state_dict().items()}
    assert any("running_mean" in k for k in enc_before)  # BatchNorm statistics are covered
    wrapper.fit_transfer(loader)
    for k, v in wrapper.encoder.state_dict().items():
        assert torch.equal(v, enc_before[k]), k
    assert any(not torch.equal(v, head_before[k]) for k, v in wrapper.head.state_dict().items())
    assert all(p.requires_grad for p in wrapper.model.parameters())  # unfrozen again afterwards


def test_autoencoder_trains_encoder_and_decoder_not_head(digits):
    wrapper = EncodeNetWrapper(make_model("resnet10t"), _cfg(autoencoder=1))
    loader = _small(digits)
    head_before = {k: v.clone() for k, v in wrapper.head.state_dict().items()}
    enc_before = {k: v.clone() for k, v in wrapper.encoder.state_dict().items()}
    wrapper.fit_autoencoder(loader)  # representatives computed on the way
    assert wrapper.representatives is not None
    assert all(torch.equal(v, head_before[k]) for k, v in wrapper.head.state_dict().items())
    assert any(not torch.equal(v, enc_before[k]) for k, v in wrapper.encoder.state_dict().items())


@pytest.mark.parametrize("ce_weight", [0.0, 1.0])
def test_autoencoder_task_is_what_fit_autoencoder_trains(digits, ce_weight):
    """The task the stage builds (and benchmarks reuse): the head joins only with a CE term, every part trainable."""
    cfg = _cfg()
    cfg.autoencoder.ce_weight = ce_weight
    wrapper = EncodeNetWrapper(make_model("resnet10t"), cfg)
    wrapper.encoder.requires_grad_(False)  # as the transfer stage leaves it
    task = wrapper.autoencoder_task(wrapper.select_representatives(_small(digits)))
    trainable = {id(p) for p in task.parameters() if p.requires_grad}
    assert {id(p) for p in wrapper.encoder.parameters()} <= trainable
    assert {id(p) for p in wrapper.decoder.parameters()} <= trainable
    head = {id(p) for p in wrapper.head.parameters()}
    assert (head <= trainable) if ce_weight else not (head & {id(p) for p in task.parameters()})


def test_same_seed_same_result_on_cpu(digits):
    results = []
    for _ in range(2):
        cfg = _cfg(baseline=1, autoencoder=1, transfer=1)
        cfg.device = "cpu"  # CUDA kernels (cuDNN) are not bitwise repeatable by default
        wrapper = EncodeNetWrapper(make_model("resnet10t"), cfg)
        history = wrapper.fit(_small(digits, n=120, batch_size=40))
        results.append((history, wrapper.model.state_dict()))
    (h1, s1), (h2, s2) = results
    for stage in ("baseline", "autoencoder", "transfer"):
        assert [r["loss"] for r in h1[stage]] == [r["loss"] for r in h2[stage]]
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


# bad input (labels, classes, channels, NaN, loaders, model, config, checkpoints): tests/test_bad_input.py


def test_decoder_size_follows_data_until_trained(digits):
    wrapper = EncodeNetWrapper(make_model("resnet10t"), _cfg())
    assert wrapper.input_size == (3, 176, 176)  # resnet10t's default cfg
    wrapper.fit_autoencoder(_small(digits, n=100))  # 32x32 digits
    assert wrapper.input_size == (3, 32, 32) and wrapper.decoder.shape_trail.input_size == (3, 32, 32)
    assert wrapper.reconstruct(torch.randn(2, 3, 32, 32)).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="trained decoder"):
        wrapper.reconstruct(torch.randn(2, 3, 64, 64))


def test_other_families_run_every_stage(digits):
    """A token model and an NHWC model through all stages (one short epoch each)."""
    loader = _small(digits, n=100)
    for name in ("vit_tiny_patch16_224", "swin_tiny_patch4_window7_224"):
        cfg = _cfg(autoencoder=1, transfer=1)
        cfg.representatives.clusters_per_class = 2
        wrapper = EncodeNetWrapper(make_model(name), cfg)
        history = wrapper.fit(loader)
        assert history["transfer"][0]["loss"] > 0
        assert wrapper.reconstruct(torch.randn(2, 3, 32, 32)).shape == (2, 3, 32, 32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_fit_with_bf16_and_channels_last(digits):
    train, test = digits
    cfg = _cfg(baseline=3, autoencoder=1, transfer=1)
    cfg.device, cfg.amp, cfg.channels_last = "cuda", "bf16", True
    wrapper = EncodeNetWrapper(make_model("resnet10t"), cfg)
    wrapper.fit(DataLoader(train, batch_size=64, shuffle=True), DataLoader(test, batch_size=256))
    assert next(wrapper.model.parameters()).is_cuda and wrapper.decoder.to_image.weight.is_cuda
    assert wrapper.evaluate(DataLoader(test, batch_size=256))["accuracy"] > 0.5
    assert wrapper.reconstruct(test[:4][0]).device.type == "cpu"


def test_representative_images_go_through_the_loaders_collate_fn(digits):
    """A dataset of raw uint8 images normalised in collate_fn: targets must be in the model's input space."""
    train, _ = digits
    raw = [((train[i][0] * 40 + 120).clamp(0, 255).to(torch.uint8), train[i][1]) for i in range(150)]

    def collate(batch):
        x = torch.stack([b[0] for b in batch]).float()
        return (x - 120.0) / 40.0, torch.stack([torch.as_tensor(b[1]) for b in batch])

    loader = DataLoader(raw, batch_size=50, collate_fn=collate)
    wrapper = EncodeNetWrapper(make_model("resnet10t"), _cfg())
    reps = wrapper.select_representatives(loader)
    expected = collate([raw[int(i)] for i in reps.rep_indices])[0]
    torch.testing.assert_close(reps.images, expected)


@pytest.mark.slow
def test_compile_option_trains_like_eager(digits):
    """config.compile: torch.compile (inductor, CPU here) of the stage's module; minutes on 2 cores."""
    train, _ = digits
    loader = DataLoader(Subset(train, range(128)), batch_size=32)
    losses = {}
    for compiled in (False, True):
        cfg = EncodeNetConfig(progress=False, compile=compiled, split="features").override({"transfer.epochs": 1})
        w = EncodeNetWrapper(make_model("resnet10t"), cfg)
        losses[compiled] = w.fit_transfer(loader)[0]["loss"]
        assert type(w.export()).__name__ == "ResNet"  # the exported model is never the compiled wrapper
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)


def test_a_stage_called_by_hand_with_0_epochs_says_so(digits_loaders):
    """Issue #13.3: no silent no-op; bad data is still an error first."""
    train, _ = digits_loaders
    wrapper = EncodeNetWrapper(make_model("resnet20_cifar"), EncodeNetConfig(progress=False))  # baseline.epochs 0
    with pytest.raises(ValueError, match=r"fit_baseline trains nothing: config.baseline.epochs is 0"):
        wrapper.fit_baseline(train)
    bad = DataLoader(TensorDataset(torch.randn(8, 3, 32, 32), torch.full((8,), 12)), batch_size=4)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        wrapper.fit_baseline(bad)
    assert wrapper.history == {}


def test_no_progress_bars_when_output_is_not_a_terminal(digits_loaders, capsys, caplog):
    """Issue #13.4: with output redirected, tqdm stays silent and each epoch is one logging line."""
    import logging
    train, _ = digits_loaders
    cfg = EncodeNetConfig(progress=True)
    cfg.baseline.epochs = 2
    wrapper = EncodeNetWrapper(make_model("resnet20_cifar"), cfg)
    with caplog.at_level(logging.INFO, logger="encodenet_timm.training"):
        wrapper.fit_baseline(DataLoader(Subset(train.dataset, range(64)), batch_size=32))
    err = capsys.readouterr().err
    assert "\r" not in err and "it/s" not in err  # pytest's capture is not a TTY
    assert [r.getMessage().split(":")[0] for r in caplog.records if "epoch" in r.getMessage()] == \
        ["baseline epoch 1/2", "baseline epoch 2/2"]


def test_export_timm_loads_with_timm_alone_and_predicts_the_same(tmp_path):
    """Issue #13.5: timm's own folder; a fresh process that imports only timm loads it (local-dir:)."""
    import json
    import subprocess
    import sys
    torch.manual_seed(0)
    wrapper = EncodeNetWrapper(make_model("resnet10t"), EncodeNetConfig(progress=False, input_size=(3, 32, 32)))
    names = [f"digit{i}" for i in range(10)]
    out = wrapper.export_timm(tmp_path / "exp", label_names=names, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "resnet10t" and config["num_classes"] == 10 and config["label_names"] == names
    assert config["pretrained_cfg"]["mean"] == [0.5] * 3 and config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys, timm, torch; m = timm.create_model('local-dir:' + sys.argv[1], pretrained=True).eval(); "
            "assert 'encodenet_timm' not in sys.modules; "
            "torch.save(m(torch.load(sys.argv[2])), sys.argv[3])")
    subprocess.run([sys.executable, "-c", code, str(out), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                   check=True, timeout=300)
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "y.pt"), wrapper.export()(x))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="holds other files"):
        wrapper.export_timm(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
