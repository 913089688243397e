"""Run by tests/test_distributed.py under ``torchrun --max-restarts 1``: examples/distributed_fit.py (its
arguments follow MARKER), where rank 1 SIGKILLs itself in step KILL_STEP of the autoencoder, once: it
first creates MARKER, and the restarted attempt finds it.

    python -m torch.distributed.run ... tests/ddp_kill_worker.py MARKER --out ... --run-dir ...
"""
import os
import runpy
import signal
import sys
from pathlib import Path

import torch

from encodenet_timm.tasks import ConvertingAutoencoderTask

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "distributed_fit.py"
KILL_STEP = 5


def main() -> None:
    marker = Path(sys.argv[1])
    forward, calls = ConvertingAutoencoderTask.forward, [0]

    def forward_or_die(self, *args, **kwargs):
        calls[0] += torch.is_grad_enabled()
        if calls[0] == KILL_STEP and os.environ["RANK"] == "1" and not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return forward(self, *args, **kwargs)

    ConvertingAutoencoderTask.forward = forward_or_die
    sys.argv = [str(EXAMPLE), *sys.argv[2:]]
    runpy.run_path(str(EXAMPLE), run_name="__main__")


if __name__ == "__main__":
    main()
