"""The one GPU-time and memory estimate, printed before a run touches a large model (experiments and studies).

Assumptions (stated in every printed estimate): a forward pass costs ``2 x params`` FLOPs per token (one
multiply-add per weight), a backward about twice a forward; the GPU sustains :data:`ASSUMED_UTILIZATION` of
an H100's dense bf16 peak :data:`H100_BF16_PEAK_FLOPS`. Small-batch decoding is memory-bandwidth bound, so
read the figure as an optimistic floor. Memory: 2 bytes per parameter in bf16/fp16, 4 in fp32; the GPU count
is ``ceil(weight bytes / (0.9 x 80 GB))`` -- weights only, KV cache and activations come on top.

A run's :class:`GpuEstimate` holds one :class:`ArmEstimate` per model, each counting *token-passes*
(forward-equivalent tokens: an evaluation's prompt and generated tokens; a probe study's cached tokens; a
patch study's baseline and patched forwards, and 3 per token for attribution's forward + backward).
:func:`estimate_evaluation` and :func:`estimate_arms` build it; :meth:`GpuEstimate.confirm` prints it and asks
before a large run.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from entitylens.behavior.baselines import BASELINES
from entitylens.errors import EntitylensError
from entitylens.models.hf import hub_cached_config
from entitylens.models.registry import REGISTRY
from entitylens.task.prompts import KST24
from entitylens.task.types import State

__all__ = [
    "ASSUMED_UTILIZATION",
    "CHARS_PER_TOKEN",
    "GPU_MEMORY_BYTES",
    "H100_BF16_PEAK_FLOPS",
    "LARGE_PARAMS",
    "USABLE_MEMORY_FRACTION",
    "ArmEstimate",
    "GpuEstimate",
    "ask_to_proceed",
    "bytes_per_param",
    "count_state_tokens",
    "estimate_arm",
    "estimate_arms",
    "estimate_evaluation",
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

Confirm = Callable[[str], bool]


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

    A forward costs about ``2 * params`` FLOPs per token; a backward about twice a forward, so a forward +
    backward is ``passes=3``. The throughput is ``utilization * peak_flops``.

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


@dataclass(frozen=True)
class ArmEstimate:
    """The estimate for one model of a run.

    Attributes:
        label: Model label (or the study arm, ``base`` / ``variant``).
        spec: Model spec.
        params: Parameter count (``None`` when unknown).
        params_source: Where the count came from (``registry``, ``safetensors``, ``gguf``, ``counted`` ...).
        tokens: Token-passes the run costs this model (forward-equivalent tokens).
        token_detail: What ``tokens`` is made of (e.g. ``{"prompt": ..., "generated": ...}``).
        seconds: ``2 x params x tokens / (utilization x peak)`` (``None`` when params is unknown).
        weight_bytes: ``params x bytes per param`` of the dtype (``None`` when unknown).
        gpus: 80 GB GPUs the weights need, ``ceil(weight_bytes / (0.9 x 80 GB))`` (``None`` when unknown).
        large: Whether ``params`` reaches the run's threshold (the estimate matters and the run asks first).
    """

    label: str
    spec: str
    params: int | None
    params_source: str
    tokens: float
    token_detail: Mapping[str, float] = field(default_factory=dict)
    seconds: float | None = None
    weight_bytes: int | None = None
    gpus: int | None = None
    large: bool = False


def estimate_arm(
    params: int | None,
    tokens: float,
    dtype: str = "bfloat16",
    *,
    label: str = "",
    spec: str = "",
    params_source: str = "",
    token_detail: Mapping[str, float] | None = None,
    large_params: float = LARGE_PARAMS,
    utilization: float = ASSUMED_UTILIZATION,
    peak_flops: float = H100_BF16_PEAK_FLOPS,
) -> ArmEstimate:
    """GPU time and memory of one model (see the module docstring for the assumptions).

    Args:
        params: Parameter count, or ``None`` when unknown (then only tokens are reported).
        tokens: Token-passes.
        dtype: Weight dtype of the run.
        label: Model label (recorded).
        spec: Model spec (recorded).
        params_source: Where ``params`` came from (recorded).
        token_detail: What ``tokens`` is made of (recorded).
        large_params: Threshold of :attr:`ArmEstimate.large`.
        utilization: Sustained fraction of ``peak_flops``.
        peak_flops: Peak FLOP/s of one GPU.

    Returns:
        The estimate.
    """
    per_param = bytes_per_param(dtype)
    detail = dict(token_detail or {})
    if params is None:
        estimate_gpu_seconds(0, tokens, utilization=utilization, peak_flops=peak_flops)  # checks the numbers
        return ArmEstimate(label, spec, None, params_source, float(tokens), detail)
    seconds = estimate_gpu_seconds(params, tokens, utilization=utilization, peak_flops=peak_flops)
    weight_bytes = int(params) * per_param
    gpus = max(1, math.ceil(weight_bytes / (USABLE_MEMORY_FRACTION * GPU_MEMORY_BYTES)))
    return ArmEstimate(
        label, spec, int(params), params_source, float(tokens), detail, seconds, weight_bytes, gpus,
        params >= large_params,
    )  # fmt: skip


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


@dataclass(frozen=True)
class GpuEstimate:
    """The estimate of one run: per model, parameters, token-passes, seconds and GPUs.

    Attributes:
        arms: One :class:`ArmEstimate` per model.
        what: What runs, e.g. ``"716 states"`` or ``"probe study, 210 rows"``.
        dtype: Weight dtype.
        note: What the token-passes count (and what they leave out).
        utilization: Assumed fraction of ``peak_flops``.
        peak_flops: Peak FLOP/s of the reference GPU.
    """

    arms: tuple[ArmEstimate, ...]
    what: str
    dtype: str
    note: str = ""
    utilization: float = ASSUMED_UTILIZATION
    peak_flops: float = H100_BF16_PEAK_FLOPS

    @property
    def seconds(self) -> float:
        """Total estimated GPU seconds over the models with a known size."""
        return float(sum(a.seconds or 0.0 for a in self.arms))

    @property
    def large(self) -> bool:
        """Whether any model reaches the run's size threshold."""
        return any(a.large for a in self.arms)

    @property
    def assumption(self) -> str:
        """The stated throughput and memory assumptions, one line."""
        return (
            f"forward = 2 x params FLOPs per token, backward = 2 x forward; "
            f"{self.utilization:.0%} of an H100's {self.peak_flops / 1e12:.0f} TFLOP/s bf16 dense peak "
            f"(decoding is bandwidth-bound: treat as a floor); weights {bytes_per_param(self.dtype)} bytes/param "
            f"({self.dtype}), GPUs of {GPU_MEMORY_BYTES / 1e9:.0f} GB at {USABLE_MEMORY_FRACTION:.0%} for weights"
        )

    def to_json(self) -> dict[str, Any]:
        """JSON-ready record (``estimate.json``, ``study.json``)."""
        return {
            "what": self.what, "dtype": self.dtype, "note": self.note, "utilization": self.utilization,
            "peak_flops": self.peak_flops, "chars_per_token": CHARS_PER_TOKEN, "gpu_memory_bytes": GPU_MEMORY_BYTES,
            "usable_memory_fraction": USABLE_MEMORY_FRACTION, "seconds": self.seconds, "large": self.large,
            "assumption": self.assumption, "arms": [{**asdict(a), "token_detail": dict(a.token_detail)}
                                                    for a in self.arms],
        }  # fmt: skip

    def lines(self) -> list[str]:
        """Human-readable lines: the full table for a large run, one line otherwise."""
        if not self.large:
            known = [a.params for a in self.arms if a.params]
            size = f" (largest {max(known) / 1e6:.0f}M params)" if known else ""
            return [f"estimate: small models only{size}, no GPU-time estimate needed ({self.what})"]
        out = [f"GPU-time estimate for {self.what} ({self.assumption}):"]
        for a in self.arms:
            if a.params is None:
                out.append(f"  {a.label:<34} parameter count unknown ({a.params_source}); no estimate")
            elif a.params == 0:
                out.append(f"  {a.label:<34} baseline, no weights")
            else:
                out.append(
                    f"  {a.label:<34} {a.params / 1e9:6.2f}B params ({a.params_source})  {a.tokens:>11,.0f} "
                    f"token-passes  {format_seconds(a.seconds or 0.0):>9}  weights {(a.weight_bytes or 0) / 1e9:6.1f}"
                    f" GB -> {a.gpus} x {GPU_MEMORY_BYTES / 1e9:.0f} GB GPU{'s' if (a.gpus or 0) > 1 else ''}"
                )
        out.append(f"  total ~ {format_seconds(self.seconds)} of GPU time" + (f"; {self.note}" if self.note else ""))
        return out

    def confirm(self, confirm: Confirm | None, say: Callable[[str], None]) -> None:
        """Print the estimate through ``say`` and, for a large run, ask ``confirm`` before going on.

        Raises:
            EntitylensError: The answer was no.
        """
        for line in self.lines():
            say(line)
        if self.large and confirm is not None:
            if not confirm(f"estimated {format_seconds(self.seconds)} of GPU time; proceed?"):
                raise EntitylensError("stopped at the GPU-time estimate; rerun with --yes to proceed")


# ------------------------------------------------------------------------------------------ model sizes


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

    Registry keys use the registry's ``params_b``; weight-free baselines have 0; ``tiny:`` and ``testbed:`` models
    are small by construction (count not needed); local directories and hub ids cached offline are counted from
    their safetensors headers; ``.gguf`` files from their tensor table.

    Args:
        spec: A model spec.

    Returns:
        ``(params or None, source)``: source is ``registry``, ``baseline``, ``tiny``, ``testbed``,
        ``safetensors``, ``gguf`` or ``unknown``.
    """
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
            from gguf import GGUFReader  # optional package (the gguf extra)

            return int(sum(int(t.n_elements) for t in GGUFReader(str(path)).tensors)), "gguf"
        except Exception:  # an unreadable GGUF is reported by the loader, not here
            return None, "unknown"
    if path.is_dir():
        n = _dir_params(path)
        return (n, "safetensors") if n else (None, "unknown")
    try:
        cfg = hub_cached_config(spec)
    except Exception:
        cfg = None
    if cfg is not None:
        n = _dir_params(Path(cfg).parent)
        if n:
            return n, "safetensors"
    return None, "unknown"


# ---------------------------------------------------------------------------------------------- builders


def count_state_tokens(states: Sequence[State], chars_per_token: int = CHARS_PER_TOKEN) -> tuple[int, int]:
    r"""Rough prompt and generated token counts of a list of states under the KST24 protocol.

    Each state's plain KST24 prompt (instruction, two demonstrations, test description) counts
    ``ceil(len / chars_per_token)`` prompt tokens; its generated text (the forced ``"\nStatement:"`` plus the
    gold statement) counts ``ceil(len / chars_per_token)`` generated tokens.

    Args:
        states: The states to evaluate.
        chars_per_token: Characters per token.

    Returns:
        ``(prompt_tokens, generated_tokens)`` summed over the states.
    """
    if chars_per_token < 1:
        raise EntitylensError(f"chars_per_token must be >= 1, got {chars_per_token}")
    prompt = generated = 0
    for s in states:
        prompt += math.ceil(len(KST24.prompt(s.context)) / chars_per_token)
        generated += math.ceil(len(KST24.target_text(s.contents)) / chars_per_token)
    return prompt, generated


def estimate_evaluation(models: Sequence[Any], states: Sequence[State], dtype: str) -> GpuEstimate:
    """The estimate of evaluating ``models`` (``ModelRun`` s: ``spec``, ``label``) on ``states``; loads nothing.

    Tokens are counted as ``ceil(characters / 4)`` of the plain KST24 prompt plus the gold statement (chat
    templates add a few more); every prompt and generated token is one forward token (no prefix sharing).
    """
    prompt, generated = count_state_tokens(states)
    arms = []
    for m in models:
        params, source = spec_params(m.spec)
        arms.append(estimate_arm(params, prompt + generated, dtype, label=m.label, spec=m.spec,
                                 params_source=source, token_detail={"prompt": prompt, "generated": generated}))
    return GpuEstimate(tuple(arms), f"{len(states)} states", dtype,
                       f"prompt + generated tokens ~ characters / {CHARS_PER_TOKEN} of the KST24 prompts")


def estimate_arms(
    specs: Mapping[str, str],
    loaded_params: int,
    tokens: Mapping[str, float],
    what: str,
    note: str,
    dtype: str,
    large_params: float = LARGE_PARAMS,
) -> GpuEstimate:
    """The estimate of a study: the base's size as counted on the loaded model, the variant's looked up.

    Args:
        specs: Arm (``base`` first) -> model spec.
        loaded_params: Parameters of the loaded base model.
        tokens: Arm -> token-passes.
        what: What runs (printed).
        note: What the token-passes count.
        dtype: Weight dtype.
        large_params: Size at which the full estimate is printed and the run asks first.

    Returns:
        The estimate (the variant's size: the registry's, its files', else assumed equal to the base's).
    """
    arms = []
    for arm, spec in specs.items():
        if arm == "base":
            params, source = loaded_params, "counted"
        else:
            known, how = spec_params(spec)
            params, source = (known, how) if known else (loaded_params, "assumed = base")
        arms.append(estimate_arm(params, tokens[arm], dtype, label=arm, spec=spec, params_source=source,
                                 large_params=large_params))
    return GpuEstimate(tuple(arms), what, dtype, note)
