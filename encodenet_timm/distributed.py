"""torch.distributed glue: rank and world size, reductions, broadcasts (sharded loaders: `loaders`).

Every function is a no-op (or the identity) when no process group is initialised, so the
single-process code path is the same code. Under ``torchrun`` the caller initialises the group
(``torch.distributed.init_process_group``, or `init_group` with a bounded timeout) before building the
wrapper; see docs/scaling.md.
"""
import datetime
import os
import re
import sys
import threading
from typing import Any, List, Optional, Sequence

import torch
import torch.distributed as dist

from .env import precision, resolve_device

__all__ = ["training_device", "is_distributed", "rank", "world_size", "is_main", "barrier", "local_device", "all_reduce_sum",
           "broadcast_object", "gather_objects", "TIMEOUT_ENV", "init_group", "is_collective_error"]

TIMEOUT_ENV = "ENCODENET_DIST_TIMEOUT"  # seconds a collective waits for the other ranks (default 1800)
# how the backends word a peer that died or a collective that timed out (gloo raises a plain RuntimeError)
_COLLECTIVE_FAILURE = re.compile(r"gloo|nccl|connection (closed|reset)|timed out|timeout|broken pipe", re.I)


def is_distributed() -> bool:
    """True inside an initialised process group (any world size, 1 included)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0, or the only process: the one that writes files and logs."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def local_device(name: str) -> str:
    """The device name a rank should use: "auto"/"cuda" -> ``cuda:$LOCAL_RANK`` under torchrun with CUDA."""
    if is_distributed() and name in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return name


def training_device(name: str, amp: str) -> torch.device:
    """The device this process trains on: `name` resolved (`local_device`, then `env.resolve_device`), `amp`
    checked against it (amp="fp16" on a CPU is refused here, before any training); on CUDA, cuDNN autotuning
    (fixed input sizes: let it pick the fastest kernels) and, under torchrun, the current device set (NCCL's
    object collectives use it)."""
    device = resolve_device(local_device(name))
    precision(device, amp)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        if is_distributed():
            torch.cuda.set_device(device)
    return device


def all_reduce_sum(values: Sequence[float], device: torch.device) -> List[float]:
    """Sum of `values` over all ranks (float64); `values` itself in one process. NaN/inf propagate."""
    if not is_distributed():
        return [float(v) for v in values]
    t = torch.tensor(list(values), dtype=torch.float64,
                     device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.cpu().tolist()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` of rank `src` on every rank (pickled between the job's own processes, never from a file)."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any, dst: int = 0) -> Optional[List[Any]]:
    """Every rank's `obj`, in rank order, on rank `dst` (None elsewhere); ``[obj]`` in one process."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size() if rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def init_group(backend: Optional[str] = None) -> None:
    """``init_process_group`` from torchrun's environment: NCCL with CUDA, else gloo, with a timeout of
    ``$ENCODENET_DIST_TIMEOUT`` seconds (default 1800): a rank whose peer died stops with an error
    within that time rather than waiting for ever (gloo notices a closed connection sooner). A group
    that has not connected by then ends the process (exit status 1).

    Raises:
        ValueError: the variable is not a positive number.
    """
    text = os.environ.get(TIMEOUT_ENV, "1800")
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds > 0, got {text!r}")
    # gloo can wait past its timeout while connecting to a peer that is gone: then this process gives up
    watchdog = threading.Timer(seconds, _give_up, args=(seconds,))
    watchdog.daemon = True
    watchdog.start()
    backend, timeout = backend or ("nccl" if torch.cuda.is_available() else "gloo"), datetime.timedelta(seconds=seconds)
    try:
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if attempt is None:
            dist.init_process_group(backend, timeout=timeout)
        else:  # torchrun: keys of its own in the job's store, so a restarted group never reads a dead rank's address
            store, rank_, world = next(dist.rendezvous("env://", timeout=timeout))
            dist.init_process_group(backend, store=dist.PrefixStore(f"encodenet/attempt-{attempt}", store),
                                    rank=rank_, world_size=world, timeout=timeout)
    finally:
        watchdog.cancel()


def _give_up(seconds: float) -> None:
    print(f"rank {os.environ.get('RANK', '?')}: the process group did not connect within {seconds:g} s "
          f"(${TIMEOUT_ENV}); exiting", file=sys.stderr, flush=True)
    os._exit(1)


def is_collective_error(error: BaseException) -> bool:
    """`error` is a collective that failed: another rank died, hung up, or timed out."""
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(error, dist_error):
        return True
    return isinstance(error, RuntimeError) and bool(_COLLECTIVE_FAILURE.search(str(error)))
