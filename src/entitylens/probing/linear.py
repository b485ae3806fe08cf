"""Linear probes for every layer at once: L2-regularised logistic regression, C chosen by group CV.

What is fitted (per layer, and per target for binary targets) is exactly scikit-learn's
``LogisticRegression(C=C)`` on standardised features: minimise ``C * sum_i loss_i + ||w||^2 / 2`` with an
unpenalised intercept; binary targets use the logistic loss, a class-index target the multinomial
(softmax) loss over the classes present in training.

How (see ``docs/probing.md``):

* **Exact rotation.** Each layer's standardised training features are rotated into the eigenbasis of their
  Gram matrix, dropping zero-variance directions. The L2 penalty is rotation invariant, so this is exact and
  gives ``d -> rank`` (``min(n, d)``). In that basis the Gram matrix is diagonal, which makes a diagonal
  (Jacobi) preconditioner good.
* **One batched L-BFGS, every problem on its own.** All (layer, fold, C, target) problems advance together,
  so the work per iteration is two batched matrix products (features x directions, features^T x residuals);
  but each problem has its own L-BFGS memory, its own step size and its own stopping test, and converged
  problems are dropped from the batch. The line search needs no extra matrix product: along a direction
  ``d`` the logits move as ``A + t * (Z d)``, so the 1-D objective, slope and curvature are elementwise
  sums, evaluated in float64 (safeguarded Newton to a strong-Wolfe step).
* **Mixed precision.** The feature matrix in the two products, the per-example elementwise work (logits,
  probabilities, residuals: the ``n x problems`` arrays) and the L-BFGS memory are ``config.dtype``
  (float32 by default); every sum over examples (losses, slopes, curvatures) accumulates in float64, and
  weights, gradients, the stopping test and the line-search scalars are float64. The binary loss is
  evaluated as ``-log sigmoid(s * logit)`` with ``s = 2y - 1``: one ``sigmoid`` and one ``log`` per element.
  The line search's approximate-Wolfe tolerance follows the rounding level of ``config.dtype``.
* **Stopping** as scikit-learn's lbfgs: max-abs gradient of the *mean* loss (objective / n), in the
  standardised feature basis, <= ``tol``.
* **Cross-validation.** Folds split by group (state); all folds x Cs x targets are one batch; C is chosen
  per layer (or per target) by the mean held-out score, ties to the smaller C; the refit on the whole
  training split starts from the mean of the fold solutions at the chosen C.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from entitylens._io import atomic_write
from entitylens.errors import EntitylensError
from entitylens.probing import metrics as M
from entitylens.probing.splits import GroupsLike, Split, group_codes, group_folds, split_by_group
from entitylens.progress import progress

__all__ = ["ProbeConfig", "ProbeResult", "fit_probes", "load_probe_result", "save_probe_result"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_MASKED = -1e30  # logit bias of a class absent from a fold's training rows


def _neg_log_sigmoid_sum(sa: Tensor, q: Tensor, w: Tensor) -> Tensor:
    """``sum_i w_i * -log(sigmoid(sa_i))`` over examples (dim 1), given ``q = sigmoid(sa)``.

    One ``log`` per element instead of ``softplus``'s ``exp`` + ``log1p``; below ``sa = -30`` (where ``q``
    would lose relative precision) ``-log(sigmoid(sa)) = -sa`` to within ``1e-13``.
    """
    return -(torch.where(sa > -30.0, torch.log(q), sa).mul_(w)).sum(1, dtype=torch.float64)


@dataclass(frozen=True)
class ProbeConfig:
    """Configuration of :func:`fit_probes`.

    Attributes:
        Cs: Inverse L2 strengths to choose from by cross-validation (one value: no CV).
        folds: Cross-validation folds (split by group).
        cv_metric: Held-out score that chooses C: ``"log_loss"`` (mean negative log-likelihood, default;
            informative for sparse targets), ``"accuracy"`` or ``"balanced_accuracy"``.
        select: ``"layer"``: one C per layer for all targets together; ``"target"``: one per (layer, target).
        test_fraction: Fraction of examples (whole groups) in the test split when no split is given.
        max_iter: L-BFGS iteration limit per problem.
        tol: Stop when the max-abs gradient of the mean loss is <= tol (scikit-learn's lbfgs criterion).
        history: L-BFGS memory (pairs kept).
        seed: Seed of the train/test split and of the folds; the solver itself has no randomness.
        device: Torch device the solver runs on (``"cpu"``, ``"cuda"``, ...).
        dtype: Dtype of the features in the matrix products (``"float32"`` or ``"float64"``); everything
            else is float64.
        standardize: Scale each feature to unit variance on the training split (features are always
            centred, which is exact since the intercept is not penalised).
        max_batch_bytes: Memory budget that decides how many layers are solved in one batch.
        rotate: Rotate each layer's features to their Gram eigenbasis (exact; drops the null space when
            n < d, and makes the diagonal preconditioner good: on residual-stream-like features with a few
            massive directions it cuts L-BFGS iterations 2-6x). Turn off only to compare.
    """

    Cs: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)
    folds: int = 5
    cv_metric: Literal["log_loss", "accuracy", "balanced_accuracy"] = "log_loss"
    select: Literal["layer", "target"] = "layer"
    test_fraction: float = 0.2
    max_iter: int = 1000
    tol: float = 1e-4
    history: int = 10
    seed: int = 0
    device: str = "cpu"
    dtype: Literal["float32", "float64"] = "float32"
    standardize: bool = True
    max_batch_bytes: int = 512 * 2**20
    rotate: bool = True

    def __post_init__(self) -> None:
        try:
            cs = tuple(sorted(float(c) for c in self.Cs))
        except (TypeError, ValueError) as e:
            raise EntitylensError(f"Cs must be numbers, got {self.Cs!r}; use e.g. (0.01, 0.1, 1, 10)") from e
        if not cs or any(not math.isfinite(c) or c <= 0 for c in cs) or len(set(cs)) != len(cs):
            raise EntitylensError(f"Cs must be distinct positive finite numbers, got {self.Cs!r}; "
                                  "use e.g. (0.01, 0.1, 1, 10)")
        object.__setattr__(self, "Cs", cs)
        if len(cs) > 1 and int(self.folds) < 2:
            raise EntitylensError(f"folds must be >= 2 to choose among {len(cs)} Cs, got {self.folds}")
        if self.cv_metric not in ("log_loss", "accuracy", "balanced_accuracy"):
            raise EntitylensError(f"unknown cv_metric {self.cv_metric!r}; use log_loss, accuracy or balanced_accuracy")
        if self.select not in ("layer", "target"):
            raise EntitylensError(f"unknown select {self.select!r}; use 'layer' or 'target'")
        if not 0.0 < float(self.test_fraction) < 1.0:
            raise EntitylensError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if int(self.max_iter) < 1 or int(self.history) < 1:
            raise EntitylensError("max_iter and history must be >= 1; use e.g. max_iter=1000, history=10")
        if not (float(self.tol) > 0 and math.isfinite(self.tol)):
            raise EntitylensError(f"tol must be a positive number, got {self.tol}; use e.g. 1e-4")
        if self.dtype not in _DTYPES:
            raise EntitylensError(f"unknown dtype {self.dtype!r}; use 'float32' or 'float64'")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as e:
            raise EntitylensError(f"invalid device {self.device!r}; use 'cpu' or 'cuda'") from e
        if int(self.max_batch_bytes) < 1:
            raise EntitylensError("max_batch_bytes must be positive")


# ----------------------------------------------------------------------------------------------------------
# The batched solver
# ----------------------------------------------------------------------------------------------------------


class _Problems:
    """``B`` layers x ``Q`` problems x ``K`` outputs of L2 logistic regression on shared features.

    ``Z`` is ``[B, n, r1]`` (rotated features, last column all ones = intercept). A problem ``q`` uses
    sample weights ``fold_w[:, col_fold[q]]``, penalty ``lam[:, q]`` and, for binary problems, target
    column ``col_target[q]``; multiclass problems share the class index ``y`` and mask classes absent
    from their fold with ``bias``.
    """

    def __init__(self, Z: Tensor, kind: str, y: Tensor, fold_w: Tensor, col_fold: Tensor, col_target: Tensor,
                 lam: Tensor, K: int, class_present: Tensor | None, V: Tensor | None, r: int, d: int) -> None:
        self.Z, self.kind, self.y, self.fold_w, self.K, self.V, self.r, self.d = Z, kind, y, fold_w, K, V, r, d
        self.Z2 = Z * Z
        self.edt = Z.dtype  # dtype of the [B, n, Q, K] elementwise work (sums accumulate in float64)
        self.Vw = None if V is None else V.to(Z.dtype)
        self.B, self.n, self.r1 = Z.shape
        self.class_present = class_present
        self.pen = torch.ones(1, self.r1, 1, 1, dtype=torch.float64, device=Z.device)
        self.pen[0, -1] = 0.0
        self.set_cols(col_fold, col_target, lam)

    def set_cols(self, col_fold: Tensor, col_target: Tensor, lam: Tensor) -> None:
        self.col_fold, self.col_target, self.lam = col_fold, col_target, lam
        self.Mw = self.fold_w[:, col_fold]  # [n, Q]
        self.Mwe = self.Mw.to(self.edt)
        self.nvec = self.Mw.sum(0)
        if self.kind == "binary":
            self.Yq = self.y[:, col_target]  # [n, Q]
            # with s = 2y - 1 and q = sigmoid(s * logit): loss = -log q, residual p - y = s (q - 1),
            # curvature p (1 - p) = q (1 - q)
            self.Sg = (2.0 * self.Yq - 1.0).to(self.edt)
            self.SMw = self.Sg * self.Mwe
        else:
            present = self.class_present[col_fold]  # [Q, K]
            self.bias = torch.where(present, 0.0, _MASKED).to(self.edt)
            self.idx = self.y.view(1, self.n, 1, 1).expand(self.B, self.n, len(col_fold), 1)

    def subset(self, keep_b: Tensor, keep_q: Tensor) -> _Problems:
        """A new problem set with layers ``keep_b`` and problems ``keep_q`` (index tensors); self is unchanged."""
        sub = object.__new__(_Problems)
        sub.__dict__.update(self.__dict__)
        sub.Z, sub.Z2 = self.Z[keep_b], self.Z2[keep_b]
        sub.Vw = None if self.Vw is None else self.Vw[keep_b]
        sub.B = len(keep_b)
        sub.set_cols(self.col_fold[keep_q], self.col_target[keep_q], self.lam[keep_b][:, keep_q])
        return sub

    # -- matrix products (the only O(n r Q K) work) --
    def fwd(self, W: Tensor) -> Tensor:
        B, r1, Q, K = W.shape
        out = torch.bmm(self.Z, W.reshape(B, r1, Q * K).to(self.Z.dtype)).view(B, self.n, Q, K)
        if self.kind != "binary":
            out = out + self.bias
        return out

    def bwd(self, R: Tensor) -> Tensor:
        B, n, Q, K = R.shape
        return torch.bmm(self.Z.mT, R.reshape(B, n, Q * K).to(self.Z.dtype)).view(B, self.r1, Q, K).double()

    def grad(self, R: Tensor, W: Tensor) -> Tensor:
        return self.bwd(R) + self.lam[:, None, :, None] * self.pen * W

    # -- elementwise parts, in the work dtype; every sum over examples accumulates in float64 --
    def loss_resid(self, A: Tensor) -> tuple[Tensor, Tensor]:
        """Data loss ``[B, Q]`` and residual ``dloss/dlogit`` ``[B, n, Q, K]`` at logits ``A``."""
        Mw = self.Mwe
        if self.kind == "binary":
            sa = A[..., 0] * self.Sg
            q = torch.sigmoid(sa)
            return _neg_log_sigmoid_sum(sa, q, Mw), (q - 1.0).mul_(self.SMw).unsqueeze(-1)
        lse = torch.logsumexp(A, -1)
        loss = (Mw * (lse - A.gather(3, self.idx)[..., 0])).sum(1, dtype=torch.float64)
        P = torch.exp(A - lse.unsqueeze(-1))
        P.scatter_add_(3, self.idx, torch.full_like(self.idx, -1, dtype=P.dtype))
        return loss, Mw.unsqueeze(-1) * P

    def curvature(self, A: Tensor) -> Tensor:
        """Per-sample diagonal Hessian weights ``[B, n, Q, K]`` (for the Jacobi preconditioner)."""
        if self.kind == "binary":
            p = torch.sigmoid(A[..., 0])
            return (self.Mwe * p * (1 - p)).unsqueeze(-1)
        P = torch.softmax(A, -1)
        return self.Mwe.unsqueeze(-1) * P * (1 - P)

    def line_setup(self, A: Tensor, Bd: Tensor) -> tuple[Tensor, ...]:
        """Per-direction precomputation for :meth:`line` along ``A + t Bd``."""
        if self.kind != "binary":
            return (A, Bd)
        sA = A[..., 0] * self.Sg
        sb = Bd[..., 0] * self.Sg
        wb = self.Mwe * sb  # slope = sum (q - 1) wb
        return (sA, sb, wb, wb.sum(1, dtype=torch.float64), wb * sb)  # last: Mw b^2, for the curvature

    def line(self, ctx: tuple[Tensor, ...], t: Tensor, second: bool = True
             ) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        """Data loss, slope, curvature (if ``second``) and a state for :meth:`resid`, per problem, at ``A + t Bd``.

        ``ctx`` comes from :meth:`line_setup`.
        """
        Mw = self.Mwe
        f64 = torch.float64
        tt = t[:, None, :].to(self.edt)
        if self.kind == "binary":
            sA, sb, wb, swb, wbb = ctx
            sa = torch.addcmul(sA, tt, sb)
            q = torch.sigmoid(sa)
            loss = _neg_log_sigmoid_sum(sa, q, Mw)
            d2 = (q - q * q).mul_(wbb).sum(1, dtype=f64) if second else None
            return loss, (q * wb).sum(1, dtype=f64) - swb, d2, q
        A, Bd = ctx
        At = A + tt.unsqueeze(-1) * Bd
        lse = torch.logsumexp(At, -1)
        loss = (Mw * (lse - At.gather(3, self.idx)[..., 0])).sum(1, dtype=f64)
        P = torch.exp(At - lse.unsqueeze(-1))
        d2 = None
        if second:
            pb = (P * Bd).sum(-1)
            d2 = (Mw * ((P * Bd * Bd).sum(-1) - pb * pb)).sum(1, dtype=f64)
        P.scatter_add_(3, self.idx, torch.full_like(self.idx, -1, dtype=P.dtype))
        R = Mw.unsqueeze(-1) * P
        return loss, (R * Bd).sum((1, 3), dtype=f64), d2, R

    def resid(self, state: Tensor) -> Tensor:
        """The residual ``dloss/dlogit`` ``[B, n, Q, K]`` from :meth:`line`'s state."""
        if self.kind == "binary":
            return (state - 1.0).mul_(self.SMw).unsqueeze(-1)
        return state

    def grad_ok(self, g: Tensor, tol: float) -> Tensor:
        """Whether max |grad of the mean loss| in the standardised basis is <= tol, ``[B, Q]``."""
        B, r1, Q, K = g.shape
        thr = tol * self.nvec  # [Q]
        gw = g[:, : self.r]
        bmax = g[:, self.r].abs().amax(-1)
        if self.Vw is None:  # not rotated: already the standardised basis
            return (gw.abs().amax((1, 3)) <= thr) & (bmax <= thr)
        two = gw.square().sum((1, 3)).sqrt()
        sure = (two <= thr) & (bmax <= thr)
        # ||x||_inf >= ||x||_2 / sqrt(dim) proves "not converged"; a gradient spread over many coordinates
        # has ||x||_inf several times that bound, so the exact test (a product with V) waits until the
        # 2-norm is within a third of it -- skipping the test only delays a stop, it never stops early.
        never = (two > thr * math.sqrt(self.d * K) / 3) | (bmax > thr)
        amb = ~sure & ~never
        ok = sure.clone()
        if bool(amb.any()):
            cols = torch.nonzero(amb.any(0)).flatten()
            go = torch.bmm(self.Vw, gw[:, :, cols].reshape(B, self.r, -1).to(self.Vw.dtype))
            inf = go.abs().view(B, self.d, len(cols), K).amax((1, 3))
            ok[:, cols] = sure[:, cols] | (amb[:, cols] & (inf <= thr[cols]))
        return ok


def _lbfgs(P: _Problems, W: Tensor, frozen: Tensor, max_iter: int, tol: float, history: int
           ) -> tuple[Tensor, Tensor, Tensor]:
    """Minimise every problem of ``P`` from ``W`` ``[B, r1, Q, K]``; ``frozen`` ``[B, Q]`` ones stay as given.

    Returns:
        ``(W, n_iter [B, Q], converged [B, Q])``.
    """
    B, r1, Q, K = W.shape
    dev = W.device
    W_out = W.clone()
    it_out = torch.zeros(B, Q, dtype=torch.int64, device=dev)
    conv_out = frozen.clone()
    cols = torch.arange(Q, device=dev)
    rows = torch.arange(B, device=dev)

    def dot(a: Tensor, b: Tensor) -> Tensor:
        return (a * b).sum((1, 3))

    # The L-BFGS memory is kept per problem, contiguous: [B, Q, r1 * K], in the work dtype (the direction
    # only has to be a descent direction -- the line search, gradients and stopping test stay float64), so
    # the two-loop recursion is a few streaming passes with no temporaries.
    hdt = P.Z.dtype

    def per_problem(x: Tensor) -> Tensor:
        y = x.permute(0, 2, 1, 3).to(hdt, memory_format=torch.contiguous_format, copy=True)  # a fresh tensor
        return y.view(x.shape[0], x.shape[2], -1)

    A = P.fwd(W)
    fdat, R = P.loss_resid(A)
    g = P.grad(R, W)
    H0 = 1.0 / (torch.bmm(P.Z2.mT, P.curvature(A).reshape(B, P.n, Q * K).to(P.Z2.dtype)).view(B, r1, Q, K).double()
                + P.lam[:, None, :, None] * P.pen).clamp_min(1e-12)
    if P.kind != "binary":
        H0 = H0 * (P.bias == 0)[None, None]
    H0t = per_problem(H0)
    conv = P.grad_ok(g, tol)
    active = ~frozen & ~conv
    conv_out |= conv
    S: list[Tensor] = []
    Yh: list[Tensor] = []
    rho: list[Tensor] = []
    gamma = torch.ones(B, Q, dtype=torch.float64, device=dev)
    its = torch.zeros(B, Q, dtype=torch.int64, device=dev)
    c1, c2 = 1e-4, 0.9
    fe = max(1e-10, 16 * torch.finfo(P.edt).eps)  # rounding level of the objective's elementwise terms

    for _ in range(max_iter):
        if not bool(active.any()):
            break
        # compact: drop layers whose problems are all done, and problems done in every layer
        keep_b, keep_q = active.any(1), active.any(0)
        if int(keep_q.sum()) <= len(cols) // 2 or int(keep_b.sum()) <= (3 * len(rows)) // 4:
            W_out[rows[:, None], :, cols[None, :]] = W.permute(0, 2, 1, 3)
            it_out[rows[:, None], cols[None, :]] = its
            kb, kq = torch.nonzero(keep_b).flatten(), torch.nonzero(keep_q).flatten()
            rows, cols = rows[kb], cols[kq]

            def sub(x: Tensor, qdim: int, kb: Tensor = kb, kq: Tensor = kq) -> Tensor:
                return x[kb].index_select(qdim, kq)

            W, A, g, H0, H0t = sub(W, 2), sub(A, 2), sub(g, 2), sub(H0, 2), sub(H0t, 1)
            fdat, gamma, active, its = sub(fdat, 1), sub(gamma, 1), sub(active, 1), sub(its, 1)
            S = [sub(x, 1) for x in S]
            Yh = [sub(x, 1) for x in Yh]
            rho = [sub(x, 1) for x in rho]
            P = P.subset(kb, kq)
            B = len(rows)
        am = active[:, None, :, None]
        # two-loop recursion with diagonal H0, per problem [B, Q, r1 * K]
        q = per_problem(g)
        alphas = []
        for s, y, rh in zip(reversed(S), reversed(Yh), reversed(rho)):
            a = rh * torch.linalg.vecdot(s, q).double()
            alphas.append(a)
            q.addcmul_(y, (-a).to(hdt)[..., None])
        dt = q.mul_(H0t).mul_(gamma.to(hdt)[..., None])
        for s, y, rh, a in zip(S, Yh, rho, reversed(alphas)):
            bcoef = rh * torch.linalg.vecdot(y, dt).double()
            dt.addcmul_(s, (a - bcoef).to(hdt)[..., None])
        dvec = dt.view(B, len(cols), r1, K).permute(0, 2, 1, 3).double().mul_(am).neg_()
        gd = dot(g, dvec)
        bad = active & ~(gd < 0)
        if bool(bad.any()):  # not a descent direction: restart those problems from the preconditioned gradient
            bm = bad[:, None, :, None]
            dvec = torch.where(bm, -H0 * g, dvec)
            bt = ~bad[..., None]
            S = [s * bt for s in S]
            Yh = [y * bt for y in Yh]
            rho = [r * ~bad for r in rho]
            gamma = torch.where(bad, 1.0, gamma)
            gd = dot(g, dvec)
        Bd = P.fwd(dvec) - (P.bias if P.kind != "binary" else 0.0)
        lam = P.lam
        wd = dot(P.pen * W, dvec)
        dd = dot(P.pen * dvec, dvec)
        feps = fe * (fdat.abs() + 0.5 * lam * dot(P.pen * W, W))
        # 1-D line search per problem, elementwise only: t = 1 is accepted on the Armijo test (the usual
        # case); otherwise quadratic interpolation, then safeguarded Newton steps to a strong-Wolfe step.
        done = ~active | ~(gd < 0)
        t = torch.where(done, 0.0, torch.ones(B, len(cols), dtype=torch.float64, device=dev))
        lo = torch.zeros_like(t)
        hi = torch.full_like(t, math.inf)
        acc_t = torch.zeros_like(t)
        R = torch.empty(0)
        ctx = P.line_setup(A, Bd)
        for ls in range(30):
            ldat, d1, d2, R = P.line(ctx, t, second=ls > 0)
            dphi = ldat - fdat + lam * (t * wd + 0.5 * t * t * dd)
            p1 = d1 + lam * (wd + t * dd)
            # Armijo, or -- where the decrease is below float64 resolution of the objective -- Hager & Zhang's
            # approximate Wolfe test, which relies on slopes (computed accurately) instead of differences
            approx = (dphi <= feps) & (p1 <= (2 * c1 - 1) * gd)
            armijo = (dphi <= c1 * t * gd) | approx
            ok = ~done & armijo & ((p1.abs() <= c2 * gd.abs()) if ls > 0 else True)
            acc_t = torch.where(ok, t, acc_t)
            done = done | ok
            if bool(done.all()):
                break
            far = ~armijo | (p1 > 0)
            hi = torch.where(~done & far, torch.minimum(hi, t), hi)
            lo = torch.where(~done & ~far, torch.maximum(lo, t), lo)
            if ls == 0:  # minimiser of the quadratic through phi(0), phi'(0), phi(1), kept in [0.1, 0.5]
                tq = -gd / (2 * (dphi - gd)).clamp_min(1e-300)
                tn = torch.where(armijo, 4.0 * t, tq.clamp(0.1, 0.5))
            else:
                p2 = d2 + lam * dd
                tn = t - p1 / p2.clamp_min(1e-300)
                inside = torch.isfinite(tn) & (tn > lo) & (tn < hi)
                tn = torch.where(inside, tn, torch.where(torch.isinf(hi), 4.0 * t, 0.5 * (lo + hi)))
            t = torch.where(done, t, tn)
        stalled = ~done & (lo <= 0)
        reuse = bool(done.all())  # then the last evaluation was at every problem's accepted step
        acc_t = torch.where(done, acc_t, lo)
        acc_t = torch.where(active, acc_t, 0.0)
        t4 = acc_t[:, None, :, None]
        W_new = W + t4 * dvec
        A = A + t4.to(A.dtype) * Bd
        del ctx
        if reuse:
            fdat = fdat + torch.where(active, ldat - fdat, 0.0)
            R = P.resid(R)
        else:
            fdat, R = P.loss_resid(A)
        g_new = P.grad(R, W_new)
        s_k = W_new - W
        y_k = g_new - g
        sy = dot(s_k, y_k)
        upd = active & (sy > 1e-10 * dot(s_k, s_k).sqrt() * dot(y_k, y_k).sqrt()) & (sy > 0)
        ut = upd[..., None].to(hdt)
        S.append(per_problem(s_k).mul_(ut))
        Yh.append(per_problem(y_k).mul_(ut))
        rho.append(torch.where(upd, 1.0 / sy.clamp_min(1e-300), 0.0))
        gamma = torch.where(upd, sy / dot(y_k, H0 * y_k).clamp_min(1e-300), gamma)
        if len(S) > history:
            S.pop(0)
            Yh.pop(0)
            rho.pop(0)
        W, g = W_new, g_new
        its = its + active.to(torch.int64)
        conv = P.grad_ok(g, tol)
        conv_out[rows[:, None], cols[None, :]] |= conv & active
        active = active & ~conv & ~stalled
    W_out[rows[:, None], :, cols[None, :]] = W.permute(0, 2, 1, 3)
    it_out[rows[:, None], cols[None, :]] = its
    return W_out, it_out, conv_out


# ----------------------------------------------------------------------------------------------------------
# Data preparation
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Prepared:
    mean: Tensor  # [B, d]
    scale: Tensor  # [B, d]
    V: Tensor | None  # [B, d, r] float64, zero-padded beyond each layer's rank; None: not rotated (r = d)
    Z: Tensor  # [B, n_train, r + 1] work dtype, last column ones
    r: int


def _prepare(X: Tensor, standardize: bool, work: torch.dtype, rotate: bool) -> _Prepared:
    """Standardise on these (training) rows and (optionally) rotate to the Gram eigenbasis minus its null space.

    The eigendecomposition runs in the work dtype: the fitted logits are ``Z w = Xc (V w)`` whatever V is, so
    V's own rounding only perturbs the penalty at the working precision. Centring and scaling run in X's
    dtype (statistics accumulate in float64); the returned mean and scale are exactly the values applied.
    """
    B, n, d = X.shape
    mean = X.mean(1, dtype=torch.float64).to(X.dtype)
    Xc = X - mean[:, None]
    if standardize:
        sd = Xc.square().mean(1, dtype=torch.float64).sqrt().to(X.dtype)
        scale = torch.where(sd > 0, sd, torch.ones_like(sd))
        Xc = Xc / scale[:, None]
    else:
        scale = torch.ones_like(mean)
    mean, scale = mean.double(), scale.double()
    ones = torch.ones(B, n, 1, dtype=work, device=X.device)
    if not rotate:
        return _Prepared(mean=mean, scale=scale, V=None, Z=torch.cat([Xc.to(work), ones], 2).contiguous(), r=d)
    Xw = Xc.to(work)
    # The right singular vectors of Xw: from the d x d Gram when d <= n, else from the n x n kernel
    # (V = Xw^T U / s), which costs n^2 d + n^3 instead of n d^2 + d^3 -- e.g. 7B models' d = 4096 with a
    # few thousand prompts.
    dual = n < d
    ev, vec = torch.linalg.eigh(Xw @ Xw.mT if dual else Xw.mT @ Xw)  # ascending
    ev = ev.flip(-1)
    vec = vec.flip(-1)
    rtol = 1e-10 if work == torch.float64 else 1e-6  # the Gram's rounding level: below it is null space
    keep = ev > rtol * ev[:, :1].clamp_min(1e-300)
    r = max(int(keep.sum(1).max()), 1)
    if dual:
        inv_s = torch.where(keep[:, :r], ev[:, :r].clamp_min(1e-300).rsqrt(), 0.0)
        V = (Xw.mT @ vec[:, :, :r]) * inv_s[:, None, :]
    else:
        V = vec[:, :, :r] * keep[:, None, :r]
    Z = torch.cat([Xw @ V, ones], 2).contiguous()
    return _Prepared(mean=mean, scale=scale, V=V.double(), Z=Z, r=r)


def _as_features(features: Any) -> Tensor:
    X = torch.as_tensor(features) if not isinstance(features, Tensor) else features
    if X.ndim != 3:
        raise EntitylensError(f"features must be [layer, n, d_model], got shape {tuple(X.shape)}; "
                              "stack one activation matrix per layer")
    if not torch.is_floating_point(X):
        raise EntitylensError(f"features must be floating point, got {X.dtype}; cast the activations to float")
    if X.shape[1] == 0 or X.shape[2] == 0 or X.shape[0] == 0:
        raise EntitylensError(f"features have an empty dimension {tuple(X.shape)}; pass a non-empty cache")
    return X


@dataclass
class _Labels:
    kind: str
    y: Tensor  # binary: [n, T] float64; multiclass: [n] int64 class index (-1: class unseen in training)
    classes: Tensor | None
    T: int
    K: int
    raw: Tensor | None = None  # 1-D labels as given (int64)


def _as_labels(labels: Any, n: int, train: Tensor) -> _Labels:
    y = torch.as_tensor(labels) if not isinstance(labels, Tensor) else labels
    y = y.detach().cpu()
    if y.shape[0] != n:
        raise EntitylensError(f"labels have {y.shape[0]} rows but features have {n} examples; align them")
    if y.ndim == 1 and y.dtype != torch.bool:
        if torch.is_floating_point(y):
            if not torch.equal(y, y.round()):
                raise EntitylensError("1-D labels must be integer class indices; pass class ids, or a 2-D 0/1 matrix")
            y = y.to(torch.int64)
        classes = torch.unique(y[train])
        if len(classes) < 2:
            raise EntitylensError(f"the training split has {len(classes)} class(es); a probe needs at least 2")
        pos = torch.searchsorted(classes, y).clamp_max(len(classes) - 1)
        idx = torch.where(classes[pos] == y, pos, -1)
        if len(classes) == 2:  # scikit-learn fits one binary logistic regression for two classes
            return _Labels("binary", (idx == 1).double().unsqueeze(1), classes, 1, 1, y)
        return _Labels("multiclass", idx.to(torch.int64), classes, 1, len(classes), y)
    if y.ndim == 1:
        y = y.unsqueeze(1)
    if y.ndim != 2:
        raise EntitylensError(f"labels must be [n] class indices or [n, target] 0/1, got shape {tuple(y.shape)}")
    yd = y.double()
    if not bool(((yd == 0) | (yd == 1)).all()):
        raise EntitylensError("2-D labels must be 0/1 (binary targets); pass class indices as a 1-D tensor")
    return _Labels("binary", yd, None, y.shape[1], 1)


# ----------------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeResult:
    """Probes for every layer, with their split, choice of C and held-out logits.

    ``out`` is the number of binary targets (``kind == "binary"``) or of classes (``"multiclass"``).

    Attributes:
        kind: ``"binary"`` (independent logistic targets) or ``"multiclass"`` (softmax over ``classes``).
        coef: ``[layer, d_model, out]`` weights on *standardised* features (scikit-learn's ``coef_.T`` when
            fitted on ``StandardScaler`` output).
        intercept: ``[layer, out]``.
        mean: ``[layer, d_model]`` training mean of each feature.
        scale: ``[layer, d_model]`` training standard deviation (1 where zero or when not standardising).
        C: ``[layer]`` chosen C (``[layer, target]`` with ``select="target"``).
        cv_score: ``[layer, n_C]`` mean held-out score per C (``[layer, n_C, target]`` per target;
            higher is better, i.e. minus the log loss), ``None`` without CV.
        n_iter: ``[layer, q]`` L-BFGS iterations of the final fit (``q`` = targets, or 1 for multiclass).
        converged: ``[layer, q]`` whether the final fit met ``tol``.
        classes: Label value of each class (multiclass, or the two values of a 1-D two-class label).
        constant_targets: ``[target]`` binary targets constant on the training split (fitted as a constant).
        split: The train/test split used.
        n_examples: Number of examples in the features.
        y_train: Training labels as given (2-D targets as bool ``[n_train, target]``; 1-D labels ``[n_train]``).
        y_test: Test labels as given (a test class never seen in training is simply always wrong).
        train_logits: ``[layer, n_train, out]``.
        test_logits: ``[layer, n_test, out]``.
        config: The configuration.
    """

    kind: str
    coef: Float[Tensor, "layer d_model out"]
    intercept: Float[Tensor, "layer out"]
    mean: Float[Tensor, "layer d_model"]
    scale: Float[Tensor, "layer d_model"]
    C: Tensor
    cv_score: Tensor | None
    n_iter: Int[Tensor, "layer q"]
    converged: Bool[Tensor, "layer q"]
    classes: Tensor | None
    constant_targets: Tensor | None
    split: Split
    n_examples: int
    y_train: Tensor
    y_test: Tensor
    train_logits: Float[Tensor, "layer n_train out"]
    test_logits: Float[Tensor, "layer n_test out"]
    config: ProbeConfig = field(default_factory=ProbeConfig)

    @property
    def num_layers(self) -> int:
        """Number of layers probed."""
        return int(self.coef.shape[0])

    @property
    def coef_raw(self) -> Float[Tensor, "layer d_model out"]:
        """Weights on the raw (unstandardised) features."""
        return self.coef / self.scale[:, :, None]

    @property
    def intercept_raw(self) -> Float[Tensor, "layer out"]:
        """Intercept for the raw features."""
        return self.intercept - torch.einsum("ld,ldo->lo", self.mean, self.coef_raw)

    def decision_function(self, features: Float[Tensor, "layer n d_model"]) -> Float[Tensor, "layer n out"]:
        """Logits of the probes on new features (same layers, raw activations)."""
        X = _as_features(features).to(torch.float64).cpu()
        if X.shape[0] != self.num_layers or X.shape[2] != self.coef.shape[1]:
            raise EntitylensError(f"features {tuple(X.shape)} do not match the probes "
                                  f"[{self.num_layers}, n, {self.coef.shape[1]}]; pass the same layers and width")
        return ((X - self.mean[:, None]) / self.scale[:, None]) @ self.coef + self.intercept[:, None]

    def predict(self, features: Float[Tensor, "layer n d_model"]) -> Tensor:
        """Predictions in label space, as scikit-learn's ``predict``.

        2-D binary targets: ``[layer, n, target]`` bool. 1-D class labels (multiclass, or two classes):
        ``[layer, n]`` label values from :attr:`classes`.
        """
        return self._to_labels(self._decide(self.decision_function(features)))

    def predict_proba(self, features: Float[Tensor, "layer n d_model"]) -> Float[Tensor, "layer n out"]:
        """Probabilities: per-target sigmoid (binary) or softmax over :attr:`classes` (multiclass)."""
        z = self.decision_function(features)
        return torch.sigmoid(z) if self.kind == "binary" else torch.softmax(z, -1)

    def _decide(self, logits: Tensor) -> Tensor:
        return logits > 0 if self.kind == "binary" else logits.argmax(-1)

    def _to_labels(self, decided: Tensor) -> Tensor:
        if self.classes is None:
            return decided
        idx = decided[..., 0].long() if self.kind == "binary" else decided
        return self.classes[idx]

    def predictions(self, part: Literal["train", "test"] = "test") -> Tensor:
        """Predictions on the train or test split, in label space (see :meth:`predict`)."""
        return self._to_labels(self._decide(self._logits(part)))

    def _logits(self, part: str) -> Tensor:
        if part not in ("train", "test"):
            raise EntitylensError(f"part must be 'train' or 'test', got {part!r}")
        return self.test_logits if part == "test" else self.train_logits

    def _internal(self, part: str) -> tuple[Tensor, Tensor]:
        """Predictions and truths as the solver sees them: bool ``[.., n, target]`` or class index (-1: unseen)."""
        pred = self._decide(self._logits(part))
        y = self.y_test if part == "test" else self.y_train
        if self.classes is None:
            return pred, y
        if self.kind == "binary":
            return pred, (y == self.classes[1]).unsqueeze(-1)
        pos = torch.searchsorted(self.classes, y).clamp_max(len(self.classes) - 1)
        return pred, torch.where(self.classes[pos] == y, pos, -1)

    def correct(self, part: Literal["train", "test"] = "test") -> Bool[Tensor, "layer n"]:
        """Per-example correctness: the class (class labels) or the whole target set (binary targets, exact match)."""
        pred, y = self._internal(part)
        return (pred == y).all(-1) if self.kind == "binary" else pred == y

    def metrics(self, part: Literal["train", "test"] = "test") -> dict[str, Tensor]:
        """Per-layer metrics on a split.

        Binary: ``accuracy`` (mean over targets), ``balanced_accuracy`` and ``f1`` (macro means over
        targets), ``micro_f1``, ``exact_match`` (whole target set right), and ``*_per_target`` ``[layer,
        target]`` versions. Multiclass: ``accuracy`` and ``balanced_accuracy`` (mean recall of the
        classes present). All ``[layer]`` unless named per target.
        """
        pred, y = self._internal(part)
        if len(y) == 0:
            raise EntitylensError(f"the {part} split is empty; use a split with examples on both sides")
        if self.kind == "binary":
            acc_t = (pred == y).double().mean(1)
            bal_t = M.balanced_accuracy(pred, y)
            f1_t = M.f1_score(pred, y)
            return {"accuracy": acc_t.mean(-1), "balanced_accuracy": bal_t.mean(-1), "f1": f1_t.mean(-1),
                    "micro_f1": M.micro_f1(pred, y), "exact_match": M.exact_match(pred, y),
                    "accuracy_per_target": acc_t, "balanced_accuracy_per_target": bal_t, "f1_per_target": f1_t}
        onehot_true = F.one_hot(y.clamp_min(0), len(self.classes)).bool() & (y >= 0)[:, None]
        onehot_pred = F.one_hot(pred, len(self.classes)).bool()
        present = onehot_true.any(0)
        rec = M.binary_counts(onehot_pred, onehot_true)
        recall = rec.tp.double() / (rec.tp + rec.fn).double().clamp_min(1)
        bal = (recall * present).sum(-1) / present.sum().clamp_min(1)
        return {"accuracy": M.accuracy(pred, y), "balanced_accuracy": bal}

    def stratified(self, strata: Tensor | np.ndarray, part: Literal["train", "test"] = "test",
                   method: Literal["wilson", "wald"] = "wilson") -> M.StratifiedAccuracy:
        """Accuracy per stratum (e.g. numops) of :meth:`correct`.

        Args:
            strata: One integer per example: either for all ``n_examples`` (indexed by the split here) or
                for the rows of ``part`` only.
            part: ``"test"`` or ``"train"``.
            method: Interval method.

        Returns:
            The :class:`~entitylens.probing.metrics.StratifiedAccuracy` over layers.
        """
        s = torch.as_tensor(np.asarray(strata)).to(torch.int64).flatten()
        rows = self.split.test if part == "test" else self.split.train
        if len(s) == self.n_examples:
            s = s[rows]
        elif len(s) != len(rows):
            raise EntitylensError(f"strata has {len(s)} values; pass one per example ({self.n_examples}) or one per "
                                  f"{part} row ({len(rows)})")
        return M.stratified_accuracy(self.correct(part), s, method=method)


# ----------------------------------------------------------------------------------------------------------
# fit_probes
# ----------------------------------------------------------------------------------------------------------


def _cv_scores(logits: Tensor, kind: str, y: Tensor, heldout: Tensor, metric: str) -> Tensor:
    """Held-out score per problem: logits ``[B, n, Q, K]``, heldout ``[n, Q]`` bool -> ``[B, Q]``."""
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


def _layer_bytes(n: int, d: int, Q: int, K: int, history: int, work_bytes: int) -> int:
    r1 = d + 1
    elementwise = 8 * n * Q * K * 8
    state = 8 * r1 * Q * K * (2 * history + 10)
    return int(elementwise + state + 2 * work_bytes * n * r1 + 8 * (2 * n * d + 3 * d * d))


def fit_probes(
    features: Float[Tensor, "layer n d_model"],
    labels: Tensor,
    groups: GroupsLike,
    config: ProbeConfig | None = None,
    *,
    split: Split | None = None,
) -> ProbeResult:
    """Train a linear probe on every layer at once.

    Args:
        features: ``[layer, n, d_model]`` activations of one role (e.g. the query's box token) at every layer.
        labels: ``[n, target]`` 0/1 (or bool) for independent binary targets -- e.g. "object o in box b",
            or the queried box's object set as multi-hot (multi-label) -- or ``[n]`` integer class indices
            for one softmax probe over the classes seen in training (two classes: one binary probe).
        groups: ``[n]`` group (state) of each example: no group is split across train/test or across folds.
        config: :class:`ProbeConfig` (defaults if omitted).
        split: A train/test split (e.g. from :func:`~entitylens.probing.splits.split_by_group`, possibly with
            held-out objects); by default ``split_by_group(groups, config.test_fraction, config.seed)``.

    Returns:
        The :class:`ProbeResult`.
    """
    cfg = config or ProbeConfig()
    X = _as_features(features)
    L, n, d = X.shape
    codes = group_codes(groups)
    if len(codes) != n:
        raise EntitylensError(f"groups has {len(codes)} entries but features have {n} examples; align them")
    if split is None:
        split = split_by_group(codes, cfg.test_fraction, cfg.seed)
    tr, te = split.train.to(torch.int64), split.test.to(torch.int64)
    if len(tr) and (int(tr.max()) >= n or int(tr.min()) < 0) or len(te) and (int(te.max()) >= n or int(te.min()) < 0):
        raise EntitylensError(f"split indices out of range for {n} examples; build the split from these groups")
    lab = _as_labels(labels, n, tr)
    dev = torch.device(cfg.device)
    work = _DTYPES[cfg.dtype]
    nC = len(cfg.Cs)
    T, K = lab.T, lab.K
    y_tr_all = lab.y[tr]
    n_tr = len(tr)

    # --- problem layout for CV: columns (fold, C, target) ---
    if nC > 1:
        fold = group_folds(codes[tr], cfg.folds, cfg.seed)
        Fn = cfg.folds
        fold_w = torch.stack([(fold != f) for f in range(Fn)], 1).double()  # [n_tr, F]
    else:
        Fn = 0
    if lab.kind == "binary":
        out, q_fit = T, T
        y_dev = y_tr_all.to(dev)
        pos = y_tr_all.sum(0)
        constant = (pos == 0) | (pos == n_tr)
    else:
        out, q_fit = K, 1
        y_dev = y_tr_all.to(dev)
        constant = None

    def class_presence(fw: Tensor) -> Tensor | None:
        if lab.kind == "binary":
            return None
        onehot = F.one_hot(y_tr_all, K).double()
        return (fw.T @ onehot > 0).to(dev)  # [F, K]

    def init_W(P: _Problems, Bsz: int, r: int) -> tuple[Tensor, Tensor]:
        Q = len(P.col_fold)
        W0 = torch.zeros(Bsz, r + 1, Q, K, dtype=torch.float64, device=dev)
        if lab.kind == "binary":
            ppos = (P.Mw * P.Yq).sum(0)
            rate = ((ppos + 0.5) / (P.nvec + 1.0)).clamp(1e-12, 1 - 1e-12)
            W0[:, -1, :, 0] = torch.log(rate / (1 - rate))
            frozen = ((ppos == 0) | (ppos == P.nvec)).expand(Bsz, Q).clone()
        else:
            cnt = P.Mw.T @ F.one_hot(y_dev, K).double()  # [Q, K]
            present = P.bias == 0
            logp = torch.log((cnt + 0.5) / (cnt + 0.5).sum(-1, keepdim=True))
            centre = (logp * present).sum(-1, keepdim=True) / present.sum(-1, keepdim=True)
            logp = torch.where(present, logp - centre, 0.0)
            W0[:, -1] = logp
            frozen = torch.zeros(Bsz, Q, dtype=torch.bool, device=dev)
        return W0, frozen

    rotate = bool(cfg.rotate)
    per_layer = _layer_bytes(n_tr, d, max(Fn, 1) * nC * q_fit, K, cfg.history, torch.finfo(work).bits // 8)
    lb = max(1, min(L, int(cfg.max_batch_bytes) // max(per_layer, 1)))
    coef = torch.zeros(L, d, out, dtype=torch.float64)
    intercept = torch.zeros(L, out, dtype=torch.float64)
    means = torch.zeros(L, d, dtype=torch.float64)
    scales = torch.ones(L, d, dtype=torch.float64)
    sel_shape = (L, T) if (cfg.select == "target" and lab.kind == "binary") else (L,)
    C_out = torch.full(sel_shape, cfg.Cs[0], dtype=torch.float64)
    cv_out = (torch.zeros((L, nC, T) if len(sel_shape) == 2 else (L, nC), dtype=torch.float64) if nC > 1 else None)
    n_iter = torch.zeros(L, q_fit, dtype=torch.int64)
    conv = torch.zeros(L, q_fit, dtype=torch.bool)
    train_logits = torch.zeros(L, n_tr, out, dtype=torch.float64)
    test_logits = torch.zeros(L, len(te), out, dtype=torch.float64)
    lam_C = torch.tensor([1.0 / c for c in cfg.Cs], dtype=torch.float64, device=dev)

    bar = progress(total=L, desc="probes", unit="layer")
    for l0 in range(0, L, lb):
        l1 = min(L, l0 + lb)
        Bsz = l1 - l0
        # centre and scale in the work dtype, unless the features are more precise than that
        Xb = X[l0:l1].to(device=dev, dtype=torch.promote_types(X.dtype, work))
        prep = _prepare(Xb[:, tr.to(dev)], cfg.standardize, work, rotate)
        r = prep.r
        W0 = None
        if nC > 1:
            # the regularisation path: Cs ascending, each warm-started from the previous C's solutions;
            # one batch holds every (fold, target) problem, columns ordered (fold, target)
            col_fold = torch.arange(Fn, device=dev).repeat_interleave(q_fit)
            col_t = torch.arange(q_fit, device=dev).repeat(Fn)
            P = _Problems(prep.Z, lab.kind, y_dev, fold_w.to(dev), col_fold, col_t,
                          lam_C[0].expand(Bsz, len(col_fold)).clone(), K, class_presence(fold_w), prep.V, r, d)
            Wi, frozen = init_W(P, Bsz, r)
            path = []
            for ci in range(nC):
                P.set_cols(col_fold, col_t, lam_C[ci].expand(Bsz, len(col_fold)).clone())
                Wi, _, _ = _lbfgs(P, Wi, frozen, cfg.max_iter, cfg.tol, cfg.history)
                path.append(Wi)
            # columns ordered (fold, C, target) from here on
            Wcv = torch.stack([w.view(Bsz, r + 1, Fn, 1, q_fit, K) for w in path], 3).view(Bsz, r + 1, -1, K)
            col_fold = torch.arange(Fn, device=dev).repeat_interleave(nC * q_fit)
            col_c = torch.arange(nC, device=dev).repeat_interleave(q_fit).repeat(Fn)
            col_t = torch.arange(q_fit, device=dev).repeat(Fn * nC)
            P.set_cols(col_fold, col_t, lam_C[col_c].expand(Bsz, -1).clone())
            logits = P.fwd(Wcv).double()
            held = (fold_w.to(dev) == 0)[:, col_fold]
            yv = P.Yq if lab.kind == "binary" else y_dev
            sc = _cv_scores(logits, lab.kind, yv, held, cfg.cv_metric).view(Bsz, Fn, nC, q_fit).mean(1)  # [B,nC,q]
            if len(sel_shape) == 2:
                best = sc.argmax(1)  # [B, T]; first max = smallest C
                cv_out[l0:l1] = sc.cpu()
            else:
                best = sc.mean(-1).argmax(1)[:, None].expand(Bsz, q_fit)  # [B, q]
                cv_out[l0:l1] = sc.mean(-1).cpu()
            Wcv = Wcv.view(Bsz, r + 1, Fn, nC, q_fit, K)
            gi = best.view(Bsz, 1, 1, 1, q_fit, 1).expand(Bsz, r + 1, Fn, 1, q_fit, K)
            W0 = Wcv.gather(3, gi)[:, :, :, 0].mean(2)  # [B, r1, q, K]
            lam_fit = lam_C[best]  # [B, q]
            C_out[l0:l1] = (1.0 / lam_fit if len(sel_shape) == 2 else 1.0 / lam_fit[:, 0]).cpu()
        else:
            lam_fit = lam_C[0].expand(Bsz, q_fit).clone()
        ones = torch.ones(n_tr, 1, dtype=torch.float64, device=dev)
        P = _Problems(prep.Z, lab.kind, y_dev, ones, torch.zeros(q_fit, dtype=torch.int64, device=dev),
                      torch.arange(q_fit, device=dev), lam_fit, K, class_presence(ones.cpu()), prep.V, r, d)
        Wi, frozen = init_W(P, Bsz, r)
        if W0 is not None:
            Wi = torch.where(frozen[:, None, :, None], Wi, W0)
        Wf, its, cv_ok = _lbfgs(P, Wi, frozen, cfg.max_iter, cfg.tol, cfg.history)
        lg = P.fwd(Wf).double()
        n_iter[l0:l1] = its.cpu()
        conv[l0:l1] = cv_ok.cpu()
        # back to the standardised feature basis: coef = V w
        wq = Wf[:, :r].reshape(Bsz, r, q_fit * K)
        cb = wq if prep.V is None else torch.bmm(prep.V, wq)  # [B, d, q*K]
        b = Wf[:, r].reshape(Bsz, q_fit * K)
        if lab.kind != "binary":
            b = b - b.mean(-1, keepdim=True)
            lg = lg - lg.mean(-1, keepdim=True)
        coef[l0:l1] = cb.cpu()
        intercept[l0:l1] = b.cpu()
        means[l0:l1] = prep.mean.cpu()
        scales[l0:l1] = prep.scale.cpu()
        train_logits[l0:l1] = lg.reshape(Bsz, n_tr, out).cpu()
        if len(te):
            Xt = (Xb[:, te.to(dev)].double() - prep.mean[:, None]) / prep.scale[:, None]
            test_logits[l0:l1] = (Xt @ cb + b[:, None]).cpu()
        bar.update(Bsz)
        del prep, P, Xb
    bar.close()
    if not bool(conv.all()):
        warnings.warn(f"{int((~conv).sum())} of {conv.numel()} probe fits did not reach tol={cfg.tol} within "
                      f"max_iter={cfg.max_iter}; raise max_iter or tol", RuntimeWarning, stacklevel=2)
    if lab.classes is None:
        y_train, y_test = lab.y[tr].bool(), lab.y[te].bool()
    else:
        y_train, y_test = lab.raw[tr], lab.raw[te]
    return ProbeResult(
        kind=lab.kind, coef=coef, intercept=intercept, mean=means, scale=scales, C=C_out, cv_score=cv_out,
        n_iter=n_iter, converged=conv, classes=lab.classes, constant_targets=constant, split=split,
        n_examples=n, y_train=y_train, y_test=y_test, train_logits=train_logits, test_logits=test_logits,
        config=cfg,
    )


# ----------------------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------------------

_TENSORS = ("coef", "intercept", "mean", "scale", "C", "cv_score", "n_iter", "converged", "classes",
            "constant_targets", "y_train", "y_test", "train_logits", "test_logits")


def save_probe_result(result: ProbeResult, path: str | os.PathLike[str]) -> None:
    """Write a :class:`ProbeResult` to one safetensors file (tensors + JSON metadata), atomically."""
    from safetensors.torch import save

    tensors: dict[str, Tensor] = {}
    for name in _TENSORS:
        v = getattr(result, name)
        if v is not None:
            tensors[name] = v.contiguous().cpu()
    tensors["split.train"] = result.split.train.contiguous()
    tensors["split.test"] = result.split.test.contiguous()
    tensors["split.test_heldout"] = result.split.test_heldout.contiguous()
    tensors["split.dropped"] = result.split.dropped.contiguous()
    meta = {"kind": result.kind, "n_examples": str(result.n_examples),
            "config": json.dumps(asdict(result.config), sort_keys=True),
            "heldout_objects": json.dumps(list(result.split.heldout_objects)), "format": "entitylens.probes/1"}
    blob = save(tensors, metadata=meta)
    with atomic_write(path, "wb") as f:
        f.write(blob)


def load_probe_result(path: str | os.PathLike[str]) -> ProbeResult:
    """Read a :class:`ProbeResult` written by :func:`save_probe_result`."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises its own error type for corrupt headers
        raise EntitylensError(f"cannot read probes from {path}: {e}; pass a file written by save_probe_result") from e
    if meta.get("format") != "entitylens.probes/1":
        raise EntitylensError(f"{path} is not an entitylens probe file; pass a file written by save_probe_result")
    cfg = json.loads(meta["config"])
    cfg["Cs"] = tuple(cfg["Cs"])
    split = Split(train=tensors.pop("split.train"), test=tensors.pop("split.test"),
                  heldout_objects=tuple(json.loads(meta["heldout_objects"])),
                  test_heldout=tensors.pop("split.test_heldout"), dropped=tensors.pop("split.dropped"))
    kw = {name: tensors.get(name) for name in _TENSORS}
    return ProbeResult(kind=meta["kind"], split=split, n_examples=int(meta["n_examples"]),
                       config=ProbeConfig(**cfg), **kw)
