"""Base-vs-variant studies: what the probe and patch studies share (``entitylens study probe|patch``).

Both studies (:mod:`entitylens.pipelines.probe_study`, :mod:`entitylens.pipelines.patch_study`)

- take the same states (a K&S JSONL file, or states generated from a seed) for both models,
- render them in one prompt *protocol*: ``ks`` (``"<context> Box 3 contains"``, the form of
  ``entitylens cache`` / ``entitylens patch pairs``) or ``compact`` (the testbed's ``"B0 car ; ... | B3"``,
  which the shipped testbed pair was trained on); ``auto`` picks ``compact`` when both models are
  ``testbed:`` models,
- print a GPU-time estimate before any computation when a model is large
  (:class:`~entitylens.pipelines.estimate.GpuEstimate`), and ask before going on when run at a terminal
  without ``--yes``,
- resume: finished caches, probe runs and patching runs are reused when their inputs are unchanged,
- write one run directory per model and a side-by-side comparison on one scale, plus ``study.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from entitylens.activations import build_prompts, compact_cache_prompts
from entitylens.errors import EntitylensError
from entitylens.models.registry import experiment_pairs
from entitylens.models.specs import resolve_spec
from entitylens.pipelines.estimate import LARGE_PARAMS, GpuEstimate, estimate_arms
from entitylens.task.generate import GeneratorConfig, generate_states
from entitylens.task.io import read_ks_jsonl
from entitylens.task.targeted import eval_states
from entitylens.task.types import State

__all__ = [
    "ARMS",
    "PROTOCOLS",
    "StudyConfig",
    "arm_label",
    "count_params",
    "default_model_pair",
    "resolve_protocol",
    "study_estimate",
    "study_prompts",
    "study_states",
]

ARMS: tuple[str, str] = ("base", "variant")
"""Names of the two arms of a study (directories ``base/`` and ``variant/``)."""

PROTOCOLS: tuple[str, ...] = ("auto", "ks", "compact")
"""Prompt protocols a study accepts."""


def default_model_pair() -> tuple[str, str]:
    """The registry's first code pair (base, code variant), e.g. ``("llama2-7b", "codellama-7b")``."""
    base, variant = experiment_pairs("code")[0]
    return base.key, variant.key


def resolve_protocol(protocol: str, base: str, variant: str) -> str:
    """``ks`` or ``compact``: ``auto`` is ``compact`` when both specs are ``testbed:`` models, else ``ks``.

    Raises:
        EntitylensError: An unknown protocol name.
    """
    if protocol not in PROTOCOLS:
        raise EntitylensError(f"unknown protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")
    if protocol != "auto":
        return protocol
    return "compact" if base.startswith("testbed:") and variant.startswith("testbed:") else "ks"


@dataclass(frozen=True)
class StudyConfig:
    """What both studies share: the model pair, the data, the prompt form, where and how models run.

    Attributes:
        base: Model spec of the base model.
        variant: Model spec of the variant (e.g. the code model).
        out: Output directory.
        data: K&S JSONL dataset (default: generate ``states`` states from ``seed``).
        seed: Seed of generated states (and of the patch study's pair choices).
        states: States to generate, or to keep from ``data`` (default: the study's).
        protocol: Prompt form: ks ('<context> Box 3 contains'), compact (testbed 'B0 car ; ... | B3'); auto =
            compact when both models are testbed: models.
        prefix: Text put before every ``ks`` prompt (e.g. KST24's instruction and demonstrations).
        device: cpu, cuda, cuda:N or mps.
        dtype: Model dtype: float32, bfloat16 or float16.
        estimate_above: Print the GPU-time estimate (and ask) when a model has at least this many parameters
            (0 = always).
        overwrite: Replace another model's or dataset's results in ``out``.
    """

    base: str
    variant: str
    out: Path
    data: Path | None = None
    seed: int = 0
    states: int | None = None
    protocol: str = "auto"
    prefix: str = ""
    device: str = "cpu"
    dtype: str = "float32"
    estimate_above: float = LARGE_PARAMS
    overwrite: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        if self.data is not None:
            object.__setattr__(self, "data", Path(self.data))
        if not isinstance(self.prefix, str):
            raise EntitylensError("prefix must be a string; pass the few-shot text itself")
        if self.prefix and self.resolved_protocol == "compact":
            raise EntitylensError(
                "a few-shot prefix applies to ks prompts only; drop --kst24-prefix/--prefix-file or pass --protocol ks"
            )
        if self.states is not None and self.states < 1:
            raise EntitylensError(f"--states {self.states} must be at least 1; pass a positive number of states")

    @property
    def resolved_protocol(self) -> str:
        """``ks`` or ``compact`` (:func:`resolve_protocol`)."""
        return resolve_protocol(self.protocol, self.base, self.variant)

    @property
    def specs(self) -> dict[str, str]:
        """Arm -> model spec."""
        return {"base": self.base, "variant": self.variant}

    def check(self) -> None:
        """Refuse an output path that is a file and specs that do not resolve, before any work."""
        if self.out.exists() and not self.out.is_dir():
            raise EntitylensError(f"--out {self.out} is a file; give a directory such as runs/study")
        for flag, spec in (("--base", self.base), ("--variant", self.variant)):
            try:
                resolve_spec(spec)
            except EntitylensError as e:
                raise EntitylensError(f"{flag}: {e}") from None


def study_states(data: str | os.PathLike[str] | None, seed: int, num_states: int | None, protocol: str) -> list[State]:
    """The states of a study: read from a K&S JSONL file, or generated from ``seed``.

    Generated states come from the targeted evaluation set for the ``compact`` protocol (0-8 operations on the
    queried box) and from the K&S generator (12-operation scenarios) for ``ks``.

    Args:
        data: K&S JSONL file, or ``None`` to generate.
        seed: Generator seed (ignored with ``data``).
        num_states: States to generate; with ``data``, keep the first ``num_states`` (``None``: all).
        protocol: ``ks`` or ``compact``.

    Returns:
        The states.

    Raises:
        EntitylensError: A missing file, or ``num_states`` < 1.
    """
    if num_states is not None and num_states < 1:
        raise EntitylensError(f"--states {num_states} must be at least 1; pass a positive number of states")
    if data is not None:
        path = Path(data)
        if not path.is_file():
            raise EntitylensError(f"dataset {path} does not exist; pass an existing K&S JSONL file with --data")
        states: list[State] = read_ks_jsonl(path)
        return states[:num_states] if num_states is not None else states
    n = 240 if num_states is None else int(num_states)
    if protocol == "compact":
        return eval_states(seed=seed, num_states=n)
    return generate_states(GeneratorConfig(seed=seed, num_states=n))


def study_prompts(states: Sequence[State], protocol: str, limit: int | None = None, prefix: str = "") -> list[Any]:
    """Caching prompts (one per state x box) in the study's protocol, the first ``limit`` of them.

    ``prefix`` goes before every ``ks`` prompt (the compact protocol has none).
    """
    if limit is not None and limit < 1:
        raise EntitylensError(f"--limit {limit} must be at least 1; pass a positive number of rows")
    prompts = compact_cache_prompts(states) if protocol == "compact" else build_prompts(states, prefix=prefix)
    return prompts[:limit] if limit is not None else prompts


def arm_label(arm: str, spec: str) -> str:
    """``"base (llama2-7b)"``: an arm's label in titles and comparisons."""
    return f"{arm} ({spec})"


def count_params(model: Any) -> int:
    """Parameters of a loaded model (tied weights counted once)."""
    seen: set[int] = set()
    n = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def study_estimate(
    config: StudyConfig, model: Any, tokens: float, what: str, note: str
) -> GpuEstimate:
    """The study's estimate: both arms cost ``tokens`` token-passes; the base's size counted on ``model``."""
    return estimate_arms(config.specs, count_params(model), {a: tokens for a in ARMS}, what, note,
                         config.dtype, large_params=config.estimate_above)  # fmt: skip


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object file, or ``None`` when it is absent or unreadable."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def jsonable(obj: Any) -> Any:
    """``obj`` with paths and other objects as strings (for ``study.json``)."""
    return json.loads(json.dumps(obj, default=str))


Say = Callable[[str], None]
Specs = Mapping[str, str]
