"""The paper's three comparisons (KST24): code, math and alignment -- ``entitylens experiment code|math|alignment``.

One run (:func:`run_experiment`, configured by an :class:`ExperimentConfig`)

1. picks the models: the registry's (base, variant) pairs of the experiment
   (:data:`entitylens.models.EXPERIMENTS`), or ``--models`` (first = base, like ``entitylens eval``) and
   ``--pairs BASE:VARIANT`` (:func:`entitylens.behavior.runs.models_and_pairs`, shared with ``entitylens eval``);
2. picks the data: ``--data FILE``, or the paper-profile test set (716 states, KST24's numops profile)
   generated from ``--seed`` into ``OUT/data.jsonl`` -- byte-identical for a seed, reused when present and
   identical, refused when ``OUT/data.jsonl`` holds something else (:func:`prepare_data`);
3. prints a GPU-time and memory estimate and writes it to ``OUT/estimate.json``
   (:func:`entitylens.pipelines.estimate.estimate_evaluation`) -- and, at a terminal without ``--yes``, asks
   before loading a model of 1B parameters or more;
4. evaluates with the paper's protocol through :func:`entitylens.behavior.runs.run_eval` (the run directory
   of ``entitylens eval``: ``run.json``, ``predictions.jsonl``, ``summary.csv``, ``comparison.csv``,
   ``accuracy_by_numops.png/.pdf``; resumable; ``--shard i/n``);
5. writes ``paper_table.csv`` and ``paper_table.md`` (:mod:`entitylens.pipelines.paper_table`).
   :func:`merge_experiment` merges shard runs (as ``entitylens merge``) and writes the table of the merged run.

``experiments/exp1_code.py``, ``exp2_math.py`` and ``exp3_alignment.py`` are thin scripts calling
``entitylens experiment``.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd

from entitylens._io import temp_prefix, write_json
from entitylens.behavior.combine import merge_runs
from entitylens.behavior.evaluate import EvalConfig
from entitylens.behavior.runs import (
    RUN_FILE,
    check_model_pairs,
    check_or_write_config,
    models_and_pairs,
    parse_shard,
    read_dataset,
    run_config,
    run_eval,
    select_states,
)
from entitylens.behavior.vllm_engine import VLLMOptions
from entitylens.errors import EntitylensError
from entitylens.frames import frame
from entitylens.pipelines.estimate import Confirm, GpuEstimate, ask_to_proceed, bytes_per_param, estimate_evaluation
from entitylens.pipelines.paper_table import PAPER_TABLE_COLUMNS, write_paper_table
from entitylens.task.generate import GeneratorConfig, generate_states
from entitylens.task.io import write_ks_jsonl

__all__ = [
    "EXPERIMENTS",
    "EXPERIMENT_SCRIPTS",
    "ExperimentConfig",
    "ExperimentResult",
    "experiment_title",
    "merge_experiment",
    "prepare_data",
    "run_experiment",
]

EXPERIMENT_SCRIPTS: dict[str, str] = {"code": "exp1_code", "math": "exp2_math", "alignment": "exp3_alignment"}
"""Experiment name -> script name (``experiments/<name>.py``) and default output ``runs/<name>``."""

EXPERIMENTS: tuple[str, ...] = tuple(EXPERIMENT_SCRIPTS)
"""The experiments ``entitylens experiment`` runs."""


@dataclass(frozen=True)
class ExperimentConfig:
    """One of the paper's comparisons, as ``entitylens experiment`` runs it.

    Attributes:
        experiment: ``code``, ``math`` or ``alignment``.
        out: Run directory (default ``runs/<script>``, e.g. ``runs/exp1_code``).
        models: Substitute model specs (registry key, hub id, local dir, .gguf, tiny:NAME, random...); the first
            is the base the others are compared with (default: the experiment's registry pairs).
        pairs: Explicit comparison pairs ``BASE:VARIANT`` (model labels).
        data: Dataset (K&S T5 JSONL); default: the paper-profile set for ``seed``, generated into
            ``OUT/data.jsonl``.
        seed: Seed of the generated dataset and of the random baseline.
        device: cuda, cuda:N, cpu or mps.
        device_map: Hugging Face device_map, e.g. auto to spread 70B models over the GPUs (overrides device).
        dtype: bfloat16, float16 or float32.
        batch_size: States per batch, or auto (from the GPU's free memory).
        shard: Evaluate shard I/N (0-based) only; merge the shards afterwards.
        limit: Only the first N states (smoke tests).
        forced: Grammar-forced text appended (jump, fast) or decoded token by token (step, as outlines);
            default: jump on the native engine, step on vLLM (the only form it decodes).
        score: Order-insensitive (set) or exact (strict) object strings.
        chat: Use the chat template: auto (registry / name), always or never.
        engine: Decoder: native (entitylens's own, the reference) or vllm (vLLM structured outputs).
        tensor_parallel_size: vLLM: GPUs one model is split over (70B-class models).
        gpu_memory_utilization: vLLM: fraction of device memory to reserve (default 0.9 on a GPU).
        max_model_len: vLLM: context length to reserve KV cache for (default: the model's).
    """

    experiment: str = "code"
    out: Path | None = None
    models: tuple[str, ...] | None = None
    pairs: tuple[str, ...] | None = None
    data: Path | None = None
    seed: int = 0
    device: str = "cuda"
    device_map: str | None = None
    dtype: str = "bfloat16"
    batch_size: int | Literal["auto"] = "auto"
    shard: str | None = None
    limit: int | None = None
    forced: Literal["jump", "step"] | None = None
    score: Literal["set", "strict"] = "set"
    chat: Literal["auto", "always", "never"] = "auto"
    engine: Literal["native", "vllm"] = "native"
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None

    def __post_init__(self) -> None:
        if self.experiment not in EXPERIMENT_SCRIPTS:
            raise EntitylensError(
                f"unknown experiment {self.experiment!r}; use one of {', '.join(EXPERIMENT_SCRIPTS)}"
            )
        out = Path("runs") / EXPERIMENT_SCRIPTS[self.experiment] if self.out is None else Path(self.out)
        object.__setattr__(self, "out", out)
        if self.data is not None:
            object.__setattr__(self, "data", Path(self.data))
        for name in ("models", "pairs"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(getattr(self, name)))
        bytes_per_param(self.dtype)  # fail early on a bad dtype
        if self.limit is not None and self.limit < 1:
            raise EntitylensError(f"--limit must be >= 1, got {self.limit}")

    @property
    def run_dir(self) -> Path:
        """The run directory (``out`` with its default filled in)."""
        assert self.out is not None
        return self.out


@dataclass(frozen=True)
class ExperimentResult:
    """What one experiment run produced.

    Attributes:
        out: The run directory.
        data: The dataset file.
        table: The paper table.
        estimate: The GPU-time estimate (``None`` for a merge).
    """

    out: Path
    data: Path | None
    table: pd.DataFrame
    estimate: GpuEstimate | None


def prepare_data(out: str | os.PathLike[str], seed: int) -> Path:
    """Generate the paper-profile test set for ``seed`` into ``OUT/data.jsonl`` (or reuse an identical one).

    Args:
        out: The run directory.
        seed: Dataset seed.

    Returns:
        The dataset path.

    Raises:
        EntitylensError: ``OUT/data.jsonl`` exists with other content (it is left unchanged).
    """
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EntitylensError(f"output directory {out} is not writable ({e.strerror}); choose another --out") from e
    path = out / "data.jsonl"
    states = generate_states(GeneratorConfig(seed=seed, profile="paper"))
    fd, tmp_name = tempfile.mkstemp(prefix=temp_prefix("data"), suffix=".tmp", dir=out)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write_ks_jsonl(tmp, states)
        if path.exists():
            if path.read_bytes() != tmp.read_bytes():
                raise EntitylensError(
                    f"{path} is not the paper-profile set for --seed {seed}; use a new --out, the seed it was "
                    f"made with, or --data {path}"
                )
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def experiment_title(experiment: str, shard: str | None = None) -> str:
    """Heading of the experiment's ``paper_table.md``."""
    what = {"code": "base vs code", "math": "code/base vs math", "alignment": "base vs chat/instruct"}[experiment]
    suffix = f" (shard {shard} only)" if shard else ""
    return f"{EXPERIMENT_SCRIPTS[experiment]}: {what}, boxes task (KST24 protocol){suffix}"


def _say(quiet: bool) -> Callable[[str], None]:
    def say(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr)

    return say


def run_experiment(
    config: ExperimentConfig,
    *,
    estimate_only: bool = False,
    confirm: Confirm | None = ask_to_proceed,
    quiet: bool = False,
) -> ExperimentResult:
    """Run one of the paper's comparisons into a run directory and write the paper table.

    Args:
        config: What to run.
        estimate_only: Stop after writing the estimate (no model is loaded).
        confirm: Called with a question when a model is large; False stops the run. ``None``: never ask.
        quiet: No informational lines on stderr (the large-model estimate is still printed).

    Returns:
        The run's :class:`ExperimentResult`.

    Raises:
        EntitylensError: Bad input (models, pairs, data, an incompatible run in ``out``) or the answer at the
            estimate was no.
    """
    say = _say(quiet)
    out = config.run_dir
    models, pair_list = models_and_pairs(config.experiment, config.models, config.pairs)
    if pair_list is None:
        pair_list = [(models[0].label, m.label) for m in models[1:]]
    check_model_pairs(models, pair_list)
    forced = config.forced or ("step" if config.engine == "vllm" else "jump")
    eval_config = EvalConfig(chat=config.chat, forced=forced, batch_size=config.batch_size,
                             score_mode=config.score, seed=config.seed, engine=config.engine)  # fmt: skip
    vllm_options = VLLMOptions(tensor_parallel_size=config.tensor_parallel_size,
                               gpu_memory_utilization=config.gpu_memory_utilization,
                               max_model_len=config.max_model_len)
    shard_t = parse_shard(config.shard)
    if config.data is None:
        data_path = prepare_data(out, config.seed)
        say(f"data: paper-profile test set, seed {config.seed} -> {data_path}")
    else:
        data_path = config.data
    selected = select_states(read_dataset(data_path), config.shard, config.limit)
    # Refuse a directory holding another run before anything else is written into it (run_eval writes run.json).
    if (out / RUN_FILE).exists():
        record = run_config(data_path, models, eval_config, config.dtype, shard_t, pair_list,
                            [s.state_id for s in selected])  # fmt: skip
        check_or_write_config(out, record)
    estimate = estimate_evaluation(models, selected, config.dtype)
    write_json(out / "estimate.json", estimate.to_json())
    write_json(out / "experiment.json", {
        "experiment": config.experiment, "script": EXPERIMENT_SCRIPTS[config.experiment],
        "data": {"path": str(data_path), "generated_seed": config.seed if config.data is None else None},
        "models": [{"spec": m.spec, "label": m.label} for m in models], "pairs": [list(p) for p in pair_list],
        "device": config.device, "dtype": config.dtype, "shard": config.shard, "limit": config.limit,
    })  # fmt: skip
    # A large run's estimate is printed even when quiet: it is what the run is about to cost.
    tell = _say(False) if estimate.large else say
    estimate.confirm(None if estimate_only else confirm, tell)
    if estimate_only:
        return ExperimentResult(out, data_path, frame([], PAPER_TABLE_COLUMNS), estimate)
    run_eval(models, data_path, out, eval_config, pairs=pair_list, device=config.device, dtype=config.dtype,
             shard=config.shard, limit=config.limit, device_map=config.device_map,
             vllm_options=vllm_options)  # fmt: skip
    table = write_paper_table(out, experiment_title(config.experiment, config.shard))
    return ExperimentResult(out, data_path, table, estimate)


def merge_experiment(
    experiment: str, shard_dirs: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str]
) -> pd.DataFrame:
    """Merge an experiment's shard runs into ``out`` (as ``entitylens merge``) and write its paper table.

    Args:
        experiment: ``code``, ``math`` or ``alignment``.
        shard_dirs: The shards' run directories.
        out: The merged run directory.

    Returns:
        The merged run's paper table.
    """
    if experiment not in EXPERIMENT_SCRIPTS:
        raise EntitylensError(f"unknown experiment {experiment!r}; use one of {', '.join(EXPERIMENT_SCRIPTS)}")
    merge_runs([Path(d) for d in shard_dirs], Path(out))
    return write_paper_table(out, experiment_title(experiment))
