"""The paper's three comparisons (KST24): code, math and alignment, as importable, testable functions.

``experiments/exp1_code.py``, ``exp2_math.py`` and ``exp3_alignment.py`` are thin wrappers of
:func:`main` with ``experiment="code"``, ``"math"`` or ``"alignment"``. One run

1. picks the models: the registry's (base, variant) pairs of the experiment
   (:data:`entitylens.models.EXPERIMENTS`), or ``--models`` (first = base, like ``entitylens eval``) and
   ``--pairs BASE:VARIANT`` (:func:`models_and_pairs`, shared with ``entitylens eval``);
2. picks the data: ``--data FILE``, or the paper-profile test set (716 states, KST24's numops profile)
   generated from ``--seed`` into ``OUT/data.jsonl`` — byte-identical for a seed, reused when present and
   identical, refused when ``OUT/data.jsonl`` holds something else (:func:`prepare_data`);
3. prints a GPU-time and memory estimate to stderr and writes it to ``OUT/estimate.json``
   (:func:`estimate_run`) — and, at a terminal without ``--yes``, asks before loading a model of
   1B parameters or more;
4. evaluates with the paper's protocol through :func:`entitylens.behavior.runs.run_eval` (the run
   directory of ``entitylens eval``: ``run.json``, ``predictions.jsonl``, ``summary.csv``,
   ``comparison.csv``, ``accuracy_by_numops.png/.pdf``; resumable; ``--shard i/n``);
5. writes ``paper_table.csv`` and ``paper_table.md`` (:func:`paper_table`): our accuracy overall and by
   numops beside the paper's, one row per model, and our (variant − base) difference beside the paper's,
   one row per pair. ``--merge SHARD_DIR ...`` merges shard runs (as ``entitylens merge``) and writes the
   table for the merged run.

GPU-time assumption (:func:`estimate_model`): a forward pass costs ``2 x params`` FLOPs per token, every
prompt token and every generated token is one forward token (no prefix sharing), and the GPU sustains
:data:`ASSUMED_UTILIZATION` of an H100's dense bf16 peak :data:`H100_BF16_PEAK_FLOPS`. Tokens are counted
as ``ceil(characters / 4)`` of the plain KST24 prompt plus the gold statement (chat templates add a few
more). Small-batch decoding is memory-bandwidth bound, so read the figure as an optimistic floor. Memory:
the weights need 2 bytes per parameter in bf16/fp16 (4 in fp32); the GPU count is
``ceil(weight bytes / (0.9 x 80 GB))`` — weights only, KV cache and activations come on top.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from entitylens._io import atomic_write, temp_prefix, write_json
from entitylens.errors import EntitylensError
from entitylens.estimate import (
    ASSUMED_UTILIZATION,
    CHARS_PER_TOKEN,
    GPU_MEMORY_BYTES,
    H100_BF16_PEAK_FLOPS,
    LARGE_PARAMS,
    USABLE_MEMORY_FRACTION,
    ask_to_proceed,
    bytes_per_param,
    format_seconds,
    spec_params,
)
from entitylens.table import Table, read_csv

if TYPE_CHECKING:  # pragma: no cover
    from entitylens.behavior.runs import ModelRun
    from entitylens.task.types import State

__all__ = [
    "ASSUMED_UTILIZATION",
    "CHARS_PER_TOKEN",
    "EXPERIMENT_SCRIPTS",
    "GPU_MEMORY_BYTES",
    "H100_BF16_PEAK_FLOPS",
    "LARGE_PARAMS",
    "NUMOPS_COLUMNS",
    "PAPER_TABLE_COLUMNS",
    "USABLE_MEMORY_FRACTION",
    "ExperimentResult",
    "GpuTimeEstimate",
    "ModelEstimate",
    "build_parser",
    "bytes_per_param",
    "count_state_tokens",
    "estimate_model",
    "estimate_run",
    "main",
    "models_and_pairs",
    "paper_table",
    "paper_table_markdown",
    "parse_batch_size",
    "prepare_data",
    "run_experiment",
    "spec_params",
    "write_paper_table",
]

EXPERIMENT_SCRIPTS: dict[str, str] = {"code": "exp1_code", "math": "exp2_math", "alignment": "exp3_alignment"}
"""Experiment name -> script name (``experiments/<name>.py``) and default output ``runs/<name>``."""

NUMOPS_COLUMNS: tuple[str, ...] = tuple(str(k) for k in range(8))
"""The per-numops columns of the paper table (numops 0..7; our last bucket is ``7+``)."""

PAPER_TABLE_COLUMNS: tuple[str, ...] = (
    "kind", "model", "spec", "base", "variant", "n", "ours_overall", "paper_overall",
    *(c for k in NUMOPS_COLUMNS for c in (f"ours_{k}", f"paper_{k}")), "p_value",
)  # fmt: skip
"""Columns of ``paper_table.csv``. Model rows (``kind=model``): accuracy in percent. Pair rows
(``kind=pair``, ``model = "variant - base"``): variant minus base in percentage points, and the exact
McNemar p-value of the overall difference. ``paper_*`` is blank where the paper has no number."""


# --------------------------------------------------------------------------------------------------
# Models and pairs (shared with ``entitylens eval``)
# --------------------------------------------------------------------------------------------------


def models_and_pairs(
    experiment: str | None = None,
    specs: Sequence[str] | None = None,
    pairs: Sequence[str] | None = None,
) -> tuple[list[ModelRun], list[tuple[str, str]] | None]:
    """The models to evaluate and the pairs to compare, from an experiment name or explicit specs.

    Args:
        experiment: ``code``, ``math`` or ``alignment``: every model of the experiment's registry pairs,
            each once, in pair order; the pairs are the experiment's. Ignored when ``specs`` is given.
        specs: Model specs (first = base); labels from :func:`entitylens.behavior.runs.default_label`.
        pairs: ``BASE:VARIANT`` label pairs overriding the default pairs.

    Returns:
        ``(models, pairs)``; ``pairs`` is None when neither an experiment nor ``pairs`` fixes them (then the
        first model is compared with each other one).

    Raises:
        EntitylensError: Neither experiment nor specs, an unknown experiment, a malformed pair, or a pair
            naming a model that is not evaluated.

    """
    from entitylens.behavior.runs import ModelRun, default_label
    from entitylens.models.registry import EXPERIMENTS

    out_pairs: list[tuple[str, str]] | None
    if specs:
        spec_list = list(specs)
        out_pairs = None
    elif experiment is not None:
        if experiment not in EXPERIMENTS:
            raise EntitylensError(f"unknown experiment {experiment!r}; use one of {', '.join(EXPERIMENTS)}")
        out_pairs = [(a, b) for a, b in EXPERIMENTS[experiment]]
        spec_list = []
        for base, variant in out_pairs:
            for s in (base, variant):
                if s not in spec_list:
                    spec_list.append(s)
    else:
        raise EntitylensError("no models given; pass --models SPEC ... or --experiment code|math|alignment")
    models = [ModelRun(spec=s, label=default_label(s)) for s in spec_list]
    if pairs:
        out_pairs = []
        for item in pairs:
            if ":" not in item:
                raise EntitylensError(
                    f"--pairs {item!r} is not BASE:VARIANT (model labels, e.g. llama2-7b:codellama-7b)"
                )
            base, variant = item.split(":", 1)
            out_pairs.append((base, variant))
    return models, out_pairs


def parse_batch_size(value: str, flag: str = "--batch-size") -> int | Literal["auto"]:
    """``"auto"`` or a positive integer, from a command-line string.

    Raises:
        EntitylensError: Neither ``auto`` nor an integer >= 1.

    """
    if value == "auto":
        return "auto"
    try:
        n = int(value)
    except ValueError:
        raise EntitylensError(f"{flag} {value!r} is not an integer; pass e.g. 8 or 'auto'") from None
    if n < 1:
        raise EntitylensError(f"{flag} must be >= 1, got {n}")
    return n


def _check_models(models: Sequence[ModelRun], pairs: Sequence[tuple[str, str]]) -> None:
    labels = [m.label for m in models]
    if len(set(labels)) != len(labels):
        raise EntitylensError(f"model labels must be unique, got {labels}; pass each model once")
    for base, variant in pairs:
        if base not in labels or variant not in labels:
            raise EntitylensError(f"pair {base}:{variant} names a model that is not in --models {labels}")


# --------------------------------------------------------------------------------------------------
# GPU-time and memory estimate
# --------------------------------------------------------------------------------------------------


def count_state_tokens(states: Sequence[State], chars_per_token: int = CHARS_PER_TOKEN) -> tuple[int, int]:
    r"""Rough prompt and generated token counts of a list of states under the KST24 protocol.

    Each state's plain KST24 prompt (instruction, two demonstrations, test description) counts
    ``ceil(len / chars_per_token)`` prompt tokens; its generated text (the forced ``"\nStatement:"`` plus
    the gold statement) counts ``ceil(len / chars_per_token)`` generated tokens.

    Args:
        states: The states to evaluate.
        chars_per_token: Characters per token.

    Returns:
        ``(prompt_tokens, generated_tokens)`` summed over the states.

    """
    from entitylens.task.prompts import KST24

    if chars_per_token < 1:
        raise EntitylensError(f"chars_per_token must be >= 1, got {chars_per_token}")
    prompt = generated = 0
    for s in states:
        prompt += math.ceil(len(KST24.prompt(s.context)) / chars_per_token)
        generated += math.ceil(len(KST24.target_text(s.contents)) / chars_per_token)
    return prompt, generated


@dataclass(frozen=True)
class ModelEstimate:
    """The estimate for one model.

    Attributes:
        label: Model label.
        spec: Model spec.
        params: Parameter count (None when unknown).
        params_source: Where the count came from (``registry``, ``safetensors``, ``gguf``, ``tiny``...).
        prompt_tokens: Prompt tokens over the evaluated states.
        generated_tokens: Generated tokens over the evaluated states.
        flops: ``2 x params x (prompt + generated tokens)`` (None when params is unknown).
        gpu_seconds: ``flops / (utilization x peak)`` (None when params is unknown).
        weight_bytes: ``params x bytes per param`` of the dtype (None when params is unknown).
        gpus: 80 GB GPUs the weights need: ``ceil(weight_bytes / (0.9 x 80 GB))`` (None when unknown).
        large: Whether ``params >= LARGE_PARAMS`` (the estimate matters and the run asks first).

    """

    label: str
    spec: str
    params: int | None
    params_source: str
    prompt_tokens: int
    generated_tokens: int
    flops: float | None
    gpu_seconds: float | None
    weight_bytes: int | None
    gpus: int | None
    large: bool


def estimate_model(
    params: int | None,
    prompt_tokens: int,
    generated_tokens: int,
    dtype: str = "bfloat16",
    *,
    label: str = "",
    spec: str = "",
    params_source: str = "",
    utilization: float = ASSUMED_UTILIZATION,
    peak_flops: float = H100_BF16_PEAK_FLOPS,
    large_params: int = LARGE_PARAMS,
) -> ModelEstimate:
    """GPU time and memory of evaluating one model (see the module docstring for the assumptions).

    Args:
        params: Parameter count, or None when unknown (then only tokens are reported).
        prompt_tokens: Prompt tokens of the evaluated states.
        generated_tokens: Generated tokens of the evaluated states.
        dtype: Weight dtype of the run.
        label: Model label (recorded).
        spec: Model spec (recorded).
        params_source: Where ``params`` came from (recorded).
        utilization: Sustained fraction of ``peak_flops``.
        peak_flops: Peak FLOP/s of one GPU.
        large_params: Threshold of :attr:`ModelEstimate.large`.

    Returns:
        The estimate.

    """
    if not 0 < utilization <= 1:
        raise EntitylensError(f"utilization must be in (0, 1], got {utilization}")
    if prompt_tokens < 0 or generated_tokens < 0:
        raise EntitylensError("token counts must be >= 0")
    per_param = bytes_per_param(dtype)
    if params is None:
        return ModelEstimate(label, spec, None, params_source, prompt_tokens, generated_tokens, None, None, None,
                             None, False)  # fmt: skip
    flops = 2.0 * params * (prompt_tokens + generated_tokens)
    weight_bytes = params * per_param
    gpus = max(1, math.ceil(weight_bytes / (USABLE_MEMORY_FRACTION * GPU_MEMORY_BYTES)))
    return ModelEstimate(
        label, spec, params, params_source, prompt_tokens, generated_tokens, flops, flops / (utilization * peak_flops),
        weight_bytes, gpus, params >= large_params,
    )  # fmt: skip


@dataclass(frozen=True)
class GpuTimeEstimate:
    """The estimate of one experiment run.

    Attributes:
        models: One :class:`ModelEstimate` per model.
        states: Number of states evaluated.
        dtype: Weight dtype.
        utilization: Assumed fraction of ``peak_flops``.
        peak_flops: Peak FLOP/s of the reference GPU.

    """

    models: tuple[ModelEstimate, ...]
    states: int
    dtype: str
    utilization: float = ASSUMED_UTILIZATION
    peak_flops: float = H100_BF16_PEAK_FLOPS

    @property
    def gpu_seconds(self) -> float:
        """Total estimated GPU seconds over the models with a known size."""
        return sum(m.gpu_seconds or 0.0 for m in self.models)

    @property
    def large(self) -> bool:
        """Whether any model has at least :data:`LARGE_PARAMS` parameters."""
        return any(m.large for m in self.models)

    @property
    def assumption(self) -> str:
        """The stated throughput and memory assumptions, one line."""
        return (
            f"assumed: forward = 2 x params FLOPs per prompt or generated token (tokens ~ chars/{CHARS_PER_TOKEN}), "
            f"{self.utilization:.0%} of an H100's {self.peak_flops / 1e12:.0f} TFLOP/s dense bf16 peak "
            f"(decoding is bandwidth-bound: treat as a floor); weights {bytes_per_param(self.dtype)} bytes/param "
            f"({self.dtype}), GPUs of {GPU_MEMORY_BYTES / 1e9:.0f} GB at {USABLE_MEMORY_FRACTION:.0%} for weights"
        )

    def to_json(self) -> dict[str, Any]:
        """JSON-ready record (``OUT/estimate.json``)."""
        return {
            "states": self.states, "dtype": self.dtype, "utilization": self.utilization,
            "peak_flops": self.peak_flops, "chars_per_token": CHARS_PER_TOKEN,
            "gpu_memory_bytes": GPU_MEMORY_BYTES, "usable_memory_fraction": USABLE_MEMORY_FRACTION,
            "large_params": LARGE_PARAMS, "total_gpu_seconds": self.gpu_seconds, "assumption": self.assumption,
            "models": [asdict(m) for m in self.models],
        }  # fmt: skip

    def format(self) -> str:
        """Human-readable lines for stderr."""
        if not self.large:
            known = [m for m in self.models if m.params]
            size = f" (largest {max(m.params for m in known) / 1e6:.0f}M params)" if known else ""  # type: ignore
            return f"estimate: small models only{size}, no GPU-time estimate needed ({self.states} states)"
        lines = [f"GPU-time estimate for {self.states} states ({self.assumption}):"]
        for m in self.models:
            if m.params is None:
                lines.append(f"  {m.label:<34} parameter count unknown ({m.params_source}); no estimate")
            elif m.params == 0:
                lines.append(f"  {m.label:<34} baseline, no weights")
            else:
                lines.append(
                    f"  {m.label:<34} {m.params / 1e9:6.2f}B params  {m.prompt_tokens + m.generated_tokens:>9,} tok  "
                    f"{format_seconds(m.gpu_seconds or 0.0):>9}  weights {(m.weight_bytes or 0) / 1e9:6.1f} GB -> "
                    f"{m.gpus} x {GPU_MEMORY_BYTES / 1e9:.0f} GB GPU{'s' if (m.gpus or 0) > 1 else ''}"
                )
        lines.append(f"  total ~ {format_seconds(self.gpu_seconds)} of GPU time")
        return "\n".join(lines)


def estimate_run(models: Sequence[ModelRun], states: Sequence[State], dtype: str) -> GpuTimeEstimate:
    """Estimate the GPU time and memory of evaluating ``models`` on ``states`` (no model is loaded).

    Args:
        models: The models of the run.
        states: The states that will be evaluated (after sharding and ``--limit``).
        dtype: The run's weight dtype.

    Returns:
        The estimate.

    """
    prompt, generated = count_state_tokens(states)
    rows = []
    for m in models:
        params, source = spec_params(m.spec)
        rows.append(estimate_model(params, prompt, generated, dtype, label=m.label, spec=m.spec,
                                   params_source=source))  # fmt: skip
    return GpuTimeEstimate(tuple(rows), len(states), dtype)


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


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
    from entitylens.task.generate import GeneratorConfig, generate_states
    from entitylens.task.io import write_ks_jsonl

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


# --------------------------------------------------------------------------------------------------
# Paper table
# --------------------------------------------------------------------------------------------------


def _num(v: Any) -> float | None:
    if v is None or v == "":
        return None
    x = float(v)
    return None if math.isnan(x) else x


def _pct(v: Any) -> float | None:
    x = _num(v)
    return None if x is None else 100.0 * x


def _bucket_column(bucket: str) -> str | None:
    b = str(bucket).rstrip("+")
    return b if b in NUMOPS_COLUMNS else None


def paper_table(summary: Table, comparison: Table | None = None) -> Table:
    """Our numbers beside the paper's: one row per model, then one row per (base, variant) pair.

    Args:
        summary: A run's ``summary.csv`` (:func:`entitylens.behavior.runs.summary_table`, or read back with
            :func:`entitylens.table.read_csv`): accuracies as fractions, ``paper_accuracy`` where known.
        comparison: The run's ``comparison.csv`` (:func:`entitylens.behavior.runs.compare`), or None.

    Returns:
        A :data:`PAPER_TABLE_COLUMNS` table. Model rows hold accuracies in percent (bucket ``7+`` goes to
        column ``7``); pair rows hold variant − base in percentage points, ours from the paired comparison
        and the paper's from the two models' paper numbers (blank unless both are known), with the overall
        McNemar p-value.

    """
    models: dict[str, dict[str, Any]] = {}
    for r in summary:
        name = r["model"]
        row = models.setdefault(name, {"kind": "model", "model": name, "spec": r.get("spec") or name})
        bucket = str(r["bucket"])
        if bucket == "overall":
            row["n"] = int(float(r["n"]))
            row["ours_overall"] = _pct(r["accuracy"])
            row["paper_overall"] = _pct(r.get("paper_accuracy"))
        elif (col := _bucket_column(bucket)) is not None:
            row[f"ours_{col}"] = _pct(r["accuracy"])
            row[f"paper_{col}"] = _pct(r.get("paper_accuracy"))
    rows: list[dict[str, Any]] = list(models.values())
    pairs: dict[tuple[str, str], dict[str, Any]] = {}
    for r in comparison or ():
        base, variant = r["base"], r["variant"]
        row = pairs.get((base, variant))
        if row is None:
            row = {
                "kind": "pair",
                "model": f"{variant} - {base}",
                "base": base,
                "variant": variant,
                "spec": f"{models.get(variant, {}).get('spec', variant)} - {models.get(base, {}).get('spec', base)}",
            }
            pairs[(base, variant)] = row
        bucket = str(r["bucket"])
        key = "overall" if bucket == "overall" else _bucket_column(bucket)
        if key is None:
            continue
        row[f"ours_{key}"] = _pct(r["difference"])
        if key == "overall":
            row["n"] = int(float(r["n"]))
            row["p_value"] = _num(r.get("p_value"))
    for (base, variant), row in pairs.items():
        for key in ("overall", *NUMOPS_COLUMNS):
            pb, pv = models.get(base, {}).get(f"paper_{key}"), models.get(variant, {}).get(f"paper_{key}")
            row[f"paper_{key}"] = None if pb is None or pv is None else pv - pb
    rows.extend(pairs.values())
    return Table(PAPER_TABLE_COLUMNS, tuple(rows))


def _cell(ours: Any, paper: Any, signed: bool = False) -> str:
    def f(x: Any) -> str:
        if x is None or x == "":
            return "–"
        return f"{float(x):+.1f}" if signed else f"{float(x):.1f}"

    return f"{f(ours)} / {f(paper)}"


def paper_table_markdown(table: Table, title: str = "") -> str:
    """Render :func:`paper_table` as Markdown: ``ours / paper`` cells, one table for models, one for pairs."""
    head = ["overall", *NUMOPS_COLUMNS[:-1], f"{NUMOPS_COLUMNS[-1]}+"]
    lines = [f"# {title}", ""] if title else []
    models = [r for r in table if r.get("kind") == "model"]
    pairs = [r for r in table if r.get("kind") == "pair"]
    lines += [
        "Accuracy in % as `ours / paper` (– where the paper has no number), overall and by numops "
        "(operations that changed the queried box).", "",
        "| model | n | " + " | ".join(head) + " |", "|---|---:|" + "---:|" * len(head),
    ]  # fmt: skip
    for r in models:
        cells = [_cell(r.get("ours_overall"), r.get("paper_overall"))]
        cells += [_cell(r.get(f"ours_{k}"), r.get(f"paper_{k}")) for k in NUMOPS_COLUMNS]
        lines.append(f"| {r['model']} | {r.get('n', '')} | " + " | ".join(cells) + " |")
    if pairs:
        lines += [
            "", "Variant − base in percentage points as `ours / paper`; p = exact McNemar test of the overall "
            "difference on the same rows.", "",
            "| variant − base | n | p | " + " | ".join(head) + " |", "|---|---:|---:|" + "---:|" * len(head),
        ]  # fmt: skip
        for r in pairs:
            p = _num(r.get("p_value"))
            cells = [_cell(r.get("ours_overall"), r.get("paper_overall"), True)]
            cells += [_cell(r.get(f"ours_{k}"), r.get(f"paper_{k}"), True) for k in NUMOPS_COLUMNS]
            ps = "" if p is None else f"{p:.3g}"
            lines.append(f"| {r['variant']} − {r['base']} | {r.get('n', '')} | {ps} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_paper_table(run_dir: str | os.PathLike[str], title: str = "") -> Table:
    """Build the paper table from a finished run directory's CSV files and write ``paper_table.csv/.md``.

    Reads ``summary.csv`` and (if present) ``comparison.csv``, so it works the same on an unsharded run,
    a shard and a merged run.

    Args:
        run_dir: The run directory.
        title: Heading of ``paper_table.md``.

    Returns:
        The table.

    Raises:
        EntitylensError: The directory has no ``summary.csv``.

    """
    run_dir = Path(run_dir)
    if not (run_dir / "summary.csv").is_file():
        raise EntitylensError(f"{run_dir} has no summary.csv; finish the run (or merge its shards) first")
    comp = run_dir / "comparison.csv"
    table = paper_table(read_csv(run_dir / "summary.csv"), read_csv(comp) if comp.is_file() else None)
    table.to_csv(run_dir / "paper_table.csv", digits=4)
    with atomic_write(run_dir / "paper_table.md") as f:
        f.write(paper_table_markdown(table, title))
    return table


# --------------------------------------------------------------------------------------------------
# One experiment run
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExperimentResult:
    """What one experiment run produced.

    Attributes:
        out: The run directory.
        data: The dataset file.
        table: The paper table.
        estimate: The GPU-time estimate (None for ``--merge``).

    """

    out: Path
    data: Path | None
    table: Table
    estimate: GpuTimeEstimate | None


def _say(quiet: bool) -> Callable[[str], None]:
    def say(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr)

    return say


def run_experiment(
    experiment: str,
    out: str | os.PathLike[str],
    *,
    specs: Sequence[str] | None = None,
    pairs: Sequence[str] | None = None,
    data: str | os.PathLike[str] | None = None,
    seed: int = 0,
    device: str = "cuda",
    dtype: str = "bfloat16",
    batch_size: int | Literal["auto"] = "auto",
    shard: str | None = None,
    limit: int | None = None,
    device_map: str | None = None,
    forced: Literal["jump", "step"] = "jump",
    score: Literal["set", "strict"] = "set",
    chat: Literal["auto", "always", "never"] = "auto",
    estimate_only: bool = False,
    confirm: Callable[[str], bool] | None = ask_to_proceed,
    quiet: bool = False,
) -> ExperimentResult:
    """Run one of the paper's comparisons into a run directory and write the paper table.

    Args:
        experiment: ``code``, ``math`` or ``alignment``.
        out: Run directory.
        specs: Substitute model specs (first = base); default: the experiment's registry models.
        pairs: ``BASE:VARIANT`` label pairs; default: the experiment's pairs (or first vs each other).
        data: Dataset file; default: the paper-profile set for ``seed`` in ``OUT/data.jsonl``.
        seed: Seed of the generated dataset and of the ``random`` baseline.
        device: Device for the models.
        dtype: Weight dtype.
        batch_size: States per batch, or ``"auto"``.
        shard: ``"i/n"``: evaluate one shard (merge with ``entitylens merge`` or ``--merge``).
        limit: Only the first N states (after sharding).
        device_map: Hugging Face ``device_map`` for the models (``"auto"``: spread a 70B model over the
            visible GPUs); overrides ``device``.
        forced: Grammar-forced text appended (``jump``) or decoded token by token (``step``).
        score: ``set`` (order-insensitive) or ``strict``.
        chat: Chat template use (``auto``: registry / name).
        estimate_only: Stop after writing the estimate (no model is loaded).
        confirm: Called with a question when a model is large; False stops the run. None: never ask.
        quiet: No informational lines on stderr (the large-model estimate is still printed).

    Returns:
        The run's :class:`ExperimentResult`.

    Raises:
        EntitylensError: Bad input (see :func:`models_and_pairs`, :func:`prepare_data`, ``run_eval``) or
            the answer at the estimate was no.

    """
    from entitylens.behavior.evaluate import EvalConfig
    from entitylens.behavior.runs import (
        RUN_FILE,
        check_or_write_config,
        parse_shard,
        read_dataset,
        run_config,
        run_eval,
        select_states,
    )

    if experiment not in EXPERIMENT_SCRIPTS:
        raise EntitylensError(f"unknown experiment {experiment!r}; use one of {', '.join(EXPERIMENT_SCRIPTS)}")
    say = _say(quiet)
    out = Path(out)
    bytes_per_param(dtype)  # fail early on a bad dtype
    if limit is not None and limit < 1:
        raise EntitylensError(f"--limit must be >= 1, got {limit}")
    models, pair_list = models_and_pairs(experiment, specs, pairs)
    if pair_list is None:
        pair_list = [(models[0].label, m.label) for m in models[1:]]
    _check_models(models, pair_list)
    config = EvalConfig(chat=chat, forced=forced, batch_size=batch_size, score_mode=score, seed=seed)
    shard_t = parse_shard(shard)
    if data is None:
        data_path = prepare_data(out, seed)
        say(f"data: paper-profile test set, seed {seed} -> {data_path}")
    else:
        data_path = Path(data)
    selected = select_states(read_dataset(data_path), shard, limit)
    # Refuse a directory holding another run before anything else is written into it (run_eval writes run.json).
    if (out / RUN_FILE).exists():
        record = run_config(data_path, models, config, dtype, shard_t, pair_list, [s.state_id for s in selected])
        check_or_write_config(out, record)
    estimate = estimate_run(models, selected, dtype)
    write_json(out / "estimate.json", estimate.to_json())
    if estimate.large:
        print(estimate.format(), file=sys.stderr)
    else:
        say(estimate.format())
    write_json(out / "experiment.json", {
        "experiment": experiment, "script": EXPERIMENT_SCRIPTS[experiment],
        "data": {"path": str(data_path), "generated_seed": seed if data is None else None},
        "models": [{"spec": m.spec, "label": m.label} for m in models], "pairs": [list(p) for p in pair_list],
        "device": device, "dtype": dtype, "shard": shard, "limit": limit,
    })  # fmt: skip
    if estimate_only:
        return ExperimentResult(out, data_path, Table(PAPER_TABLE_COLUMNS, ()), estimate)
    if (
        estimate.large
        and confirm is not None
        and not confirm(f"estimated {format_seconds(estimate.gpu_seconds)} of GPU time; proceed?")
    ):
        raise EntitylensError("stopped at the GPU-time estimate; rerun with --yes to proceed")
    run_eval(models, data_path, out, config, pairs=pair_list, device=device, dtype=dtype, shard=shard, limit=limit,
             device_map=device_map)
    table = write_paper_table(out, _title(experiment, shard))
    return ExperimentResult(out, data_path, table, estimate)


def _title(experiment: str, shard: str | None = None) -> str:
    what = {"code": "base vs code", "math": "code/base vs math", "alignment": "base vs chat/instruct"}[experiment]
    suffix = f" (shard {shard} only)" if shard else ""
    return f"{EXPERIMENT_SCRIPTS[experiment]}: {what}, boxes task (KST24 protocol){suffix}"


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def build_parser(experiment: str) -> argparse.ArgumentParser:
    """The command-line options of ``experiments/<script>.py`` for ``experiment``."""
    from entitylens.models.registry import EXPERIMENTS

    script = EXPERIMENT_SCRIPTS[experiment]
    pairs = ", ".join(f"{a}:{b}" for a, b in EXPERIMENTS[experiment])
    p = argparse.ArgumentParser(
        prog=f"{script}.py",
        description=f"KST24's {experiment} comparison ({pairs}) with the paper's protocol: writes a run directory "
        "(as `entitylens eval`) plus paper_table.csv/.md with our numbers beside the paper's.",
    )
    p.add_argument(
        "--models",
        nargs="+",
        metavar="SPEC",
        help="substitute model specs (registry key, hub id, local dir, .gguf, tiny:NAME, random...); "
        "the first is the base the others are compared with (default: the experiment's registry pairs)",
    )
    p.add_argument("--pairs", nargs="+", metavar="BASE:VARIANT", help="explicit comparison pairs (model labels)")
    p.add_argument("--data", type=Path, help="dataset (K&S T5 JSONL); default: the paper-profile set for --seed, "
                   "generated into OUT/data.jsonl")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the generated dataset and the random baseline (0)")
    p.add_argument("--out", type=Path, default=Path("runs") / script, help=f"run directory (default runs/{script})")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N, cpu or mps (default cuda)")
    p.add_argument("--device-map", default=None,
                   help="Hugging Face device_map, e.g. auto to spread 70B models over the GPUs (overrides --device)")
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 | float16 | float32 (default bfloat16)")
    p.add_argument("--batch-size", default="auto", help="states per batch, or 'auto' (default; GPU free memory)")
    p.add_argument("--shard", metavar="I/N", help="evaluate shard I of N (0-based); combine with --merge")
    p.add_argument("--limit", type=int, help="only the first N states (smoke tests)")
    p.add_argument(
        "--forced",
        choices=("jump", "step"),
        default="jump",
        help="grammar-forced text: appended (jump, fast) or decoded token by token (step, as outlines)",
    )
    p.add_argument("--score", choices=("set", "strict"), default="set", help="order-insensitive or exact strings")
    p.add_argument("--chat", choices=("auto", "always", "never"), default="auto", help="use the chat template")
    p.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        metavar="SHARD_DIR",
        help="merge these shard run directories into --out and write its paper table (loads no model)",
    )
    p.add_argument("--estimate-only", action="store_true", help="print and write the estimate, then stop")
    p.add_argument("--yes", action="store_true", help="do not ask before a large run (the estimate is still printed)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or informational lines")
    return p


def main(argv: Sequence[str] | None = None, experiment: str = "code") -> int:
    """Entry point of ``experiments/exp{1,2,3}_*.py``: parse, run, print the table; errors as one line.

    Args:
        argv: Command-line arguments (default ``sys.argv[1:]``).
        experiment: ``code``, ``math`` or ``alignment``.

    Returns:
        The exit status: 0, 2 on bad input (``error: ...`` on stderr), 130 when interrupted.

    """
    from entitylens.cli import guarded
    from entitylens.progress import set_quiet

    args = build_parser(experiment).parse_args(argv)
    set_quiet(bool(args.quiet))

    def body() -> int:
        if args.merge:
            from entitylens.behavior.runs import merge_runs

            merge_runs(args.merge, args.out)
            table = write_paper_table(args.out, _title(experiment))
            print(f"merged {len(args.merge)} shards into {args.out}", file=sys.stderr)
        else:
            result = run_experiment(
                experiment, args.out, specs=args.models, pairs=args.pairs, data=args.data, seed=args.seed,
                device=args.device, dtype=args.dtype, batch_size=parse_batch_size(args.batch_size),
                shard=args.shard, limit=args.limit, device_map=args.device_map,
                forced=args.forced, score=args.score, chat=args.chat,
                estimate_only=args.estimate_only, confirm=None if args.yes else ask_to_proceed, quiet=args.quiet,
            )  # fmt: skip
            table = result.table
            if args.estimate_only:
                print(f"wrote {args.out / 'estimate.json'}")
                return 0
        print(paper_table_markdown(table, _title(experiment, None if args.merge else args.shard)))
        print(f"wrote {args.out}/paper_table.csv, paper_table.md, summary.csv, comparison.csv, predictions.jsonl")
        return 0

    return guarded(body)
