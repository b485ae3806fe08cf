"""Calibrating ridge probes: a scale and class biases fitted by (class-weighted) log-loss on the training split.

``ProbeConfig(estimator="ridge", calibrate=True)``. A ridge probe's scores rank well but sit on no
probability scale, and their argmax is a fixed decision (plain, or balanced with the prior-scaled coding).
Calibration turns them into log-odds by fitting, per layer, the few numbers that map a score to a logit,
by the same (class-weighted) cross-entropy a logistic or softmax probe minimises:

* one categorical variable per column group (the ternary tags: three columns per entry) or a class label:
  ``logit_c = a * score_c + b_c`` -- one scale ``a`` per layer and one bias per class (``b_0 = 0``), shared
  by every group: temperature plus class-prior correction, a softmax over each group's columns;
* independent 0/1 columns: ``logit = a_t * score_t + b_t`` per column (Platt scaling), a sigmoid.

The loss is convex in ``(a, b)``; damped Newton steps (``K`` parameters per problem, the exact Hessian from
a few reductions over the scores) reach the optimum in a handful of iterations, the first ones on every
16th row when there are many, the per-row arithmetic in float32 (memory-bound; parameters and Hessians in
float64): on the ternary tags of SmolLM2's 30 layers (81,000 entries per layer) about 0.7 s, half the ridge
fit's time. A penalty ``1e-6 |theta|^2 / 2`` keeps the optimum finite when the training scores separate the
classes. Class weights: with ``class_weight="balanced"``, ``n / (K n_c)`` per class -- pooled over every
entry of every group for column groups (Tang et al.'s class-weighted loss exactly), per column for
independent columns, over the classes for a class label; else unit weights.

The fitted map is folded into the probe: ``coef`` and ``intercept`` are scaled and shifted, so the probe
stays one linear map (for column groups: to the softmax logits of each group). Its reported logits
(``train_logits`` / ``test_logits``, ``decision_function``) are calibrated log-odds: for column groups each
column's ``log(p_c / (1 - p_c))`` of the group's softmax (:func:`group_log_odds`), so a column's sigmoid is
its class's probability and ``> 0`` means ``p_c > 1/2``; a group's argmax is the softmax's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from entitylens.probing.prepare import Labels, Outputs, class_weights
from entitylens.probing.ridge import column_ranks, group_index

__all__ = ["calibrate_outputs", "fit_scale_bias", "group_log_odds"]

_PENALTY = 1e-6
_WORK = {"float32": torch.float32, "float64": torch.float64}
_MIN_SUBSET = 2048  # rows: below 16 x this, no warm start on a subset


class _Problem:
    """The rows of a batch of calibration problems, class-major (``[P, K, m]``: long contiguous passes).

    The per-row arithmetic and the (cascade) sums over rows run in ``dtype`` (float32 by default: it is
    memory-bound); the parameters, gradient and Hessian are float64.
    """

    def __init__(self, scores: Tensor, y: Tensor, weight: Tensor, dtype: torch.dtype) -> None:
        P, K, m = scores.shape
        self.s = scores.to(dtype).contiguous()  # [P, K, m]
        self.s2 = self.s.square()
        self.y = y.long().expand(P, m)[:, None, :]  # [P, 1, m]
        w = weight.double().expand(P, m)
        self.wn = (w / w.sum(-1, keepdim=True).clamp_min(1e-300)).to(dtype)  # [P, m]: the loss is a weighted mean
        self.sy = self.s.gather(1, self.y)[:, 0]  # [P, m] the true class's score
        wd = self.wn.double()
        self.wy = torch.stack([(wd * (self.y[:, 0] == k)).sum(-1) for k in range(K)], -1)  # [P, K] class fractions
        self.wsy = (wd * self.sy.double()).sum(-1)  # [P]

    def _sum(self, t: Tensor, dims: int | tuple[int, ...] = -1) -> Tensor:
        return t.sum(dims).double()  # torch's cascade summation: ~1e-7 relative in float32, 40x a float64 cast

    def evaluate(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        """``[P]`` loss (weighted mean cross-entropy plus the penalty) and ``[P, K, m]`` probabilities at ``theta``."""
        th = theta.to(self.s.dtype)
        b = torch.cat([torch.zeros_like(th[:, :1]), th[:, 1:]], -1)
        z = torch.addcmul(b[:, :, None], th[:, :1, None], self.s)
        mx = z.amax(1, keepdim=True)
        e = z.sub_(mx).exp_()
        S = e.sum(1, keepdim=True)
        zy = torch.addcmul(b.gather(1, self.y[:, 0]), th[:, :1], self.sy)
        nll = S.log().add_(mx)[:, 0].sub_(zy)
        loss = self._sum(self.wn * nll) + 0.5 * _PENALTY * theta.square().sum(-1)
        return loss, e.div_(S)

    def grad_hess(self, theta: Tensor, p: Tensor) -> tuple[Tensor, Tensor]:
        """Gradient ``[P, K]`` and exact Hessian ``[P, K, K]`` of the loss, given the probabilities ``p``."""
        P, K, _ = p.shape
        wp = p * self.wn[:, None]  # [P, K, m]
        ps = (p * self.s).sum(1)  # [P, m]: the mean score under p
        wps = wp @ ps[:, :, None]  # [P, K, 1]
        mp = self._sum(wp)  # [P, K]
        g = torch.empty(P, K, dtype=torch.float64, device=p.device)
        g[:, 0] = wps.sum((1, 2)).double() - self.wsy
        g[:, 1:] = mp[:, 1:] - self.wy[:, 1:]
        H = torch.empty(P, K, K, dtype=torch.float64, device=p.device)
        H[:, 0, 0] = self._sum(wp * self.s2, (1, 2)) - self._sum(self.wn * ps.square())
        cross = self._sum(wp[:, 1:] * self.s[:, 1:]) - wps[:, 1:, 0].double()
        H[:, 0, 1:] = cross
        H[:, 1:, 0] = cross
        H[:, 1:, 1:] = torch.diag_embed(mp[:, 1:]) - (wp[:, 1:] @ p[:, 1:].transpose(1, 2)).double()
        eye = torch.eye(K, dtype=torch.float64, device=p.device)
        return g + _PENALTY * theta, H + _PENALTY * eye


def fit_scale_bias(scores: Float[Tensor, "P m K"], y: Int[Tensor, "*P m"], weight: Float[Tensor, "*P m"],
                   max_iter: int = 50, tol: float = 1e-7, dtype: torch.dtype = torch.float32
                   ) -> Float[Tensor, "P K"]:
    """Fit ``logit_c = a * score_c + b_c`` (``b_0 = 0``) by weighted cross-entropy, for a batch of problems.

    Args:
        scores: ``[P, m, K]`` the scores of each row's ``K`` classes, per problem.
        y: ``[P, m]`` (or ``[m]``, shared) the true class of each row.
        weight: ``[P, m]`` (or ``[m]``) nonnegative row weights.
        max_iter: Newton iterations at most.
        tol: Stop when every problem's max-abs gradient (of the weighted *mean* loss) is below this.
        dtype: Dtype of the per-row arithmetic and its sums (the parameters and Hessians are float64).

    Returns:
        ``[P, K]`` float64 ``(a, b_1, .., b_{K-1})`` per problem (damped Newton from ``a = 1, b = 0``).
    """
    return _newton(_Problem(scores.transpose(1, 2), y, weight, dtype), max_iter, tol, dtype)


def _subset(prob: _Problem, stride: int) -> _Problem:
    """Every ``stride``-th row of ``prob`` (weights renormalised)."""
    w = prob.wn[:, ::stride]
    return _Problem(prob.s[..., ::stride], prob.y[:, 0, ::stride], w, prob.s.dtype)


def _newton(prob: _Problem, max_iter: int, tol: float, dtype: torch.dtype, theta: Tensor | None = None) -> Tensor:
    """Damped Newton on a batch of problems (from ``theta``, default ``a = 1, b = 0``); returns ``[P, K]``.

    With many rows, the first iterations run on every 16th row (statistically as good a start for the
    last, quadratically converging, full-data steps) -- a third of the cost on the probe family's targets.
    """
    P, K, m = prob.s.shape
    if theta is None:
        theta = torch.zeros(P, K, dtype=torch.float64, device=prob.s.device)
        theta[:, 0] = 1.0
        if m >= 16 * _MIN_SUBSET:
            theta = _newton(_subset(prob, 16), max_iter, tol, dtype, theta)
    active = torch.ones(P, dtype=torch.bool, device=theta.device)
    resolve = 8 * torch.finfo(dtype).eps
    f, p = prob.evaluate(theta)
    for _ in range(max_iter):
        g, H = prob.grad_hess(theta, p)
        step = torch.linalg.solve(H, g)
        dec = (g * step).sum(-1)  # the Newton decrement: twice the predicted f - f*
        active &= (g.abs().amax(-1) > tol) & (dec > 0)
        # inside Newton's quadratic region (or below what the loss resolves in `dtype`): full step, then stop
        final = active & (dec <= torch.clamp(resolve * f.abs(), min=1e-9))
        theta = torch.where(final[:, None], theta - step, theta)
        active &= ~final
        if not bool(active.any()):
            break
        t = torch.ones(P, dtype=torch.float64, device=theta.device)
        todo = active.clone()
        for _ in range(12):  # backtracking (Armijo) per problem; the full step is nearly always taken
            cand = theta - t[:, None] * step
            fc, pc = prob.evaluate(cand)
            ok = todo & (fc <= f - 1e-4 * t * dec)
            theta = torch.where(ok[:, None], cand, theta)
            f = torch.where(ok, fc, f)
            p = torch.where(ok[:, None, None], pc, p)
            todo &= ~ok
            if not bool(todo.any()):
                break
            t = torch.where(todo, t / 2, t)
        active &= ~todo  # no decrease along the Newton direction: at the optimum to working precision
        if not bool(active.any()):
            break
    return theta


def group_log_odds(logits: Tensor, column_groups: Sequence[int], dtype: torch.dtype = torch.float64) -> Tensor:
    """Per column, ``log(p / (1 - p))`` of ``p`` the softmax over its group's logits (last dim = columns).

    Computed in ``dtype``, returned in ``logits``'s dtype.

    What calibrated grouped probes report as logits: each column's sigmoid is its class's softmax
    probability, ``> 0`` means ``p > 1/2``, and a group's argmax is unchanged (the map is monotone).
    """
    idx = group_index(column_groups).to(logits.device)  # [group, class] -> column
    inplace = bool(torch.equal(idx.flatten(), torch.arange(idx.numel(), device=idx.device)))  # e.g. the tags
    z = logits.to(dtype)
    zz = z.reshape(*z.shape[:-1], *idx.shape) if inplace else z[..., idx]
    others = [zz.roll(k, -1) for k in range(1, idx.shape[1])]  # each column's group-mates, one shift each
    m = others[0]
    for o in others[1:]:
        m = torch.maximum(m, o)
    total = torch.zeros_like(m)
    for o in others:
        total += (o - m).exp_()
    lo = zz - m - total.log_()  # log(p / (1 - p)) = z_c - logsumexp of the others (no cancellation)
    if inplace:
        return lo.reshape(z.shape).to(logits.dtype)
    out = torch.empty_like(z)
    out[..., idx] = lo
    return out.to(logits.dtype)


def calibrate_outputs(res: Outputs, lab: Labels, y_tr: Tensor, class_weight: str | None,
                      column_groups: Sequence[int] = (), dtype: str = "float64") -> None:
    """Fit the calibration on ``res.train_logits`` and fold it into ``res`` in place (see the module docstring).

    Args:
        res: The ridge fit's outputs (``coef``, ``intercept``, train and test logits, standardised space).
        lab: The encoded labels.
        y_tr: The training rows' labels (``lab.y[train]``).
        class_weight: ``None`` or ``"balanced"``.
        column_groups: One-vs-rest column groups of 2-D labels (one categorical variable per group).
        dtype: ``ProbeConfig.dtype``: the precision of the reported grouped log-odds.
    """
    L, n, out = res.train_logits.shape
    if lab.kind != "binary" or column_groups:
        if lab.kind == "binary":
            idx = group_index(column_groups).T  # [class, group] -> column
            K = idx.shape[0]
            s = res.train_logits.float()[:, :, idx].permute(0, 2, 1, 3).reshape(L, K, -1)  # [L, K, rows x groups]
            cls = y_tr[:, idx].to(torch.uint8).argmax(1).reshape(-1)
            col_rank = column_ranks(column_groups)
        else:
            K = out
            s, cls, col_rank = res.train_logits.float().transpose(1, 2), y_tr.long(), torch.arange(K)
        # balanced: n / (K n_c) over every row (and group): their weights (the loss is a weighted mean)
        w = class_weights(class_weight, "multiclass", cls, K)[0][:, 0]
        theta = _newton(_Problem(s, cls, w, torch.float32), 50, 1e-7, torch.float32)  # [L, K]
        a = theta[:, :1].expand(L, out)
        b = torch.cat([torch.zeros(L, 1, dtype=torch.float64), theta[:, 1:]], -1)[:, col_rank]
    else:
        y = y_tr.long().T  # [out, n]
        per_column = class_weights(class_weight, "binary", y_tr, 2)[1]  # balanced: per column; else None
        w = torch.ones(out, n, dtype=torch.float64) if per_column is None else per_column.T  # [out, n]
        a = torch.empty(L, out, dtype=torch.float64)
        b = torch.empty(L, out, dtype=torch.float64)
        for layer in range(L):  # one Platt problem per column; a layer at a time bounds the memory
            sc = res.train_logits[layer].T.double()  # [out, n]
            theta = fit_scale_bias(torch.stack([torch.zeros_like(sc), sc], -1), y, w)
            a[layer], b[layer] = theta[:, 0], theta[:, 1]
    res.coef.mul_(a[:, None, :])
    res.intercept.mul_(a).add_(b)
    res.train_logits.mul_(a[:, None, :]).add_(b[:, None, :])
    res.test_logits.mul_(a[:, None, :]).add_(b[:, None, :])
    if column_groups and lab.kind == "binary":  # report each column's log-odds within its group
        work = _WORK[dtype]  # the fit's own precision (its logits come from products in it)
        res.train_logits.copy_(group_log_odds(res.train_logits, column_groups, work))
        res.test_logits.copy_(group_log_odds(res.test_logits, column_groups, work))
