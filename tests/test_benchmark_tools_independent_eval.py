"""benchmarks/tools/independent_eval.py: its own decode + torchvision path scores a model as the package does."""
import json

import timm
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from conftest import load_benchmark
from encodenet_timm.data import CIFAR_STATS, CifarDataset, load_cifar
from encodenet_timm.training import evaluate
from test_data_cifar import make_image_zip


def test_agrees_with_the_package_on_a_tiny_zip(tmp_path):
    """A model that learnt the classes' tints (channel c per class c): a swapped channel or label order in
    either path would show as a different accuracy."""
    make_image_zip(tmp_path / "cifar10-jpeg.zip", classes=("a", "b", "c"), n_train=4, n_test=8)
    arrays = load_cifar("cifar10-jpeg", tmp_path, cache_dir=tmp_path / "cache")
    stats = CIFAR_STATS["cifar10"]
    torch.manual_seed(0)
    model = timm.create_model("resnet20_cifar", num_classes=3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = next(iter(DataLoader(CifarDataset(arrays.train_images, arrays.train_labels, *stats), batch_size=12)))
    for _ in range(20):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    test = DataLoader(CifarDataset(arrays.test_images, arrays.test_labels, *stats), batch_size=24)
    ours = evaluate(model, test, torch.device("cpu"))["accuracy"]
    assert ours > 0.9  # the tints are learnt: the comparison below can tell paths apart
    results = tmp_path / "results"
    (results / "weights").mkdir(parents=True)
    save_file(model.state_dict(), str(results / "weights" / "baseline-seed0.safetensors"))
    (results / "anchor.json").write_text(json.dumps({"test_accuracy": {"0": ours}}))
    record = load_benchmark("tools/independent_eval").main(["--data-dir", str(tmp_path), "--results", str(results)])
    assert record["images"] == 24 and record["seeds"]["0"]["test_accuracy"] == ours
    assert sum(record["seeds"]["0"]["per_class"].values()) / 3 == ours  # 8 images per class
    assert (results / "independent-eval.md").read_text().startswith("# The full regime's baselines")
