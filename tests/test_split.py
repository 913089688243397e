import pytest
import timm
import torch
import torch.nn as nn

from encodenet_timm.errors import UnsupportedModelError
from encodenet_timm.split import (Encoder, Head, check_timm_classifier, model_input_size, modules_after, split_model,
                                  stage_names)

from conftest import FAMILIES, make_model


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_parameter_owned_by_exactly_one_side(name):
    model = make_model(name)
    enc_names, head_names = split_model(model, (3, 32, 32))
    encoder, head = Encoder(model, enc_names), Head(model, head_names)
    enc_ids = {id(p) for p in encoder.parameters()}
    head_ids = {id(p) for p in head.parameters()}
    all_ids = {id(p) for p in model.parameters()}
    assert enc_ids and head_ids
    assert not enc_ids & head_ids
    assert enc_ids | head_ids == all_ids
    # the classifier layer timm reports is on the head side
    assert all(id(p) in head_ids for p in model.get_classifier().parameters())
    # views share storage, they do not copy
    n_params = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in encoder.parameters()) + sum(p.numel() for p in head.parameters()) == n_params


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto", "efficientnet_b0", "vit_tiny_patch16_224",
                                  "swin_tiny_patch4_window7_224", "mobilenetv3_small_100"])
def test_head_of_encoder_equals_model(name):
    model = make_model(name).eval()
    enc_names, head_names = split_model(model, (3, 32, 32))
    encoder, head = Encoder(model, enc_names).eval(), Head(model, head_names).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(head(encoder(x)), model(x), rtol=0, atol=0)
        assert head(encoder(x), pre_logits=True).shape[-1] == (
            getattr(model, "head_hidden_size", None) or model.num_features)


def test_split_restores_requires_grad_and_mode():
    model = make_model("resnet18").train()
    model.layer1.requires_grad_(False)
    split_model(model, (3, 32, 32))
    assert model.training
    assert not any(p.requires_grad for p in model.layer1.parameters())
    assert all(p.requires_grad for p in model.layer2.parameters())


def test_view_train_mode_reaches_model_flag():
    model = make_model("resnet18").train()
    enc_names, head_names = split_model(model, (3, 32, 32))
    encoder = Encoder(model, enc_names)
    encoder.eval()
    assert not model.layer1.training and not model.training


@pytest.mark.parametrize("bad, err", [
    (nn.Linear(3, 4), TypeError),
    ("resnet18", TypeError),
    (nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten()), TypeError),
])
def test_non_timm_module_is_rejected_with_a_clear_message(bad, err):
    with pytest.raises(err, match="timm"):
        check_timm_classifier(bad)


def test_headless_model_is_rejected():
    model = make_model("resnet18", num_classes=0)
    with pytest.raises(ValueError, match="num_classes"):
        check_timm_classifier(model)


def test_forward_failure_names_the_input_size():
    model = make_model("vit_tiny_patch16_224")  # built for 32x32, fixed size: it says how to build it for 48x48
    with pytest.raises(ValueError, match=r"built for 32x32 images but runs here at 48x48.*img_size=48"):
        split_model(model, (3, 48, 48))
    model.forward_features = lambda x: x[:, :, :, 0].mean()  # a forward that fails at any size
    with pytest.raises(UnsupportedModelError, match="input size"):
        split_model(model, (3, 32, 32))


def test_model_input_size_reads_patch_embed():
    assert model_input_size(make_model("vit_tiny_patch16_224")) == (3, 32, 32)
    assert model_input_size(make_model("resnet18")) == (3, 224, 224)
    assert model_input_size(make_model("resnet18", in_chans=1))[0] == 1


def test_feature_info_names_that_are_not_modules_are_left_out(caplog):
    """twins' feature_info says "block.2" but its module is "blocks.2": no such stage, so "last_stage"
    falls back to the paper's split with a warning instead of a KeyError."""
    model = timm.create_model("twins_svt_small", pretrained=False, num_classes=10, depths=(1, 1, 1, 1))
    assert [f["module"] for f in model.feature_info][-1] == "block.3" and stage_names(model) == []
    with caplog.at_level("WARNING", logger="encodenet_timm.split"):
        assert modules_after(model, "last_stage", (3, 32, 32)) == []
    assert "splitting at 'features' instead" in caplog.text
    with pytest.raises(ValueError, match="not a stage"):
        modules_after(model, "block.2", (3, 32, 32))
