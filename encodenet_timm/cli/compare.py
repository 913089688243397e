"""``encodenet compare``: its options (seeds, controls, trials, the controls' settings) and examples, and
the command: a new comparison or ``--resume`` of the one in --out (compare.json holds what it was asked for),
checked before any data is read, then `compare.compare` over the (row, seed) pairs and its table, verdict and
files."""
import argparse
from pathlib import Path
from typing import Any, Dict

import torch

from ..checks import check_writable
from ..compare import CONTROLS, compare
from ..config import ControlsConfig, EncodeNetConfig, describe_keys
from ..config_io import parse_value
from ..data import make_loaders
from ..data.device import on_cuda_device
from ..env import resolve_device
from ..files import LOCK_FILE, DirLock, read_json, write_json
from ..run_dir import check_new_dir
from .parser import _add_config_options, _add_data_options, _config, _config_overrides, _count, _subparser
from .spec import _FIT_DEFAULTS, _create_model, _data, _locked, _new_spec, _record_data

COMPARE_JSON = "compare.json"  # what `encodenet compare` was asked for: model, data, seeds, controls, config
# what a new compare may find in --out (one of ours that stopped early); anything else is the user's
_COMPARE_FILES = (COMPARE_JSON, "compute.json", "runs", "weights", "results.md", "results.json",
                  "accuracy_vs_compute.png", LOCK_FILE, ".*.tmp")

_COMPARE_EPILOG = """examples:
  # digits, 3 seeds: baseline, EncodeNet (the default recipe) and the controls continued, kd, ema, equal
  encodenet compare --model resnet10t --dataset digits --out runs/cmp --batch-size 64 --baseline.epochs 6 \\
      --autoencoder.epochs 3 --transfer.epochs 3 --finetune.epochs 2 --seeds 0 1 2
  # continue an interrupted comparison (finished rows are kept)
  encodenet compare --out runs/cmp --resume
"""


def add_command(sub) -> None:
    """The ``compare`` subcommand, its options and its function, on `sub` (`build_parser`'s subparsers)."""
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
