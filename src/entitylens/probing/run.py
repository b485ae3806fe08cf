"""Probe a cached model: targets from the cache, probes on every layer and role, controls.

``run_probes`` is what ``entitylens probe`` runs: it builds the target from the cache's rows, splits by
scenario (or state), fits the task probe -- and the control task and the random model's probe -- on every
layer of each role, and scores them (:mod:`~entitylens.probing.rows`). The run's output directory is
:mod:`~entitylens.probing.outputs`' job (``write_probe_outputs``, ``read_probe_table``,
``compare_probe_runs``). See ``docs/probing.md`` ("From a cache: targets, CLI, outputs").
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from entitylens.activations import load_cache
from entitylens.errors import EntitylensError
from entitylens.frames import frame
from entitylens.probing.controls import control_labels
from entitylens.probing.family import CONTEXT_TARGETS
from entitylens.probing.linear import ProbeConfig, ProbeResult, fit_probes
from entitylens.probing.rows import PROBE_COLUMNS, baseline_predictions, bootstrap_weights, role_rows
from entitylens.probing.splits import Split, split_by_group
from entitylens.probing.targets import TARGETS, ProbeTarget, build_target
from entitylens.progress import progress

__all__ = [
    "ProbeRun",
    "ProbeRunConfig",
    "reinitialize_weights",
    "run_probes",
]

SPLIT_UNITS = ("scenario", "state")
"""What a probe split keeps on one side: whole scenarios (default) or whole states."""


@dataclass(frozen=True)
class ProbeRunConfig:
    """What :func:`run_probes` probes and how.

    Attributes:
        target: ``"box_contents"``, ``"object_in_box"`` (see :mod:`entitylens.probing.targets`) or a family
            target (``global``, ``prior``, ``mention``, ``incremental``, ``tags_box``, ``tags_object``; see
            :mod:`entitylens.probing.family`).
        roles: Token roles whose activations are probed (each must be in the cache). Context targets
            (mention, incremental, tags) ignore them: their examples sit at their group's positions.
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
        if not self.probe.calibrate:  # added later: runs without it keep the identity they were written with
            del d["probe"]["calibrate"]
        return d


@dataclass(frozen=True)
class ProbeRun:
    """Everything :func:`run_probes` produced.

    Attributes:
        table: The long-format results, a DataFrame (columns :data:`PROBE_COLUMNS`), as written to ``probe.csv``.
        target: The :class:`~entitylens.probing.targets.ProbeTarget` (labels, groups, numops, ...).
        split: The train/test split shared by every role and probe.
        layers: Layer of each entry of the results' layer dimension.
        results: Task probe per role.
        controls: Control-task probe per role (empty without ``control``).
        random_model: Random-model probe per role (empty without ``random_cache``).
        config: The run configuration.
        cache_meta: The cache's ``meta.json`` (model, dataset, ...).
        random_cache_meta: The random-model cache's ``meta.json`` (``None`` without ``random_cache``).
    """

    table: pd.DataFrame
    target: ProbeTarget
    split: Split
    layers: tuple[int, ...]
    results: dict[str, ProbeResult]
    controls: dict[str, ProbeResult]
    random_model: dict[str, ProbeResult]
    config: ProbeRunConfig
    cache_meta: dict[str, Any]
    random_cache_meta: dict[str, Any] | None = None


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


def _load(cache: Any) -> Any:
    if isinstance(cache, (str, os.PathLike)):

        return load_cache(cache)
    return cache


def _select_layers(c: Any, cfg: ProbeRunConfig) -> tuple[list[int], tuple[int, ...]]:
    """Positions in the cache's layers of ``cfg.hook`` of the layers probed (all, or ``cfg.layers``), and the layers."""
    cached_layers = tuple(c.layers(cfg.hook))
    if cfg.layers is None:
        layer_idx = list(range(len(cached_layers)))
    else:
        missing = [x for x in cfg.layers if x not in cached_layers]
        if missing:
            raise EntitylensError(f"layers {missing} are not in the cache (it has {list(cached_layers)}); "
                                  "pick cached layers or re-cache with --layers")
        layer_idx = [cached_layers.index(x) for x in cfg.layers]
    return layer_idx, tuple(cached_layers[i] for i in layer_idx)


def _features(c: Any, hook: str, role: str, layer_idx: list[int], target: ProbeTarget) -> Tensor:
    """``[layer, example, d]`` features of the target's examples.

    At ``role``, or (context targets, where ``role`` names the group) each example at its own role.
    """
    if not target.is_context:
        return c.features(hook, role)[layer_idx][:, target.rows].float()
    out: Tensor | None = None
    for r in sorted(set(target.example_roles)):
        idx = torch.tensor([i for i, x in enumerate(target.example_roles) if x == r], dtype=torch.int64)
        f = c.features(hook, r)[layer_idx][:, target.rows[idx]].float()
        if out is None:
            out = torch.empty(f.shape[0], len(target.example_roles), *f.shape[2:], dtype=torch.float32)
        out[:, idx] = f
    assert out is not None
    return out


def _check_roles(c: Any, cfg: ProbeRunConfig, target: ProbeTarget) -> None:
    """Every probed role is cached (for ``cfg.hook``) and present in every row of the target."""
    if target.is_context:
        c._check(cfg.hook, None)
        return
    for role in cfg.roles:
        c._check(cfg.hook, role)
        present = c.present(role)[target.rows]
        if not bool(present.all()):
            raise EntitylensError(f"role {role!r} is missing from {int((~present).sum())} rows; probe roles present "
                                  "in every row (e.g. query_box,last)")


def _open_random_cache(random_cache: Any | None, c: Any, cfg: ProbeRunConfig) -> Any | None:
    """The random-model cache (or ``None``), checked to hold the same rows and layers as the cache ``c``."""
    if random_cache is None:
        return None
    rc = _load(random_cache)
    if list(rc.row_ids) != list(c.row_ids):
        raise EntitylensError("the random-model cache holds other rows than the cache; cache the same dataset "
                              "with the randomly initialised model")
    if tuple(rc.layers(cfg.hook)) != tuple(c.layers(cfg.hook)):
        raise EntitylensError("the random-model cache has other layers than the cache; cache the same layers")
    return rc


def _split(target: ProbeTarget, cfg: ProbeRunConfig) -> tuple[list[str], Split]:
    """The split unit of every row (scenario or state) and the train/test split by it (with held-out objects)."""
    pc = cfg.probe
    units = list(target.scenarios if cfg.split == "scenario" else target.groups)
    if cfg.heldout_object_fraction > 0:
        split = split_by_group(units, pc.test_fraction, pc.seed, objects=target.objects,
                               heldout_object_fraction=cfg.heldout_object_fraction)
    else:
        split = split_by_group(units, pc.test_fraction, pc.seed)
    return units, split


def _control_task(target: ProbeTarget, cfg: ProbeRunConfig) -> Tensor | None:
    """The control task's labels (one random label set per object type), or ``None`` without ``cfg.control``."""
    if not cfg.control:
        return None
    if bool((target.types < 0).any()):
        raise EntitylensError("the cache rows carry no 'initial' contents, which the control task types rows "
                              "by; rebuild the cache with this entitylens version or pass --no-control")
    return control_labels(target.labels, target.types, cfg.probe.seed)


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
    layer_idx, layers = _select_layers(c, cfg)
    _check_roles(c, cfg, target)
    rc = _open_random_cache(random_cache, c, cfg)
    pc = cfg.probe
    units, split = _split(target, cfg)
    test_units = [units[i] for i in split.test.tolist()]
    weights = bootstrap_weights(test_units, cfg.bootstrap, pc.seed) if cfg.bootstrap else None
    baselines = baseline_predictions(target, split)
    ctl_labels = _control_task(target, cfg)
    rows: list[dict[str, Any]] = []
    results: dict[str, ProbeResult] = {}
    controls: dict[str, ProbeResult] = {}
    random_results: dict[str, ProbeResult] = {}
    sources = [CONTEXT_TARGETS[cfg.target]] if target.is_context else list(cfg.roles)
    for role in progress(sources, desc="probing roles", unit="role"):
        feats = _features(c, cfg.hook, role, layer_idx, target)
        task = fit_probes(feats, target.labels, units, pc, split=split, column_groups=target.column_groups)
        results[role] = task
        ctl = None
        if ctl_labels is not None:
            ctl = fit_probes(feats, ctl_labels, units, pc, split=split)
            controls[role] = ctl
        rand = None
        if rc is not None:
            rfeats = _features(rc, cfg.hook, role, layer_idx, target)
            rand = fit_probes(rfeats, target.labels, units, pc, split=split, column_groups=target.column_groups)
            random_results[role] = rand
        rows += role_rows(role, layers, task, ctl, ctl_labels, rand, target, split, weights, units, baselines)
    table = frame(rows, PROBE_COLUMNS)
    return ProbeRun(table=table, target=target, split=split, layers=layers, results=results, controls=controls,
                    random_model=random_results, config=cfg, cache_meta=dict(c.meta),
                    random_cache_meta=None if rc is None else dict(rc.meta))
