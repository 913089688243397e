"""``encodenet fit``: its options and examples, and the command: a new run, or ``--resume`` of the run in
--out (with its saved settings; a finished run is left as it is), checked before any data is read, then data,
model and `EncodeNetWrapper.fit` into the run directory, its pictures and the test accuracy (eval.json); under
torchrun, data-parallel, with one rank writing."""
import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict

import torch

from .. import distributed
from ..checks import check_writable
from ..config import EncodeNetConfig
from ..data import make_loaders
from ..data.device import on_cuda_device
from ..env import resolve_device
from ..errors import Interrupted
from ..files import DirLock, read_json, write_json
from ..plots import save_run_plots
from ..run_dir import CLI_FILE, CONFIG_FILE, EVAL_FILE, MODEL_FILE, RECORD_FILE, RUNTIME_CONFIG_KEYS, check_new_dir
from ..seeding import seed_everything
from ..wrapper import EncodeNetWrapper
from .parser import _add_config_options, _add_data_options, _config, _subparser
from .spec import _FIT_DEFAULTS, _create_model, _data, _load_run, _locked, _new_spec, _record_data, _report

_logger = logging.getLogger(__package__)  # "encodenet_timm.cli", the logger's name before cli/ was a package

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


def add_command(sub) -> None:
    """The ``fit`` subcommand, its options and its function, on `sub` (`build_parser`'s subparsers)."""
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
