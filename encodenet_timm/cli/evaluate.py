"""``encodenet evaluate``: its options and examples, and the command: a run's model (or other --weights) on its
test or validation split, the results printed and written to RUN_DIR/eval.json (other weights:
RUN_DIR/eval-<name>.json, `_eval_path`)."""
import argparse
import itertools
from pathlib import Path
from typing import Any, Dict, Optional

from ..config import EncodeNetConfig
from ..data import make_loaders
from ..env import resolve_device
from ..files import read_json
from ..run_dir import EVAL_FILE, MODEL_FILE
from .parser import _count, _subparser
from .spec import _data, _load_run, _locked, _report, _wrapper_with_weights


def add_command(sub) -> None:
    """The ``evaluate`` subcommand, its options and its function, on `sub` (`build_parser`'s subparsers)."""
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
