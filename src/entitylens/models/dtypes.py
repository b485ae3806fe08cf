"""Parameter dtypes and devices: parsing their names and checking that a device can run a dtype."""

from __future__ import annotations

import torch

from entitylens.errors import EntitylensError
from entitylens.models._constants import DTYPE_CHOICES

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map ``float32``/``fp32``/``bfloat16``/``bf16``/``float16``/``fp16`` (or a torch dtype) to a torch dtype.

    Raises:
        EntitylensError: Unknown or non-floating dtype.
    """
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise EntitylensError(f"dtype {dtype} is not supported; use one of {', '.join(DTYPE_CHOICES)}")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise EntitylensError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPE_CHOICES)}")
    return _DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """Canonical name of a torch dtype (``float32``, ``bfloat16``, ``float16``)."""
    return str(dtype).removeprefix("torch.")


def check_device_dtype(device: str | torch.device, dtype: torch.dtype) -> torch.device:
    """Check that ``device`` exists and supports ``dtype``; returns the parsed device.

    CPU supports float32, bfloat16 and float16 (torch >= 2 has CPU kernels for both half types; they
    are slower than float32 on most CPUs). CUDA needs compute capability >= 8.0 for bfloat16.

    Raises:
        EntitylensError: Unknown device, CUDA/MPS not available, or dtype unsupported on the device.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise EntitylensError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise EntitylensError(f"device {device!r} requested but CUDA is not available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise EntitylensError(
                f"device {device!r} does not exist ({torch.cuda.device_count()} CUDA devices); use cuda:0"
            )
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise EntitylensError(
                f"bfloat16 is not supported on {device} (needs compute capability >= 8.0); use --dtype float16 "
                "or float32"
            )
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise EntitylensError(f"device {device!r} requested but MPS is not available here; use --device cpu")
    elif dev.type != "cpu":
        raise EntitylensError(f"device type {dev.type!r} is not supported; use cpu, cuda, cuda:N or mps")
    return dev
