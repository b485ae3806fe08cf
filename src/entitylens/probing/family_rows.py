"""The extra rows of ``probe.csv`` for the family targets (:mod:`entitylens.probing.family`).

* ternary tags: predictions decided per (box, object) entry by the largest of its three one-vs-rest logits;
  ``tag_accuracy`` over the scored entries (objects named so far), ``tag_recall_<class>`` per class, and
  ``exact_match`` = every scored entry of an example right;
* ``global`` / ``incremental``: exact match of one box's contents, pooled over the focus boxes (the queried
  box; the boxes the operation changed) and over the other boxes, and per box (``exact_match_box=k``);
* every target with strata: ``exact_match_<stratum>=<value>`` (the mention's kind, operations read).

Intervals are clustered Wilson intervals over the split units, as for every exact-match row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool
from torch import Tensor

from entitylens.probing.linear import ProbeResult
from entitylens.probing.targets import ProbeTarget
from entitylens.probing.world import TAG_CLASSES

__all__ = ["decided", "example_correct", "family_rows"]

Rows = Callable[[str, Sequence[int], str, Tensor, Sequence[str]], list[dict[str, Any]]]


def decided(task: ProbeResult, target: ProbeTarget, part: str = "test") -> Bool[Tensor, "layer n column"]:
    """Predicted labels: per column (binary targets), or per tag entry by the largest of its three logits."""
    if not target.column_groups:
        return task.predictions(part).bool()  # type: ignore[arg-type]
    logits = task.test_logits if part == "test" else task.train_logits
    L, n, C = logits.shape
    cls = logits.reshape(L, n, C // 3, 3).argmax(-1)
    return F.one_hot(cls, 3).bool().reshape(L, n, C)


def _entry_correct(task: ProbeResult, target: ProbeTarget, y: Tensor) -> Tensor:
    """``[layer, n, entry]`` whether each tag entry's class is right."""
    pred = decided(task, target)
    L, n, C = pred.shape
    return (pred.reshape(L, n, C // 3, 3) == y.reshape(n, C // 3, 3)).all(-1)


def example_correct(task: ProbeResult, target: ProbeTarget, test_rows: Tensor) -> Bool[Tensor, "layer n"]:
    """Exact match per test example: the whole label set (binary), or every scored tag entry (tags)."""
    if not target.column_groups:
        return task.correct("test")
    assert target.scored is not None
    ok = _entry_correct(task, target, target.labels[test_rows])
    return (ok | ~target.scored[test_rows]).all(-1)


def family_rows(role: str, layers: Sequence[int], task: ProbeResult, target: ProbeTarget, test_rows: Tensor,
                test_units: Sequence[str], clustered: Rows) -> list[dict[str, Any]]:
    """The family-specific rows of one role (see the module docstring); ``[]`` for other targets."""
    out: list[dict[str, Any]] = []
    y = target.labels[test_rows]
    if target.column_groups:
        assert target.scored is not None
        ok = _entry_correct(task, target, y)  # [L, n, entry]
        scored = target.scored[test_rows]
        cls = y.reshape(len(test_rows), -1, 3).int().argmax(-1)  # [n, entry]
        units = [u for u, k in zip(test_units, scored.sum(-1).tolist()) for _ in range(k)]
        flat = ok[:, scored]
        out += clustered(role, layers, "tag_accuracy", flat, units)
        for c, name in enumerate(TAG_CLASSES):
            mask = scored & (cls == c)
            if int(mask.sum()):
                cu = [u for u, k in zip(test_units, mask.sum(-1).tolist()) for _ in range(k)]
                out += clustered(role, layers, f"tag_recall_{name}", ok[:, mask], cu)
    elif target.column_boxes and min(target.column_boxes) >= 0 and target.focus:
        pred = decided(task, target)
        boxes = torch.tensor(target.column_boxes)
        per_box = {}
        for b in sorted(set(target.column_boxes)):
            cols = boxes == b
            per_box[b] = (pred[..., cols] == y[:, cols]).all(-1)  # [L, n]
        focus = [target.focus[i] for i in test_rows.tolist()]
        names = ("queried_box", "other_boxes") if target.name == "global" else ("changed_boxes", "unchanged_boxes")
        for name, inside in zip(names, (True, False)):
            parts, units = [], []
            for b, ok in per_box.items():
                mask = torch.tensor([(b in f) == inside for f in focus])
                parts.append(ok[:, mask])
                units += [u for u, m in zip(test_units, mask.tolist()) if m]
            out += clustered(role, layers, f"exact_match_{name}", torch.cat(parts, 1), units)
        for b, ok in per_box.items():
            out += clustered(role, layers, f"exact_match_box={b}", ok, test_units)
    correct = example_correct(task, target, test_rows)
    for name, values in sorted(target.strata.items()):
        vals = [values[i] for i in test_rows.tolist()]
        for v in sorted(set(vals), key=lambda x: (len(x), x)):
            mask = torch.tensor([x == v for x in vals])
            out += clustered(role, layers, f"exact_match_{name}={v}", correct[:, mask],
                             [u for u, m in zip(test_units, mask.tolist()) if m])
    return out
