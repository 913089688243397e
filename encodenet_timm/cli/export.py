"""``encodenet export``: its options and examples, and the command: a run's model as a plain timm state dict
with a .json sidecar (model, create_model arguments, classes, the run's data config), or as timm's own folder
(``--format timm``), and the lines that load it; an existing file is replaced only if it is an earlier
export (`_export_targets`)."""
import argparse
from pathlib import Path

from ..checks import check_writable
from ..files import read_json, save_tensors, write_json
from .parser import _PACKAGE, _key_values, _subparser
from .spec import _data_config, _load_run, _wrapper_with_weights


def add_command(sub) -> None:
    """The ``export`` subcommand, its options and its function, on `sub` (`build_parser`'s subparsers)."""
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
    zoo = type(exported).__module__.startswith(_PACKAGE)
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
