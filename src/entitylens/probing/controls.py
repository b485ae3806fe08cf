"""Probe controls: a Hewitt & Liang (2019) control task, and the same probe on a random-init model.

* **Control task.** Each example has a *type* (e.g. the object word at the probed token). Every type gets
  one label, drawn once from the empirical distribution of the task's labels, and every example of that
  type carries it. A probe can only solve this by memorising types, so ``selectivity = task - control``
  measures how much of the task accuracy is more than type memorisation.
* **Random model.** The same probe, split and configuration on activations of a randomly initialised model
  of the same architecture (the caching layer produces them); ``task - random`` measures what training
  added over architecture + token identity.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from entitylens.errors import EntitylensError
from entitylens.probing.linear import ProbeConfig, ProbeResult, fit_probes
from entitylens.probing.splits import GroupsLike, Split, group_codes, split_by_group

__all__ = ["ControlsResult", "control_labels", "metric_difference", "run_controls"]


def control_labels(labels: Tensor, types: Tensor | np.ndarray | Sequence[object], seed: int = 0) -> Tensor:
    """Control-task labels: one label per type, drawn from the empirical label distribution.

    The draw depends only on ``seed``, the set of type values and the label distribution -- not on the
    order of the examples -- so the same type always gets the same control label.

    Args:
        labels: ``[n]`` class indices or ``[n, target]`` 0/1 rows (a row is drawn as a whole, so a
            multi-label control keeps realistic label sets).
        types: ``[n]`` type of each example (ints or strings).
        seed: Seed of the draw.

    Returns:
        Control labels, same shape and dtype as ``labels``.
    """
    y = torch.as_tensor(labels) if not isinstance(labels, Tensor) else labels
    codes = group_codes(types)
    if y.ndim not in (1, 2) or y.shape[0] != len(codes):
        raise EntitylensError(f"labels {tuple(y.shape)} and types ({len(codes)}) must have one entry per example; "
                              "align them")
    values, inverse, counts = torch.unique(y.cpu(), dim=0, return_inverse=True, return_counts=True)
    num_types = int(codes.max()) + 1
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    draw = torch.multinomial(counts.double(), num_types, replacement=True, generator=gen)  # label per type
    del inverse
    return values[draw[codes]].to(y.dtype).to(y.device)


def _default_metric(result: ProbeResult) -> str:
    return "balanced_accuracy" if result.kind == "binary" else "accuracy"


def metric_difference(a: ProbeResult, b: ProbeResult, metric: str | None = None,
                      part: Literal["train", "test"] = "test") -> Float[Tensor, " layer"]:
    """Per-layer ``metric(a) - metric(b)`` (e.g. task minus control = selectivity).

    Args:
        a: First result.
        b: Second result (same layers).
        metric: A key of :meth:`ProbeResult.metrics` (default: balanced accuracy for binary targets,
            accuracy for a class index).
        part: ``"test"`` or ``"train"``.

    Returns:
        ``[layer]`` difference.
    """
    m = metric or _default_metric(a)
    ma, mb = a.metrics(part), b.metrics(part)
    if m not in ma or m not in mb:
        raise EntitylensError(f"metric {m!r} is not available for both probes; use one of {sorted(set(ma) & set(mb))}")
    if ma[m].shape != mb[m].shape:
        raise EntitylensError(f"probes disagree in shape for {m!r} ({tuple(ma[m].shape)} vs {tuple(mb[m].shape)}); "
                              "compare probes of the same layers and targets")
    return ma[m] - mb[m]


@dataclass(frozen=True)
class ControlsResult:
    """Task probe, control-task probe and (optionally) random-model probe on one split.

    Attributes:
        task: Probe on the real labels.
        control: Probe on :func:`control_labels`.
        random_model: Probe on a random-init model's activations, or ``None``.
        metric: The metric compared.
    """

    task: ProbeResult
    control: ProbeResult
    random_model: ProbeResult | None
    metric: str

    @property
    def selectivity(self) -> Float[Tensor, " layer"]:
        """Task minus control-task metric per layer (test split)."""
        return metric_difference(self.task, self.control, self.metric)

    @property
    def over_random(self) -> Float[Tensor, " layer"] | None:
        """Task minus random-model metric per layer (test split), or ``None``."""
        if self.random_model is None:
            return None
        return metric_difference(self.task, self.random_model, self.metric)

    def rows(self) -> list[dict[str, float | int | str | None]]:
        """One dict per layer: task, control, selectivity, random-model and difference (for CSV/JSON)."""
        t = self.task.metrics()[self.metric]
        c = self.control.metrics()[self.metric]
        r = self.random_model.metrics()[self.metric] if self.random_model is not None else None
        out: list[dict[str, float | int | str | None]] = []
        for layer in range(len(t)):
            out.append({
                "layer": layer, "metric": self.metric, "task": float(t[layer]), "control": float(c[layer]),
                "selectivity": float(t[layer] - c[layer]),
                "random_model": None if r is None else float(r[layer]),
                "over_random": None if r is None else float(t[layer] - r[layer]),
            })
        return out


def run_controls(
    features: Float[Tensor, "layer n d_model"],
    labels: Tensor,
    groups: GroupsLike,
    types: Tensor | np.ndarray | Sequence[object],
    config: ProbeConfig | None = None,
    *,
    random_features: Float[Tensor, "layer n d_model"] | None = None,
    split: Split | None = None,
    metric: str | None = None,
) -> ControlsResult:
    """Fit the task probe, the control-task probe and optionally the random-model probe on one split.

    Args:
        features: ``[layer, n, d_model]`` activations of the trained model.
        labels: Task labels (as for :func:`~entitylens.probing.linear.fit_probes`).
        groups: ``[n]`` group (state) per example.
        types: ``[n]`` type per example for the control task (e.g. the object at the probed token).
        config: Probe configuration (shared by all three probes).
        random_features: Same examples through a randomly initialised model of the same architecture.
        split: Train/test split (default: by group from ``config``).
        metric: Metric to compare (default: balanced accuracy for binary targets, else accuracy).

    Returns:
        The :class:`ControlsResult`.
    """
    cfg = config or ProbeConfig()
    if split is None:
        split = split_by_group(groups, cfg.test_fraction, cfg.seed)
    if random_features is not None and tuple(random_features.shape[:2]) != tuple(features.shape[:2]):
        raise EntitylensError(f"random_features {tuple(random_features.shape)} must cover the same layers and "
                              f"examples as features {tuple(features.shape)}; cache both from the same prompts")
    task = fit_probes(features, labels, groups, cfg, split=split)
    control = fit_probes(features, control_labels(labels, types, cfg.seed), groups, cfg, split=split)
    rand = fit_probes(random_features, labels, groups, cfg, split=split) if random_features is not None else None
    return ControlsResult(task=task, control=control, random_model=rand, metric=metric or _default_metric(task))
