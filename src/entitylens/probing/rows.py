"""The rows of ``probe.csv``: test-split metrics per layer x role with their intervals, baselines and references.

:func:`role_rows` turns one role's fitted probes into long-format rows (columns :data:`PROBE_COLUMNS`):
exact-set match with a clustered Wilson interval (overall, per numops and pooled over numops >= 1, with and
without held-out objects),
balanced accuracy and F1 with bootstrap intervals over whole test units (:func:`bootstrap_weights`), the
control task's and the random model's balanced accuracy with the task's margin over each, and the
:data:`BASELINES` (:func:`baseline_predictions`) scored like the probe.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from entitylens.errors import EntitylensError
from entitylens.probing.family_rows import example_correct, family_rows
from entitylens.probing.linear import ProbeResult
from entitylens.probing.splits import Split
from entitylens.probing.targets import ProbeTarget
from entitylens.stats import clustered_wilson

__all__ = ["BASELINES", "PROBE_COLUMNS", "baseline_predictions", "bootstrap_weights", "role_rows"]

PROBE_COLUMNS = ("layer", "role", "metric", "value", "ci_low", "ci_high", "n")
"""Columns of ``probe.csv`` (long format: one row per layer x role x metric)."""

BASELINES = ("baseline_empty", "baseline_majority", "baseline_sibling_lookup")
"""Reference predictions reported beside every exact-match metric: every label false (the queried box holds
nothing), the most frequent training label set, and -- using no activations at all -- the label set of the
closest training state of the same scenario (same queried box), else the majority set."""


def bootstrap_weights(groups: Sequence[str], resamples: int, seed: int) -> Tensor:
    """``[R, n]`` multiplicity of each test row when whole test states are resampled with replacement.

    Args:
        groups: The unit (scenario or state) of each test row.
        resamples: Number of resamples ``R``.
        seed: Seed of the draw (offset, so it differs from the split's stream).

    Returns:
        Row weights, float64.
    """
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
    same_box = target.name in ("box_contents", "prior", "mention", "tags_box")
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


def role_rows(role: str, layers: Sequence[int], task: ProbeResult, control: ProbeResult | None,
               y_control: Tensor | None, random: ProbeResult | None, target: ProbeTarget, split: Split,
               weights: Tensor | None, units: Sequence[str] | None = None,
               baselines: Mapping[str, Tensor] | None = None) -> list[dict[str, Any]]:
    """The rows of ``probe.csv`` for one role: every metric at every layer, on the test split.

    Args:
        role: The token role probed.
        layers: Layer of each entry of the results' layer dimension.
        task: The task probe.
        control: The control-task probe, or ``None``.
        y_control: The control-task labels of every row, or ``None``.
        random: The random-model probe, or ``None``.
        target: The probe target (labels, numops, objects, scenarios).
        split: The split shared by the probes.
        weights: ``[R, n_test]`` bootstrap row weights (:func:`bootstrap_weights`), or ``None`` for no intervals
            on the averaged metrics.
        units: The split unit of every row (default: the scenarios); intervals cluster by it.
        baselines: Test-row predictions per baseline (:func:`baseline_predictions`), scored beside the probe.

    Returns:
        One dict per layer x metric (columns :data:`PROBE_COLUMNS`).

    Raises:
        EntitylensError: No label column has both classes in the test split.
    """
    out: list[dict[str, Any]] = []
    te = split.test
    y = target.labels[te]
    n = len(te)
    units = list(target.scenarios) if units is None else list(units)
    test_units = [units[i] for i in te.tolist()]
    correct = example_correct(task, target, te)  # [L, n] exact set match (tags: every scored entry)
    out += _clustered_rows(role, layers, "exact_match", correct, test_units)
    numops_all = target.numops[te]
    strata = sorted(set(numops_all.tolist())) if bool((numops_all >= 0).all()) else []
    for name, pred in (baselines or {}).items():
        ok = _baseline_correct(pred, y, target, te)[None].expand(len(layers), -1)
        out += _clustered_rows(role, layers, name, ok, test_units)
        for label, mask in _numops_masks(numops_all, strata):
            out += _clustered_rows(role, layers, f"{name}_{label}", ok[:, mask],
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
        out += _clustered_rows(role, layers, "random_model_exact_match",
                               example_correct(random, target, te), test_units)
    if split.heldout_objects and split.test_heldout is not None:
        seen_ok = (task.predictions("test").bool() == y)[..., ~held_cols].all(-1)  # [L, n]
        for flag, name in ((True, "exact_match_rows_with_heldout"), (False, "exact_match_rows_without_heldout")):
            mask = split.test_heldout == flag
            if int(mask.sum()):
                out += _clustered_rows(role, layers, name, seen_ok[:, mask],
                                       [u for u, m in zip(test_units, mask.tolist()) if m])
    for label, mask in _numops_masks(numops_all, strata):
        out += _clustered_rows(role, layers, f"exact_match_{label}", correct[:, mask],
                               [u for u, m in zip(test_units, mask.tolist()) if m])
    return out + family_rows(role, layers, task, target, te, test_units, _clustered_rows)


def _baseline_correct(pred: Tensor, y: Tensor, target: ProbeTarget, te: Tensor) -> Tensor:
    """Exact match of a baseline's predicted label sets (tags: every scored entry's class right)."""
    if not target.column_groups or target.scored is None:
        return (pred == y).all(-1)
    n = len(y)
    ok = (pred.reshape(n, -1, 3) == y.reshape(n, -1, 3)).all(-1)
    return (ok | ~target.scored[te]).all(-1)


def _numops_masks(numops: Tensor, strata: Sequence[int]) -> list[tuple[str, Tensor]]:
    """Test-row masks per numops stratum (``numops=k``), then ``numops>=1`` when rows of 0 and of >= 1 exist.

    ``numops>=1`` pools every row whose queried box an operation changed: the rows whose answer needs the
    *updated* state, against ``numops=0`` where copying the initial description suffices.
    """
    masks = [(f"numops={int(s)}", numops == s) for s in strata]
    if strata and min(strata) == 0 and max(strata) >= 1:
        masks.append(("numops>=1", numops >= 1))
    return masks

