import importlib.util
from pathlib import Path

import pytest
import timm
import torch
from torch.utils.data import DataLoader

from encodenet_timm.cli import main
from encodenet_timm.data import digits_datasets

# (timm name, create kwargs for a 32x32 input, same for 64x64): the families the core must cover
FAMILIES = {
    "resnet18": ({}, {}),
    "resnet10t": ({}, {}),
    "vgg11": ({}, {}),
    "convnext_atto": ({}, {}),
    "efficientnet_b0": ({}, {}),
    "mobilenetv3_small_100": ({}, {}),
    "vit_tiny_patch16_224": (dict(img_size=32, patch_size=4), dict(img_size=64, patch_size=8)),
    "swin_tiny_patch4_window7_224": (dict(img_size=32, window_size=4), dict(img_size=64, window_size=4)),
}


def make_model(name: str, size: int = 32, num_classes: int = 10, **kw) -> torch.nn.Module:
    """A randomly initialised timm model for `size` x `size` inputs (no download)."""
    kwargs = dict(FAMILIES.get(name, ({}, {}))[0 if size == 32 else 1])
    kwargs.update(kw)
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)


@pytest.fixture(scope="session")
def digits():
    """(train, test) TensorDatasets of real digits at 3x32x32."""
    return digits_datasets(size=32, in_chans=3, seed=0)


@pytest.fixture
def digits_loaders(digits):
    train, test = digits
    g = torch.Generator().manual_seed(0)
    return (DataLoader(train, batch_size=64, shuffle=True, generator=g),
            DataLoader(test, batch_size=256))


def load_benchmark(name: str):
    """Import benchmarks/<name>.py as a module (the benchmarks are scripts, not a package); ``tools/<name>``
    for the one-off measurement scripts under benchmarks/tools/."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmark_{name.replace('/', '_')}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def restore_threads():
    """Every test: put torch's global thread count back afterwards (benchmarks' --threads sets it, and a test
    left at 1 thread made a later bit-for-bit comparison against a 2-thread subprocess depend on test order)."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# ---- the command line (tests/test_cli_*.py) ---------------------------------------------------------------
TINY = ["--batch-size", "32", "--device", "cpu", "--set", "progress=false", "--representatives.clusters_per_class",
        "2", "--autoencoder.epochs", "1", "--transfer.epochs", "1"]

PICTURES = ("representatives.png", "reconstructions.png", "curves.png")



def run(capsys, *argv):
    """(exit code, stdout, stderr) of ``encodenet *argv`` run in-process."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err



@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """A finished digits run (shared by the fit, evaluate and export tests; they leave it as they found it): resnet20_cifar, 3 baseline epochs (adamw) on 60 images per class."""
    out = tmp_path_factory.mktemp("runs") / "digits"
    code = main(["fit", "--model", "resnet20_cifar", "--dataset", "digits", "--out", str(out), "--per-class", "60",
                 "--baseline.epochs", "3", "--baseline.opt", "adamw", "--baseline.lr", "3e-3",
                 "--set", "transfer.lr=0.02", *TINY])
    assert code == 0
    return out

