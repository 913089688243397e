"""The method variants (issue #7): split point, final fine-tune, AE + CE objective, representative rule."""
import importlib

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

import encodenet_timm  # noqa: F401  (registers resnet20_cifar)
from encodenet_timm import EncodeNetConfig, EncodeNetWrapper
from encodenet_timm.clustering import centroid_distance
from encodenet_timm.representatives import pick_representatives
from encodenet_timm.split import modules_after, stage_names
from encodenet_timm.tasks import ConvertingAutoencoder, ConvertingAutoencoderTask, PartlyFrozenClassifier

from conftest import FAMILIES, make_model


def _model():
    torch.manual_seed(0)
    return timm.create_model("resnet20_cifar", num_classes=10)


def _loader(digits, n=200):
    train, _ = digits
    return DataLoader(Subset(train, list(range(n))), batch_size=50, shuffle=True,
                      generator=torch.Generator().manual_seed(0))


def _cfg(**dotted):
    base = {"progress": False, "representatives.clusters_per_class": 2, "autoencoder.epochs": 1,
            "transfer.epochs": 1}
    base.update(dotted)
    return EncodeNetConfig.paper(**base)


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ---- config ----------------------------------------------------------------------------------------------
def test_paper_preset_is_the_method_as_published_and_round_trips():
    paper = EncodeNetConfig.paper()
    assert paper.split == "features" and paper.finetune.epochs == 0
    assert paper.autoencoder.ce_weight == 0.0 and paper.representatives.rule == "min_entropy"
    assert paper.representatives.clusters_per_class == 5
    assert EncodeNetConfig.from_yaml(paper.to_yaml()) == paper
    assert EncodeNetConfig.paper(**{"transfer.epochs": 3}).transfer.epochs == 3


def test_bad_variant_options_are_named():
    with pytest.raises(ValueError, match="representatives.rule"):
        EncodeNetConfig.from_dict({"representatives": {"rule": "median"}})
    with pytest.raises(ValueError, match="autoencoder.ce_weight"):
        EncodeNetConfig.from_dict({"autoencoder": {"ce_weight": "high"}})
    with pytest.raises(ValueError, match=r"split='layer9'.*'layer3'"):
        EncodeNetWrapper(_model(), EncodeNetConfig(split="layer9", progress=False))


# ---- split point -----------------------------------------------------------------------------------------
def test_modules_after_a_stage_are_the_later_stages():
    model = _model()
    assert stage_names(model) == ["act1", "layer1", "layer2", "layer3"]
    assert modules_after(model, "features", (3, 32, 32)) == []
    after = modules_after(model, "layer2", (3, 32, 32))
    assert "layer3" in after and all(n.startswith("layer3") for n in after)
    assert {n for n, _ in model.named_modules() if n.startswith("layer3")} == set(after)
    assert modules_after(model, "last_stage", (3, 32, 32)) == after
    resnet = timm.create_model("resnet18", num_classes=10)
    assert {n.split(".")[0] for n in modules_after(resnet, "layer2", (3, 32, 32))} == {"layer3", "layer4"}


def test_partly_frozen_classifier_trains_only_the_tail_and_head():
    model = _model()
    trainable = PartlyFrozenClassifier(model, ["layer3", "fc"]).train()
    assert model.layer3[0].bn1.training and model.fc.training
    assert not model.layer1[0].bn1.training and not model.bn1.training
    trainable(torch.randn(4, 3, 32, 32)).sum().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == name.startswith(("layer3", "fc")), name


def test_split_transfer_restores_the_tail_to_the_baseline_and_freezes_the_rest(digits, monkeypatch):
    loader = _loader(digits)
    w = EncodeNetWrapper(_model(), _cfg(split="layer2"))
    baseline = _state(w.model)
    w.select_representatives(loader)
    w.fit_autoencoder(loader)
    after_ae = _state(w.model)
    assert any(not torch.equal(after_ae[k], baseline[k]) for k in baseline if k.startswith("layer3") and "weight" in k)
    # transfer's training step left out (an lr of 0 is refused by the config): what it starts from is
    # exactly the baseline's tail; that the prefix stays bitwise through training is the next test
    monkeypatch.setattr(importlib.import_module("encodenet_timm.wrapper"), "train_stage", lambda *a, **k: [])
    w.fit_transfer(loader)
    final = _state(w.model)
    for k in final:
        if k.startswith("layer3") and "running" not in k and "num_batches" not in k:
            assert torch.equal(final[k], baseline[k]), k
        elif not k.startswith(("layer3", "fc")):
            assert torch.equal(final[k], after_ae[k]), k  # prefix: frozen, BatchNorm statistics included


def test_split_transfer_trains_the_tail_and_keeps_the_prefix_bitwise(digits):
    loader = _loader(digits)
    w = EncodeNetWrapper(_model(), _cfg(split="layer2", **{"transfer.lr": 0.05}))
    w.select_representatives(loader)
    w.fit_autoencoder(loader)
    before = _state(w.model)
    w.fit_transfer(loader)
    after = _state(w.model)
    assert any(not torch.equal(after[k], before[k]) for k in after if k.startswith("layer3"))
    assert all(torch.equal(after[k], before[k]) for k in after if not k.startswith(("layer3", "fc")))
    plain = w.export()
    assert type(plain) is type(_model()) and set(plain.state_dict()) == set(_model().state_dict())


# ---- autoencoder objective -------------------------------------------------------------------------------
def test_autoencoder_loss_with_ce_is_mse_plus_weighted_cross_entropy():
    torch.manual_seed(0)
    enc = torch.nn.Conv2d(3, 4, 3, padding=1)
    dec = torch.nn.Conv2d(4, 3, 3, padding=1)
    head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))
    reps, labels = torch.randn(5, 3, 8, 8), torch.tensor([0, 0, 1, 2, 2])
    task = ConvertingAutoencoderTask(ConvertingAutoencoder(enc, dec, head), reps, cluster_labels=labels,
                                     ce_weight=0.5)
    x, cid = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 4, 4])
    out = task(x, cid)
    z = enc(x)
    mse = F.mse_loss(dec(z), reps[cid])
    ce = F.cross_entropy(head(z), labels[cid])
    assert torch.allclose(out["loss"], mse + 0.5 * ce) and torch.allclose(out["ce"], ce)
    out["loss"].backward()
    assert head[2].weight.grad is not None and head[2].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="ce_weight"):
        ConvertingAutoencoderTask(ConvertingAutoencoder(enc, dec), reps, ce_weight=1.0)


def test_ce_weight_trains_the_head_during_the_autoencoder_stage(digits):
    loader = _loader(digits)
    for weight, changes in ((0.0, False), (1.0, True)):
        w = EncodeNetWrapper(_model(), _cfg(**{"autoencoder.ce_weight": weight}))
        w.select_representatives(loader)
        fc = w.model.fc.weight.detach().clone()
        hist = w.fit_autoencoder(loader)
        assert (not torch.equal(fc, w.model.fc.weight)) == changes
        assert torch.isfinite(torch.tensor(hist[-1]["loss"]))


# ---- representative rule ---------------------------------------------------------------------------------
def test_centroid_distance_matches_brute_force_and_picks_the_nearest_member():
    torch.manual_seed(0)
    feats, ids = torch.randn(40, 6), torch.randint(0, 4, (40,))
    ids[:4] = torch.arange(4)
    d = centroid_distance(feats, ids, 4)
    for i in range(40):
        centroid = feats[ids == ids[i]].double().mean(0)
        assert torch.allclose(d[i], (feats[i].double() - centroid).square().sum())
    picks = pick_representatives(ids, d, 4)
    for c in range(4):
        members = torch.nonzero(ids == c).flatten()
        assert picks[c] == members[d[members].argmin()]


def test_nearest_centroid_rule_differs_from_min_entropy_and_stays_in_cluster(digits):
    loader = _loader(digits)
    reps = {}
    for rule in ("min_entropy", "nearest_centroid"):
        w = EncodeNetWrapper(_model(), _cfg(**{"representatives.rule": rule}))
        reps[rule] = w.select_representatives(loader)
        r = reps[rule]
        assert torch.equal(r.cluster_ids[r.rep_indices], torch.arange(r.num_clusters))
    assert not torch.equal(reps["min_entropy"].rep_indices, reps["nearest_centroid"].rep_indices)


# ---- final fine-tune -------------------------------------------------------------------------------------
def test_finetune_stage_runs_after_transfer_and_trains_every_weight(digits):
    loader = _loader(digits)
    w = EncodeNetWrapper(_model(), _cfg(**{"finetune.epochs": 1}))
    w.select_representatives(loader)
    w.fit_autoencoder(loader)
    w.fit_transfer(loader)
    before = _state(w.model)
    w.fit_finetune(loader)
    after = _state(w.model)
    assert not torch.equal(before["conv1.weight"], after["conv1.weight"])
    assert not torch.equal(before["fc.weight"], after["fc.weight"])
    history = EncodeNetWrapper(_model(), _cfg(**{"finetune.epochs": 1})).fit(loader)
    assert list(history)[-1] == "finetune" and len(history["finetune"]) == 1


# ---- the default recipe on every core family -------------------------------------------------------------
@pytest.mark.parametrize("name", list(FAMILIES))
def test_default_split_retrains_only_the_last_stage_and_head(name):
    """The default split ("last_stage") finds a tail on every core family; transfer trains only it and the head."""
    w = EncodeNetWrapper(make_model(name), EncodeNetConfig(progress=False, device="cpu"))
    assert w.after_split, "no modules after the split"
    trainable = PartlyFrozenClassifier(w.model, w.after_split + w.head.part_names).train()
    trainable(torch.randn(2, 3, 32, 32)).float().square().mean().backward()
    tail = set(w.after_split) | set(w.head.part_names)
    grads = {n: p.grad is not None for n, p in w.model.named_parameters()}
    in_tail = {n: any(n == t or n.startswith(t + ".") for t in tail) for n in grads}
    assert any(grads[n] for n in grads if in_tail[n])
    assert not any(grads[n] for n in grads if not in_tail[n]), [n for n in grads if grads[n] and not in_tail[n]][:3]


def test_after_split_restore_covers_weights_used_functionally():
    """beit's attention reads ``attn.qkv.weight`` through F.linear, so FX never sees ``attn.qkv`` called:
    the snapshot still holds it (it trains with its parent ``attn``) and transfer restores it."""
    model = timm.create_model("beit_base_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=8,
                              depth=2, embed_dim=64, num_heads=2)
    w = EncodeNetWrapper(model, EncodeNetConfig(progress=False, device="cpu"))
    assert "blocks.1.attn" in w.after_split and "blocks.1.attn.qkv" not in w.after_split
    w._snapshot_after_split()
    assert "blocks.1.attn.qkv.weight" in w._after_split_snapshot
    with torch.no_grad():
        w.model.blocks[1].attn.qkv.weight.add_(1.0)  # what the autoencoder stage does to the tail
    w._restore_after_split()
    assert torch.equal(w.model.blocks[1].attn.qkv.weight, w._after_split_snapshot["blocks.1.attn.qkv.weight"])
    assert torch.equal(w.model.blocks[1].attn.qkv.weight, model.blocks[1].attn.qkv.weight)  # the baseline's
