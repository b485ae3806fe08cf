"""Probe a cached model: targets from the cache, probes on every layer and role, controls, outputs.

``run_probes`` is what ``entitylens probe`` runs; ``write_probe_outputs`` writes ``probe.csv``,
``probe_by_layer.png`` and ``meta.json``; ``compare_probe_runs`` draws two runs (base vs variant) on
one figure. See ``docs/probing.md`` ("From a cache: targets, CLI, outputs").
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from entitylens._io import prepare_output_dir, write_json
from entitylens.errors import EntitylensError
from entitylens.probing.controls import control_labels
from entitylens.probing.linear import ProbeConfig, ProbeResult, fit_probes
from entitylens.probing.splits import Split, split_by_group
from entitylens.probing.targets import TARGETS, ProbeTarget, build_target
from entitylens.progress import progress
from entitylens.stats import clustered_wilson
from entitylens.table import Table, read_csv

__all__ = [
    "PROBE_COLUMNS",
    "ProbeRun",
    "ProbeRunConfig",
    "compare_probe_runs",
    "read_probe_table",
    "reinitialize_weights",
    "run_probes",
    "write_probe_outputs",
]

PROBE_COLUMNS = ("layer", "role", "metric", "value", "ci_low", "ci_high", "n")
"""Columns of ``probe.csv`` (long format: one row per layer x role x metric)."""

SPLIT_UNITS = ("scenario", "state")
"""What a probe split keeps on one side: whole scenarios (default) or whole states."""

STATE_SPLIT_WARNING = (
    "split by state: test states can be prefixes of scenarios whose other prefixes are in training, so a probe "
    "may look answers up from sibling states (compare with baseline_sibling_lookup); use --split scenario"
)

BASELINES = ("baseline_empty", "baseline_majority", "baseline_sibling_lookup")
"""Reference predictions reported beside every exact-match metric: every label false (the queried box holds
nothing), the most frequent training label set, and -- using no activations at all -- the label set of the
closest training state of the same scenario (same queried box), else the majority set."""


@dataclass(frozen=True)
class ProbeRunConfig:
    """What :func:`run_probes` probes and how.

    Attributes:
        target: ``"box_contents"`` or ``"object_in_box"`` (see :mod:`entitylens.probing.targets`).
        roles: Token roles whose activations are probed (each must be in the cache).
        hook: Hook key of the cache (``"resid_post"``).
        layers: Cached layers to probe (default: all cached layers of ``hook``).
        min_count: Keep label columns true in at least this many rows.
        heldout_object_fraction: Hold out this fraction of the objects from training (disjoint objects;
            0 = off). Metrics are then also reported on test rows with / without a held-out object.
        control: Also fit the control task (one random label set per object type: the queried box's initial
            contents) and report selectivity.
        bootstrap: Resamples of the test scenarios (states) for the intervals of averaged metrics (0 = none).
        probe: The :class:`~entitylens.probing.linear.ProbeConfig` (seed, test fraction, Cs, ...).
        split: ``"scenario"`` (default): no scenario (``sample_id``) has states on both sides of the split or
            of a cross-validation fold, so a probe cannot look answers up from sibling prefixes of the same
            scenario. ``"state"`` splits by state only (the earlier behaviour; outputs carry a warning).
    """

    target: str = "box_contents"
    roles: tuple[str, ...] = ("query_box", "last")
    hook: str = "resid_post"
    layers: tuple[int, ...] | None = None
    min_count: int = 1
    heldout_object_fraction: float = 0.0
    control: bool = True
    bootstrap: int = 200
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    split: str = "scenario"

    def __post_init__(self) -> None:
        if self.split not in SPLIT_UNITS:
            raise EntitylensError(f"unknown split {self.split!r}; use one of {', '.join(SPLIT_UNITS)}")
        if self.target not in TARGETS:
            raise EntitylensError(f"unknown target {self.target!r}; use one of {', '.join(TARGETS)}")
        roles = tuple(self.roles)
        if not roles or len(set(roles)) != len(roles):
            raise EntitylensError(f"roles must be distinct and non-empty, got {self.roles!r}; use e.g. query_box,last")
        object.__setattr__(self, "roles", roles)
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        if not 0.0 <= float(self.heldout_object_fraction) < 1.0:
            raise EntitylensError(f"heldout_object_fraction must be in [0, 1), got {self.heldout_object_fraction}")
        if int(self.bootstrap) < 0:
            raise EntitylensError(f"bootstrap must be >= 0, got {self.bootstrap}; use e.g. 200")
        if int(self.min_count) < 1:
            raise EntitylensError(f"min_count must be >= 1, got {self.min_count}")
        if not isinstance(self.probe, ProbeConfig):
            raise EntitylensError("probe must be a ProbeConfig")

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (recorded in ``meta.json``)."""
        d = asdict(self)
        d["probe"] = asdict(self.probe)
        return d


@dataclass(frozen=True)
class ProbeRun:
    """Everything :func:`run_probes` produced.

    Attributes:
        table: The long-format results (columns :data:`PROBE_COLUMNS`), as written to ``probe.csv``.
        target: The :class:`~entitylens.probing.targets.ProbeTarget` (labels, groups, numops, ...).
        split: The train/test split shared by every role and probe.
        layers: Layer of each entry of the results' layer dimension.
        results: Task probe per role.
        controls: Control-task probe per role (empty without ``control``).
        random_model: Random-model probe per role (empty without ``random_cache``).
        config: The run configuration.
        cache_meta: The cache's ``meta.json`` (model, dataset, ...).
    """

    table: Table
    target: ProbeTarget
    split: Split
    layers: tuple[int, ...]
    results: dict[str, ProbeResult]
    controls: dict[str, ProbeResult]
    random_model: dict[str, ProbeResult]
    config: ProbeRunConfig
    cache_meta: dict[str, Any]


def reinitialize_weights(model: Any, seed: int = 0) -> Any:
    """Re-initialise a loaded model in place with its architecture's own initializer (random-model control).

    Every module of the Hugging Face model behind a ``TransformerBridge`` (``model.original_model``), or of
    a plain ``PreTrainedModel``, is reset by the model class's ``_init_weights`` (e.g. normal with the
    config's ``initializer_range`` for Llama linear layers and embeddings, ones for RMSNorm) after
    ``torch.manual_seed(seed)``: the same architecture and tokenizer with trained weights discarded.
    Cache it with a distinct ``model_spec`` (e.g. ``"smollm2-135m-instruct#random-init-0"``) and pass
    that cache as ``random_cache`` to :func:`run_probes`.

    Args:
        model: A ``TransformerBridge`` (or a Hugging Face ``PreTrainedModel``).
        seed: Seed of the initialisation (same seed -> same weights).

    Returns:
        ``model`` (modified in place).

    Raises:
        EntitylensError: The model has no Hugging Face ``_init_weights``.
    """
    hf = getattr(model, "original_model", model)
    init = getattr(hf, "_init_weights", None)
    if init is None or not hasattr(hf, "apply"):
        raise EntitylensError(f"cannot re-initialise a {type(model).__name__}: it has no Hugging Face _init_weights; "
                              "pass a TransformerBridge from entitylens.models.load_model")
    torch.manual_seed(int(seed))
    with torch.no_grad():
        hf.apply(init)
    return model


def _bootstrap_weights(groups: Sequence[str], resamples: int, seed: int) -> Tensor:
    """``[R, n]`` multiplicity of each test row when whole test states are resampled with replacement."""
    uniq = sorted(set(groups))
    index = {g: i for i, g in enumerate(uniq)}
    code = torch.tensor([index[g] for g in groups], dtype=torch.int64)
    gen = torch.Generator().manual_seed(int(seed) + 7919)
    draws = torch.randint(len(uniq), (resamples, len(uniq)), generator=gen)
    per_state = torch.zeros(resamples, len(uniq), dtype=torch.float64)
    per_state.scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.float64))
    return per_state[:, code]


def _evaluable(y: Bool[Tensor, "n target"]) -> Bool[Tensor, " target"]:
    """Label columns with both classes among the rows ``y`` (balanced accuracy and F1 are informative)."""
    pos = y.sum(0)
    return (pos > 0) & (pos < y.shape[0])


def _weighted_binary(pred: Bool[Tensor, "layer n target"], y: Bool[Tensor, "n target"],
                     w: Float[Tensor, "r n"], cols: Bool[Tensor, " target"]) -> dict[str, Tensor]:
    """Mean balanced accuracy and F1 over the columns ``cols``, ``[r, layer]``, with row weights ``w``.

    Same definitions as :mod:`entitylens.probing.metrics` on evaluable columns (weights of 1 reproduce
    them exactly); in a resample, columns left with one class are skipped as they are in the estimate.
    """
    p, t = pred[..., cols].double(), y[:, cols].double()
    tp = torch.einsum("rn,lnt,nt->rlt", w, p, t)
    fn = torch.einsum("rn,lnt,nt->rlt", w, 1 - p, t)
    fp = torch.einsum("rn,lnt,nt->rlt", w, p, 1 - t)
    tn = torch.einsum("rn,lnt,nt->rlt", w, 1 - p, 1 - t)
    pos, neg = tp + fn, tn + fp
    ok = (pos > 0) & (neg > 0)  # a resample can lose a column's only positives: it is then not evaluable
    bal = torch.where(ok, (tp / pos.clamp_min(1e-12) + tn / neg.clamp_min(1e-12)) / 2, torch.nan).nanmean(-1)
    f1 = torch.where(ok, 2 * tp / (2 * tp + fp + fn).clamp_min(1e-12), torch.nan).nanmean(-1)
    return {"balanced_accuracy": bal, "f1": f1}


def _column_means(result: ProbeResult, cols: Bool[Tensor, " target"]) -> dict[str, Tensor]:
    """``balanced_accuracy`` and ``f1`` of ``result.metrics('test')`` averaged over the columns ``cols``."""
    met = result.metrics("test")
    return {k: met[f"{k}_per_target"][:, cols].mean(-1) for k in ("balanced_accuracy", "f1")}


def _interval(value: Tensor, samples: Tensor | None, low: float, high: float) -> tuple[Tensor | None, Tensor | None]:
    """Normal-approximation bootstrap interval ``value +- 1.96 sd(samples)``, clipped to ``[low, high]``."""
    if samples is None:
        return None, None
    samples = torch.where(samples.isnan(), value.expand_as(samples), samples)  # no evaluable column: neutral
    half = 1.96 * samples.std(0)
    return (value - half).clamp(low, high), (value + half).clamp(low, high)


def _rows_for(role: str, layers: Sequence[int], metric: str, value: Tensor, low: Tensor | None,
              high: Tensor | None, n: int) -> list[dict[str, Any]]:
    return [{"layer": int(layer), "role": role, "metric": metric, "value": float(value[i]),
             "ci_low": None if low is None else float(low[i]), "ci_high": None if high is None else float(high[i]),
             "n": int(n)} for i, layer in enumerate(layers)]


def _reference_rows(role: str, layers: Sequence[int], n: int, met: dict[str, Tensor],
                    boot_t: dict[str, Tensor] | None, reference: ProbeResult, y: Bool[Tensor, "n target"],
                    cols: Bool[Tensor, " target"], weights: Tensor | None, accuracy_name: str,
                    difference_name: str) -> list[dict[str, Any]]:
    """A reference probe's (control task, random model) balanced accuracy and the task's margin over it.

    The margin's interval comes from paired resamples of the same test states as the task's.
    """
    ref = _column_means(reference, cols)["balanced_accuracy"]
    boot_r = (_weighted_binary(reference.predictions("test").bool(), y, weights, cols)
              if weights is not None else None)
    lo, hi = _interval(ref, None if boot_r is None else boot_r["balanced_accuracy"], 0.0, 1.0)
    rows = _rows_for(role, layers, accuracy_name, ref, lo, hi, n)
    diff = met["balanced_accuracy"] - ref
    dlo, dhi = _interval(diff, None if boot_t is None or boot_r is None
                         else boot_t["balanced_accuracy"] - boot_r["balanced_accuracy"], -1.0, 1.0)
    return rows + _rows_for(role, layers, difference_name, diff, dlo, dhi, n)


def baseline_predictions(target: ProbeTarget, split: Split) -> dict[str, Tensor]:
    """The :data:`BASELINES`' predicted label sets for the test rows, ``{name: [n_test, target]}``.

    The sibling lookup looks inside a row's own scenario; under the default scenario split no sibling is in
    training, so it falls back to the majority set -- which is the point of that split.

    Args:
        target: The probe target.
        split: The train/test split.

    Returns:
        Boolean predictions per baseline.
    """
    tr, te = split.train.tolist(), split.test.tolist()
    y = target.labels
    counts: dict[tuple[bool, ...], int] = {}
    for j in tr:
        key = tuple(bool(v) for v in y[j].tolist())
        counts[key] = counts.get(key, 0) + 1
    majority = max(sorted(counts), key=lambda k: counts[k]) if counts else (False,) * y.shape[1]
    maj = torch.tensor(majority, dtype=torch.bool)
    by_scenario: dict[str, list[int]] = {}
    for j in tr:
        by_scenario.setdefault(target.scenarios[j], []).append(j)
    same_box = target.name == "box_contents"
    lookup = torch.zeros(len(te), y.shape[1], dtype=torch.bool)
    for r, i in enumerate(te):
        cands = [j for j in by_scenario.get(target.scenarios[i], [])
                 if not same_box or target.boxes[j] == target.boxes[i]]  # fmt: skip
        if not cands:
            lookup[r] = maj
            continue
        ops = target.prefix_ops[i]
        best = min(cands, key=lambda j: (abs(target.prefix_ops[j] - ops), target.prefix_ops[j], j))
        lookup[r] = y[best]
    return {
        "baseline_empty": torch.zeros(len(te), y.shape[1], dtype=torch.bool),
        "baseline_majority": maj.expand(len(te), -1).clone(),
        "baseline_sibling_lookup": lookup,
    }


def _clustered_rows(role: str, layers: Sequence[int], metric: str, correct: Bool[Tensor, "layer n"],
                    clusters: Sequence[str]) -> list[dict[str, Any]]:
    """Rows of an exact-match metric with the one interval method of entitylens (rows clustered by unit)."""
    n = correct.shape[-1]
    values = correct.double().mean(-1) if n else torch.full((correct.shape[0],), float("nan"))
    lows, highs = [], []
    for li in range(correct.shape[0]):
        lo, hi = clustered_wilson(correct[li].tolist(), clusters)
        lows.append(lo)
        highs.append(hi)
    return _rows_for(role, layers, metric, values, torch.tensor(lows), torch.tensor(highs), n)


def _role_rows(role: str, layers: Sequence[int], task: ProbeResult, control: ProbeResult | None,
               y_control: Tensor | None, random: ProbeResult | None, target: ProbeTarget, split: Split,
               weights: Tensor | None, units: Sequence[str] | None = None,
               baselines: Mapping[str, Tensor] | None = None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    te = split.test
    y = target.labels[te]
    n = len(te)
    units = list(target.scenarios) if units is None else list(units)
    test_units = [units[i] for i in te.tolist()]
    correct = task.correct("test")  # [L, n] exact set match
    out += _clustered_rows(role, layers, "exact_match", correct, test_units)
    numops_all = target.numops[te]
    strata = sorted(set(numops_all.tolist())) if bool((numops_all >= 0).all()) else []
    for name, pred in (baselines or {}).items():
        ok = (pred == y).all(-1)[None].expand(len(layers), -1)
        out += _clustered_rows(role, layers, name, ok, test_units)
        for s in strata:
            mask = numops_all == s
            out += _clustered_rows(role, layers, f"{name}_numops={s}", ok[:, mask],
                                   [u for u, m in zip(test_units, mask.tolist()) if m])
    held_names = {target.vocabulary[i] for i in split.heldout_objects}
    held_cols = torch.tensor([o in held_names for o in target.column_objects], dtype=torch.bool)
    cols = _evaluable(y) & ~held_cols  # a held-out object's column has no training positive: left out
    if not bool(cols.any()):
        raise EntitylensError("no label has both classes in the test split; cache more states or raise --test-fraction")
    met = _column_means(task, cols)
    boot_t = _weighted_binary(task.predictions("test").bool(), y, weights, cols) if weights is not None else None
    for name in ("balanced_accuracy", "f1"):
        blo, bhi = _interval(met[name], None if boot_t is None else boot_t[name], 0.0, 1.0)
        out += _rows_for(role, layers, name, met[name], blo, bhi, n)
    if control is not None and y_control is not None:
        y_c = y_control[te].bool()
        ccols = _evaluable(y_c)
        if bool(ccols.any()):
            out += _reference_rows(role, layers, n, met, boot_t, control, y_c, ccols, weights,
                                   "control_balanced_accuracy", "selectivity")
    if random is not None:
        out += _reference_rows(role, layers, n, met, boot_t, random, y, cols, weights,
                               "random_model_balanced_accuracy", "over_random")
        out += _clustered_rows(role, layers, "random_model_exact_match", random.correct("test"), test_units)
    if split.heldout_objects and split.test_heldout is not None:
        seen_ok = (task.predictions("test").bool() == y)[..., ~held_cols].all(-1)  # [L, n]
        for flag, name in ((True, "exact_match_rows_with_heldout"), (False, "exact_match_rows_without_heldout")):
            mask = split.test_heldout == flag
            if int(mask.sum()):
                out += _clustered_rows(role, layers, name, seen_ok[:, mask],
                                       [u for u, m in zip(test_units, mask.tolist()) if m])
    for s in strata:
        mask = numops_all == s
        out += _clustered_rows(role, layers, f"exact_match_numops={int(s)}", correct[:, mask],
                               [u for u, m in zip(test_units, mask.tolist()) if m])
    return out


def _load(cache: Any) -> Any:
    if isinstance(cache, (str, os.PathLike)):
        from entitylens.activations import load_cache

        return load_cache(cache)
    return cache


def run_probes(cache: Any, config: ProbeRunConfig | None = None, *, random_cache: Any | None = None) -> ProbeRun:
    """Probe every cached layer of each role of a cache for one target, with controls.

    All roles and probes share one split by state (optionally with held-out objects), so their numbers
    are comparable. Metrics are on the test split: ``exact_match`` (the whole label set of a row right:
    the queried box's object set, or every (box, object) pair; Wilson interval), ``balanced_accuracy``
    and ``f1`` (means over the label columns with both classes in the test split; 95% interval from
    resampling whole test states), ``control_balanced_accuracy`` and ``selectivity`` (task - control, on
    paired resamples), ``random_model_*`` and ``over_random`` with ``random_cache``,
    ``exact_match_numops=k`` (target c) and, with held-out objects, ``exact_match_rows_with_heldout`` /
    ``exact_match_rows_without_heldout`` (test rows whose labels involve a held-out object or not, scored
    on the seen objects' columns; held-out objects' columns are also left out of the means).

    Args:
        cache: A cache directory (``entitylens cache --out``) or an opened
            :class:`~entitylens.activations.CachedActivations`.
        config: The :class:`ProbeRunConfig` (defaults if omitted).
        random_cache: Optional cache of the same rows through a randomly initialised model of the same
            architecture (directory or opened cache): the same probe, split and labels are fitted on it and
            ``random_model_*`` and ``over_random`` (task - random model) rows are added.

    Returns:
        The :class:`ProbeRun` (``.table`` is ``probe.csv``).

    Raises:
        EntitylensError: Missing hook/role/layer, a role absent from some rows, or too few states.
    """
    cfg = config or ProbeRunConfig()
    c = _load(cache)
    target = build_target(c, cfg.target, min_count=cfg.min_count)
    cached_layers = tuple(c.layers(cfg.hook))
    if cfg.layers is None:
        layer_idx = list(range(len(cached_layers)))
    else:
        missing = [x for x in cfg.layers if x not in cached_layers]
        if missing:
            raise EntitylensError(f"layers {missing} are not in the cache (it has {list(cached_layers)}); "
                                  "pick cached layers or re-cache with --layers")
        layer_idx = [cached_layers.index(x) for x in cfg.layers]
    layers = tuple(cached_layers[i] for i in layer_idx)
    for role in cfg.roles:
        c._check(cfg.hook, role)
        present = c.present(role)[target.rows]
        if not bool(present.all()):
            raise EntitylensError(f"role {role!r} is missing from {int((~present).sum())} rows; probe roles present "
                                  "in every row (e.g. query_box,last)")
    rc = None
    if random_cache is not None:
        rc = _load(random_cache)
        if list(rc.row_ids) != list(c.row_ids):
            raise EntitylensError("the random-model cache holds other rows than the cache; cache the same dataset "
                                  "with the randomly initialised model")
        if tuple(rc.layers(cfg.hook)) != cached_layers:
            raise EntitylensError("the random-model cache has other layers than the cache; cache the same layers")
    pc = cfg.probe
    units = list(target.scenarios if cfg.split == "scenario" else target.groups)
    if cfg.heldout_object_fraction > 0:
        split = split_by_group(units, pc.test_fraction, pc.seed, objects=target.objects,
                               heldout_object_fraction=cfg.heldout_object_fraction)
    else:
        split = split_by_group(units, pc.test_fraction, pc.seed)
    test_units = [units[i] for i in split.test.tolist()]
    weights = _bootstrap_weights(test_units, cfg.bootstrap, pc.seed) if cfg.bootstrap else None
    baselines = baseline_predictions(target, split)
    ctl_labels = None
    if cfg.control:
        if bool((target.types < 0).any()):
            raise EntitylensError("the cache rows carry no 'initial' contents, which the control task types rows "
                                  "by; rebuild the cache with this entitylens version or pass --no-control")
        ctl_labels = control_labels(target.labels, target.types, pc.seed)
    rows: list[dict[str, Any]] = []
    results: dict[str, ProbeResult] = {}
    controls: dict[str, ProbeResult] = {}
    random_results: dict[str, ProbeResult] = {}
    for role in progress(cfg.roles, desc="probing roles", unit="role"):
        feats = c.features(cfg.hook, role)[layer_idx][:, target.rows].float()
        task = fit_probes(feats, target.labels, units, pc, split=split)
        results[role] = task
        ctl = None
        if ctl_labels is not None:
            ctl = fit_probes(feats, ctl_labels, units, pc, split=split)
            controls[role] = ctl
        rand = None
        if rc is not None:
            rfeats = rc.features(cfg.hook, role)[layer_idx][:, target.rows].float()
            rand = fit_probes(rfeats, target.labels, units, pc, split=split)
            random_results[role] = rand
        rows += _role_rows(role, layers, task, ctl, ctl_labels, rand, target, split, weights, units, baselines)
    table = Table(PROBE_COLUMNS, tuple(rows))
    return ProbeRun(table=table, target=target, split=split, layers=layers, results=results, controls=controls,
                    random_model=random_results, config=cfg, cache_meta=dict(c.meta))


def best_against_baselines(table: Table) -> dict[str, Any]:
    """The best layer x role by exact-set accuracy, its interval, and the baselines of its role.

    Returns:
        ``value``, ``ci_low``, ``ci_high``, ``layer``, ``role``, one entry per :data:`BASELINES`, the
        ``best_baseline`` and ``beats_baselines`` (the interval's lower end above every baseline).
    """
    rows = [r for r in table.rows if r["metric"] == "exact_match"]
    if not rows:
        raise EntitylensError("the probe table has no exact_match rows; run entitylens probe first")
    best = max(rows, key=lambda r: (float(r["value"]), -int(r["layer"])))
    out: dict[str, Any] = {k: best[k] for k in ("value", "ci_low", "ci_high", "layer", "role")}
    for name in BASELINES:
        vals = [float(r["value"]) for r in table.rows if r["metric"] == name and r["role"] == best["role"]]
        out[name] = vals[0] if vals else float("nan")
    out["best_baseline"] = max(out[name] for name in BASELINES)
    low = float(best["ci_low"]) if best["ci_low"] is not None else float(best["value"])
    out["beats_baselines"] = low > out["best_baseline"]
    return out


PROBE_FILES: tuple[str, ...] = ("probe.csv", "probe_by_layer.png", "probe_by_layer.pdf", "meta.json")
"""What a probe run writes into its output directory."""


def probe_identity(cache_dir: str | os.PathLike[str], config: ProbeRunConfig) -> dict[str, Any]:
    """What must match for a probe run to replace an earlier one in the same directory: cache and config."""
    try:
        meta = json.loads((Path(cache_dir) / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        meta = {}
    return {"cache_fingerprint": meta.get("fingerprint"), "config": config.to_json()}


def check_probe_dir(out: str | os.PathLike[str], identity: Mapping[str, Any], overwrite: bool = False) -> Path:
    """Check a probe output directory before any work: writable, and not holding something else.

    Refused without ``overwrite``: a directory whose ``meta.json`` is not a probe run's (an activation cache,
    say) or belongs to a probe run of another cache or configuration. A rerun of the same probe is fine.

    Args:
        out: The output directory.
        identity: :func:`probe_identity` of the run about to start.
        overwrite: Replace an earlier probe run of another configuration.

    Returns:
        The directory.

    Raises:
        EntitylensError: As above, or the directory cannot be written.
    """
    out = prepare_output_dir(out)
    meta_path = out / "meta.json"
    if meta_path.is_file():
        try:
            old = json.loads(meta_path.read_text(encoding="utf-8"))
        except ValueError:
            old = {}
        if not (isinstance(old, dict) and "target" in old and "config" in old):
            raise EntitylensError(
                f"{out} holds a meta.json that is not a probe run's (an activation cache?); write the probes "
                "to another --out (nothing was changed)"
            )
        same = old.get("identity") == json.loads(json.dumps(dict(identity)))
        if not same and not overwrite:
            raise EntitylensError(
                f"{out} holds a probe run of another cache or configuration; use another --out or pass "
                "--overwrite (nothing was changed)"
            )
    return out


def write_probe_outputs(
    out_dir: str | os.PathLike[str], run: ProbeRun, *, title: str | None = None, label: str | None = None
) -> list[Path]:
    """Write ``probe.csv``, ``probe_by_layer.png`` and ``meta.json`` (each atomically).

    Args:
        out_dir: Output directory (created).
        run: The :class:`ProbeRun` from :func:`run_probes`.
        title: Figure title (default: the model's label and the target).
        label: The model's label in this run's figure and in comparisons (default: the cache's label, i.e.
            :func:`entitylens.models.model_label` of the cached model's spec).

    Returns:
        The written paths.
    """
    from entitylens.plots import plot_probe_by_layer

    out = prepare_output_dir(out_dir)
    csv_path = out / "probe.csv"
    run.table.to_csv(csv_path)
    model = label or _cache_label(run.cache_meta)
    fig_title = title or f"{model or 'model'}: {run.target.name} probes"
    pngs = plot_probe_by_layer(run.table, out / "probe_by_layer", title=fig_title)
    meta = {
        "label": model,
        "split": run.config.split,
        "warning": STATE_SPLIT_WARNING if run.config.split == "state" else None,
        "identity": {"cache_fingerprint": run.cache_meta.get("fingerprint"), "config": run.config.to_json()},
        "target": run.target.name,
        "target_names": list(run.target.target_names),
        "n_rows": len(run.target.rows),
        "n_train": len(run.split.train),
        "n_test": len(run.split.test),
        "n_test_states": len(set(run.target.groups[i] for i in run.split.test.tolist())),
        "n_test_scenarios": len(set(run.target.scenarios[i] for i in run.split.test.tolist())),
        "n_train_scenarios": len(set(run.target.scenarios[i] for i in run.split.train.tolist())),
        "heldout_objects": [run.target.vocabulary[i] for i in run.split.heldout_objects],
        "dropped_states": list(run.target.dropped_states),
        "layers": list(run.layers),
        "random_model": bool(run.random_model),
        "config": run.config.to_json(),
        "seed": run.config.probe.seed,
        "cache": {"model": run.cache_meta.get("model"), "dataset_sha256": run.cache_meta.get("dataset_sha256"),
                  "dataset_source": run.cache_meta.get("dataset_source"), "config": run.cache_meta.get("config")},
    }
    write_json(out / "meta.json", meta)
    return [csv_path, *pngs, out / "meta.json"]


def read_probe_table(run_dir: str | os.PathLike[str]) -> Table:
    """Read a run's ``probe.csv`` with numeric columns parsed (blank intervals become ``None``)."""
    path = Path(run_dir) / "probe.csv"
    if not path.exists():
        raise EntitylensError(f"{path} does not exist; pass a directory written by `entitylens probe --out`")
    t = read_csv(path)
    if tuple(t.columns) != PROBE_COLUMNS:
        raise EntitylensError(f"{path} is not a probe table (columns {list(t.columns)}); pass an `entitylens probe` "
                              "output directory")

    def num(v: str | None) -> float | None:
        return None if v in (None, "") else float(v)

    rows = tuple({"layer": int(r["layer"]), "role": r["role"], "metric": r["metric"], "value": float(r["value"]),
                  "ci_low": num(r["ci_low"]), "ci_high": num(r["ci_high"]), "n": int(r["n"])} for r in t.rows)
    return Table(PROBE_COLUMNS, rows)


def _cache_label(cache_meta: Mapping[str, Any]) -> str | None:
    """The model label of a cache's ``meta.json`` (recorded, or derived from the recorded spec)."""
    from entitylens.models.loading import model_label

    model = cache_meta.get("model") or {}
    if model.get("label"):
        return str(model["label"])
    return model_label(str(model["spec"])) if model.get("spec") else None


def _label(run_dir: Path) -> str:
    meta = run_dir / "meta.json"
    if meta.exists():
        try:
            doc = json.loads(meta.read_text(encoding="utf-8"))
            found = doc.get("label") or _cache_label(doc["cache"])
            if found:
                return str(found)
        except (KeyError, TypeError, ValueError):
            pass
    return run_dir.name


def compare_probe_runs(
    base: str | os.PathLike[str],
    variant: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    metric: str = "exact_match",
    labels: tuple[str, str] | None = None,
    depth: str = "layer",
) -> list[Path]:
    """Draw two probe runs (base vs variant) on one figure, ``probe_compare.png``.

    Args:
        base: Output directory of the base model's ``entitylens probe`` run.
        variant: Output directory of the variant's run.
        out_dir: Where to write ``probe_compare.png``.
        metric: Metric to draw (a value of the ``metric`` column), with its band; the runs' majority and
            sibling-lookup baselines are drawn thin for exact-match metrics, and selectivity gets its own
            row of panels when both runs have it.
        labels: Legend names (default: the runs' model labels).
        depth: ``"layer"`` (default; refused for models of different depth) or ``"relative"``: the x axis is
            ``layer / (layers - 1)`` so models of different depth line up by relative position.

    Returns:
        The written paths.
    """
    from entitylens.plots import plot_probe_compare

    a, b = Path(base), Path(variant)
    ta, tb = read_probe_table(a), read_probe_table(b)
    for p, t in ((a, ta), (b, tb)):
        if not t.where(metric=metric).rows:
            have = sorted(set(t.column("metric")))
            raise EntitylensError(f"{p}/probe.csv has no metric {metric!r}; use one of {', '.join(have)}")
    names = labels or (_label(a), _label(b))
    if names[0] == names[1]:
        names = (f"{names[0]} ({a.name})", f"{names[1]} ({b.name})")
    if depth not in ("layer", "relative"):
        raise EntitylensError(f"unknown --depth {depth!r}; use layer or relative")
    da, db = _probe_depth(a), _probe_depth(b)
    scales: dict[str, float] | None = None
    if da != db and depth == "layer":
        raise EntitylensError(
            f"{names[0]} has {da} layers and {names[1]} {db}: layer numbers do not line up across depths; pass "
            "--depth relative (layer / (layers - 1))"
        )
    if depth == "relative":
        scales = {names[0]: 1.0 / max(1, da - 1), names[1]: 1.0 / max(1, db - 1)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return plot_probe_compare({names[0]: ta, names[1]: tb}, out / "probe_compare", metric=metric, x_scales=scales)


def _probe_depth(run_dir: Path) -> int:
    """Layers of the model behind a probe run (its cache's ``n_layers``; else the largest probed layer + 1)."""
    try:
        doc = json.loads((run_dir / "meta.json").read_text(encoding="utf-8"))
        n = doc["cache"]["model"]["n_layers"]
        if n:
            return int(n)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    layers = [int(r["layer"]) for r in read_probe_table(run_dir).rows]
    return max(layers) + 1 if layers else 0
