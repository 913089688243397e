"""The ``encodenet`` command: argv -> config -> data and model -> `EncodeNetWrapper` calls.

    encodenet fit --model resnet10t --dataset digits --out runs/digits --baseline.epochs 6
    encodenet evaluate runs/digits
    encodenet export runs/digits --to digits.safetensors
    encodenet compare --model resnet10t --dataset digits --out runs/cmp --baseline.epochs 6 --seeds 0 1 2
    encodenet config --dump

A run directory holds ``cli.json`` (what `fit` was asked for: model, data, loader settings), so
`evaluate`, `export` and ``fit --resume`` rebuild model and data from it without repeating arguments.
"""
import argparse
import difflib
import itertools
import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import timm
import torch

from . import distributed
from .checks import check_writable
from .compare import CONTROLS, compare
from .config import ControlsConfig, EncodeNetConfig, describe_keys
from .config_io import parse_value
from .data import DATA_CONFIG_KEYS, DATASETS, RESIZE, DataSplits, build_datasets, make_loaders
from .data.device import on_cuda_device
from .env import resolve_device
from .errors import EncodeNetError, Interrupted
from .files import LOCK_FILE, DirLock, read_json, save_tensors, write_json
from .plots import save_run_plots
from .run_dir import CLI_FILE, CONFIG_FILE, EVAL_FILE, MODEL_FILE, RECORD_FILE, RUNTIME_CONFIG_KEYS, check_new_dir
from .seeding import seed_everything
from .wrapper import EncodeNetWrapper

__all__ = ["main", "build_parser"]

_logger = logging.getLogger(__name__)

COMPARE_JSON = "compare.json"  # what `encodenet compare` was asked for: model, data, seeds, controls, config
# what a new compare may find in --out (one of ours that stopped early); anything else is the user's
_COMPARE_FILES = (COMPARE_JSON, "compute.json", "runs", "weights", "results.md", "results.json",
                  "accuracy_vs_compute.png", LOCK_FILE, ".*.tmp")
# fit options recorded in cli.json, with their defaults; with --resume they come from cli.json
_FIT_DEFAULTS = {"model": None, "model_arg": [], "pretrained": False, "dataset": None, "data_dir": None,
                 "val_fraction": 0.1, "per_class": None, "batch_size": 128, "img_size": 32}

_FIT_EPILOG = """examples:
  # no download: scikit-learn's digits, a timm ResNet trained from scratch (a few minutes on a CPU)
  encodenet fit --model resnet10t --dataset digits --out runs/digits --batch-size 64 --channels-last true \\
      --baseline.epochs 6 --autoencoder.epochs 3 --transfer.epochs 3
  # CIFAR-10 through torchvision (downloaded into data/ unless --no-download), a YAML config and overrides
  encodenet fit --model resnet20_cifar --dataset cifar10 --data-dir data --config run.yaml \\
      --set transfer.lr=0.1 --set representatives.clusters_per_class=auto --out runs/c10
  # your own images: D/train/<class>/*.jpg and D/test/<class>/*.jpg (or D/val/)
  encodenet fit --model resnet18 --pretrained --dataset imagefolder --data-dir D --img-size 64 --out runs/mine
  # continue an interrupted run (model, data and config come from the run dir)
  encodenet fit --out runs/c10 --resume
  # long runs: a checkpoint every 2000 steps too; SIGTERM (preemption) checkpoints and exits with 143
  encodenet fit --model resnet50 --dataset imagefolder --data-dir D --out runs/r50 --checkpoint-every 2000
"""


_COMPARE_EPILOG = """examples:
  # digits, 3 seeds: baseline, EncodeNet (the default recipe) and the controls continued, kd, ema, equal
  encodenet compare --model resnet10t --dataset digits --out runs/cmp --batch-size 64 --baseline.epochs 6 \\
      --autoencoder.epochs 3 --transfer.epochs 3 --finetune.epochs 2 --seeds 0 1 2
  # continue an interrupted comparison (finished rows are kept)
  encodenet compare --out runs/cmp --resume
"""


_EXAMPLES = """example (no download; a few minutes on a CPU):
  encodenet fit --model resnet10t --dataset digits --out runs/digits --batch-size 64 --channels-last true \\
      --baseline.epochs 6 --autoencoder.epochs 3 --transfer.epochs 3
  encodenet evaluate runs/digits
  encodenet export runs/digits --to digits.safetensors
  encodenet config --dump > run.yaml

Run 'encodenet <command> --help' for a command's options.
"""


# ---- parser -------------------------------------------------------------------------------------------
def _dashed(argv: Sequence[str]) -> List[str]:
    """`argv` with every option name spelled with dashes: ``--batch_size 8`` -> ``--batch-size 8``,
    ``--transfer.warmup_epochs=2`` -> ``--transfer.warmup-epochs=2``; values, and all after ``--``, as given."""
    out, options = [], True
    for arg in argv:
        if arg == "--":
            options = False
        elif options and arg.startswith("--"):
            name, sep, value = arg.partition("=")
            arg = name.replace("_", "-") + sep + value
        out.append(arg)
    return out


class _Parser(argparse.ArgumentParser):
    """An `ArgumentParser` that reads ``_`` and ``-`` in option names alike (`_dashed`); help shows dashes."""

    def parse_known_args(self, args: Optional[Sequence[str]] = None, namespace: Optional[argparse.Namespace] = None):
        return super().parse_known_args(_dashed(sys.argv[1:] if args is None else args), namespace)


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="YAML", help="config file (partial is fine); flags override it")
    parser.add_argument("--set", "-o", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. transfer.lr=0.1 (repeatable; values are YAML)")
    group = parser.add_argument_group("config keys", "--KEY V sets the config key KEY (as in config.yaml; - and _ "
                                      "alike), as --set KEY=V does.\nV is YAML: 0.1, true, null, \"[3, 64, 64]\".")
    for key, text in describe_keys().items():
        group.add_argument(f"--{key.replace('_', '-')}", dest=f"cfg:{key}", metavar="V", help=text)


def _add_data_options(parser: argparse.ArgumentParser, out_help: str) -> None:
    """Model, data and loader options shared by fit and compare (recorded in the output directory)."""
    parser.add_argument("--model", metavar="NAME", help="timm model name (resnet20_cifar, resnet18, ...)")
    parser.add_argument("--model-arg", action="append", default=None, metavar="KEY=VALUE",
                        help="extra timm.create_model argument, e.g. img_size=32 (repeatable)")
    parser.add_argument("--pretrained", action="store_true", default=None,
                        help="start from timm's pretrained weights (timm downloads them) and their mean/std")
    parser.add_argument("--dataset", choices=DATASETS, help="digits needs no data dir and no download")
    parser.add_argument("--data-dir", metavar="D",
                        help="where the data lies (imagefolder: D/train/<class>/..., D/test or D/val)")
    parser.add_argument("--out", required=True, metavar="DIR", help=out_help)
    parser.add_argument("--val-fraction", type=float, metavar="F", help="share of each class held out for "
                                                                        "validation (default 0.1; 0: none)")
    parser.add_argument("--per-class", type=int, metavar="N", help="use at most N training images per class "
                                                                   "(a quick run)")
    parser.add_argument("--batch-size", type=_count(1), metavar="N", help="batch size of every loader (default 128)")
    parser.add_argument("--img-size", type=_count(1), metavar="N",
                        help="image side for digits and imagefolder (default 32)")
    parser.add_argument("--workers", type=_count(0), default=0, metavar="N",
                        help="DataLoader worker processes (default 0)")
    parser.add_argument("--no-download", action="store_true", help="never download CIFAR; fail if it is missing")


def _count(low: int):
    """An argparse type: an int >= `low` (argparse reports anything else as a usage error, exit 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {value}")
        return value
    parse.__name__ = f"int >= {low}"
    return parse


def _subparser(sub, name: str, usage: str, text: str, epilog: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, usage=usage, help=text, description=text, epilog=epilog, allow_abbrev=False,
                          formatter_class=_HelpFormatter)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Examples as written; each option's help starts on its own line, under the option."""

    def __init__(self, prog: str):
        super().__init__(prog, max_help_position=6)


def build_parser() -> argparse.ArgumentParser:
    """The ``encodenet`` argument parser with its four subcommands."""
    parser = _Parser(
        prog="encodenet", description="EncodeNet for timm classifiers: fit, compare, evaluate and export runs. "
                                      "Options take dashes or underscores alike (--batch-size, --batch_size).",
        epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", metavar="{fit,compare,evaluate,export,config}", required=True)

    fit = _subparser(sub, "fit", "encodenet fit --model NAME --dataset NAME [--data-dir D] --out RUN_DIR "
                     "[options] [--set KEY=VALUE ...]\n       encodenet fit --out RUN_DIR --resume",
                     "train a timm model with EncodeNet into a run directory", _FIT_EPILOG)
    _add_data_options(fit, "the run directory to write (or resume)")
    fit.add_argument("--resume", action="store_true", help="continue the run in --out with its saved settings")
    fit.add_argument("--checkpoint-every", type=int, metavar="N",
                     help="also checkpoint every N optimizer steps inside an epoch (default 0: at epoch ends "
                          "only); recorded in the run dir, --resume may change it")
    _add_config_options(fit)
    fit.set_defaults(func=_cmd_fit)

    cmp = _subparser(sub, "compare", "encodenet compare --model NAME --dataset NAME [--data-dir D] --out DIR "
                     "[--seeds S ...] [--controls LIST] [options]\n       encodenet compare --out DIR --resume",
                     "will EncodeNet help this model? the recipe against same-size controls at equal extra compute",
                     _COMPARE_EPILOG)
    _add_data_options(cmp, "the comparison's directory (results, per-row records and weights)")
    cmp.add_argument("--seeds", type=int, nargs="+", metavar="S", help="one set of rows per seed (default 0 1 2)")
    cmp.add_argument("--controls", metavar="LIST", help=f"comma-separated, any of {','.join(CONTROLS)} (default: all)")
    cmp.add_argument("--resume", action="store_true", help="continue the comparison in --out with its saved settings")
    cmp.add_argument("--trials", type=_count(1), metavar="K",
                     help="validation trials per side: EncodeNet's stage lrs and each restarted control's lr x 1, "
                          "1/3, 3, ... (the first K); each side's best is chosen on validation (default 1)")
    cmp.add_argument("--checkpoint-every", type=_count(0), metavar="N",
                     help="also checkpoint a row every N optimizer steps (default 0: at epoch ends only); "
                          "--resume may change it")
    cmp.add_argument("--allow-untrained-baseline", action="store_true", default=None,
                     help="compare from a baseline near chance accuracy instead of refusing it")
    cmp.add_argument("--controls-config", metavar="YAML", help="ControlsConfig file: how continued, ema and kd train")
    ctl = cmp.add_argument_group("controls' settings", "--controls.KEY V sets the ControlsConfig key KEY (how "
                                 "continued, ema and kd train; - and _ alike; V is YAML).")
    for key, text in describe_keys(ControlsConfig()).items():
        ctl.add_argument(f"--controls.{key.replace('_', '-')}", dest=f"ctl:{key}", metavar="V", help=text)
    _add_config_options(cmp)
    cmp.set_defaults(func=_cmd_compare)

    ev = _subparser(sub, "evaluate", "encodenet evaluate RUN_DIR [--split {test,val}] [--weights FILE] [options]",
                    f"accuracy and loss of a run's model; writes RUN_DIR/{EVAL_FILE} (other --weights: "
                    f"RUN_DIR/eval-<weights name>.json, never over the run's own {EVAL_FILE})",
                    "examples:\n  encodenet evaluate runs/digits --split test\n"
                    "  encodenet evaluate runs/digits --weights runs/cmp/weights/kd-seed0.safetensors"
                    "   # -> runs/digits/eval-kd-seed0.json\n")
    ev.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by 'encodenet fit'")
    ev.add_argument("--split", choices=("test", "val"), default="test", help="which split (default test)")
    ev.add_argument("--weights", metavar="FILE",
                    help=f"a safetensors state dict to evaluate (default RUN_DIR/{MODEL_FILE}); its results go "
                         f"to RUN_DIR/eval-<FILE's name without suffix>.json (-2, -3, ... when that name is "
                         f"taken by other weights)")
    ev.add_argument("--batch-size", type=_count(1), metavar="N", help="default: the run's")
    ev.add_argument("--workers", type=_count(0), default=0, metavar="N",
                    help="DataLoader worker processes (default 0)")
    ev.add_argument("--device", metavar="DEVICE", help="default: the run's config (auto: CUDA when present)")
    ev.add_argument("--no-download", action="store_true", help="never download CIFAR; fail if it is missing")
    ev.set_defaults(func=_cmd_evaluate)

    ex = _subparser(sub, "export", "encodenet export RUN_DIR --to FILE.safetensors [--format safetensors]\n"
                    "       encodenet export RUN_DIR --to DIR --format timm",
                    "write a run's model as a plain timm state dict (+ a .json sidecar); an existing file is "
                    "never overwritten unless it is an earlier export",
                    "examples:\n  encodenet export runs/digits --to digits.safetensors\n"
                    "  encodenet export runs/digits --to digits-timm --format timm\n")
    ex.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by 'encodenet fit'")
    ex.add_argument("--to", required=True, metavar="FILE.safetensors", help="the file (or, --format timm, the "
                                                                             "directory) to write")
    ex.add_argument("--format", choices=("safetensors", "timm"), default="safetensors",
                    help="safetensors + a .json sidecar (default), or timm's own folder (config.json + "
                         "model.safetensors) that timm.create_model('local-dir:DIR', pretrained=True) loads")
    ex.set_defaults(func=_cmd_export)

    cf = _subparser(sub, "config", "encodenet config --dump [--config YAML] [--set KEY=VALUE ...] [--KEY V ...]",
                    "print the config as YAML: the defaults, or merged with a file and flags",
                    "examples:\n  encodenet config --dump > run.yaml\n"
                    "  encodenet config --dump --config run.yaml --set transfer.lr=0.1\n")
    cf.add_argument("--dump", action="store_true", required=True, help="print the full config as YAML")
    _add_config_options(cf)
    cf.set_defaults(func=_cmd_config)
    return parser


# ---- arguments -> objects -----------------------------------------------------------------------------
def _key_values(items: Sequence[str], what: str) -> Dict[str, Any]:
    """["a.b=1", ...] -> {"a.b": 1, ...}; raises ValueError for an item without '='."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{what} expects KEY=VALUE, got {item!r}")
        out[key.strip()] = parse_value(value)
    return out


def _config_overrides(args: argparse.Namespace) -> Dict[str, Any]:
    """Dotted config keys set by --KEY flags and --set (which wins)."""
    flags = {name[4:]: parse_value(value) for name, value in vars(args).items()
             if name.startswith("cfg:") and value is not None}
    given = {key.replace("-", "_"): value for key, value in _key_values(args.set, "--set").items()}  # - and _ alike
    return {**flags, **given}


def _config(args: argparse.Namespace, base: Optional[EncodeNetConfig] = None) -> EncodeNetConfig:
    """`base` (default: the defaults) or the --config file <- --KEY flags and --set."""
    config = EncodeNetConfig.from_yaml(Path(args.config)) if args.config else base or EncodeNetConfig()
    return config.override(_config_overrides(args))


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


# ---- commands -----------------------------------------------------------------------------------------
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


def _cmd_fit(args: argparse.Namespace) -> int:
    out = Path(args.out)
    given = {k: getattr(args, k) for k in _FIT_DEFAULTS if getattr(args, k) is not None}
    if not args.resume and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0 and (out / CONFIG_FILE).is_file():
        # torchrun --max-restarts restarts the same command: continue what the failed attempt began
        _logger.warning("torchrun restart %s: continuing the run in %s as --resume would",
                        os.environ["TORCHELASTIC_RESTART_COUNT"], out)
        args.resume, given = True, {}
    if args.checkpoint_every is not None and args.checkpoint_every < 0:
        raise ValueError(f"--checkpoint-every must be >= 0 (0: at epoch ends only), got {args.checkpoint_every}")
    if args.resume:
        spec, saved = _load_run(out)
        if given:
            raise ValueError(f"--resume takes the model and data from {out}/{CLI_FILE}; drop "
                             + ", ".join(f"--{k.replace('_', '-')}" for k in given))
        config = _config(args, base=saved)  # EncodeNetWrapper.fit refuses a change that alters results
        if _complete(out):
            return _already_complete(out, saved, config)
        check_writable(out)
    else:
        if (out / CONFIG_FILE).is_file() and (out / RECORD_FILE).is_file():  # written when training begins
            raise ValueError(f"{out} already holds a run: continue it with --resume, or pick another --out")
        check_new_dir(out)  # writable, and nothing of the user's in it
        spec = _new_spec(given, "fit", "a run")
        config = _config(args)
    resolve_device(config.device)  # an unknown device or a missing GPU, before any data is read
    return _locked(out, lambda lock: _fit(args, out, spec, config, lock))


def _complete(run_dir: Path) -> bool:
    """The run in `run_dir` has finished: run.json says so and its model file is there."""
    return (run_dir / MODEL_FILE).is_file() and read_json(run_dir / RECORD_FILE).get("status") == "complete"


def _already_complete(out: Path, saved: EncodeNetConfig, config: EncodeNetConfig) -> int:
    """``fit --resume`` on a finished run: nothing is read, trained or written; a changed setting is an error."""
    before, after = _flat(saved.to_dict()), _flat(config.to_dict())
    changed = [f"{k}: {before[k]!r} -> {after[k]!r}" for k in before
               if before[k] != after[k] and k.split(".")[0] not in RUNTIME_CONFIG_KEYS]
    if changed:
        raise ValueError(f"{out} holds a complete run; its settings cannot change ({'; '.join(changed)}): start a "
                         f"new run with another --out")
    print(f"{out} is already complete: nothing to do (weights: {out / MODEL_FILE}; "
          f"measure them again with: encodenet evaluate {out})")
    return 0


def _flat(data: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """A nested dict as {dotted key: value}."""
    out = {}
    for key, value in data.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return out


def _fit(args: argparse.Namespace, out: Path, spec: Dict[str, Any], config: EncodeNetConfig, lock: DirLock) -> int:
    """`fit` after its checks, with `out` locked."""
    if not distributed.is_main():  # under torchrun rank 0 reads (or downloads) the data first, then the others
        distributed.barrier()
    data = _data(spec, config.seed, download=not args.no_download)
    if distributed.is_main():
        distributed.barrier()
    if not args.resume:
        _record_data(spec, data)
        if config.input_size is None:
            config = config.override({"input_size": spec["input_size"]})
        if config.baseline.epochs == 0 and not spec["pretrained"]:
            _logger.warning("the model starts from random weights (no --pretrained) and baseline.epochs is 0: "
                            "EncodeNet will start from an untrained model; set --baseline.epochs N")
    data = on_cuda_device(data, config.device)  # #15: on a GPU the splits that fit live and batch there
    loaders = make_loaders(data, batch_size=spec["batch_size"], workers=args.workers, seed=config.seed,
                           pin_memory=torch.cuda.is_available())
    seed_everything(config.seed)  # the model's random init too: same seed and config => same weights
    wrapper = EncodeNetWrapper(_create_model(spec, pretrained=spec["pretrained"] and not args.resume), config)
    distributed.barrier()  # under torchrun: every rank has checked --out before rank 0 writes to it
    checkpoint_every = args.checkpoint_every if args.checkpoint_every is not None else spec.get("checkpoint_every", 0)
    if not args.resume and distributed.is_main():
        lock.acquire()  # creates `out`
    if distributed.is_main() and (not args.resume or spec.get("checkpoint_every", 0) != checkpoint_every):
        write_json(out / CLI_FILE, {**spec, "checkpoint_every": checkpoint_every}, indent=2, newline=True)
    _logger.info("%s on %s: %d classes, %d training images, run dir %s", spec["model"], spec["dataset"],
                 data.num_classes, len(data.train), out)
    try:
        wrapper.fit(loaders["train"], loaders["val"], plain_loader=loaders["plain"], run_dir=out,
                    resume=args.resume, checkpoint_every=checkpoint_every)
    except KeyboardInterrupt:
        print(f"interrupted; continue with: encodenet fit --out {out} --resume", file=sys.stderr)
        return 130
    except Interrupted:  # main prints the resume command and exits 128 + the signal
        raise
    except Exception:  # main prints the error; this says how to go on (run.json's words)
        record = read_json(out / RECORD_FILE) if (out / RECORD_FILE).is_file() else {}
        if record.get("how_to_continue"):
            print(f"encodenet fit: the run in {out} stopped; {record['how_to_continue']}", file=sys.stderr)
        raise
    test = wrapper.evaluate(loaders["test"]) if loaders["test"] is not None else None  # every rank takes part
    if not distributed.is_main():
        return 0
    denormalize = data.denormalize if data.mean is not None else None
    pictures = save_run_plots(wrapper, out, wrapper.plain_dataset, denormalize, classes=data.classes)
    print(f"run dir: {out}")
    print(f"  weights: {out / MODEL_FILE}")
    print(f"  pictures: {', '.join(p.name for p in pictures)}")
    if test is not None:
        _report(out / EVAL_FILE, "test", test, len(data.test))
    return 0


def _controls_overrides(args: argparse.Namespace) -> Dict[str, Any]:
    """The --controls.KEY flags given, as ControlsConfig overrides (values read as YAML)."""
    return {k[4:]: parse_value(v) for k, v in vars(args).items() if k.startswith("ctl:") and v is not None}


def _cmd_compare(args: argparse.Namespace) -> int:
    out = Path(args.out)
    given = {k: getattr(args, k) for k in _FIT_DEFAULTS if getattr(args, k) is not None}
    run = {"seeds": args.seeds, "controls": args.controls, "trials": args.trials,
           "allow_untrained_baseline": args.allow_untrained_baseline,
           "controls_config": _controls_overrides(args) or None}
    if args.resume:
        if not (out / COMPARE_JSON).is_file():
            raise FileNotFoundError(f"{out} has no {COMPARE_JSON}: it is not a comparison written by "
                                    f"'encodenet compare'")
        saved = read_json(out / COMPARE_JSON)  # a damaged file is named
        extra = ([f"--{k.replace('_', '-')}" for k in given]
                 + [f"--{k.replace('_', '-')}" for k, v in run.items() if v is not None and k != "controls_config"]
                 + [f"--controls.{k.replace('_', '-')}" for k in _controls_overrides(args)]
                 + (["--controls-config"] if args.controls_config else []))
        if extra:
            raise ValueError(f"--resume takes every setting from {out}/{COMPARE_JSON}; drop {', '.join(extra)}")
        spec, run = saved["spec"], saved["run"]
        check_writable(out)
        config = EncodeNetConfig.from_dict(saved["config"]).override(_config_overrides(args))
    else:
        if (out / COMPARE_JSON).exists():
            raise ValueError(f"{out} already holds a comparison: continue it with --resume, or pick another --out")
        check_new_dir(out, _COMPARE_FILES, what="comparison directory")  # writable, nothing of the user's
        spec = _new_spec(given, "compare", "a comparison")
        config = _config(args)
        if config.baseline.epochs == 0 and not spec["pretrained"] and not args.allow_untrained_baseline:
            raise ValueError("compare would start every row from the model's random weights (--baseline.epochs 0 "
                             "without --pretrained): every row would sit at chance and the verdict would compare "
                             "noise. Set --baseline.epochs N to train the baseline (or --pretrained to start from "
                             "timm's weights); --allow-untrained-baseline if this is intended")
        controls_config = (ControlsConfig.from_yaml(args.controls_config) if args.controls_config
                           else ControlsConfig()).override(_controls_overrides(args))
        run = {"seeds": args.seeds or [0, 1, 2],
               "controls": [c.strip() for c in (args.controls or ",".join(CONTROLS)).split(",") if c.strip()],
               "trials": args.trials or 1, "allow_untrained_baseline": bool(args.allow_untrained_baseline),
               "controls_config": controls_config.to_dict()}
        unknown = [c for c in run["controls"] if c not in CONTROLS]
        if unknown:
            raise ValueError(f"unknown --controls {unknown}; choose from {','.join(CONTROLS)}")
    resolve_device(config.device)  # an unknown device or a missing GPU, before any data is read
    return _locked(out, lambda lock: _compare(args, out, spec, run, config, lock))


def _compare(args: argparse.Namespace, out: Path, spec: Dict[str, Any], run: Dict[str, Any],
             config: EncodeNetConfig, lock: DirLock) -> int:
    """`compare` after its checks, with `out` locked."""
    data = _data(spec, config.seed, download=not args.no_download)
    if data.val is None:
        raise ValueError("compare needs a validation split: set --val-fraction above 0 (or give the image folder "
                         "a val/ directory)")
    _record_data(spec, data)
    if config.input_size is None:
        config = config.override({"input_size": spec["input_size"]})
    if not args.resume:
        lock.acquire()  # creates `out`
        write_json(out / COMPARE_JSON, {"spec": spec, "run": run, "config": config.to_dict()})
    data = on_cuda_device(data, config.device)  # #15: on a GPU the splits that fit live and batch there
    loaders = make_loaders(data, batch_size=spec["batch_size"], workers=args.workers, seed=config.seed,
                           pin_memory=torch.cuda.is_available())
    result = compare(lambda: _create_model(spec, pretrained=spec["pretrained"]), loaders["train"], loaders["val"],
                     config=config, controls=run["controls"], seeds=run["seeds"], plain_loader=loaders["plain"],
                     test_loader=loaders["test"], out_dir=out, trials=run.get("trials", 1),
                     controls_config=ControlsConfig.from_dict(run.get("controls_config") or {}),
                     allow_untrained_baseline=run.get("allow_untrained_baseline", False),
                     checkpoint_every=args.checkpoint_every or 0)
    result.save(out)
    print(result.table())
    print()
    print(result.verdict)
    print(f"results: {out / 'results.md'}, {out / 'results.json'}, {out / 'accuracy_vs_compute.png'}")
    return 0


def _report(path: Path, split: str, metrics: Dict[str, float], images: int, **facts: Any) -> None:
    """Print the metrics and merge them into `path` (an eval JSON) under `split`; `facts` go in at the top."""
    results = read_json(path) if path.is_file() else {}
    results.update(facts)
    results[split] = {**metrics, "images": images}
    write_json(path, results, indent=2, newline=True)
    print(f"{split} accuracy: {metrics['accuracy']:.4f}  loss: {metrics['loss']:.4f}  ({images} images) -> {path}")


def _eval_path(run_dir: Path, weights: Optional[Path]) -> Path:
    """Where `evaluate` writes: RUN_DIR/eval.json for the run's own model; for other weights
    RUN_DIR/eval-<stem>.json (-2, -3, ... when that name holds the results of other weights)."""
    if weights is None or weights.resolve() == (run_dir / MODEL_FILE).resolve():
        return run_dir / EVAL_FILE
    for n in itertools.count(1):
        path = run_dir / f"eval-{weights.stem}{'' if n == 1 else f'-{n}'}.json"
        if not path.is_file() or read_json(path).get("weights") == str(weights.resolve()):
            return path


def _cmd_evaluate(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    spec, config = _load_run(run_dir)
    weights = Path(args.weights) if args.weights else None
    if weights is not None and not weights.is_file():
        raise FileNotFoundError(f"--weights {weights}: no such file")
    if args.device:
        config = config.override({"device": args.device})
    resolve_device(config.device)  # an unknown device or a missing GPU, before any data is read
    if args.batch_size:
        spec["batch_size"] = args.batch_size
    return _locked(run_dir, lambda lock: _evaluate(args, run_dir, spec, config, weights))


def _evaluate(args: argparse.Namespace, run_dir: Path, spec: Dict[str, Any], config: EncodeNetConfig,
              weights: Optional[Path]) -> int:
    """`evaluate` after its checks, with the run dir locked."""
    data = _data(spec, config.seed, download=not args.no_download)
    dataset = data.test if args.split == "test" else data.val
    if dataset is None:
        raise ValueError(f"the run's data has no {args.split} split"
                         + (" (it was fitted with --val-fraction 0)" if args.split == "val" else ""))
    loader = make_loaders(data, batch_size=spec["batch_size"], workers=args.workers)[args.split]
    wrapper = _wrapper_with_weights(spec, config, run_dir, weights)
    path = _eval_path(run_dir, weights)
    facts = {} if path.name == EVAL_FILE else {"weights": str(weights.resolve())}
    _report(path, args.split, wrapper.evaluate(loader), len(dataset), **facts)
    return 0


_SIDECAR_KEYS = ("model", "create_kwargs", "classes", "run_dir")  # what marks a .json as export's own sidecar


def _export_targets(to: Path) -> Path:
    """The sidecar of weights file `to` (``to`` with suffix .json), after checking that the two are different
    files and that neither is a file of the user's: an existing pair is replaced only if it is an earlier export.

    Raises:
        ValueError: naming the path, and what to do instead.
    """
    if to.suffix.lower() == ".json":
        raise ValueError(f"--to {to}: export writes its .json sidecar next to the weights, so the weights file must "
                         f"not end in .json; use e.g. --to {to.with_suffix('.safetensors')}")
    if to.is_dir():
        raise ValueError(f"--to {to} is a directory: give a file name (e.g. --to {to / 'model.safetensors'}), "
                         f"or --format timm to write timm's folder")
    check_writable(to.parent, "--to")
    sidecar = to.with_suffix(".json")
    try:
        ours = sidecar.is_file() and all(k in read_json(sidecar) for k in _SIDECAR_KEYS)
    except ValueError:  # not JSON: the user's
        ours = False
    for path in (to, sidecar):
        if path.exists() and not ours:
            raise ValueError(f"--to {to}: {path} exists and is not an earlier 'encodenet export' (nothing of yours "
                             f"is overwritten); choose another --to, or move {path} away")
    return sidecar


def _cmd_export(args: argparse.Namespace) -> int:
    run_dir, to = Path(args.run_dir), Path(args.to)
    spec, config = _load_run(run_dir)
    sidecar = _export_targets(to) if args.format == "safetensors" else None
    wrapper = _wrapper_with_weights(spec, config.override({"device": "cpu"}), run_dir)
    data_config = _data_config(spec, config.seed)
    exported = wrapper.export()
    zoo = type(exported).__module__.startswith(__package__)
    if args.format == "timm":
        wrapper.export_timm(to, label_names=spec["classes"], data_config=data_config)
        print(f"wrote {to / 'config.json'} and {to / 'model.safetensors'}. To load it:")
        print(f"import timm{', encodenet_timm  # registers ' + spec['model'] if zoo else ''}")
        print(f"model = timm.create_model('local-dir:{to.resolve()}', pretrained=True)")
        print("transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))  # the run's")
        return 0
    save_tensors(to, exported.state_dict())  # atomic, like every file of a run
    kwargs = {"num_classes": spec["num_classes"], **_key_values(spec["model_arg"], "--model-arg")}
    data_config = {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()}
    write_json(sidecar, {"model": spec["model"], "create_kwargs": kwargs, "classes": spec["classes"],
                         **data_config, "run_dir": str(run_dir.resolve())}, indent=2, newline=True)
    args_text = ", ".join([repr(spec["model"])] + [f"{k}={v!r}" for k, v in kwargs.items()]
                          + [f"pretrained_cfg_overlay={data_config!r}"])  # timm's transforms read the run's
    print(f"wrote {to} and {sidecar}. To load it:")
    print(f"import timm, safetensors.torch{', encodenet_timm  # registers ' + spec['model'] if zoo else ''}")
    print(f"model = timm.create_model({args_text})")
    print(f"model.load_state_dict(safetensors.torch.load_file({str(to)!r}))")
    print("transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))  # the run's")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    print(_config(args).to_yaml(), end="")
    return 0


# ---- entry point --------------------------------------------------------------------------------------
def main(argv: Optional[List[str]] = None) -> int:
    """Run ``encodenet`` with `argv` (default ``sys.argv[1:]``); returns the exit code.

    Every error prints one line, never a traceback: bad input (an unknown config key, a missing data dir,
    a YAML syntax error, a directory that cannot be written, ...) returns 2; an `EncodeNetError` (a model
    EncodeNet cannot handle, a diverged loss, a run directory another process writes) returns 1, as does
    anything unexpected (``ENCODENET_TRACEBACK=1`` shows its traceback); Ctrl-C returns 130.
    SIGTERM or SIGINT during ``fit`` (checkpoint written, run marked interrupted) prints the resume
    command and returns 128 + the signal number (143, 130), so a scheduler can requeue the job.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or argparse's own usage error (already printed)
        return e.code if isinstance(e.code, int) else 2
    if not logging.getLogger().handlers:  # this package's messages at INFO, others' warnings only
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        logging.getLogger(__package__).setLevel(logging.INFO)
    # under torchrun (WORLD_SIZE set) `fit` runs data-parallel: one process group for the command
    group = args.command == "fit" and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not distributed.is_distributed()
    if group:
        distributed.init_group()  # NCCL with CUDA, else gloo; a bounded timeout ($ENCODENET_DIST_TIMEOUT)
        if not distributed.is_main():  # one rank logs
            logging.getLogger(__package__).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except Interrupted as e:
        if distributed.is_main():
            again = f"encodenet {args.command} --out {args.out} --resume"
            under = " (under torchrun: the same torchrun command)" if distributed.world_size() > 1 else ""
            print(f"encodenet {args.command}: {e}; continue with: {again}{under}", file=sys.stderr)
        return 128 + e.signal
    except EncodeNetError as e:  # DataError is also a ValueError: bad input, 2 like the rest of it
        print(f"encodenet {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 1
    except (ValueError, OSError) as e:  # OSError: a file that cannot be read or written (named by `e`)
        print(f"encodenet {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        again = f"; continue with: encodenet {args.command} --out {args.out} --resume" if args.command in (
            "fit", "compare") else ""
        print(f"encodenet {args.command}: interrupted{again}", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("ENCODENET_TRACEBACK"):
            raise
        print(f"encodenet {args.command}: unexpected {type(e).__name__}: {e} (set ENCODENET_TRACEBACK=1 to see "
              f"where; please report it)", file=sys.stderr)
        return 1
    finally:
        if group:
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
