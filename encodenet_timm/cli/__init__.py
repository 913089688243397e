"""The ``encodenet`` command: argv -> config -> data and model -> `EncodeNetWrapper` calls.

    encodenet fit --model resnet10t --dataset digits --out runs/digits --baseline.epochs 6
    encodenet evaluate runs/digits
    encodenet export runs/digits --to digits.safetensors
    encodenet compare --model resnet10t --dataset digits --out runs/cmp --baseline.epochs 6 --seeds 0 1 2
    encodenet config --dump

A run directory holds ``cli.json`` (what `fit` was asked for: model, data, loader settings), so
`evaluate`, `export` and ``fit --resume`` rebuild model and data from it without repeating arguments.

The package, one module per command over the shared parts: `parser` (shared options, flags -> config),
`spec` (model, data and run directory from a spec), `fit`, `compare`, `evaluate`, `export` and `config`
(each its options and its ``_cmd_*``); this module assembles the parser and runs a command (`main`).
"""
import argparse
import logging
import os
import sys
from typing import List, Optional

import torch

from .. import distributed
from ..errors import EncodeNetError, Interrupted
from . import compare, config, evaluate, export, fit
from .parser import _PACKAGE, _Parser

__all__ = ["main", "build_parser"]

_EXAMPLES = """example (no download; a few minutes on a CPU):
  encodenet fit --model resnet10t --dataset digits --out runs/digits --batch-size 64 --channels-last true \\
      --baseline.epochs 6 --autoencoder.epochs 3 --transfer.epochs 3
  encodenet evaluate runs/digits
  encodenet export runs/digits --to digits.safetensors
  encodenet config --dump > run.yaml

Run 'encodenet <command> --help' for a command's options.
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``encodenet`` argument parser with its four subcommands."""
    parser = _Parser(
        prog="encodenet", description="EncodeNet for timm classifiers: fit, compare, evaluate and export runs. "
                                      "Options take dashes or underscores alike (--batch-size, --batch_size).",
        epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", metavar="{fit,compare,evaluate,export,config}", required=True)
    for command in (fit, compare, evaluate, export, config):
        command.add_command(sub)
    return parser


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
        logging.getLogger(_PACKAGE).setLevel(logging.INFO)
    # under torchrun (WORLD_SIZE set) `fit` runs data-parallel: one process group for the command
    group = args.command == "fit" and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not distributed.is_distributed()
    if group:
        distributed.init_group()  # NCCL with CUDA, else gloo; a bounded timeout ($ENCODENET_DIST_TIMEOUT)
        if not distributed.is_main():  # one rank logs
            logging.getLogger(_PACKAGE).setLevel(logging.WARNING)
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
