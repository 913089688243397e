"""Coverage sweep: EncodeNet on the smallest model of every timm family, on one CPU thread.

A family is a model module of timm (``timm.models.<module>``, as ``timm.list_modules()`` names them);
the encodenet_timm CIFAR zoo registers two more (``resnet_cifar``, ``vgg_cifar``). For each family:

1. smallest variant: every model of the module is built on the ``meta`` device (no memory, no init
   compute) and the one with the fewest parameters is kept (timm's ``test_*`` models are left out
   unless ``--include-test-models``). Over ``--max-params`` the family is skipped, with the reason.
2. input size: the first of 32, 64, 96, 128 and the model's default size (``pretrained_cfg``) at which
   the model's own ``forward_features`` runs. Where the model class takes ``img_size``, the model is
   built for that size (``img_size=32`` ...); the default size uses the default build.
3. `encodenet_timm.compat.check_model` at that size: split, decoder, one autoencoder step, one
   transfer step, export. Each family runs under a time limit (``--time-limit``, SIGALRM).

Writes ``<out>/coverage.json`` (every record, versions, machine, the exact command) and
``<out>/coverage.md`` (pass count and the table).

Usage:
    OMP_NUM_THREADS=1 python benchmarks/coverage.py                  # every family
    OMP_NUM_THREADS=1 python benchmarks/coverage.py --families resnet vision_transformer --out /tmp/cov
"""
import argparse
import inspect
import json
import logging
import os
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import timm
from torch.utils._python_dispatch import TorchDispatchMode

import encodenet_timm  # registers the CIFAR zoo in timm
from encodenet_timm.env import machine, versions
from encodenet_timm.compat import check_model

SIZES = (32, 64, 96, 128)  # tried in order before the model's default size
LAYOUT_NAMES = {"NCHW": "NCHW", "NHWC": "NHWC", "NLC": "tokens", "NCL": "NCL", "NC": "vector"}
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


class _TimeLimit(BaseException):
    """The family ran past --time-limit (a BaseException, so no `except Exception` on the way swallows it)."""


def _on_alarm(signum, frame):
    raise _TimeLimit()


# ---- family -> smallest variant ---------------------------------------------------------------------
def list_families() -> List[str]:
    """Every timm model module with at least one model, the zoo's included, sorted."""
    return sorted(m for m in timm.list_modules() if timm.list_models(module=m))


class _SkipInit(TorchDispatchMode):
    """Turns in-place initialisation ops into no-ops: on the meta device they change no shape, and
    running them (trunc_normal_'s clamp_ goes through Python reference kernels there) is most of the time."""
    _OPS = frozenset({"normal_", "uniform_", "fill_", "zero_", "clamp_", "mul_", "add_", "sub_", "div_",
                      "erfinv_", "copy_", "exponential_", "bernoulli_"})

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._overloadpacket.__name__ in self._OPS:
            return args[0]
        return func(*args, **(kwargs or {}))


def _meta_model(name: str) -> torch.nn.Module:
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with _SkipInit():
                return timm.create_model(name, pretrained=False, num_classes=10)
        except Exception:  # an init that needs real values: build it the plain way
            return timm.create_model(name, pretrained=False, num_classes=10)


def smallest_variant(family: str, include_test_models: bool = False) -> Tuple[str, int, type, int]:
    """(name, parameters, model class, variants measured) of the family's smallest model.

    Models are built on the meta device: shapes only, no memory and no initialisation compute.
    """
    sized = []
    for name in timm.list_models(module=family):
        if name.startswith("test_") and not include_test_models:
            continue
        try:
            model = _meta_model(name)
        except Exception:  # a variant that cannot be built is simply not a candidate
            continue
        sized.append((sum(p.numel() for p in model.parameters()), name, type(model)))
    if not sized:
        raise RuntimeError(f"no model of timm module {family!r} could be built")
    params, name, cls = min(sized, key=lambda t: (t[0], t[1]))
    return name, params, cls, len(sized)


def _takes_img_size(cls: type) -> bool:
    """True if the model class (or a base it hands **kwargs to) has an ``img_size`` argument."""
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass is torch.nn.Module:
            continue
        params = inspect.signature(klass.__init__).parameters
        if "img_size" in params:
            return True
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return False
    return False


# ---- input size ----------------------------------------------------------------------------------------
def _create(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)


def pick_input_size(name: str, takes_img_size: bool) -> Tuple[Optional[torch.nn.Module], Tuple[int, int, int],
                                                                  Dict[str, Any], List[str]]:
    """The smallest size at which the model's own forward runs.

    Returns:
        (model or None if no size worked, (C, H, W), create kwargs, one line per rejected size).
    """
    cfg = timm.get_pretrained_cfg(name)
    c, h, w = cfg.input_size if cfg is not None else (3, 224, 224)
    candidates = [(s, s) for s in SIZES if s < min(h, w)] + [(h, w)]
    rejected = []
    for size in candidates:
        kwargs = {"img_size": size[0] if size[0] == size[1] else size} if takes_img_size and size != (h, w) else {}
        try:
            model = _create(name, **kwargs).eval()
            with torch.no_grad():
                model.forward_features(torch.randn(2, c, *size))
            return model, (c, *size), kwargs, rejected
        except _TimeLimit:
            raise
        except Exception as e:
            rejected.append(f"{size[0]}x{size[1]}: {type(e).__name__}: {' '.join(str(e).split())[:120]}")
    return None, (c, h, w), {}, rejected


# ---- one family ------------------------------------------------------------------------------------------
def run_family(family: str, *, max_params: float, time_limit: int, include_test_models: bool) -> Dict[str, Any]:
    """Select, size and check one family; always returns a record (status pass / fail / skip)."""
    start = time.perf_counter()
    record: Dict[str, Any] = {"family": family, "model": None, "params": None, "variants": None,
                              "create_kwargs": {}, "input_size": None, "sizes_rejected": [],
                              "status": "fail", "step": "select", "error_type": None, "reason": None}
    signal.alarm(time_limit)
    try:
        name, params, cls, n_variants = smallest_variant(family, include_test_models)
        record.update(model=name, params=params, variants=n_variants)
        if params > max_params:
            record.update(status="skip", step=None, reason=f"smallest variant has {params / 1e6:.0f}M parameters, "
                                                           f"over this sweep's limit of {max_params / 1e6:.0f}M")
            return record
        record["step"] = "create"
        model, input_size, kwargs, rejected = pick_input_size(name, _takes_img_size(cls))
        record.update(create_kwargs=kwargs, input_size=list(input_size), sizes_rejected=rejected)
        if model is None:  # no size ran: let the package say why at the default size
            model = _create(name)
        result = check_model(model, input_size)
        del model
        result.pop("model")
        result.pop("seconds")
        record.update(result)
    except _TimeLimit:
        record.update(error_type="TimeLimit", reason=f"over the {time_limit} s limit in step {record['step']}")
    except Exception as e:  # selection or creation failed outside the package
        record.update(error_type=type(e).__name__, reason=" ".join(str(e).split())[:300])
    finally:
        signal.alarm(0)
        record["seconds"] = round(time.perf_counter() - start, 2)
    return record


# ---- report ----------------------------------------------------------------------------------------------
def _environment(argv: Sequence[str]) -> Dict[str, Any]:
    threads = os.environ.get("OMP_NUM_THREADS")
    command = " ".join(["python", "benchmarks/coverage.py", *argv])
    return {
        "command": (f"OMP_NUM_THREADS={threads} " if threads else "") + command,
        "versions": versions(),
        "machine": machine(),
    }


def _fmt_flops(n: Optional[float]) -> str:
    if n is None:
        return ""
    return f"{n / 1e9:.3g}G" if n >= 1e9 else f"{n / 1e6:.3g}M"


def write_markdown(report: Dict[str, Any], path: Path) -> None:
    s = report["summary"]
    lines = [
        "# EncodeNet coverage of timm families",
        "",
        f"**{s['passed']} of {s['tried']} families pass** ({s['failed']} fail, {s['skipped']} skipped); "
        f"timm {report['versions']['timm']}, torch {report['versions']['torch']}, "
        f"{report['machine']['torch_threads']} CPU thread, {s['seconds'] / 60:.1f} min.",
        "",
        "One model per timm module (the smallest variant by parameter count), `pretrained=False`, at the "
        "smallest input size it runs at. Checked: split (every parameter on one side, `head(encoder(x)) == "
        "model(x)`), decoder output shape and FLOPs cap, one autoencoder step and one transfer step with a "
        "finite loss (encoder unchanged by the transfer), `export()` parameter count. "
        "Layout: the encoder output (tokens = `(B, N, D)`, NCL = a flattened map `(B, C, h*w)`; `list[i]`: "
        "forward_features returns a list, the decoder mirrors its element i, the largest map); trace: how the "
        "shape trail was read (FX graph, or forward hooks where FX fails); `(n light)`: a tiny encoder, the "
        "decoder's n highest-resolution blocks are depthwise to fit the FLOPs cap.",
        "",
        f"Command: `{report['command']}`",
        "",
        "| family | model | params | input | layout | trace | dec/enc FLOPs | enc FLOPs | status | reason |",
        "|---|---|---:|---|---|---|---:|---:|---|---|",
    ]
    for r in report["families"]:
        size = "x".join(str(v) for v in r["input_size"][1:]) if r.get("input_size") else ""
        if r.get("create_kwargs"):
            size += " (" + ", ".join(f"{k}={v}" for k, v in r["create_kwargs"].items()) + ")"
        ratio = f"{r['flops_ratio']:.2f}" if r.get("flops_ratio") is not None else ""
        if r.get("light_blocks"):
            ratio += f" ({r['light_blocks']} light)"
        layout = LAYOUT_NAMES.get(r.get("layout"), "")
        if r.get("output_index") is not None:
            layout = f"list[{r['output_index']}]: {layout}"
        if r["status"] == "fail":
            reason = f"{r['step']}: {r['error_type']}: {r['reason']}"
        elif r["status"] == "pass" and r.get("sizes_rejected"):
            reason = "the model itself does not run at " + ", ".join(x.split(":")[0] for x in r["sizes_rejected"])
        else:
            reason = r["reason"] or ""
        lines.append(
            f"| {r['family']} | {r['model'] or ''} | {r['params'] / 1e6:.2f}M | {size} | "
            f"{layout} | {r.get('trace_path') or ''} | {ratio} | "
            f"{_fmt_flops(r.get('encoder_flops'))} | {r['status']} | {reason.replace('|', '/')} |"
            if r["params"] is not None else
            f"| {r['family']} | | | | | | | | {r['status']} | {reason.replace('|', '/')} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="*", help="timm module names (default: every family)")
    parser.add_argument("--max-params", type=float, default=150e6, help="skip families whose smallest model is larger")
    parser.add_argument("--time-limit", type=int, default=120, help="seconds per family, selection included")
    parser.add_argument("--include-test-models", action="store_true", help="let timm's tiny test_* models compete")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for coverage.json and coverage.md")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    signal.signal(signal.SIGALRM, _on_alarm)
    families = args.families or list_families()
    unknown = sorted(set(families) - set(list_families()))
    if unknown:
        parser.error(f"unknown timm modules {unknown}; see timm.list_modules()")

    start = time.perf_counter()
    records = []
    for i, family in enumerate(families):
        r = run_family(family, max_params=args.max_params, time_limit=args.time_limit,
                       include_test_models=args.include_test_models)
        records.append(r)
        print(f"[{i + 1}/{len(families)}] {family:28s} {r['model'] or '':34s} {r['status']:4s} {r['seconds']:6.1f}s"
              + (f"  {r['step']}: {r['error_type']}: {r['reason']}" if r["status"] == "fail" else
                 f"  {r['reason']}" if r["status"] == "skip" else ""), flush=True)

    statuses = [r["status"] for r in records]
    report = _environment(argv)
    report["settings"] = {"sizes": list(SIZES), "max_params": args.max_params, "time_limit_s": args.time_limit,
                          "include_test_models": args.include_test_models, "num_classes": 10}
    report["summary"] = {"tried": len(records) - statuses.count("skip"), "passed": statuses.count("pass"),
                         "failed": statuses.count("fail"), "skipped": statuses.count("skip"),
                         "seconds": round(time.perf_counter() - start, 1)}
    report["families"] = records
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "coverage.json").write_text(json.dumps(report, indent=1) + "\n")
    write_markdown(report, args.out / "coverage.md")
    print(f"{report['summary']['passed']} of {report['summary']['tried']} families pass; "
          f"wrote {args.out / 'coverage.json'} and coverage.md", flush=True)
    return report


if __name__ == "__main__":
    main()
