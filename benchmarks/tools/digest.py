"""Pin the package's behaviour: SHA-256 digests of a fixed, seeded CPU run (issue #12's acceptance check).

    OMP_NUM_THREADS=1 python benchmarks/tools/digest.py            # prints one "name sha256" line per digest

1. `EncodeNetWrapper.fit` on scikit-learn's digits (3x32x32, `resnet10t`), every stage enabled (baseline,
   representatives, autoencoder, transfer, fine-tune, one epoch each), into a run directory: the exported
   model's state dict (each tensor's bytes, keys sorted), the run's ``model.safetensors`` and the history
   (``seconds`` dropped).
2. ``encodenet fit`` + ``evaluate`` on digits (40 per class): the run's weights, cli.json and eval.json.
3. ``benchmarks/ablation.py --regime smoke`` on a tiny synthetic zip in the cifar10-jpeg layout: every JSON
   it writes, with the timing and machine fields (wall_seconds, seconds, machine, versions, command) dropped.

A re-layout of the package must leave every line unchanged. One torch thread, so sums are summed in one order.
"""
import contextlib
import hashlib
import importlib.util
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict

import timm
import torch
from torch.utils.data import DataLoader

from encodenet_timm import EncodeNetConfig, EncodeNetWrapper
from encodenet_timm.data import digits_datasets

_VOLATILE = {"wall_seconds", "seconds", "machine", "versions", "command"}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def state_dict_sha256(state: Dict[str, torch.Tensor]) -> str:
    """SHA-256 over (key, dtype, shape, bytes) of every tensor, in sorted key order."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _strip(obj: Any) -> Any:
    """`obj` without the keys whose values depend on the machine or the clock."""
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in _VOLATILE}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _json_sha(obj: Any) -> str:
    return _sha(json.dumps(_strip(obj), sort_keys=True).encode())


def fit_digest(work: Path) -> Dict[str, str]:
    train, _ = digits_datasets(size=32, in_chans=3, seed=0)
    loader = DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    config = EncodeNetConfig(seed=0, device="cpu", progress=False)
    config = config.override({"baseline.epochs": 1, "autoencoder.epochs": 1, "transfer.epochs": 1,
                              "finetune.epochs": 1})
    wrapper = EncodeNetWrapper(model, config)
    history = wrapper.fit(loader, run_dir=work / "run")
    return {"fit.export_state_dict": state_dict_sha256(wrapper.export().state_dict()),
            "fit.model.safetensors": _sha((work / "run" / "model.safetensors").read_bytes()),
            "fit.history": _json_sha(history),
            "fit.representatives": _sha(json.dumps({k: getattr(wrapper.representatives, k).tolist()
                                                    for k in ("cluster_ids", "rep_indices")}).encode())}


def cli_digest(work: Path) -> Dict[str, str]:
    """``encodenet fit`` on digits (the CLI's datasets, loaders and run directory), then ``evaluate``."""
    from encodenet_timm.cli import main as cli
    out = work / "cli"
    argv = ["fit", "--model", "resnet10t", "--dataset", "digits", "--out", str(out), "--per-class", "40",
            "--batch-size", "32", "--device", "cpu", "--progress", "false", "--baseline.epochs", "1",
            "--autoencoder.epochs", "1", "--transfer.epochs", "1", "--finetune.epochs", "1"]
    with contextlib.redirect_stdout(sys.stderr):  # its report lines; stdout holds only the digests
        codes = cli(argv), cli(["evaluate", str(out), "--split", "val"])
    if codes != (0, 0):
        raise RuntimeError("encodenet fit / evaluate failed")
    return {"cli.model.safetensors": _sha((out / "model.safetensors").read_bytes()),
            "cli.cli.json": _json_sha({k: v for k, v in json.loads((out / "cli.json").read_text()).items()
                                       if k != "data_dir"}),
            "cli.eval.json": _json_sha(json.loads((out / "eval.json").read_text()))}


def _image_zip(path: Path) -> None:
    """The tests' zip in the cifar10-jpeg layout (tests/test_data_cifar.make_image_zip), 4 classes."""
    spec = importlib.util.spec_from_file_location("test_data_cifar",
                                                  Path(__file__).parents[2] / "tests" / "test_data_cifar.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.make_image_zip(path, classes=("a", "b", "c", "d"), n_train=12, n_test=5)


def ablation_digest(work: Path) -> Dict[str, str]:
    spec = importlib.util.spec_from_file_location("benchmark_ablation", Path(__file__).parents[1] / "ablation.py")
    ablation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablation)
    _image_zip(work / "cifar10-jpeg.zip")
    out = work / "ablation"
    ablation.main(["--data-dir", str(work), "--cache-dir", str(work / "cache"), "--regime", "smoke",
                   "--seeds", "0", "--variants", "paper,split_last_no_ae,split_features,ce_0.3", "--out-dir", str(out),
                   "--threads", "1", "--device", "cpu"])
    return {f"ablation.{p.relative_to(out)}": _json_sha(json.loads(p.read_text()))
            for p in sorted(out.rglob("*.json"))}


def main() -> Dict[str, str]:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        digests = {**fit_digest(Path(tmp)), **cli_digest(Path(tmp)), **ablation_digest(Path(tmp))}
    for name, value in digests.items():
        print(f"{name} {value}")
    return digests


if __name__ == "__main__":
    sys.exit(main() and 0)
