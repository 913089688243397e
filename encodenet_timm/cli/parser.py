"""The parts of the ``encodenet`` parser that the commands share, and the flags read back: option names in
dashes or underscores alike (`_Parser`), the help layout, the int types, the config-key options (their help
from `config.describe_keys`), the model/data/loader options of fit and compare, and KEY=VALUE items, --KEY
flags and --set turned into an `EncodeNetConfig` (values read as YAML by `config_io.parse_value`)."""
import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..config import EncodeNetConfig, describe_keys
from ..config_io import parse_value
from ..data import DATASETS

_PACKAGE = __name__.split(".")[0]  # "encodenet_timm": the whole package, not only its command line


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


# ---- arguments -> config ------------------------------------------------------------------------------
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
