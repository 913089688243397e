import importlib.util
from pathlib import Path

import pytest
import torch

from encodenet_timm.compat import check_model

from conftest import make_model

# one model per kind of architecture, at 32x32: (timm name, create kwargs, expected encoder layout)
REPRESENTATIVES = {
    "resnet10t": ({}, "NCHW"),                                         # CNN
    "mobilenetv3_small_100": ({}, "NCHW"),                             # mobile net
    "deit_tiny_patch16_224": (dict(img_size=32), "NLC"),               # ViT / DeiT: tokens + class token
    "swin_tiny_patch4_window7_224": (dict(img_size=32), "NHWC"),       # Swin: NHWC, windowed attention
    "convnext_atto": ({}, "NCHW"),                                     # ConvNeXt
    "gmlp_ti16_224": (dict(img_size=32), "NLC"),                       # MLP-mixer family
    "regnetx_002": ({}, "NCHW"),                                       # RegNet
    "densenet121": ({}, "NCHW"),                                       # DenseNet
    "vit_tiny_r_s16_p8_224": (dict(img_size=32), "NLC"),               # hybrid: ResNet stem + ViT
    "pit_ti_224": (dict(img_size=32), "NLC"),                          # class token handed to a submodule
    "resnet20_cifar": ({}, "NCHW"),                                    # encodenet_timm zoo
}


@pytest.mark.parametrize("name", list(REPRESENTATIVES))
def test_every_part_works_on_representative_families(name):
    kwargs, layout = REPRESENTATIVES[name]
    r = check_model(name, (3, 32, 32), create_kwargs=kwargs)
    assert r["status"] == "pass", f"{r['step']}: {r['error_type']}: {r['reason']}"
    assert r["layout"] == layout and r["trace_path"] == "fx"
    assert 0 < r["decoder_flops"] <= r["encoder_flops"] and r["flops_ratio"] <= 1.0
    assert r["trail"][-1][1] * r["trail"][-1][2] <= 32 * 32 // 4  # the deepest map is downsampled
    assert torch.isfinite(torch.tensor([r["ae_loss"], r["transfer_loss"]])).all()
    assert r["step"] is None and r["error_type"] is None and r["params"] > 0


def test_attention_maps_stay_out_of_the_shape_trail():
    # CaiT's talking heads run a Linear over (B, N, N, heads) attention maps: 4x4 at a 2x2 token grid
    r = check_model("cait_xxs24_224", (3, 32, 32), create_kwargs=dict(img_size=32))
    assert r["status"] == "pass" and r["trail"] == [[192, 2, 2]]


class _DictFeatures(torch.nn.Module):
    """A timm-style classifier whose forward_features returns a dict: no tensor or list to split at."""

    def __init__(self):
        super().__init__()
        self.num_classes = 10
        self.conv, self.fc = torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.Linear(8, 10)

    def forward_features(self, x):
        return {"map": self.conv(x)}

    def forward_head(self, feats, pre_logits=False):
        x = feats["map"].mean((2, 3))
        return x if pre_logits else self.fc(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    def get_classifier(self):
        return self.fc

    def reset_classifier(self, num_classes):
        self.num_classes, self.fc = num_classes, torch.nn.Linear(8, num_classes)


def test_unsupported_model_fails_with_a_clean_reason():
    r = check_model(_DictFeatures(), (3, 32, 32))
    assert r["status"] == "fail" and r["step"] == "split"
    assert r["error_type"] == "UnsupportedModelError" and r["clean"]
    assert "returned dict" in r["reason"] and "\n" not in r["reason"]


def test_a_given_model_is_checked_on_a_copy():
    model = make_model("resnet20_cifar")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = check_model(model, (3, 32, 32))
    assert r["status"] == "pass" and r["model"] == type(model).__name__
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_not_a_model_is_a_type_error():
    with pytest.raises(TypeError, match="timm model"):
        check_model(42)


def test_input_size_defaults_to_the_models_own():
    r = check_model(make_model("vit_tiny_patch16_224"))  # built for 32x32 by conftest
    assert r["status"] == "pass" and r["input_size"] == [3, 32, 32]


def _load_benchmark():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "coverage.py"
    spec = importlib.util.spec_from_file_location("coverage_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_full_sweep_over_timm_families(tmp_path):
    """Every timm family (the zoo too): at least 40 pass and every failure names its reason cleanly."""
    report = _load_benchmark().main(["--out", str(tmp_path)])
    summary, records = report["summary"], report["families"]
    assert summary["tried"] >= 60 and summary["passed"] >= 40
    assert {"resnet_cifar", "vgg_cifar"} <= {r["family"] for r in records if r["status"] == "pass"}
    unclean = [(r["family"], r["error_type"], r["reason"]) for r in records
               if r["status"] == "fail" and not r.get("clean")]
    assert not unclean
    assert (tmp_path / "coverage.json").exists() and "families pass" in (tmp_path / "coverage.md").read_text()
