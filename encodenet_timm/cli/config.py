"""``encodenet config``: its options and examples, and the command: the config as YAML, the defaults or
merged with a --config file, --KEY flags and --set."""
import argparse

from .parser import _add_config_options, _config, _subparser


def add_command(sub) -> None:
    """The ``config`` subcommand, its options and its function, on `sub` (`build_parser`'s subparsers)."""
    cf = _subparser(sub, "config", "encodenet config --dump [--config YAML] [--set KEY=VALUE ...] [--KEY V ...]",
                    "print the config as YAML: the defaults, or merged with a file and flags",
                    "examples:\n  encodenet config --dump > run.yaml\n"
                    "  encodenet config --dump --config run.yaml --set transfer.lr=0.1\n")
    cf.add_argument("--dump", action="store_true", required=True, help="print the full config as YAML")
    _add_config_options(cf)
    cf.set_defaults(func=_cmd_config)


def _cmd_config(args: argparse.Namespace) -> int:
    print(_config(args).to_yaml(), end="")
    return 0
