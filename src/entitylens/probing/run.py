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
from entitylens.probing import metrics as M
from entitylens.probing.controls import control_labels
from entitylens.probing.linear import ProbeConfig, ProbeResult, fit_probes
from entitylens.probing.splits import Split, split_by_group
from entitylens.probing.targets import TARGETS, ProbeTarget, build_target
from entitylens.progress import progress
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
        bootstrap: Resamples of the test states for the intervals of averaged metrics (0 = none).
        probe: The :class:`~entitylens.probing.linear.ProbeConfig` (seed, test fraction, Cs, ...).
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

    def __post_init__(self) -> None:
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


def _role_rows(role: str, layers: Sequence[int], task: ProbeResult, control: ProbeResult | None,
               y_control: Tensor | None, random: ProbeResult | None, target: ProbeTarget, split: Split,
               weights: Tensor | None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    te = split.test
    y = target.labels[te]
    n = len(te)
    correct = task.correct("test")  # [L, n] exact set match
    k = correct.sum(-1)
    lo, hi = M.wilson_interval(k, torch.tensor(n))
    out += _rows_for(role, layers, "exact_match", task.metrics("test")["exact_match"], lo, hi, n)
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
        rk = random.correct("test").sum(-1)
        rlo2, rhi2 = M.wilson_interval(rk, torch.tensor(n))
        out += _rows_for(role, layers, "random_model_exact_match", random.metrics("test")["exact_match"], rlo2, rhi2,
                         n)
    if split.heldout_objects and split.test_heldout is not None:
        seen_ok = (task.predictions("test").bool() == y)[..., ~held_cols].all(-1)  # [L, n]
        for flag, name in ((True, "exact_match_rows_with_heldout"), (False, "exact_match_rows_without_heldout")):
            mask = split.test_heldout == flag
            m = int(mask.sum())
            if m:
                kk = seen_ok[:, mask].sum(-1)
                lo2, hi2 = M.wilson_interval(kk, torch.tensor(m))
                out += _rows_for(role, layers, name, kk.double() / m, lo2, hi2, m)
    numops = target.numops[te]
    if bool((numops >= 0).all()):
        strat = task.stratified(numops, "test")
        for j, s in enumerate(strat.strata.tolist()):
            out += _rows_for(role, layers, f"exact_match_numops={int(s)}", strat.accuracy[:, j], strat.low[:, j],
                             strat.high[:, j], int(strat.count[j]))
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
    if cfg.heldout_object_fraction > 0:
        split = split_by_group(list(target.groups), pc.test_fraction, pc.seed, objects=target.objects,
                               heldout_object_fraction=cfg.heldout_object_fraction)
    else:
        split = split_by_group(list(target.groups), pc.test_fraction, pc.seed)
    test_groups = [target.groups[i] for i in split.test.tolist()]
    weights = _bootstrap_weights(test_groups, cfg.bootstrap, pc.seed) if cfg.bootstrap else None
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
        task = fit_probes(feats, target.labels, list(target.groups), pc, split=split)
        results[role] = task
        ctl = None
        if ctl_labels is not None:
            ctl = fit_probes(feats, ctl_labels, list(target.groups), pc, split=split)
            controls[role] = ctl
        rand = None
        if rc is not None:
            rfeats = rc.features(cfg.hook, role)[layer_idx][:, target.rows].float()
            rand = fit_probes(rfeats, target.labels, list(target.groups), pc, split=split)
            random_results[role] = rand
        rows += _role_rows(role, layers, task, ctl, ctl_labels, rand, target, split, weights)
    table = Table(PROBE_COLUMNS, tuple(rows))
    return ProbeRun(table=table, target=target, split=split, layers=layers, results=results, controls=controls,
                    random_model=random_results, config=cfg, cache_meta=dict(c.meta))


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
        "identity": {"cache_fingerprint": run.cache_meta.get("fingerprint"), "config": run.config.to_json()},
        "target": run.target.name,
        "target_names": list(run.target.target_names),
        "n_rows": len(run.target.rows),
        "n_train": len(run.split.train),
        "n_test": len(run.split.test),
        "n_test_states": len(set(run.target.groups[i] for i in run.split.test.tolist())),
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
) -> list[Path]:
    """Draw two probe runs (base vs variant) on one figure, ``probe_compare.png``.

    Args:
        base: Output directory of the base model's ``entitylens probe`` run.
        variant: Output directory of the variant's run.
        out_dir: Where to write ``probe_compare.png``.
        metric: Metric to draw (a value of the ``metric`` column; selectivity is always added dashed
            when both runs have it).
        labels: Legend names (default: the model specs recorded in the runs).

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
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return plot_probe_compare({names[0]: ta, names[1]: tb}, out / "probe_compare", metric=metric)
