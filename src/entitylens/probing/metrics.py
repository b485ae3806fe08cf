"""Probe metrics: accuracy, balanced accuracy, F1, exact-set match, intervals, numops-stratified accuracy, CV scores.

Box contents are sparse -- most (box, object) pairs are 0 -- so plain accuracy of a binary probe is
close to 1 for a probe that always says "no". Report it, but read balanced accuracy (mean of the
true-positive and true-negative rates), F1 of the positive class and, for the queried box's object set,
the exact-set match (every object's membership right, the probe analogue of a correct box).

All functions take predictions with arbitrary leading batch dimensions (typically ``layer``) and
targets without them; examples are on the dimension named ``n``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from entitylens.errors import EntitylensError

__all__ = [
    "BinaryCounts",
    "StratifiedAccuracy",
    "accuracy",
    "balanced_accuracy",
    "binary_counts",
    "exact_match",
    "f1_score",
    "heldout_scores",
    "interval",
    "micro_f1",
    "stratified_accuracy",
    "wald_interval",
    "wilson_interval",
]


def _check_n(pred: Tensor, target: Tensor, dim: int) -> None:
    if pred.shape[pred.ndim + dim if dim < 0 else dim] != target.shape[target.ndim + dim if dim < 0 else dim]:
        raise EntitylensError(f"predictions {tuple(pred.shape)} and targets {tuple(target.shape)} disagree on the "
                              "number of examples; pass predictions for exactly the target rows")


def accuracy(pred: Tensor, target: Tensor) -> Float[Tensor, "*batch"]:
    """Fraction of examples whose prediction equals the target.

    Args:
        pred: ``[*batch, n]`` predicted labels (class indices or booleans).
        target: ``[n]`` true labels.

    Returns:
        ``[*batch]`` accuracy.
    """
    _check_n(pred, target, -1)
    if pred.shape[-1] == 0:
        raise EntitylensError("accuracy of zero examples is undefined; evaluate on a non-empty set")
    return (pred == target.to(pred.device)).double().mean(-1)


@dataclass(frozen=True)
class BinaryCounts:
    """Confusion counts of binary predictions, summed over examples.

    Attributes:
        tp: True positives ``[*batch, target]``.
        fp: False positives.
        fn: False negatives.
        tn: True negatives.
    """

    tp: Int[Tensor, "*batch target"]
    fp: Int[Tensor, "*batch target"]
    fn: Int[Tensor, "*batch target"]
    tn: Int[Tensor, "*batch target"]


def binary_counts(pred: Bool[Tensor, "*batch n target"], target: Bool[Tensor, "n target"]) -> BinaryCounts:
    """Confusion counts per target column.

    Args:
        pred: ``[*batch, n, target]`` predicted memberships.
        target: ``[n, target]`` true memberships.

    Returns:
        The :class:`BinaryCounts`.
    """
    _check_n(pred, target, -2)
    p = pred.to(torch.bool)
    t = target.to(torch.bool).to(p.device)
    return BinaryCounts(
        tp=(p & t).sum(-2), fp=(p & ~t).sum(-2), fn=(~p & t).sum(-2), tn=(~p & ~t).sum(-2)
    )


def balanced_accuracy(
    pred: Bool[Tensor, "*batch n target"], target: Bool[Tensor, "n target"]
) -> Float[Tensor, "*batch target"]:
    """Balanced accuracy per target: mean of the recall of each class present in the targets.

    As scikit-learn's ``balanced_accuracy_score``: when a target column has only one class, its
    balanced accuracy is that class's recall.

    Args:
        pred: ``[*batch, n, target]`` predicted memberships.
        target: ``[n, target]`` true memberships.

    Returns:
        ``[*batch, target]`` balanced accuracy.
    """
    c = binary_counts(pred, target)
    pos = (c.tp + c.fn).double()
    neg = (c.tn + c.fp).double()
    tpr = c.tp.double() / pos.clamp_min(1)
    tnr = c.tn.double() / neg.clamp_min(1)
    num = torch.where(pos > 0, tpr, 0.0) + torch.where(neg > 0, tnr, 0.0)
    den = (pos > 0).double() + (neg > 0).double()
    return num / den.clamp_min(1)


def f1_score(pred: Bool[Tensor, "*batch n target"], target: Bool[Tensor, "n target"]) -> Float[Tensor, "*batch target"]:
    """F1 of the positive class per target, ``2tp / (2tp + fp + fn)``; 0 when that is 0/0 (scikit-learn's default).

    Args:
        pred: ``[*batch, n, target]`` predicted memberships.
        target: ``[n, target]`` true memberships.

    Returns:
        ``[*batch, target]`` F1.
    """
    c = binary_counts(pred, target)
    den = (2 * c.tp + c.fp + c.fn).double()
    return torch.where(den > 0, 2 * c.tp.double() / den.clamp_min(1), 0.0)


def micro_f1(pred: Bool[Tensor, "*batch n target"], target: Bool[Tensor, "n target"]) -> Float[Tensor, "*batch"]:
    """F1 pooled over all targets and examples (micro average).

    Args:
        pred: ``[*batch, n, target]`` predicted memberships.
        target: ``[n, target]`` true memberships.

    Returns:
        ``[*batch]`` micro F1.
    """
    c = binary_counts(pred, target)
    tp, fp, fn = c.tp.sum(-1), c.fp.sum(-1), c.fn.sum(-1)
    den = (2 * tp + fp + fn).double()
    return torch.where(den > 0, 2 * tp.double() / den.clamp_min(1), 0.0)


def exact_match(pred: Bool[Tensor, "*batch n target"], target: Bool[Tensor, "n target"]) -> Float[Tensor, "*batch"]:
    """Fraction of examples whose whole predicted set equals the true set (every target right).

    Args:
        pred: ``[*batch, n, target]`` predicted memberships.
        target: ``[n, target]`` true memberships.

    Returns:
        ``[*batch]`` exact-set match rate.
    """
    _check_n(pred, target, -2)
    return (pred.to(torch.bool) == target.to(torch.bool).to(pred.device)).all(-1).double().mean(-1)


def wald_interval(successes: Tensor, total: Tensor, z: float = 1.96) -> tuple[Tensor, Tensor]:
    """Wald interval ``p +- z sqrt(p(1-p)/n)`` (the paper's plots), clipped to [0, 1].

    Args:
        successes: Number of successes (any shape).
        total: Number of trials (broadcastable); entries with 0 trials give NaN.
        z: Normal quantile (1.96 for 95%).

    Returns:
        ``(low, high)``.
    """
    k = torch.as_tensor(successes).double()
    n = torch.as_tensor(total).double()
    p = k / n
    half = z * torch.sqrt(p * (1 - p) / n)
    return (p - half).clamp(0, 1), (p + half).clamp(0, 1)


def wilson_interval(successes: Tensor, total: Tensor, z: float = 1.96) -> tuple[Tensor, Tensor]:
    """Wilson score interval: unlike Wald, sensible at p = 0 or 1 and for small n.

    Args:
        successes: Number of successes (any shape).
        total: Number of trials (broadcastable); entries with 0 trials give NaN.
        z: Normal quantile (1.96 for 95%).

    Returns:
        ``(low, high)``.
    """
    k = torch.as_tensor(successes).double()
    n = torch.as_tensor(total).double()
    p = k / n
    z2 = z * z
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * torch.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return (center - half).clamp(0, 1), (center + half).clamp(0, 1)


def interval(successes: Tensor, total: Tensor, method: Literal["wilson", "wald"] = "wilson",
             z: float = 1.96) -> tuple[Tensor, Tensor]:
    """Dispatch to :func:`wilson_interval` or :func:`wald_interval`."""
    if method == "wilson":
        return wilson_interval(successes, total, z)
    if method == "wald":
        return wald_interval(successes, total, z)
    raise EntitylensError(f"unknown interval method {method!r}; use 'wilson' or 'wald'")


@dataclass(frozen=True)
class StratifiedAccuracy:
    """Accuracy per stratum (e.g. per numops), with confidence intervals.

    Attributes:
        strata: ``[s]`` the distinct stratum values, ascending.
        count: ``[s]`` examples per stratum.
        correct: ``[*batch, s]`` correct examples per stratum.
        accuracy: ``[*batch, s]`` ``correct / count``.
        low: ``[*batch, s]`` interval lower bound.
        high: ``[*batch, s]`` interval upper bound.
        method: Interval method (``"wilson"`` or ``"wald"``).
    """

    strata: Int[Tensor, " s"]
    count: Int[Tensor, " s"]
    correct: Int[Tensor, "*batch s"]
    accuracy: Float[Tensor, "*batch s"]
    low: Float[Tensor, "*batch s"]
    high: Float[Tensor, "*batch s"]
    method: str = "wilson"

    def rows(self) -> list[dict[str, float | int]]:
        """Flatten to one dict per (batch index, stratum), ready for CSV/JSON (batch index as ``layer``)."""
        acc = self.accuracy.reshape(-1, len(self.strata))
        cor = self.correct.reshape(-1, len(self.strata))
        lo = self.low.reshape(-1, len(self.strata))
        hi = self.high.reshape(-1, len(self.strata))
        out: list[dict[str, float | int]] = []
        for b in range(acc.shape[0]):
            for j, s in enumerate(self.strata.tolist()):
                out.append({"layer": b, "stratum": int(s), "n": int(self.count[j]), "correct": int(cor[b, j]),
                            "accuracy": float(acc[b, j]), "low": float(lo[b, j]), "high": float(hi[b, j])})
        return out


def stratified_accuracy(
    correct: Bool[Tensor, "*batch n"],
    strata: Int[Tensor, " n"],
    method: Literal["wilson", "wald"] = "wilson",
    z: float = 1.96,
) -> StratifiedAccuracy:
    """Accuracy split by a per-example stratum such as ``numops``.

    Set probe failures against behavioural failures at the same numops.

    Args:
        correct: ``[*batch, n]`` whether each example was predicted correctly (for a set target, use
            the exact-set match per example).
        strata: ``[n]`` integer stratum per example.
        method: ``"wilson"`` (default) or ``"wald"`` intervals.
        z: Normal quantile (1.96 for 95%).

    Returns:
        The :class:`StratifiedAccuracy`.
    """
    s = torch.as_tensor(strata).to(torch.int64).cpu()
    c = torch.as_tensor(correct).to(torch.bool).cpu()
    if s.ndim != 1 or c.shape[-1] != s.shape[0]:
        raise EntitylensError(f"strata {tuple(s.shape)} must be 1-D with one value per example of correct "
                              f"{tuple(c.shape)}; index numops with the same rows as the predictions")
    values, inv = torch.unique(s, return_inverse=True)
    count = torch.bincount(inv, minlength=len(values))
    flat = c.reshape(-1, s.shape[0]).to(torch.int64)
    cor = torch.zeros(flat.shape[0], len(values), dtype=torch.int64)
    cor.index_add_(1, inv, flat)
    cor = cor.reshape(*c.shape[:-1], len(values))
    acc = cor.double() / count.double()
    lo, hi = interval(cor, count, method, z)
    return StratifiedAccuracy(strata=values, count=count, correct=cor, accuracy=acc, low=lo, high=hi, method=method)


def heldout_scores(logits: Float[Tensor, "B n Q K"], kind: str, y: Tensor, heldout: Bool[Tensor, "n Q"],
                   metric: str) -> Float[Tensor, "B Q"]:
    """Held-out score of each of a batch of probe problems, higher is better: the score that chooses C.

    Args:
        logits: ``[B, n, Q, K]`` logits of ``B`` layers x ``Q`` problems on all ``n`` training rows (``K = 1``
            for binary targets).
        kind: ``"binary"`` (``y`` ``[n, Q]`` 0/1, the target of each problem) or ``"multiclass"`` (``y`` ``[n]``
            class index, -1 for a class unseen in training: never right).
        y: The labels, as above.
        heldout: ``[n, Q]`` the rows held out of each problem's training fold (the rows scored).
        metric: ``"log_loss"`` (minus the mean negative log-likelihood, clipped at ``1e-15`` as
            scikit-learn's), ``"accuracy"`` or ``"balanced_accuracy"``.

    Returns:
        ``[B, Q]`` the mean score over each problem's held-out rows (float64).
    """
    w = heldout.double()
    cnt = w.sum(0).clamp_min(1)
    if kind == "binary":
        a = logits[..., 0]
        if metric == "log_loss":
            ll = F.softplus(a) - y * a
            return -(w * ll.clamp_max(-math.log(1e-15))).sum(1) / cnt
        pred = (a > 0).double()
        if metric == "accuracy":
            return (w * (pred == y).double()).sum(1) / cnt
        pos, neg = (w * y).sum(0), (w * (1 - y)).sum(0)
        tpr = (w * pred * y).sum(1) / pos.clamp_min(1)
        tnr = (w * (1 - pred) * (1 - y)).sum(1) / neg.clamp_min(1)
        den = (pos > 0).double() + (neg > 0).double()
        return (torch.where(pos > 0, tpr, 0.0) + torch.where(neg > 0, tnr, 0.0)) / den.clamp_min(1)
    B, n, Q, K = logits.shape
    yi = y.clamp_min(0).view(1, n, 1, 1).expand(B, n, Q, 1)
    logp = torch.log_softmax(logits, -1).gather(3, yi)[..., 0]
    logp = torch.where((y >= 0).view(1, n, 1), logp, -math.inf)
    if metric == "log_loss":
        return (w * logp.clamp_min(math.log(1e-15))).sum(1) / cnt
    hit = (logits.argmax(-1) == y.view(1, n, 1)).double()
    if metric == "accuracy":
        return (w * hit).sum(1) / cnt
    onehot = F.one_hot(y.clamp_min(0), K).double() * (y >= 0).double()[:, None]  # [n, K]
    per_class = torch.einsum("nq,nk->qk", w, onehot)  # [Q, K]
    hits = torch.einsum("bnq,nq,nk->bqk", hit, w, onehot)
    rec = hits / per_class.clamp_min(1)
    present = (per_class > 0).double()
    return (rec * present).sum(-1) / present.sum(-1).clamp_min(1)
