import pytest
import torch

from encodenet_timm.config import DecoderConfig
from encodenet_timm.decoder import _plan, build_decoder, count_flops, size_for_data
from encodenet_timm.errors import UnsupportedModelError

from conftest import FAMILIES, make_model


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_decoder_restores_input_shape_within_encoder_flops(name, size):
    model = make_model(name, size=size)
    dec = build_decoder(model, (3, size, size))
    x = torch.randn(2, 3, size, size)
    model.eval(), dec.eval()
    with torch.no_grad():
        out = dec(model.forward_features(x))
    assert out.shape == x.shape
    assert dec.trace_path == "fx"
    assert 0 < dec.flops <= dec.encoder_flops
    assert dec.light_blocks == 0 and not dec.light_head  # only tiny encoders need the light blocks
    assert dec.encoder_flops == count_flops(model.forward_features, torch.randn(1, 3, size, size))


def test_non_square_and_odd_sizes():
    model = make_model("resnet18")
    dec = build_decoder(model, (3, 40, 24))
    assert dec(model.forward_features(torch.randn(2, 3, 40, 24))).shape == (2, 3, 40, 24)
    dec = build_decoder(model, (3, 30, 30))
    assert dec(model.forward_features(torch.randn(2, 3, 30, 30))).shape == (2, 3, 30, 30)


def test_other_channel_counts():
    model = make_model("resnet10t", in_chans=1)
    dec = build_decoder(model, (1, 32, 32))
    assert dec(model.forward_features(torch.randn(2, 1, 32, 32))).shape == (2, 1, 32, 32)


def test_flops_cap_shrinks_width_or_fails():
    model = make_model("mobilenetv3_small_100")
    wide = build_decoder(model, (3, 32, 32), DecoderConfig(max_flops_ratio=100.0))
    capped = build_decoder(model, (3, 32, 32), DecoderConfig(max_flops_ratio=0.7))
    assert capped.width < wide.width and capped.flops <= 0.7 * capped.encoder_flops
    with pytest.raises(UnsupportedModelError, match="max_flops_ratio"):
        build_decoder(model, (3, 32, 32), DecoderConfig(max_flops_ratio=0.01))


def test_plan_splits_large_steps():
    plan = _plan([(192, 8, 8)], (32, 32))
    assert [p[1:] for p in plan] == [(16, 16), (32, 32)]
    plan = _plan([(64, 16, 16), (512, 1, 1)], (32, 32))
    assert [p[1] for p in plan] == [2, 4, 8, 16, 32]


def test_wrong_encoder_output_is_a_clear_error():
    model = make_model("resnet18")
    dec = build_decoder(model, (3, 32, 32))
    with pytest.raises(ValueError, match="decoder expects"):
        dec(model.forward_features(torch.randn(2, 3, 64, 64)))


def test_size_for_data_rebuilds_only_an_untrained_decoder_for_another_hw():
    x = torch.zeros(2, 3, 40, 48)
    assert size_for_data(torch.zeros(2, 3, 32, 32), (3, 32, 32), None, trained=False) is None  # it fits
    assert size_for_data(torch.zeros(2, 1, 40, 48), (3, 32, 32), None, trained=False) is None  # channels: check_batch's
    assert size_for_data(x, (3, 32, 32), None, trained=False) == (3, 40, 48)
    with pytest.raises(ValueError, match="trained decoder expects"):
        size_for_data(x, (3, 32, 32), None, trained=True)
    with pytest.raises(ValueError, match="config.input_size is"):
        size_for_data(x, (3, 32, 32), (3, 32, 32), trained=False)
