"""Base-vs-variant studies: the probing and patching pipelines run on a (base, variant) model pair.

``experiments/probe_base_vs_code.py`` and ``experiments/patch_base_vs_code.py`` are thin command lines
over :func:`run_probe_study` and :func:`run_patch_study`. Both

- take the same states (a K&S JSONL file, or states generated from a seed) for both models,
- render them in one prompt *protocol*: ``ks`` (``"<context> Box 3 contains"``, the form of
  ``entitylens cache`` / ``entitylens patch pairs``) or ``compact`` (the testbed's ``"B0 car ; ... | B3"``,
  which the shipped testbed pair was trained on); ``auto`` picks ``compact`` when both models are
  ``testbed:`` models,
- print a GPU-time estimate before any computation when a model is large (:func:`estimate_gpu_seconds`),
  and ask before going on when run at a terminal without ``--yes``,
- resume: finished caches, probe runs and patching runs are reused when their inputs are unchanged,
- write one run directory per model and a side-by-side comparison on one scale.

Layout of a probe study (``OUT``)::

    cache/{base,variant}[-random]/   activation caches (entitylens.activations; resumable shards)
    probe/{base,variant}/            probe.csv, probe_by_layer.png, meta.json, study.json
    compare/probe_compare.png        both models' probes by layer on one figure
    compare/probe_diff.csv           per (layer, role, metric): base, variant, variant - base
    summary.csv                      best layer and exact-set accuracy per model and role
    study.json                       what ran (specs, protocol, data, estimate)

Layout of a patch study (``OUT``)::

    pairs.jsonl                      clean/corrupted text pairs (in the study's protocol)
    patch/{base,variant}/            patch.csv, patch_<c>.png, result_<c>.safetensors, run.json
                                     (+ attribution_<c>.*, agreement.json with attribution)
    compare/compare_<c>.png          both heatmaps side by side on one colour scale (+ compare.csv)
    compare-attribution/             the same for the attribution estimates
    study.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from entitylens._io import sha256_file, write_json
from entitylens.errors import EntitylensError
from entitylens.estimate import (
    ASSUMED_UTILIZATION,
    H100_BF16_PEAK_FLOPS,
    LARGE_PARAMS,
    ask_to_proceed,
    estimate_gpu_seconds,
    format_seconds,
    spec_params,
)
from entitylens.table import Table

__all__ = [
    "ARMS",
    "PROTOCOLS",
    "GpuEstimate",
    "PatchStudyConfig",
    "PatchStudyResult",
    "ProbeStudyConfig",
    "ProbeStudyResult",
    "StudyConfig",
    "default_model_pair",
    "patch_tokens",
    "probe_diff_table",
    "resolve_protocol",
    "run_patch_study",
    "run_probe_study",
    "study_prompts",
    "study_states",
]

ARMS: tuple[str, str] = ("base", "variant")
"""Names of the two arms of a study (directories ``base/`` and ``variant/``)."""

PROTOCOLS: tuple[str, ...] = ("auto", "ks", "compact")
"""Prompt protocols a study accepts."""

SUMMARY_COLUMNS = ("arm", "model", "role", "best_layer", "exact_match", "ci_low", "ci_high", "selectivity")
DIFF_COLUMNS = ("layer", "role", "metric", "base", "variant", "variant_minus_base")

Confirm = Callable[[str], bool]


# --------------------------------------------------------------------------------------------------
# GPU-time estimate
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuEstimate:
    """The estimate of one study: per arm, parameters, tokens (forward-equivalents included) and seconds.

    Attributes:
        arms: Arm -> ``{"model", "params", "tokens", "seconds", "params_source"}``.
        note: What the token count includes.
    """

    arms: Mapping[str, Mapping[str, Any]]
    note: str

    @property
    def seconds(self) -> float:
        """Total estimated GPU seconds."""
        return float(sum(a["seconds"] for a in self.arms.values()))

    def lines(self) -> list[str]:
        """Human-readable lines, starting with the assumption."""
        tput = ASSUMED_UTILIZATION * H100_BF16_PEAK_FLOPS / 1e12
        out = [
            f"GPU-time estimate (forward ~ 2 x params x tokens FLOPs, backward ~ 2 x forward; assumed throughput "
            f"{ASSUMED_UTILIZATION:.0%} of an H100's {H100_BF16_PEAK_FLOPS / 1e12:.0f} TFLOP/s bf16 dense peak "
            f"= {tput:.0f} TFLOP/s):"
        ]
        for arm, a in self.arms.items():
            out.append(
                f"  {arm} {a['model']}: {_fmt_params(a['params'])} params ({a['params_source']}), "
                f"{a['tokens']:.3g} token-passes -> {format_seconds(a['seconds'])}"
            )
        out.append(f"  total {format_seconds(self.seconds)}; {self.note}")
        return out

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (recorded in ``study.json``)."""
        return {"arms": {k: dict(v) for k, v in self.arms.items()}, "seconds": self.seconds, "note": self.note,
                "utilization": ASSUMED_UTILIZATION, "peak_flops": H100_BF16_PEAK_FLOPS}


def _fmt_params(n: float) -> str:
    return f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.3g}M"


def _count_params(model: Any) -> int:
    seen: set[int] = set()
    n = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def _token_count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=True)["input_ids"])


def _estimate_and_confirm(
    specs: Mapping[str, str], loaded_params: int, tokens: Mapping[str, float], note: str, *,
    estimate_above: float, confirm: Confirm | None, say: Callable[[str], None],
) -> GpuEstimate | None:
    """Build the estimate (base size measured; the variant's from the registry, else the base's)."""
    arms: dict[str, dict[str, Any]] = {}
    for arm, spec in specs.items():
        if arm == "base":
            params, source = loaded_params, "counted"
        else:
            known, how = spec_params(spec)
            params, source = (known, how) if known else (loaded_params, "assumed = base")
        arms[arm] = {"model": spec, "params": int(params), "params_source": source, "tokens": float(tokens[arm]),
                     "seconds": estimate_gpu_seconds(params, tokens[arm])}
    if max(a["params"] for a in arms.values()) < estimate_above:
        return None
    est = GpuEstimate(arms, note)
    for line in est.lines():
        say(line)
    if confirm is not None and not confirm(f"estimated {format_seconds(est.seconds)} of GPU time; proceed?"):
        raise EntitylensError("stopped at the GPU-time estimate; rerun with --yes to proceed")
    return est


# --------------------------------------------------------------------------------------------------
# Data: states, prompts, pairs
# --------------------------------------------------------------------------------------------------


def default_model_pair() -> tuple[str, str]:
    """The registry's first code pair (base, code variant), e.g. ``("llama2-7b", "codellama-7b")``."""
    from entitylens.models.registry import experiment_pairs

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


def study_states(data: str | os.PathLike[str] | None, seed: int, num_states: int | None, protocol: str) -> list[Any]:
    """The states of a study: read from a K&S JSONL file, or generated from ``seed``.

    Generated states come from the testbed's targeted evaluation set for the ``compact`` protocol (0-8
    operations on the queried box) and from the K&S generator (12-operation scenarios, every prefix)
    for ``ks``.

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
    from entitylens.task.types import State

    if num_states is not None and num_states < 1:
        raise EntitylensError(f"--states {num_states} must be at least 1; pass a positive number of states")
    if data is not None:
        from entitylens.task.io import read_ks_jsonl

        path = Path(data)
        if not path.is_file():
            raise EntitylensError(f"dataset {path} does not exist; pass an existing K&S JSONL file with --data")
        states: list[State] = read_ks_jsonl(path)
        return states[:num_states] if num_states is not None else states
    n = 240 if num_states is None else int(num_states)
    if protocol == "compact":
        from entitylens.testbed import eval_states

        return eval_states(seed=seed, num_states=n)
    from entitylens.task.generate import GeneratorConfig, generate_states

    return generate_states(GeneratorConfig(seed=seed, num_states=n))


def study_prompts(states: Sequence[Any], protocol: str, limit: int | None = None, prefix: str = "") -> list[Any]:
    """Caching prompts (one per state x box) in the study's protocol, the first ``limit`` of them.

    ``prefix`` goes before every ``ks`` prompt (the compact protocol has none).
    """
    if limit is not None and limit < 1:
        raise EntitylensError(f"--limit {limit} must be at least 1; pass a positive number of rows")
    if protocol == "compact":
        from entitylens.testbed import cache_prompts

        prompts = cache_prompts(states)
    else:
        from entitylens.activations import build_prompts

        prompts = build_prompts(states, prefix=prefix)
    return prompts[:limit] if limit is not None else prompts


# --------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise EntitylensError(f"--out {out} is a file; give a directory such as runs/study")


def _check_specs(base: str, variant: str) -> None:
    from entitylens.models.loading import resolve_spec

    for flag, spec in (("--base", base), ("--variant", variant)):
        try:
            resolve_spec(spec)
        except EntitylensError as e:
            raise EntitylensError(f"{flag}: {e}") from None


def _check_prefix(prefix: str, protocol: str) -> None:
    if not isinstance(prefix, str):
        raise EntitylensError("prefix must be a string; pass the few-shot text itself")
    if prefix and protocol == "compact":
        raise EntitylensError("a few-shot prefix applies to ks prompts only; drop --kst24-prefix/--prefix-file or "
                              "pass --protocol ks")


def _label(arm: str, spec: str) -> str:
    return f"{arm} ({spec})"


# --------------------------------------------------------------------------------------------------
# Probe study
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyConfig:
    """What both studies share: the model pair, the data, the prompt form, where and how models run.

    Attributes:
        base: Model spec of the base model.
        variant: Model spec of the variant (e.g. the code model).
        out: Output directory.
        data: K&S JSONL file (``None``: generate ``states`` states from ``seed``).
        seed: Seed of generated states (and of the patch study's pair choices).
        states: States to generate, or to keep from ``data`` (``None``: the study's default).
        protocol: ``auto``, ``ks`` or ``compact`` (see :func:`resolve_protocol`).
        prefix: Text put before every ``ks`` prompt (e.g. KST24's instruction and demonstrations).
        device: Device the models run on.
        dtype: Dtype the models run in.
        estimate_above: Print the GPU-time estimate when a model has at least this many parameters.
        overwrite: Replace another model's / dataset's / pairs file's results in ``out``.
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


@dataclass(frozen=True)
class ProbeStudyConfig(StudyConfig):
    """What :func:`run_probe_study` runs (the :class:`StudyConfig` fields, then these).

    ``states=None`` means 240 generated states, or all of ``data``.

    Attributes:
        hooks: Cached hooks (the probes read ``hooks[0]``).
        roles: Token roles cached and probed (``None``: ``query_box,last`` for ``ks`` prompts; for ``compact``
            prompts, whose last token is the query box, ``query_box,query_box_desc``).
        target: Probe target (``box_contents`` or ``object_in_box``).
        limit: Cache only the first ``limit`` rows.
        batch_size: Prompts per forward while caching.
        cache_dtype: Storage dtype of the caches.
        random_control: Also cache a randomly re-initialised copy of each model and report ``over_random``.
        probe_seed: Seed of the probes' split, folds and control labels.
        folds: Cross-validation folds of the probes.
        bootstrap: State resamples for the probes' intervals (0: none).
    """

    hooks: tuple[str, ...] = ("resid_post",)
    roles: tuple[str, ...] | None = None
    target: str = "box_contents"
    limit: int | None = None
    batch_size: int = 8
    cache_dtype: str = "float32"
    random_control: bool = False
    probe_seed: int = 0
    folds: int = 5
    bootstrap: int = 200

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        if self.data is not None:
            object.__setattr__(self, "data", Path(self.data))
        for name in ("hooks", "roles"):
            v = getattr(self, name)
            if v is None and name == "roles":
                continue
            v = tuple(x.strip() for x in v.split(",")) if isinstance(v, str) else tuple(v)
            if not v or not all(v):
                raise EntitylensError(f"--{name} is empty; pass e.g. --{name} " + ("resid_post" if name == "hooks"
                                                                                    else "query_box,last"))
            object.__setattr__(self, name, v)
        _check_prefix(self.prefix, resolve_protocol(self.protocol, self.base, self.variant))
        if self.batch_size < 1:
            raise EntitylensError(f"--batch-size {self.batch_size} must be at least 1")
        if self.limit is not None and self.limit < 1:
            raise EntitylensError(f"--limit {self.limit} must be at least 1; pass a positive number of rows")
        if self.states is not None and self.states < 1:
            raise EntitylensError(f"--states {self.states} must be at least 1; pass a positive number of states")

    def study_roles(self) -> tuple[str, ...]:
        """The roles cached and probed (``roles``, or the protocol's default)."""
        if self.roles is not None:
            return self.roles
        if resolve_protocol(self.protocol, self.base, self.variant) == "compact":
            return ("query_box", "query_box_desc")
        return ("query_box", "last")

    def probe_run_config(self) -> Any:
        """The :class:`~entitylens.probing.run.ProbeRunConfig` both models are probed with."""
        from entitylens.probing.linear import ProbeConfig
        from entitylens.probing.run import ProbeRunConfig

        return ProbeRunConfig(target=self.target, roles=self.study_roles(), hook=self.hooks[0],
                              bootstrap=self.bootstrap, probe=ProbeConfig(seed=self.probe_seed, folds=self.folds))


@dataclass(frozen=True)
class ProbeStudyResult:
    """Paths and numbers a probe study produced.

    Attributes:
        out: The study directory.
        probe_dirs: Arm -> probe output directory.
        cache_dirs: Arm -> activation cache directory (``base-random`` / ``variant-random`` with the control).
        compare_png: The comparison figure.
        diff_csv: Per-layer differences (variant - base).
        summary: The ``summary.csv`` table.
        reused: Arms whose probe outputs were reused from an earlier run.
        estimate: The GPU-time estimate, when it was printed.
    """

    out: Path
    probe_dirs: dict[str, Path]
    cache_dirs: dict[str, Path]
    compare_png: Path
    diff_csv: Path
    summary: Table
    reused: tuple[str, ...]
    estimate: GpuEstimate | None = None


def probe_diff_table(base_dir: str | os.PathLike[str], variant_dir: str | os.PathLike[str]) -> Table:
    """Per (layer, role, metric) present in both probe runs: base value, variant value, variant - base."""
    from entitylens.probing.run import read_probe_table

    tb, tv = read_probe_table(base_dir), read_probe_table(variant_dir)
    vals = {(r["layer"], r["role"], r["metric"]): r["value"] for r in tv.rows}
    rows = []
    for r in tb.rows:
        key = (r["layer"], r["role"], r["metric"])
        if key in vals:
            rows.append({"layer": key[0], "role": key[1], "metric": key[2], "base": r["value"],
                         "variant": vals[key], "variant_minus_base": vals[key] - r["value"]})
    if not rows:
        raise EntitylensError(f"{base_dir} and {variant_dir} share no (layer, role, metric); probe the same roles")
    return Table(DIFF_COLUMNS, tuple(rows))


def _summary_rows(arm: str, spec: str, table: Table) -> list[dict[str, Any]]:
    rows = []
    roles = list(dict.fromkeys(r["role"] for r in table.rows))
    for role in roles:
        em = [r for r in table.rows if r["role"] == role and r["metric"] == "exact_match"]
        best = max(em, key=lambda r: (r["value"], -r["layer"]))
        sel = next((r["value"] for r in table.rows if r["role"] == role and r["metric"] == "selectivity"
                    and r["layer"] == best["layer"]), None)
        rows.append({"arm": arm, "model": spec, "role": role, "best_layer": best["layer"],
                     "exact_match": best["value"], "ci_low": best["ci_low"], "ci_high": best["ci_high"],
                     "selectivity": sel})
    return rows


def run_probe_study(
    config: ProbeStudyConfig, *, confirm: Confirm | None = None, say: Callable[[str], None] = print
) -> ProbeStudyResult:
    """Cache both models on the same prompts, probe every layer of each, and compare them.

    Steps (each reused when an earlier run already finished it with the same inputs): cache the base
    (``cache/base``; and a randomly re-initialised copy, ``cache/base-random``, with ``random_control``),
    probe it (``probe/base``), the same for the variant, then draw both on one figure
    (``compare/probe_compare.png``), write the per-layer differences (``compare/probe_diff.csv``) and the
    best layer per model and role (``summary.csv``).

    Args:
        config: The study configuration.
        confirm: Called with a question after the GPU-time estimate (large models only); returning
            False stops the study. ``None``: never ask.
        say: Where progress lines go (default ``print``).

    Returns:
        The :class:`ProbeStudyResult`.

    Raises:
        EntitylensError: Bad specs or data, an incompatible earlier run in ``out`` (without ``overwrite``),
            or a stop at the estimate.
    """
    from entitylens.activations import CacheConfig, cache_activations
    from entitylens.models import load_model
    from entitylens.probing.run import compare_probe_runs, read_probe_table, reinitialize_weights, run_probes
    from entitylens.probing.run import write_probe_outputs as write_probe

    cfg = config
    _check_out(cfg.out)
    _check_specs(cfg.base, cfg.variant)
    protocol = resolve_protocol(cfg.protocol, cfg.base, cfg.variant)
    states = study_states(cfg.data, cfg.seed, cfg.states, protocol)
    prompts = study_prompts(states, protocol, cfg.limit, cfg.prefix)
    source: dict[str, Any] = {"protocol": protocol, "n_states": len(states), "n_rows": len(prompts)}
    if cfg.data is not None:
        source.update(path=str(cfg.data), sha256=sha256_file(cfg.data))
    else:
        source.update(seed=cfg.seed, generator="testbed.eval_states" if protocol == "compact" else "task.generate")
    roles = cfg.study_roles()
    cache_cfg = CacheConfig(hooks=cfg.hooks, roles=roles, batch_size=cfg.batch_size, dtype=cfg.cache_dtype)
    probe_cfg = cfg.probe_run_config()
    specs = {"base": cfg.base, "variant": cfg.variant}
    say(f"probe study: base {cfg.base} vs variant {cfg.variant}; {len(prompts)} rows from {len(states)} states "
        f"({protocol} prompts); roles {', '.join(roles)}; output {cfg.out}")
    cfg.out.mkdir(parents=True, exist_ok=True)
    estimate: GpuEstimate | None = None
    probe_dirs: dict[str, Path] = {}
    cache_dirs: dict[str, Path] = {}
    reused: list[str] = []
    for arm, spec in specs.items():
        t0 = time.perf_counter()
        say(f"[{arm}] loading {spec}")
        model = load_model(spec, device=cfg.device, dtype=cfg.dtype)
        if arm == "base":
            tok = model.tokenizer
            n_tok = float(sum(_token_count(tok, p.text) for p in prompts))
            passes = 2 if cfg.random_control else 1
            estimate = _estimate_and_confirm(
                specs, _count_params(model), {a: n_tok * passes for a in specs},
                "one forward per prompt" + (" (twice: trained and random-init weights)" if passes == 2 else ""),
                estimate_above=cfg.estimate_above, confirm=confirm, say=say,
            )  # fmt: skip
        cache_dir = cfg.out / "cache" / arm
        say(f"[{arm}] caching {len(prompts)} rows to {cache_dir}")
        index = cache_activations(model, prompts, cache_cfg, cache_dir, model_spec=spec, dataset_source=source,
                                  overwrite=cfg.overwrite)
        say(f"[{arm}] cache: {index.computed} shards computed, {index.reused} reused")
        cache_dirs[arm] = cache_dir
        random_dir = None
        random_fp = None
        if cfg.random_control:
            random_dir = cfg.out / "cache" / f"{arm}-random"
            reinitialize_weights(model, seed=cfg.probe_seed)
            rindex = cache_activations(model, prompts, cache_cfg, random_dir, dataset_source=source,
                                       model_spec=f"{spec}#random-init-{cfg.probe_seed}", overwrite=cfg.overwrite)
            say(f"[{arm}] random-init cache: {rindex.computed} shards computed, {rindex.reused} reused")
            cache_dirs[f"{arm}-random"] = random_dir
            random_fp = rindex.fingerprint
        del model
        probe_dir = cfg.out / "probe" / arm
        marker = {"probe_config": _jsonable(probe_cfg.to_json()), "cache": index.fingerprint,
                  "random_cache": random_fp, "model": spec}
        old = _read_json(probe_dir / "study.json")
        if old == marker and (probe_dir / "probe.csv").is_file():
            say(f"[{arm}] probes: reusing {probe_dir} (same cache and configuration)")
            reused.append(arm)
        else:
            if old is not None and old.get("model") != spec and not cfg.overwrite:
                raise EntitylensError(f"{probe_dir} holds probes of {old.get('model')!r}, not {spec!r}; use another "
                                      "--out or pass --overwrite")
            say(f"[{arm}] probing {len(index.shards)} shard(s) x {len(roles)} role(s)")
            run = run_probes(cache_dir, probe_cfg, random_cache=random_dir)
            write_probe(probe_dir, run, title=f"{_label(arm, spec)}: {run.target.name} probes by layer")
            write_json(probe_dir / "study.json", marker)
        probe_dirs[arm] = probe_dir
        say(f"[{arm}] done in {time.perf_counter() - t0:.1f} s")
    compare_dir = cfg.out / "compare"
    pngs = compare_probe_runs(probe_dirs["base"], probe_dirs["variant"], compare_dir,
                              labels=(_label("base", cfg.base), _label("variant", cfg.variant)))
    diff = probe_diff_table(probe_dirs["base"], probe_dirs["variant"])
    diff_csv = compare_dir / "probe_diff.csv"
    diff.to_csv(diff_csv)
    rows = []
    for arm, spec in specs.items():
        rows += _summary_rows(arm, spec, read_probe_table(probe_dirs[arm]))
    summary = Table(SUMMARY_COLUMNS, tuple(rows))
    summary.to_csv(cfg.out / "summary.csv")
    write_json(cfg.out / "study.json", _jsonable({
        "study": "probe_base_vs_variant", "config": {**asdict(cfg), "out": str(cfg.out)}, "protocol": protocol,
        "data": source, "estimate": estimate.to_json() if estimate else None,
        "outputs": {"probe": {k: str(v) for k, v in probe_dirs.items()},
                    "compare": [str(p) for p in pngs], "diff": str(diff_csv), "summary": str(cfg.out / "summary.csv")},
    }))  # fmt: skip
    say("best exact-set accuracy per model and role (95% Wilson interval):")
    for r in rows:
        sel = "" if r["selectivity"] is None else f", selectivity {r['selectivity']:+.3f}"
        ci = "" if r["ci_low"] is None else f" [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
        say(f"  {r['arm']:<7} {r['model']:<24} {r['role']:<12} layer {r['best_layer']:>3}: {r['exact_match']:.3f}"
            f"{ci}{sel}")
    say(f"wrote {pngs[0]}, {diff_csv}, {cfg.out / 'summary.csv'}")
    return ProbeStudyResult(out=cfg.out, probe_dirs=probe_dirs, cache_dirs=cache_dirs, compare_png=pngs[0],
                            diff_csv=diff_csv, summary=summary, reused=tuple(reused), estimate=estimate)


# --------------------------------------------------------------------------------------------------
# Patch study
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PatchStudyConfig(StudyConfig):
    """What :func:`run_patch_study` runs (the :class:`StudyConfig` fields, then these).

    ``states=None`` means ``4 * pairs`` states to draw pairs from; ``prefix`` goes before both prompts of
    every ``ks`` pair.

    Attributes:
        kind: Corruption kind (``op_object``, ``op_box``, ``init_object``, ``drop_op``).
        pairs: Most pairs.
        component: Patched activation (``resid_pre``, ``resid_mid``, ``resid_post``, ``attn_out``, ``mlp_out``,
            ``head_z``).
        grid: ``layer_role`` / ``layer_head`` (``None``: the component's default).
        roles: Grid columns (``None``: the default roles every pair has).
        layers: Grid rows (``None``: all).
        method: ``fast`` or ``hooks``.
        batch_cells: Most cells per forward.
        attribution: Also run attribution patching and report its agreement with exact patching.
        k: Top-k size of the agreement.
    """

    kind: str = "op_object"
    pairs: int = 24
    component: str = "resid_pre"
    grid: str | None = None
    roles: tuple[str, ...] | None = None
    layers: tuple[int, ...] | None = None
    method: str = "fast"
    batch_cells: int = 32
    attribution: bool = False
    k: int = 10

    def __post_init__(self) -> None:
        from entitylens.patching.exact import COMPONENTS

        object.__setattr__(self, "out", Path(self.out))
        if self.data is not None:
            object.__setattr__(self, "data", Path(self.data))
        _check_prefix(self.prefix, resolve_protocol(self.protocol, self.base, self.variant))
        if self.kind not in ("op_object", "op_box", "init_object", "drop_op"):
            raise EntitylensError(f"unknown --kind {self.kind!r}; use op_object, op_box, init_object or drop_op")
        if self.component not in COMPONENTS:
            raise EntitylensError(f"unknown --component {self.component!r}; use one of {', '.join(COMPONENTS)}")
        if self.method not in ("fast", "hooks"):
            raise EntitylensError(f"unknown --method {self.method!r}; use fast or hooks")
        if self.pairs < 1 or self.batch_cells < 1 or self.k < 1:
            raise EntitylensError(f"--pairs {self.pairs}, --batch-cells {self.batch_cells} and --k {self.k} must be "
                                  "at least 1")
        if self.states is not None and self.states < 1:
            raise EntitylensError(f"--states {self.states} must be at least 1; pass a positive number of states")
        if self.roles is not None:
            object.__setattr__(self, "roles", tuple(self.roles))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))


@dataclass(frozen=True)
class PatchStudyResult:
    """Paths and results a patch study produced.

    Attributes:
        out: The study directory.
        pairs_file: The text pairs both models were patched on.
        run_dirs: Arm -> patching run directory.
        results: Arm -> exact patching result.
        attributions: Arm -> attribution result (empty without ``attribution``).
        compare_dir: Directory of the side-by-side heatmap (``compare_<component>.png``, ``compare.csv``).
        reused: Arms whose results were reused from an earlier run.
        estimate: The GPU-time estimate, when it was printed.
    """

    out: Path
    pairs_file: Path
    run_dirs: dict[str, Path]
    results: dict[str, Any]
    attributions: dict[str, Any]
    compare_dir: Path
    reused: tuple[str, ...]
    estimate: GpuEstimate | None = None


def patch_tokens(pairs: Sequence[Any], n_layers: int, n_cells: int, attribution: bool) -> float:
    """Token-passes of patching ``pairs`` (tokenised :class:`~entitylens.patching.exact.PatchPair` s).

    Exact patching: the clean and corrupted baselines, then at most one corrupted forward per cell (an
    upper bound: the hooks engine's cost; the fast engine skips no-op cells and recomputes only the tail).
    Attribution adds a clean forward, a corrupted forward and a backward (2x a forward).
    """
    total = 0.0
    for p in pairs:
        clean, corr = len(p.clean_tokens), len(p.corrupted_tokens)
        total += clean + corr + n_layers * n_cells * corr
        if attribution:
            total += clean + 3 * corr
    return total


def _write_pairs_if_changed(path: Path, pairs: Sequence[Any]) -> bool:
    """Write the pairs unless ``path`` already holds exactly them (keeps resumed runs' inputs untouched)."""
    from entitylens.patching.pairs import read_pairs, write_pairs

    if path.is_file():
        try:
            if [p.to_json() for p in read_pairs(path)] == [p.to_json() for p in pairs]:
                return False
        except EntitylensError:
            pass
    write_pairs(path, pairs)
    return True


def _agreement_line(run_dir: Path, component: str) -> str:
    from entitylens.patching.attribution import agreement_line

    data = _read_json(run_dir / "agreement.json") or {}
    return agreement_line((data.get(component) or {}).get("pair_mean") or {})


def run_patch_study(
    config: PatchStudyConfig, *, confirm: Confirm | None = None, say: Callable[[str], None] = print
) -> PatchStudyResult:
    """Build clean/corrupted pairs, patch both models on them, and draw the heatmaps side by side.

    Steps: states -> ``pairs.jsonl`` (``build_pairs``; rendered in the compact protocol for the testbed) ->
    for each model, exact patching of every (layer x role) cell (``patch/<arm>/``; reused when
    ``run.json`` shows the same model, tokenizer, pairs and grid) and, with ``attribution``, attribution
    patching and its agreement with exact patching -> ``compare/compare_<component>.png`` (one colour scale)
    and ``compare/compare.csv`` (``entitylens patch compare``).

    Args:
        config: The study configuration.
        confirm: Called with a question after the GPU-time estimate (large models only); returning False
            stops. ``None``: never ask.
        say: Where progress lines go.

    Returns:
        The :class:`PatchStudyResult`.

    Raises:
        EntitylensError: Bad specs or data, no pair could be built, an incompatible earlier run in ``out``
            (without ``overwrite``), or a stop at the estimate.
    """
    from entitylens.activations.cache import model_fingerprint
    from entitylens.models import load_model
    from entitylens.patching.exact import PatchResult, tokenizer_fingerprint
    from entitylens.patching.pairs import build_pairs, compact_pairs, write_patch_pairs
    from entitylens.patching.run import (
        check_run_dir,
        compare_patch_runs,
        default_grid,
        prepare_pairs,
        read_manifest,
        run_attribution,
        run_patching,
        top_cells_summary,
        write_patch_outputs,
    )

    cfg = config
    _check_out(cfg.out)
    _check_specs(cfg.base, cfg.variant)
    protocol = resolve_protocol(cfg.protocol, cfg.base, cfg.variant)
    grid = cfg.grid or default_grid(cfg.component)
    n_states = cfg.states if cfg.states is not None else 4 * cfg.pairs
    states = study_states(cfg.data, cfg.seed, n_states, protocol)
    text_pairs = build_pairs(states, cfg.kind, seed=cfg.seed, max_pairs=cfg.pairs, prefix=cfg.prefix)
    if protocol == "compact":
        text_pairs = compact_pairs(text_pairs)
        if not text_pairs:
            raise EntitylensError(f"no {cfg.kind} pair has distinguishable compact answers; raise --states or "
                                  "use another --kind")
    cfg.out.mkdir(parents=True, exist_ok=True)
    pairs_file = cfg.out / "pairs.jsonl"
    specs = {"base": cfg.base, "variant": cfg.variant}
    say(f"patch study: base {cfg.base} vs variant {cfg.variant}; {len(text_pairs)} {cfg.kind} pairs "
        f"({protocol} prompts) from {len(states)} states; {cfg.component} {grid}; output {cfg.out}")
    for arm in specs:  # refuse an incompatible earlier run before touching anything
        old = read_manifest(cfg.out / "patch" / arm)
        if old is not None and pairs_file.is_file() and not cfg.overwrite:
            from entitylens.patching.pairs import read_pairs

            try:
                same = [p.to_json() for p in read_pairs(pairs_file)] == [p.to_json() for p in text_pairs]
            except EntitylensError:
                same = False
            if not same:
                raise EntitylensError(f"{cfg.out} holds a study on other pairs; use another --out or pass "
                                      "--overwrite")
    wrote = _write_pairs_if_changed(pairs_file, text_pairs)
    say(f"{'wrote' if wrote else 'reusing'} {pairs_file}")
    pairs_sha = sha256_file(pairs_file)
    settings = {"component": cfg.component, "grid": grid, "roles": None if cfg.roles is None else list(cfg.roles),
                "layers": None if cfg.layers is None else list(cfg.layers), "method": cfg.method,
                "attribution": cfg.attribution}
    estimate: GpuEstimate | None = None
    run_dirs: dict[str, Path] = {}
    results: dict[str, Any] = {}
    attributions: dict[str, Any] = {}
    reused: list[str] = []
    stem_files = {"exact": f"result_{cfg.component}.safetensors", "attr": f"attribution_{cfg.component}.safetensors"}
    for arm, spec in specs.items():
        t0 = time.perf_counter()
        say(f"[{arm}] loading {spec}")
        model = load_model(spec, device=cfg.device, dtype=cfg.dtype)
        tok = model.tokenizer
        plist, cols = prepare_pairs(model, text_pairs, grid, cfg.roles)
        n_layers = len(cfg.layers) if cfg.layers is not None else int(model.cfg.n_layers)
        n_cells = len(cols) if cols is not None else int(
            model.cfg.n_heads if grid == "layer_head" else max(len(p.corrupted_tokens) for p in plist))
        if arm == "base":
            n_tok = patch_tokens(plist, n_layers, n_cells, cfg.attribution)
            estimate = _estimate_and_confirm(
                specs, _count_params(model), {a: n_tok for a in specs},
                "patching is an upper bound (one forward per cell, as the hooks engine); the fast engine skips "
                "no-op cells and recomputes only the changed tail",
                estimate_above=cfg.estimate_above, confirm=confirm, say=say,
            )  # fmt: skip
        run_dir = cfg.out / "patch" / arm
        identity = {"model_fingerprint": model_fingerprint(model), "tokenizer_fingerprint": tokenizer_fingerprint(tok),
                    "pairs_sha256": pairs_sha}
        check_run_dir(run_dir, identity, cfg.overwrite)
        manifest = read_manifest(run_dir) or {}
        entry = (manifest.get("results") or {}).get(f"patch/{cfg.component}") or {}
        done = (entry.get("study") == settings and (run_dir / stem_files["exact"]).is_file()
                and (not cfg.attribution or (run_dir / stem_files["attr"]).is_file()))
        if done:
            say(f"[{arm}] patching: reusing {run_dir} (same model, pairs and grid)")
            results[arm] = PatchResult.load(run_dir / stem_files["exact"])
            if cfg.attribution:
                attributions[arm] = PatchResult.load(run_dir / stem_files["attr"])
            reused.append(arm)
        else:
            say(f"[{arm}] patching {len(plist)} pairs x {n_layers} layers x {n_cells} cells ({cfg.component})")
            t1 = time.perf_counter()
            res = run_patching(model, plist, cfg.component, grid, roles=cols, layers=cfg.layers, method=cfg.method,
                               batch_cells=cfg.batch_cells)
            info: dict[str, Any] = {"model": spec, "pairs": str(pairs_file), "method": cfg.method,
                                    "roles": cols if cols is not None else "all positions", "study": settings,
                                    "n_layers": int(model.cfg.n_layers)}
            timing = {"seconds": time.perf_counter() - t1}
            attr = None
            if cfg.attribution:
                t2 = time.perf_counter()
                attr = run_attribution(model, plist, cfg.component, grid, roles=cols, layers=cfg.layers)
                timing["attribution_seconds"] = time.perf_counter() - t2
                attributions[arm] = attr
            write_patch_outputs(run_dir, res, attribution=attr, k=cfg.k, label=_label(arm, spec), identity=identity,
                                info=info, overwrite=cfg.overwrite, timing=timing)
            write_patch_pairs(run_dir / "pairs_tokens.jsonl", plist)
            results[arm] = res
        run_dirs[arm] = run_dir
        say(f"[{arm}] cells restoring most of the clean answer (normalised, 1 = clean):")
        say(top_cells_summary(results[arm]))
        if cfg.attribution:
            say(f"[{arm}] attribution vs exact: {_agreement_line(run_dir, cfg.component)}")
        say(f"[{arm}] done in {time.perf_counter() - t0:.1f} s")
        del model
    labels = [_label("base", cfg.base), _label("variant", cfg.variant)]
    compare_dir = cfg.out / "compare"
    kinds = [("activation", compare_dir)]
    if cfg.attribution:
        kinds.append(("attribution", cfg.out / "compare-attribution"))
    for kind, d in kinds:
        written, _ = compare_patch_runs(run_dirs["base"], run_dirs["variant"], d, kind=kind,
                                        components=[cfg.component], labels=labels, vmax=1.0, say=say)
        say("wrote " + ", ".join(str(p) for p in written))
    write_json(cfg.out / "study.json", _jsonable({
        "study": "patch_base_vs_variant", "config": {**asdict(cfg), "out": str(cfg.out)}, "protocol": protocol,
        "data": {"path": str(cfg.data)} if cfg.data is not None else {"seed": cfg.seed, "states": n_states},
        "pairs": {"file": str(pairs_file), "sha256": pairs_sha, "n": len(text_pairs)},
        "estimate": estimate.to_json() if estimate else None,
        "outputs": {"runs": {k: str(v) for k, v in run_dirs.items()}, "compare": str(compare_dir)},
    }))  # fmt: skip
    return PatchStudyResult(out=cfg.out, pairs_file=pairs_file, run_dirs=run_dirs, results=results,
                            attributions=attributions, compare_dir=compare_dir, reused=tuple(reused),
                            estimate=estimate)


# --------------------------------------------------------------------------------------------------
# Command-line helpers shared by the two experiment scripts
# --------------------------------------------------------------------------------------------------


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def add_common_args(p: argparse.ArgumentParser, out_default: str) -> None:
    """Options both study scripts take: the model pair, data, protocol, device, output, estimate, quiet."""
    base, variant = default_model_pair()
    p.add_argument("--base", default=base, metavar="SPEC", help=f"base model spec (default {base})")
    p.add_argument("--variant", default=variant, metavar="SPEC", help=f"variant model spec (default {variant})")
    p.add_argument("--data", type=Path, default=None, help="K&S JSONL dataset (default: generate --states states)")
    p.add_argument("--seed", type=int, default=0, help="seed of generated states (default 0)")
    p.add_argument("--states", type=int, default=None, help="states to generate, or to keep from --data")
    p.add_argument("--protocol", choices=PROTOCOLS, default="auto",
                   help="prompt form: ks ('<context> Box 3 contains'), compact (testbed 'B0 car ; ... | B3'); "
                        "auto = compact when both models are testbed: models")
    prefix = p.add_mutually_exclusive_group()
    prefix.add_argument("--kst24-prefix", action="store_true",
                        help="put KST24's instruction and two demonstrations before every ks prompt")
    prefix.add_argument("--prefix-file", type=Path, default=None, help="text file put before every ks prompt")
    p.add_argument("--out", type=Path, default=Path(out_default), help=f"output directory (default {out_default})")
    gpu = _cuda_available()
    p.add_argument("--device", default="cuda" if gpu else "cpu",
                   help="cpu, cuda, cuda:N or mps (default: cuda when a GPU is visible, else cpu)")
    p.add_argument("--dtype", default="bfloat16" if gpu else "float32",
                   help="model dtype: float32, bfloat16 or float16 (default: bfloat16 on a GPU, else float32)")
    p.add_argument("--yes", action="store_true", help="do not ask before a large run (the estimate is still printed)")
    p.add_argument("--estimate-above", type=float, default=LARGE_PARAMS, metavar="PARAMS",
                   help=f"print the GPU-time estimate for models with at least PARAMS parameters "
                        f"(default {LARGE_PARAMS:.0e}; 0 = always)")
    p.add_argument("--overwrite", action="store_true", help="replace another model's or dataset's results in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def script_main(build: Callable[[argparse.Namespace], Any], run: Callable[..., Any],
                parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse, run a study, print one-line errors (exit 2), as the ``entitylens`` CLI does."""
    from entitylens.progress import set_quiet

    args = parser.parse_args(argv)
    set_quiet(bool(args.quiet))
    from entitylens.cli import guarded

    def body() -> int:
        run(build(args), confirm=None if args.yes else ask_to_proceed)
        return 0

    return guarded(body)

