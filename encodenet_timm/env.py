"""Versions and machine facts that results files record (benchmarks, run directories)."""
import os
import platform
from typing import Dict, Optional

import numpy as np
import timm
import torch


def versions() -> Dict[str, Optional[str]]:
    """Python, torch, timm, numpy, FAISS (None when absent) and encodenet_timm versions."""
    from . import __version__
    out = {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
           "numpy": np.__version__, "encodenet_timm": __version__}
    try:
        import faiss
        out["faiss"] = faiss.__version__
    except ImportError:
        out["faiss"] = None
    return out


def machine(device: Optional[torch.device] = None) -> Dict[str, object]:
    """Platform, CPU count, torch threads, OMP_WAIT_POLICY, and the device (with its GPU name on CUDA)."""
    device = device or torch.device("cpu")
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "torch_threads": torch.get_num_threads(), "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
