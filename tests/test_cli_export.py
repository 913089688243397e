"""``encodenet export``: a plain timm model, and timm's own folder, carrying the run's preprocessing (`encodenet_timm.cli.export`)."""
import json
from typing import Tuple

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from encodenet_timm import EncodeNetConfig, EncodeNetWrapper
from encodenet_timm.data import build_datasets

from conftest import run


def test_export_loads_into_plain_timm(digits_run, capsys, tmp_path):
    target = tmp_path / "exported" / "digits.safetensors"
    code, out, _ = run(capsys, "export", digits_run, "--to", target)
    assert code == 0 and target.is_file()
    sidecar = json.loads(target.with_suffix(".json").read_text())
    assert sidecar["model"] == "resnet20_cifar" and sidecar["create_kwargs"] == {"num_classes": 10}
    snippet = out.split("To load it:\n", 1)[1]
    scope = {}
    exec(snippet, scope)  # the printed snippet runs as printed
    plain = scope["model"].eval()
    assert type(plain).__name__ == "CifarResNet"

    config = EncodeNetConfig.from_yaml(digits_run / "config.yaml")
    wrapper = EncodeNetWrapper(timm.create_model("resnet20_cifar", num_classes=10), config)
    wrapper.load_weights(digits_run / "model.safetensors")
    test = build_datasets("digits", val_fraction=0.1, per_class=60, seed=config.seed).test
    x, y = next(iter(DataLoader(test, batch_size=64)))
    wrapper.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), wrapper(x))
    assert set(load_file(str(target))) == set(plain.state_dict())



def test_export_format_timm_round_trips_through_local_dir(digits_run, tmp_path, capsys):
    """Issue #13.5: ``encodenet export --format timm`` writes timm's folder; timm loads it bit for bit."""
    import timm
    from safetensors.torch import load_file
    code, out, _ = run(capsys, "export", digits_run, "--to", tmp_path / "exp", "--format", "timm")
    assert code == 0 and "local-dir:" in out
    config = json.loads((tmp_path / "exp" / "config.json").read_text())
    assert config["architecture"] == "resnet20_cifar" and len(config["label_names"]) == config["num_classes"] == 10
    model = timm.create_model(f"local-dir:{tmp_path / 'exp'}", pretrained=True)  # the zoo: registered on import
    saved = load_file(str(digits_run / "model.safetensors"))
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())



def _timm_accuracies(model: torch.nn.Module, transform, images: np.ndarray, labels: np.ndarray) -> Tuple[float, float]:
    """Top-1 accuracy of `model` on grey images (N, H, W) in [0, 1] put through `transform` as float tensors
    (C, H, W) and as 8-bit PIL images: (tensors, PIL)."""
    from PIL import Image
    tensors = [torch.from_numpy(im)[None].expand(3, -1, -1) for im in images]  # (3, H, W) each
    pictures = [Image.fromarray(np.round(255 * im).astype(np.uint8)).convert("RGB") for im in images]
    with torch.no_grad():
        return tuple(float((model.eval()(torch.stack([transform(im) for im in inputs])).argmax(1).numpy()
                            == labels).mean()) for inputs in (tensors, pictures))



def test_both_exports_carry_the_runs_preprocessing_to_timm_alone(digits_run, tmp_path, capsys):
    """Issue #25.1: the run records the mean/std, input size, interpolation and crop its images went through,
    and both exports carry them: timm alone, with its own eval transform built from the export
    (`resolve_model_data_config` + `create_transform`), scores the package's test accuracy on the raw digits
    (given as float tensors: exactly; as 8-bit images, rounded: within a point). Before #25 it scored 11%."""
    from encodenet_timm.data.digits import digits_images
    spec = json.loads((digits_run / "cli.json").read_text())
    assert len(spec["mean"]) == len(spec["std"]) == 3 and spec["input_size"] == [3, 32, 32]
    assert (spec["interpolation"], spec["crop_pct"], spec["crop_mode"]) == ("bilinear", 1.0, "center")
    expected = json.loads((digits_run / "eval.json").read_text())["test"]["accuracy"]
    _, (images, labels) = digits_images(seed=0)  # the run's 450 test digits, 8x8, as scikit-learn has them

    code, out, _ = run(capsys, "export", digits_run, "--to", tmp_path / "folder", "--format", "timm")
    assert code == 0
    model = timm.create_model(f"local-dir:{tmp_path / 'folder'}", pretrained=True)
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    exact, rounded = _timm_accuracies(model, transform, images, labels)
    assert exact == pytest.approx(expected) and rounded == pytest.approx(expected, abs=0.01)

    code, out, _ = run(capsys, "export", digits_run, "--to", tmp_path / "digits.safetensors")
    assert code == 0
    keys = ("mean", "std", "input_size", "interpolation", "crop_pct", "crop_mode")
    assert {k: json.loads((tmp_path / "digits.json").read_text())[k] for k in keys} == {k: spec[k] for k in keys}
    scope = {}
    exec(out.split("To load it:\n", 1)[1], scope)  # the printed lines: model and transform
    exact, rounded = _timm_accuracies(scope["model"], scope["transform"], images, labels)
    assert exact == pytest.approx(expected) and rounded == pytest.approx(expected, abs=0.01)

