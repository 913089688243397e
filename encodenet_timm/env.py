"""Versions and machine facts that results files record (benchmarks, run directories), the device a name
resolves to, and the precision (autocast dtype) a run gets on this machine."""
import os
import platform
from contextlib import nullcontext
from functools import lru_cache
from typing import Dict, List, Optional

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
            "torch_threads": torch.get_num_threads(), "device": str(device), "cpu_flags": cpu_flags(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


@lru_cache(maxsize=None)
def _cpu_flags() -> tuple:
    return tuple(_read_cpu_flags())


def cpu_flags() -> List[str]:
    """`_read_cpu_flags`, read once per process."""
    return list(_cpu_flags())


def _read_cpu_flags() -> List[str]:
    """The CPU's matrix and vector flags that decide its training speed (AMX, AVX512-BF16, AVX512, AVX2), as
    torch's own feature checks report them (not read from the CPU's name)."""
    cpu = getattr(torch, "cpu", None)
    names = {"amx_tile": "_is_amx_tile_supported", "amx_fp16": "_is_amx_fp16_supported",
             "avx512_bf16": "_is_avx512_bf16_supported", "avx512": "_is_avx512_supported",
             "avx2": "_is_avx2_supported", "vnni": "_is_vnni_supported"}
    flags = []
    for flag, name in names.items():
        check = getattr(cpu, name, None)
        try:
            if check is not None and check():
                flags.append(flag)
        except RuntimeError:
            pass
    return flags


def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bf16 in hardware (AMX tiles or AVX512-BF16), as torch's own CPU
    feature checks report it; bf16 autocast then runs oneDNN's bf16 kernels, about 2x fp32 for convolutions."""
    return torch.backends.mkldnn.is_available() and bool({"amx_tile", "avx512_bf16"} & set(cpu_flags()))


def autocast_dtype(device: torch.device, amp: str) -> Optional[torch.dtype]:
    """The autocast dtype `amp` means on `device`, or None for fp32.

    "auto": bf16 on a CUDA GPU that supports it and on a CPU with native bf16 (`cpu_has_native_bf16`),
    else fp32. "bf16": bf16 on any CUDA GPU or CPU. "fp16": CUDA only (with a GradScaler).

    Raises:
        ValueError: an unknown `amp`, or "fp16" on a CPU.
    """
    if amp not in ("none", "auto", "bf16", "fp16"):
        raise ValueError(f"amp must be 'none', 'auto', 'bf16' or 'fp16', got {amp!r}")
    if amp == "auto":
        if device.type == "cuda":
            amp = "bf16" if torch.cuda.is_bf16_supported() else "none"
        else:
            amp = "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "none"
    if amp == "none" or device.type not in ("cuda", "cpu"):
        return None
    if amp == "fp16" and device.type == "cpu":
        raise ValueError("amp='fp16' needs a CUDA device; on a CPU use amp='bf16' (or 'auto': bf16 where the "
                         "CPU has native bf16, else fp32)")
    return torch.bfloat16 if amp == "bf16" else torch.float16


def precision(device: torch.device, amp: str) -> str:
    """What a run records: "bf16", "fp16" or "fp32" (`autocast_dtype` in words)."""
    dtype = autocast_dtype(device, amp)
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def autocast(device: torch.device, amp: str):
    """`torch.autocast` for `amp` on `device` (`autocast_dtype`), or a null context for fp32."""
    dtype = autocast_dtype(device, amp)
    return nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


def resolve_device(name: str) -> torch.device:
    """"auto" -> CUDA when available, else CPU; anything else is passed to torch.device.

    Raises:
        ValueError: a name torch does not know, or a CUDA device this machine does not have.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={name!r} is not a device torch knows; use 'auto', 'cpu', 'cuda' or "
                         f"'cuda:N'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available; use device='auto' or 'cpu'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise ValueError(f"device={name!r} but this machine has {n} CUDA device{'s' if n != 1 else ''} "
                         f"(cuda:0 to cuda:{n - 1}); use one of those or 'auto'")
    return device
