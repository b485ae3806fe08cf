"""The objective the probe solver minimises: many L2 logistic regressions on shared features, evaluated in batch.

:class:`Problems` holds ``B`` layers x ``Q`` problems x ``K`` outputs (binary targets, or the classes of one
softmax) that share each layer's prepared features (:class:`~entitylens.probing.prepare.Prepared`), and
evaluates what L-BFGS (:mod:`entitylens.probing.solver`) needs: logits, losses, residuals, gradients, the
stopping test and the line search's 1-D loss, slope and curvature along a direction -- the only matrix
products are two per layer and iteration; the rest is elementwise work in the work dtype with float64 sums.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from entitylens.probing.prepare import Prepared

__all__ = ["Problems", "neg_log_sigmoid_sum"]

_MASKED = -1e30  # logit bias of a class absent from a fold's training rows


def neg_log_sigmoid_sum(sa: Tensor, q: Tensor, w: Tensor | None) -> Tensor:
    """``sum_i w_i * -log(sigmoid(sa_i))`` over examples (dim 1), given ``q = sigmoid(sa)``; ``w=None``: unit weights.

    One ``log`` per element instead of ``softplus``'s ``exp`` + ``log1p``. Where ``q`` underflowed to 0
    (``sa`` below about -88 in float32), ``-log(sigmoid(sa)) = -sa`` to within ``1e-38``. The sum is
    torch's pairwise (cascade) sum in the work dtype, returned as float64.
    """
    lq = torch.log(q)
    if not bool(torch.isfinite(lq.amin())):
        lq = torch.where(q > 0, lq, sa)
    if w is not None:
        lq = lq.mul_(w)
    return -lq.sum(1).double()


class Problems:
    """``B`` layers x ``Q`` problems x ``K`` outputs of L2 logistic regression on shared features.

    ``Z`` is ``[B_all, n, r1]`` (standardised, possibly rotated features; last column all ones = intercept) and
    ``layers`` the rows of ``Z`` the ``B`` layers of the problems are (a subset after converged layers are
    dropped: no copy of ``Z``). A problem ``q`` uses sample weights ``fold_w[:, col_fold[q]]``, penalty
    ``lam[:, q]`` and, for binary problems, target column ``col_target[q]``; multiclass problems share the
    class index ``y`` and mask classes absent from their fold with ``bias``.

    Args:
        prep: The layers' prepared training features (``Z``, ``Zt``, ``G``, ``V``, ``r``).
        kind: ``"binary"`` or ``"multiclass"``.
        y: Binary: ``[n, T]`` 0/1 targets (float64); multiclass: ``[n]`` class indices.
        fold_w: ``[n, F]`` sample weights of each fold's training rows (all ones: no folds).
        col_fold: ``[Q]`` fold of each problem.
        col_target: ``[Q]`` target column of each problem (binary).
        lam: ``[B, Q]`` L2 penalty (``1 / C``) of each problem.
        K: Outputs per problem (classes; 1 for binary).
        class_present: ``[F, K]`` whether each class occurs in each fold's training rows (multiclass).
        d: Number of features before any rotation.
        target_w: Binary only: ``[n, T]`` per-example weight of each target (class weights), multiplied into
            the fold weights of that target's problems; ``None``: unit weights.
    """

    def __init__(self, prep: Prepared, kind: str, y: Tensor, fold_w: Tensor, col_fold: Tensor, col_target: Tensor,
                 lam: Tensor, K: int, class_present: Tensor | None, d: int, target_w: Tensor | None = None) -> None:
        self.Z, self.Zt, self.G, self.V, self.r = prep.Z, prep.Zt, prep.G, prep.V, prep.r
        self.kind, self.y, self.fold_w, self.K, self.d = kind, y, fold_w, K, d
        self.edt = self.Z.dtype  # dtype of the [B, n, Q, K] elementwise work (and of its sums)
        self.Vw = None if self.V is None else self.V.to(self.Z.dtype)
        self.B, self.n, self.r1 = self.Z.shape
        self.layers = torch.arange(self.B, device=self.Z.device)
        self.class_present = class_present
        self.target_w = target_w
        self.unit = bool((fold_w == 1).all()) and target_w is None  # unit weights: the weighted sums are plain sums
        self.pen = torch.ones(1, self.r1, 1, 1, dtype=torch.float64, device=self.Z.device)
        self.pen[0, -1] = 0.0
        self.set_cols(col_fold, col_target, lam)

    def set_cols(self, col_fold: Tensor, col_target: Tensor, lam: Tensor) -> None:
        """Set the problems: fold ``col_fold[q]``, target ``col_target[q]`` and penalty ``lam[:, q]`` of each."""
        self.col_fold, self.col_target, self.lam = col_fold, col_target, lam
        self.Mw = self.fold_w[:, col_fold]  # [n, Q]
        if self.target_w is not None:
            self.Mw = self.Mw * self.target_w[:, col_target]
        self.Mwe = self.Mw.to(self.edt)
        self.nvec = self.Mw.sum(0)
        if self.kind == "binary":
            self.Yq = self.y[:, col_target]  # [n, Q]
            # with s = 2y - 1 and q = sigmoid(s * logit): loss = -log q, residual p - y = s (q - 1),
            # curvature p (1 - p) = q (1 - q)
            self.Sg = (2.0 * self.Yq - 1.0).to(self.edt)
            self.SMw = self.Sg * self.Mwe
        else:
            assert self.class_present is not None, "multiclass problems need class_present"
            present = self.class_present[col_fold]  # [Q, K]
            self.bias = torch.where(present, 0.0, _MASKED).to(self.edt)
            self.idx = self.y.view(1, self.n, 1, 1).expand(self.B, self.n, len(col_fold), 1)

    def subset(self, keep_b: Tensor, keep_q: Tensor) -> Problems:
        """A new problem set with layers ``keep_b`` and problems ``keep_q`` (index tensors); self is unchanged."""
        sub = object.__new__(Problems)
        sub.__dict__.update(self.__dict__)
        sub.layers = self.layers[keep_b]
        sub.B = len(keep_b)
        sub.set_cols(self.col_fold[keep_q], self.col_target[keep_q], self.lam[keep_b][:, keep_q])
        return sub

    def columns(self, bi: Tensor, qi: Tensor) -> Problems:
        """The problems ``(bi[j], qi[j])`` as one layer of ``len(bi)`` problems, for :meth:`line` only (no products)."""
        sub = object.__new__(Problems)
        sub.__dict__.update(self.__dict__)
        sub.B = 1
        sub.lam = self.lam[bi, qi][None]
        sub.Mwe = self.Mwe if self.unit else self.Mwe[:, qi]  # (unit weights are not read)
        if self.kind != "binary":
            sub.idx = self.y.view(1, self.n, 1, 1).expand(1, self.n, len(qi), 1)
        return sub

    def of_layers(self, M: Tensor) -> Tensor:
        """The rows of a per-layer tensor ``[B_all, ...]`` for this problem set's layers."""
        return M if len(self.layers) == M.shape[0] else M[self.layers]

    # -- matrix products (the only O(n r Q K) work) --
    def _mm(self, M: Tensor, X: Tensor) -> Tensor:
        """``M[layers] @ X``: ``M`` ``[B_all, a, b]``, ``X`` ``[B, b, c]`` -> ``[B, a, c]``.

        One ``mm`` per layer on the CPU: faster than ``bmm`` over a batch of large matrices (measured
        0.37 vs 0.63 ms per layer for 1199 x 577 by 577 x 48), and no copy of the dropped layers' features.
        """
        if M.device.type != "cpu":
            return torch.bmm(self.of_layers(M), X)
        out = torch.empty(X.shape[0], M.shape[1], X.shape[2], dtype=M.dtype, device=M.device)
        for i, b in enumerate(self.layers.tolist()):
            torch.mm(M[b], X[i], out=out[i])
        return out

    def initial_weights(self) -> tuple[Tensor, Tensor]:
        """The base-rate start ``[B, r1, Q, K]`` (float64) of every problem, and which problems are frozen there.

        Binary: the intercept is the log-odds of each problem's (smoothed) positive rate; a target constant on
        the problem's rows is frozen at it. Multiclass: the intercepts are the centred log frequencies of the
        classes present in the fold; nothing is frozen.
        """
        B, Q, K = self.B, len(self.col_fold), self.K
        W0 = torch.zeros(B, self.r + 1, Q, K, dtype=torch.float64, device=self.Z.device)
        if self.kind == "binary":
            ppos = (self.Mw * self.Yq).sum(0)
            rate = ((ppos + 0.5) / (self.nvec + 1.0)).clamp(1e-12, 1 - 1e-12)
            W0[:, -1, :, 0] = torch.log(rate / (1 - rate))
            frozen = ((ppos == 0) | (ppos == self.nvec)).expand(B, Q).clone()
        else:
            cnt = self.Mw.T @ F.one_hot(self.y, K).double()  # [Q, K]
            present = self.bias == 0
            logp = torch.log((cnt + 0.5) / (cnt + 0.5).sum(-1, keepdim=True))
            centre = (logp * present).sum(-1, keepdim=True) / present.sum(-1, keepdim=True)
            logp = torch.where(present, logp - centre, 0.0)
            W0[:, -1] = logp
            frozen = torch.zeros(B, Q, dtype=torch.bool, device=self.Z.device)
        return W0, frozen

    def fwd(self, W: Tensor) -> Tensor:
        """Logits ``[B, n, Q, K]`` of the weights ``W`` ``[B, r1, Q, K]`` (plus the masking bias of multiclass)."""
        B, r1, Q, K = W.shape
        out = self._mm(self.Z, W.reshape(B, r1, Q * K).to(self.Z.dtype)).view(B, self.n, Q, K)
        if self.kind != "binary":
            out = out + self.bias
        return out

    # -- the solver's per-problem ("rows") layout: [B, Q, r1 * K], one contiguous row per problem --
    def fwd_rows(self, D: Tensor) -> Tensor:
        """Logits ``[B, n, Q, K]`` of the weights ``D`` in rows layout (plus the masking bias of multiclass)."""
        B, Q, rk = D.shape
        K = self.K
        X = D.mT if K == 1 else D.view(B, Q, self.r1, K).permute(0, 2, 1, 3).reshape(B, self.r1, Q * K)
        out = self._mm(self.Z, X).view(B, self.n, Q, K)
        return out if self.kind == "binary" else out.add_(self.bias)

    def grad_rows(self, R: Tensor, W: Tensor) -> Tensor:
        """Gradient in rows layout from the residual ``R`` ``[B, n, Q, K]`` and the weights ``W`` (rows)."""
        B, n, Q, K = R.shape
        # Zt: a contiguous transposed copy -- Z.mT as a strided operand is ~3x slower once Z is out of the cache
        T = self._mm(self.Zt, R.reshape(B, n, Q * K).to(self.Z.dtype))  # [B, r1, Q * K]
        g = W * self.lam[..., None].to(W.dtype)
        g[..., self.r1 * K - K:] = 0.0  # the intercept is not penalised
        g.view(B, Q, self.r1, K).add_(T.view(B, self.r1, Q, K).permute(0, 2, 1, 3))
        return g

    def grad_ok_rows(self, g: Tensor, tol: float) -> Tensor:
        """Whether max |grad of the mean loss| in the standardised basis is <= tol, ``[B, Q]`` (``g`` in rows)."""
        if self.Vw is None:
            return torch.linalg.vector_norm(g, ord=math.inf, dim=-1).double() <= tol * self.nvec
        B, Q, _ = g.shape
        return self._grad_ok_rotated(g.view(B, Q, self.r1, self.K).permute(0, 2, 1, 3).double(), tol)

    # -- elementwise parts in the work dtype; sums over examples are torch's pairwise sums, then float64 --
    def _wsum(self, x: Tensor) -> Tensor:
        """``sum_i Mw_i x_i`` over examples (dim 1) of ``x`` ``[B, n, Q]``, float64."""
        return (x if self.unit else x * self.Mwe).sum(1).double()

    def loss_resid(self, A: Tensor) -> tuple[Tensor, Tensor]:
        """Data loss ``[B, Q]`` and residual ``dloss/dlogit`` ``[B, n, Q, K]`` at logits ``A``."""
        Mw = self.Mwe
        if self.kind == "binary":
            sa = A[..., 0] * self.Sg
            q = torch.sigmoid(sa)
            return neg_log_sigmoid_sum(sa, q, None if self.unit else Mw), (q - 1.0).mul_(self.SMw).unsqueeze(-1)
        lse = torch.logsumexp(A, -1)
        loss = self._wsum(lse - A.gather(3, self.idx)[..., 0])
        P = torch.exp(A - lse.unsqueeze(-1))
        P.scatter_add_(3, self.idx, torch.full_like(self.idx, -1, dtype=P.dtype))
        return loss, P if self.unit else Mw.unsqueeze(-1) * P

    def curvature(self, A: Tensor) -> Tensor:
        """Per-sample diagonal Hessian weights ``[B, n, Q, K]`` (for the preconditioner)."""
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
        wb = sb if self.unit else self.Mwe * sb  # slope = sum (q - 1) wb
        return (sA, sb, wb, wb.sum(1).double(), wb * sb)  # last: Mw b^2, for the curvature

    @staticmethod
    def line_columns(ctx: tuple[Tensor, ...], bi: Tensor, qi: Tensor) -> tuple[Tensor, ...]:
        """The :meth:`line_setup` context of the problems ``(bi[j], qi[j])``, as one layer (see :meth:`columns`)."""
        out = []
        for x in ctx:
            if x.dim() == 2:  # [B, Q]
                out.append(x[bi, qi][None])
            else:  # [B, n, Q, ...] -> [1, n, P, ...]
                out.append(x[bi, :, qi].movedim(0, 1).unsqueeze(0))
        return tuple(out)

    def line(self, ctx: tuple[Tensor, ...], t: Tensor, second: bool = True
             ) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        """Data loss, slope, curvature (if ``second``) and a state for :meth:`resid`, per problem, at ``A + t Bd``.

        ``ctx`` comes from :meth:`line_setup`.
        """
        Mw = self.Mwe
        tt = t[:, None, :].to(self.edt)
        if self.kind == "binary":
            sA, sb, wb, swb, wbb = ctx
            sa = torch.addcmul(sA, tt, sb)
            q = torch.sigmoid(sa)
            loss = neg_log_sigmoid_sum(sa, q, None if self.unit else Mw)
            d2 = (q - q * q).mul_(wbb).sum(1).double() if second else None
            return loss, (q * wb).sum(1).double() - swb, d2, q
        A, Bd = ctx
        At = A + tt.unsqueeze(-1) * Bd
        lse = torch.logsumexp(At, -1)
        loss = self._wsum(lse - At.gather(3, self.idx)[..., 0])
        P = torch.exp(At - lse.unsqueeze(-1))
        d2 = None
        if second:
            pb = (P * Bd).sum(-1)
            d2 = self._wsum((P * Bd * Bd).sum(-1) - pb * pb)
        P.scatter_add_(3, self.idx, torch.full_like(self.idx, -1, dtype=P.dtype))
        R = P if self.unit else Mw.unsqueeze(-1) * P
        return loss, (R * Bd).sum((1, 3)).double(), d2, R

    def resid(self, state: Tensor) -> Tensor:
        """The residual ``dloss/dlogit`` ``[B, n, Q, K]`` from :meth:`line`'s state."""
        if self.kind == "binary":
            return (state - 1.0).mul_(self.SMw).unsqueeze(-1)
        return state

    def _grad_ok_rotated(self, g: Tensor, tol: float) -> Tensor:
        """:meth:`grad_ok_rows` for features rotated by ``V``: ``g`` ``[B, r1, Q, K]`` in the rotated basis."""
        assert self.Vw is not None  # only called for rotated features
        B, r1, Q, K = g.shape
        thr = tol * self.nvec  # [Q]
        gw = g[:, : self.r]
        bmax = g[:, self.r].abs().amax(-1)
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
            go = self._mm(self.Vw, gw[:, :, cols].reshape(B, self.r, -1).to(self.Vw.dtype))
            inf = go.abs().view(B, self.d, len(cols), K).amax((1, 3))
            ok[:, cols] = sure[:, cols] | (amb[:, cols] & (inf <= thr[cols]))
        return ok

