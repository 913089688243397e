"""What the commands share past the parser: a spec (the model and data settings that fit records in cli.json
and compare in compare.json, `_FIT_DEFAULTS`) checked before any data is read, turned into a timm model, the
data splits and timm's data config; a run directory read back (its spec and config, a wrapper with its
weights); the directory lock a command holds while it works; and an evaluation printed and merged into its
eval JSON."""
import difflib
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import timm
import torch

from .. import distributed
from ..config import EncodeNetConfig
from ..data import DATA_CONFIG_KEYS, RESIZE, DataSplits, build_datasets
from ..files import DirLock, read_json, write_json
from ..run_dir import CLI_FILE, CONFIG_FILE, MODEL_FILE
from ..wrapper import EncodeNetWrapper
from .parser import _key_values

# fit options recorded in cli.json, with their defaults; with --resume they come from cli.json
_FIT_DEFAULTS = {"model": None, "model_arg": [], "pretrained": False, "dataset": None, "data_dir": None,
                 "val_fraction": 0.1, "per_class": None, "batch_size": 128, "img_size": 32}


def _check_model_name(name: str) -> None:
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown timm model {name!r}{hint} (timm.list_models() lists them all)")


def _create_model(spec: Dict[str, Any], pretrained: bool = False) -> torch.nn.Module:
    _check_model_name(spec["model"])
    kwargs = _key_values(spec["model_arg"], "--model-arg")
    try:
        return timm.create_model(spec["model"], pretrained=pretrained, num_classes=spec["num_classes"], **kwargs)
    except TypeError as e:  # e.g. "__init__() got an unexpected keyword argument 'depth'"
        if not kwargs:
            raise
        raise ValueError(f"--model-arg {' '.join(spec['model_arg'])}: timm.create_model({spec['model']!r}) "
                         f"does not take it ({e})") from None


def _data(spec: Dict[str, Any], seed: int, download: bool = True) -> DataSplits:
    in_chans = _key_values(spec["model_arg"], "--model-arg").get("in_chans", 3)
    return build_datasets(spec["dataset"], spec["data_dir"], img_size=spec["img_size"], in_chans=in_chans,
                          val_fraction=spec["val_fraction"], per_class=spec["per_class"], seed=seed,
                          download=download, mean=spec.get("mean"), std=spec.get("std"))


def _record_data(spec: Dict[str, Any], data: DataSplits) -> None:
    """Put into `spec` (cli.json, compare.json) the classes and what every image went through, in timm's
    data-config keys (`DataSplits.data_config`: input size, interpolation, crop, mean/std), for the exports."""
    spec.update(num_classes=data.num_classes, classes=data.classes)
    spec.update({k: list(v) if isinstance(v, tuple) else v for k, v in data.data_config.items()})


def _data_config(spec: Dict[str, Any], seed: int) -> Dict[str, Any]:
    """timm's data config of a run (`_record_data`); a digits run recorded before its mean/std were (#25)
    reads them off the data."""
    if spec.get("mean") is None or spec.get("std") is None:
        return _data(spec, seed, download=False).data_config
    return {**RESIZE, **{k: spec[k] for k in DATA_CONFIG_KEYS if spec.get(k) is not None}}


def _load_run(run_dir: Path) -> Tuple[Dict[str, Any], EncodeNetConfig]:
    """(the fit arguments from cli.json, the config from config.yaml) of a run directory."""
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run dir {run_dir} " + ("is a file, not a directory" if run_dir.exists()
                                                         else "does not exist"))
    if not os.access(run_dir, os.R_OK | os.X_OK):
        raise ValueError(f"cannot read the run dir {run_dir} (permission denied)")
    for name in (CLI_FILE, CONFIG_FILE):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir} has no {name}: it is not a run directory written by 'encodenet fit' "
                                    f"(or its fit stopped before training began)")
    return read_json(run_dir / CLI_FILE), EncodeNetConfig.from_yaml(run_dir / CONFIG_FILE)  # errors name the file


def _wrapper_with_weights(spec: Dict[str, Any], config: EncodeNetConfig, run_dir: Path,
                          weights: Optional[Path] = None) -> EncodeNetWrapper:
    """A wrapper around the run's model with `weights` (default RUN_DIR/model.safetensors) loaded."""
    if weights is None:
        weights = run_dir / MODEL_FILE
        if not weights.is_file():
            raise FileNotFoundError(f"{run_dir} has no {MODEL_FILE}: the run has not finished "
                                    f"(continue it with: encodenet fit --out {run_dir} --resume)")
    wrapper = EncodeNetWrapper(_create_model(spec), config)
    wrapper.load_weights(weights)
    return wrapper


def _new_spec(given: Dict[str, Any], command: str, what: str) -> Dict[str, Any]:
    """The model and data settings of a new fit or compare (recorded in its directory), checked before
    any data is read: --model and --dataset given, the model name known to timm; with --pretrained, the
    mean/std its weights expect."""
    missing = [f"--{k.replace('_', '-')}" for k in ("model", "dataset") if k not in given]
    if missing:
        raise ValueError(f"{command} needs {' and '.join(missing)} (or --resume to continue {what})")
    spec = {**_FIT_DEFAULTS, **given}
    spec["data_dir"] = str(Path(spec["data_dir"]).resolve()) if spec["data_dir"] else None
    _check_model_name(spec["model"])
    model_args = _key_values(spec["model_arg"], "--model-arg")  # KEY=VALUE each; the model checks them when built
    if "num_classes" in model_args:
        raise ValueError(f"--model-arg num_classes={model_args['num_classes']}: the number of classes comes from the "
                         f"data (its class folders or labels); drop it")
    if spec["pretrained"]:  # pretrained weights expect their own normalisation
        cfg = timm.models.get_pretrained_cfg(spec["model"])
        if cfg is not None:
            spec["mean"], spec["std"] = list(cfg.mean), list(cfg.std)
    return spec


def _locked(out: Path, command) -> int:
    """``command(lock)`` holding `out`'s `DirLock` (rank 0 writes; other ranks do not lock): taken now if
    `out` exists, else by `command` when it creates `out`; released however it ends."""
    lock = DirLock(out)
    try:
        if out.is_dir() and distributed.is_main():
            lock.acquire()  # another process writing `out` is refused before any data is read
        return command(lock)
    finally:
        lock.release()


def _report(path: Path, split: str, metrics: Dict[str, float], images: int, **facts: Any) -> None:
    """Print the metrics and merge them into `path` (an eval JSON) under `split`; `facts` go in at the top."""
    results = read_json(path) if path.is_file() else {}
    results.update(facts)
    results[split] = {**metrics, "images": images}
    write_json(path, results, indent=2, newline=True)
    print(f"{split} accuracy: {metrics['accuracy']:.4f}  loss: {metrics['loss']:.4f}  ({images} images) -> {path}")
