import pytest
import torch

from encodenet_timm import shape_trail as shape_trail_mod
from encodenet_timm.decoder import build_decoder
from encodenet_timm.shape_trail import trace_shape_trail

from conftest import make_model


@pytest.mark.parametrize("name, layout", [("resnet18", "NCHW"), ("vit_tiny_patch16_224", "NLC"),
                                          ("swin_tiny_patch4_window7_224", "NHWC")])
def test_layouts_and_trails(name, layout):
    trail = trace_shape_trail(make_model(name, size=64), (3, 64, 64))
    assert trail.layout == layout
    sizes = [h for _, h, _ in trail.trail]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)
    if name == "vit_tiny_patch16_224":
        assert trail.num_prefix_tokens == 1 and trail.trail[-1] == (192, 8, 8)
    if name == "swin_tiny_patch4_window7_224":  # stage maps, not attention maps
        assert trail.trail == [(96, 16, 16), (192, 8, 8), (384, 4, 4), (768, 2, 2)]
    if name == "resnet18":
        assert trail.trail == [(64, 32, 32), (64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2)]


def test_hook_fallback_when_fx_fails(monkeypatch):
    model = make_model("resnet18")
    fx_trail = trace_shape_trail(model, (3, 32, 32))

    def broken(*a, **k):
        raise RuntimeError("untraceable")

    monkeypatch.setattr(shape_trail_mod, "_shapes_fx", broken)
    hook_trail = trace_shape_trail(model, (3, 32, 32))
    assert hook_trail.trace == "hooks" and fx_trail.trace == "fx"
    assert hook_trail.trail == fx_trail.trail
    dec = build_decoder(model, (3, 32, 32))
    assert dec.trace_path == "hooks"
    assert dec(model.forward_features(torch.randn(2, 3, 32, 32))).shape == (2, 3, 32, 32)
