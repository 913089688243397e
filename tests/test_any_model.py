"""Models the sweep once refused: list outputs, tiny encoders, models built for another input size."""
import pytest
import timm
import torch

from encodenet_timm.config import DecoderConfig, EncodeNetConfig
from encodenet_timm.compat import check_model
from encodenet_timm.decoder import build_decoder, count_flops
from encodenet_timm.split import Encoder, Head, model_input_size, split_model
from encodenet_timm.wrapper import EncodeNetWrapper


def _create(name, num_classes=10, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)


# forward_features returns a list: (name, create kwargs, input size, mirrored element, its layout, deepest map)
LIST_MODELS = {
    "coat_tiny": (dict(img_size=32), 32, 0, "NLC", (152, 4, 4)),  # [x2, x3, x4] tokens: x2 is the largest map
    "efficientvim_m1": ({}, 32, 3, "NCL", (320, 1, 1)),           # 3 SSM hidden states + the final (B, C, h*w)
}


@pytest.mark.parametrize("name", list(LIST_MODELS))
def test_list_output_split_is_exact_and_the_decoder_mirrors_the_largest_map(name):
    kwargs, size, index, layout, deepest = LIST_MODELS[name]
    model = _create(name, **kwargs).eval()
    enc_names, head_names = split_model(model, (3, size, size))
    encoder, head = Encoder(model, enc_names).eval(), Head(model, head_names).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        feats = encoder(x)
        assert isinstance(feats, list)  # passed to the head whole, unchanged
        torch.testing.assert_close(head(feats), model(x), rtol=0, atol=0)
    dec = build_decoder(model, (3, size, size))
    trail = dec.shape_trail
    assert trail.output_index == index and trail.layout == layout and trail.trail[-1] == deepest
    assert trail.output_shape == tuple(feats[index].shape[1:])
    dec.eval()
    with torch.no_grad():
        assert dec(feats).shape == x.shape
    assert 0 < dec.flops <= dec.encoder_flops


# coat_tiny's steps take a minute on 2 cores: the default run keeps the lighter list-output model
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "coat_tiny" else n for n in LIST_MODELS])
def test_list_output_autoencoder_and_transfer_steps_are_finite(name):
    kwargs, size, *_ = LIST_MODELS[name]
    r = check_model(name, (3, size, size), create_kwargs=kwargs)
    assert r["status"] == "pass", f"{r['step']}: {r['error_type']}: {r['reason']}"
    assert torch.isfinite(torch.tensor([r["ae_loss"], r["transfer_loss"]])).all()


@pytest.mark.parametrize("name, size", [("lcnet_035", 32), ("repghostnet_050", 32), ("lcnet_050", 224)])
def test_tiny_encoders_get_a_light_decoder_within_the_cap(name, size):
    model = _create(name).eval()
    dec = build_decoder(model, (3, size, size))
    assert 0 < dec.flops <= dec.encoder_flops
    assert dec.encoder_flops == count_flops(model.forward_features, torch.randn(1, 3, size, size))
    assert dec.light_blocks > 0  # the plain 8-channel decoder is over the cap
    x = torch.randn(2, 3, size, size)
    dec.eval()
    with torch.no_grad():
        assert dec(model.forward_features(x)).shape == x.shape
    # the light blocks are the highest-resolution ones: the last `light_blocks` of the plan
    light = [b.conv.groups > 1 for b in dec.blocks]
    assert light == [False] * (len(light) - dec.light_blocks) + [True] * dec.light_blocks


def test_a_decoder_with_no_room_still_says_why():
    model = _create("lcnet_035")
    with pytest.raises(Exception, match="lightest mirrored decoder"):
        build_decoder(model, (3, 32, 32), DecoderConfig(max_flops_ratio=0.01))


@pytest.mark.parametrize("name, kwargs, size", [
    ("vit_tiny_patch16_224", dict(img_size=32, patch_size=4), 32),          # patch_embed.img_size
    ("swin_tiny_patch4_window7_224", dict(img_size=64, window_size=4), 64),  # patch_embed.img_size
    ("coat_lite_tiny", dict(img_size=64), 64),                               # patch_embed1.img_size
    ("maxvit_nano_rw_256", dict(img_size=64), 64),                           # model.img_size
    ("gcvit_xxtiny", dict(img_size=64), 64),                                 # stages.0.feat_size x 4
])
def test_input_size_is_the_size_the_model_was_built_for(name, kwargs, size):
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    assert model.pretrained_cfg["input_size"][1] != size  # timm's own config keeps the registered size
    assert model_input_size(model) == (3, size, size)


def test_the_wrapper_uses_the_built_size_and_config_input_size_overrides_it():
    model = _create("coat_lite_tiny", img_size=64)
    wrapper = EncodeNetWrapper(model, EncodeNetConfig(device="cpu"))
    assert wrapper.input_size == (3, 64, 64)
    assert wrapper.decoder.shape_trail.input_size == (3, 64, 64)
    vit = _create("vit_tiny_patch16_224", img_size=32, patch_size=8, dynamic_img_size=True)
    assert EncodeNetWrapper(vit, EncodeNetConfig(device="cpu")).input_size == (3, 32, 32)
    over = EncodeNetWrapper(vit, EncodeNetConfig(device="cpu", input_size=(3, 64, 64)))
    assert over.input_size == (3, 64, 64) and over.decoder.shape_trail.input_size == (3, 64, 64)


def test_a_module_list_stage_ends_with_its_last_block():
    # CoaT's feature_info names "parallel_blocks", a ModuleList forward_features never calls (only its blocks)
    from encodenet_timm.split import modules_after
    model = _create("coat_tiny", img_size=32)
    assert modules_after(model, "last_stage", (3, 32, 32)) == ["norm2", "norm3", "norm4"]
    assert modules_after(model, "serial_blocks1", (3, 32, 32))[0] == "patch_embed2"


@pytest.mark.parametrize("preset", ["default", pytest.param("paper", marks=pytest.mark.slow)])  # paper: a minute more
def test_a_list_output_model_runs_every_stage(preset):
    # representatives (the pre-logits feature pass), autoencoder, transfer, fine-tune, reconstruct
    model = _create("efficientvim_m1", num_classes=2)
    x, y = torch.randn(24, 3, 32, 32), torch.arange(24) % 2
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    cfg = EncodeNetConfig.paper() if preset == "paper" else EncodeNetConfig()
    cfg = cfg.override({"device": "cpu", "progress": False, "representatives.clusters_per_class": 2,
                        "autoencoder.epochs": 1, "transfer.epochs": 1, "finetune.epochs": 1})
    wrapper = EncodeNetWrapper(model, cfg)
    history = wrapper.fit(loader)
    losses = [e["loss"] for stage in ("autoencoder", "transfer") for e in history[stage]]
    assert torch.isfinite(torch.tensor(losses)).all()
    assert wrapper.reconstruct(x[:2]).shape == (2, 3, 32, 32)
