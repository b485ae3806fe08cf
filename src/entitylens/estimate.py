"""GPU-time and memory estimates for runs on large models, shared by the experiment and study scripts.

Assumptions (stated in every printed estimate): a forward pass costs ``2 x params`` FLOPs per token (one
multiply-add per weight), a backward about twice a forward; the GPU sustains
:data:`ASSUMED_UTILIZATION` of an H100's dense bf16 peak :data:`H100_BF16_PEAK_FLOPS`. Small-batch
decoding is memory-bandwidth bound, so read the figure as an optimistic floor. Memory: 2 bytes per
parameter in bf16/fp16, 4 in fp32; weights only (KV cache and activations come on top).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from entitylens.errors import EntitylensError

__all__ = [
    "ASSUMED_UTILIZATION",
    "CHARS_PER_TOKEN",
    "GPU_MEMORY_BYTES",
    "H100_BF16_PEAK_FLOPS",
    "LARGE_PARAMS",
    "USABLE_MEMORY_FRACTION",
    "ask_to_proceed",
    "bytes_per_param",
    "estimate_gpu_seconds",
    "format_seconds",
    "spec_params",
]

H100_BF16_PEAK_FLOPS = 989e12
"""Dense bf16 peak of one NVIDIA H100 SXM in FLOP/s (an A100's is 312e12)."""

ASSUMED_UTILIZATION = 0.4
"""Fraction of :data:`H100_BF16_PEAK_FLOPS` the estimate assumes is sustained."""

CHARS_PER_TOKEN = 4
"""Rough characters per token used to count the dataset's tokens without a tokenizer."""

GPU_MEMORY_BYTES = 80e9
"""Memory of the GPUs the memory check counts (A100/H100 80 GB)."""

USABLE_MEMORY_FRACTION = 0.9
"""Fraction of :data:`GPU_MEMORY_BYTES` the weights may fill (the rest for CUDA context, KV cache...)."""

LARGE_PARAMS = 1_000_000_000
"""Models with at least this many parameters get the full estimate and the question before loading."""

_BYTES_PER_PARAM: dict[str, int] = {
    "float32": 4, "fp32": 4, "float": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "half": 2,
}  # fmt: skip


def bytes_per_param(dtype: str) -> int:
    """Bytes per weight for a dtype name (``bfloat16``/``bf16``/``float16`` -> 2, ``float32`` -> 4).

    Raises:
        EntitylensError: Unknown dtype name.

    """
    try:
        return _BYTES_PER_PARAM[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise EntitylensError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16") from None


def estimate_gpu_seconds(
    params: float,
    tokens: float,
    passes: float = 1.0,
    *,
    utilization: float = ASSUMED_UTILIZATION,
    peak_flops: float = H100_BF16_PEAK_FLOPS,
) -> float:
    """Seconds of GPU time for ``passes`` forward-equivalents over ``tokens`` tokens of a ``params`` model.

    A forward costs about ``2 * params`` FLOPs per token (one multiply-add per weight); a backward about
    twice a forward, so a forward + backward is ``passes=3``. The throughput is ``utilization *
    peak_flops`` (default 40% of an H100's 989 TFLOP/s bf16 dense peak).

    Args:
        params: Parameter count.
        tokens: Tokens processed per pass.
        passes: Forward-equivalent passes over those tokens.
        utilization: Fraction of the peak reached, in (0, 1].
        peak_flops: Peak FLOP/s of the device.

    Returns:
        ``2 * params * tokens * passes / (utilization * peak_flops)``.

    Raises:
        EntitylensError: A negative count, or a utilization / peak outside its range.
    """
    if min(params, tokens, passes) < 0 or not all(math.isfinite(x) for x in (params, tokens, passes)):
        raise EntitylensError(
            f"params={params}, tokens={tokens}, passes={passes} must be finite and >= 0; pass real counts"
        )
    if not 0 < utilization <= 1 or not peak_flops > 0:
        raise EntitylensError(
            f"utilization={utilization} must be in (0, 1] and peak_flops={peak_flops} positive; use e.g. 0.4, 989e12"
        )
    return 2.0 * params * tokens * passes / (utilization * peak_flops)


def _safetensors_params(files: Sequence[Path]) -> int | None:
    total = 0
    for f in files:
        try:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
        except (OSError, ValueError):
            return None
        for name, meta in header.items():
            if name != "__metadata__":
                total += math.prod(meta["shape"])
    return total if files else None


def _dir_params(path: Path) -> int | None:
    return _safetensors_params(sorted(path.glob("*.safetensors")))


def spec_params(spec: str) -> tuple[int | None, str]:
    """The parameter count of a model spec, without loading the model.

    Registry keys use the registry's ``params_b``; weight-free baselines have 0; ``tiny:``/``testbed:``
    models are small by construction (count not needed); local directories and hub ids cached offline
    are counted from their safetensors headers; ``.gguf`` files from their tensor table.

    Args:
        spec: A model spec.

    Returns:
        ``(params or None, source)``: source is ``registry``, ``baseline``, ``tiny``, ``testbed``,
        ``safetensors``, ``gguf`` or ``unknown``.

    """
    from entitylens.behavior.baselines import BASELINES
    from entitylens.models.registry import REGISTRY

    if spec in BASELINES:
        return 0, "baseline"
    if spec in REGISTRY:
        return round(REGISTRY[spec].params_b * 1e9), "registry"
    if spec.startswith("tiny:"):
        return None, "tiny"
    if spec.startswith("testbed:"):
        return None, "testbed"
    path = Path(spec).expanduser()
    if spec.lower().endswith(".gguf") and path.is_file():
        try:
            from gguf import GGUFReader

            return int(sum(int(t.n_elements) for t in GGUFReader(str(path)).tensors)), "gguf"
        except Exception:  # an unreadable GGUF is reported by the loader, not here
            return None, "unknown"
    if path.is_dir():
        n = _dir_params(path)
        return (n, "safetensors") if n else (None, "unknown")
    try:
        from entitylens.models.loading import hub_cached_config

        cfg = hub_cached_config(spec)
    except Exception:
        cfg = None
    if cfg is not None:
        n = _dir_params(Path(cfg).parent)
        if n:
            return n, "safetensors"
    return None, "unknown"


def format_seconds(s: float) -> str:
    """``"42 s"``, ``"3.5 min"`` or ``"2.1 h"``."""
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def ask_to_proceed(question: str) -> bool:
    """Ask ``question [y/N]`` at a terminal; True without asking when stdin is not a TTY (CI never blocks)."""
    if not sys.stdin.isatty():
        return True
    try:
        answer = input(f"{question} [y/N] ")
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")
