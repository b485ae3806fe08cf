"""Linear probes for every layer at once: L2-regularised logistic regression, C chosen by group CV.

What is fitted (per layer, and per target for binary targets) is exactly scikit-learn's
``LogisticRegression(C=C)`` on standardised features: minimise ``C * sum_i loss_i + ||w||^2 / 2`` with an
unpenalised intercept; binary targets use the logistic loss, a class-index target the multinomial
(softmax) loss over the classes present in training.

How (see ``docs/probing.md``):

* **Preconditioning** (``ProbeConfig.preconditioner``). L-BFGS's initial inverse Hessian is exact for the
  quadratic model at the start: ``(c Gram + lam I)^-1`` per layer from one Cholesky factorisation
  (``"cholesky"``), or the diagonal after an exact rotation into the Gram eigenbasis (``"eigen"``: the L2
  penalty is rotation invariant; zero-variance directions are dropped, ``d -> rank <= min(n, d)``).
  ``"auto"`` takes the cheaper for the problem at hand. See :class:`_Precond`.
* **One batched L-BFGS, every problem on its own.** All (layer, fold, C, target) problems advance together,
  so the work per iteration is two matrix products per layer (features x directions, features^T x
  residuals); but each problem has its own L-BFGS memory, its own step size and its own stopping test, and
  converged problems are dropped from the batch. The line search needs no extra matrix product: along a
  direction ``d`` the logits move as ``A + t * (Z d)``, so the 1-D objective, slope and curvature are
  elementwise sums (safeguarded Newton to a strong-Wolfe step); after the first trial only the problems
  still searching are evaluated.
* **Precision.** The feature matrix, the per-example elementwise work (logits, probabilities, residuals:
  the ``n x problems`` arrays) and the weight-space vectors (weights, gradients, directions, L-BFGS memory:
  one contiguous row per problem) are ``config.dtype`` (float32 by default); sums over examples are
  torch's pairwise sums in that dtype, returned as float64, and the per-problem scalars (losses, slopes,
  step sizes, the stopping test) are float64. The binary loss is evaluated as ``-log sigmoid(s * logit)``
  with ``s = 2y - 1``: one ``sigmoid`` and one ``log`` per element. The line search's approximate-Wolfe
  tolerance follows the rounding level of ``config.dtype``.
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


def _neg_log_sigmoid_sum(sa: Tensor, q: Tensor, w: Tensor | None) -> Tensor:
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
        max_batch_bytes: Memory budget that decides how many layers are solved in one batch. ``None``
            (default): 128 MiB on the CPU -- small batches stay in the cache (on a 2-core CPU 128 MiB was
            1.2x faster than 512 MiB, measured) -- and 1 GiB on an accelerator, where large batches amortise
            the kernel launches.
        preconditioner: L-BFGS's initial inverse Hessian. ``"cholesky"``: per layer the dense
            ``(c Gram + lam I)^-1`` from one Cholesky factorisation of the standardised features' Gram matrix,
            ``c`` the typical curvature at the start; costs one ``[d, d]`` product per problem and iteration.
            ``"eigen"``: rotate each layer's features into their Gram eigenbasis (exact; drops the null space
            when n < d) and use the diagonal there -- the same quality with no per-iteration cost, but an
            eigendecomposition and a rotation per layer (about 3x the Cholesky factorisation when d <= n).
            ``"diagonal"``: the diagonal in the standardised basis, cheap per layer but 2-6x more iterations on
            residual-stream-like features (a few massive directions). ``"auto"`` (default): ``"eigen"`` when
            d > n (the rotation also shrinks the problem to n dimensions) or when there are many problems per
            layer (a C grid x folds x targets), else ``"cholesky"``. All reach the same optimum; they differ
            only in speed.
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
    max_batch_bytes: int | None = None
    preconditioner: Literal["auto", "cholesky", "eigen", "diagonal"] = "auto"

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
        if self.max_batch_bytes is not None and int(self.max_batch_bytes) < 1:
            raise EntitylensError("max_batch_bytes must be positive (or None for the default)")
        if self.preconditioner not in ("auto", "cholesky", "eigen", "diagonal"):
            raise EntitylensError(f"unknown preconditioner {self.preconditioner!r}; use 'auto', 'cholesky', 'eigen' "
                                  "or 'diagonal'")


# ----------------------------------------------------------------------------------------------------------
# The batched solver
# ----------------------------------------------------------------------------------------------------------


class _Problems:
    """``B`` layers x ``Q`` problems x ``K`` outputs of L2 logistic regression on shared features.

    ``Z`` is ``[B_all, n, r1]`` (standardised, possibly rotated features; last column all ones = intercept) and
    ``layers`` the rows of ``Z`` the ``B`` layers of the problems are (a subset after converged layers are
    dropped: no copy of ``Z``). A problem ``q`` uses sample weights ``fold_w[:, col_fold[q]]``, penalty
    ``lam[:, q]`` and, for binary problems, target column ``col_target[q]``; multiclass problems share the
    class index ``y`` and mask classes absent from their fold with ``bias``.
    """

    def __init__(self, prep: _Prepared, kind: str, y: Tensor, fold_w: Tensor, col_fold: Tensor, col_target: Tensor,
                 lam: Tensor, K: int, class_present: Tensor | None, d: int) -> None:
        self.Z, self.Zt, self.G, self.V, self.r = prep.Z, prep.Zt, prep.G, prep.V, prep.r
        self.kind, self.y, self.fold_w, self.K, self.d = kind, y, fold_w, K, d
        self.edt = self.Z.dtype  # dtype of the [B, n, Q, K] elementwise work (and of its sums)
        self.Vw = None if self.V is None else self.V.to(self.Z.dtype)
        self.B, self.n, self.r1 = self.Z.shape
        self.layers = torch.arange(self.B, device=self.Z.device)
        self.class_present = class_present
        self.unit = bool((fold_w == 1).all())  # no fold masks: the weighted sums are plain sums
        self.pen = torch.ones(1, self.r1, 1, 1, dtype=torch.float64, device=self.Z.device)
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
        sub.layers = self.layers[keep_b]
        sub.B = len(keep_b)
        sub.set_cols(self.col_fold[keep_q], self.col_target[keep_q], self.lam[keep_b][:, keep_q])
        return sub

    def columns(self, bi: Tensor, qi: Tensor) -> _Problems:
        """The problems ``(bi[j], qi[j])`` as one layer of ``len(bi)`` problems, for :meth:`line` only (no products)."""
        sub = object.__new__(_Problems)
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

    def fwd(self, W: Tensor) -> Tensor:
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
            return _neg_log_sigmoid_sum(sa, q, None if self.unit else Mw), (q - 1.0).mul_(self.SMw).unsqueeze(-1)
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
            loss = _neg_log_sigmoid_sum(sa, q, None if self.unit else Mw)
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


class _Precond:
    """L-BFGS's initial inverse Hessian ``H0`` for every problem of a :class:`_Problems`, from the start's curvature.

    * Diagonal (features rotated to the Gram eigenbasis, or plain Jacobi): ``1 / (diag(Z^T D Z) + lam)``.
      With orthogonal feature columns this is the exact inverse Hessian of the quadratic model at the start.
    * Dense (``P.G`` set: the layer's Gram ``Z^T Z``): ``kscale * (c G + lam I_pen)^{-1}``, with ``c`` the
      layer's typical curvature ``p (1 - p)`` at the start (geometric mean over problems and classes) and
      ``kscale = c / c_qk`` each problem's (and class's) own. The inverse is exact for the quadratic model when
      every example has the same curvature (as at the start of a fit from the base rate), needs one Cholesky
      factorisation per layer and distinct penalty, and one ``[r1, r1]`` product per L-BFGS iteration --
      instead of the eigendecomposition and full rotation of the features that make ``H0`` diagonal.
    """

    def __init__(self, K: int, diag: Tensor | None = None, dense: Tensor | None = None, gidx: Tensor | None = None,
                 kscale: Tensor | None = None, c: Tensor | None = None) -> None:
        # diag: the diagonal in per-problem layout [B, Q, r1 * K], work dtype (None: dense)
        self.K, self.diag, self.dense, self.gidx, self.kscale, self.c = K, diag, dense, gidx, kscale, c

    @staticmethod
    def build(P: _Problems, A: Tensor) -> _Precond:
        """The preconditioner of the problems ``P`` at logits ``A`` ``[B, n, Q, K]``."""
        B, n, Q, K = A.shape
        r1 = P.r1
        cur = P.curvature(A)  # [B, n, Q, K]: sample weight x p (1 - p)
        if P.G is None:
            z2 = P.of_layers(P.Zt).square()
            h = torch.bmm(z2, cur.reshape(B, n, Q * K).to(z2.dtype)).view(B, r1, Q, K).double()
            diag = 1.0 / (h + P.lam[:, None, :, None] * P.pen).clamp_min(1e-12)
            if P.kind != "binary":
                diag = diag * (P.bias == 0)[None, None]
            return _Precond(K, diag=diag.permute(0, 2, 1, 3).to(P.Z.dtype).contiguous().view(B, Q, -1))
        cq = cur.sum(1).double() / n  # [B, Q, K], the fold's share of the rows included
        live = cq > 1e-12
        if P.kind != "binary":
            live &= (P.bias == 0)[None]
        logc = torch.where(live, cq.clamp_min(1e-300).log(), 0.0).sum((1, 2)) / live.sum((1, 2)).clamp_min(1)
        c = logc.exp()  # [B]
        kscale = torch.where(live, (c[:, None, None] / cq.clamp_min(1e-300)).clamp(1e-4, 1e4), 0.0)
        vals, gidx = torch.unique(P.lam, return_inverse=True)  # distinct penalties (one, unless C per target)
        eye = torch.diag_embed(P.pen.view(1, 1, r1).expand(1, len(vals), r1))
        G = P.of_layers(P.G)
        M = G[:, None] * c.view(B, 1, 1, 1).to(G.dtype) + (vals.view(1, -1, 1, 1) * eye).to(G.dtype)  # [B, nv, r1, r1]
        Lc, info = torch.linalg.cholesky_ex(M)
        if bool((info != 0).any()):  # too ill-conditioned for the work dtype: float64, then a tiny ridge
            M = G.double()[:, None] * c.view(B, 1, 1, 1) + vals.view(1, -1, 1, 1) * eye
            Lc, info = torch.linalg.cholesky_ex(M)
            if bool((info != 0).any()):
                Lc = torch.linalg.cholesky(M + 1e-10 * M.diagonal(0, -2, -1).amax(-1)[..., None, None] * eye)
        dense = torch.cholesky_inverse(Lc).to(P.Z.dtype)
        if len(vals) == 1 or bool((gidx == gidx[:, :1]).all()):  # one penalty per layer: one matrix per layer
            dense, gidx = dense[torch.arange(B, device=A.device), gidx[:, 0]][:, None], None
        return _Precond(K, dense=dense, gidx=gidx, kscale=kscale, c=c)

    def subset(self, kb: Tensor, kq: Tensor) -> _Precond:
        """The preconditioner of layers ``kb`` and problems ``kq``."""
        if self.diag is not None:
            return _Precond(self.K, diag=self.diag[kb].index_select(1, kq))
        return _Precond(self.K, dense=self.dense[kb], kscale=self.kscale[kb].index_select(1, kq), c=self.c[kb],
                        gidx=None if self.gidx is None else self.gidx[kb].index_select(1, kq))

    def per_problem(self, q: Tensor) -> Tensor:
        """``H0 q`` for ``q`` in per-problem layout ``[B, Q, r1 * K]`` (work dtype; may be overwritten)."""
        B, Q, _ = q.shape
        K = self.K
        if self.diag is not None:
            return q.mul_(self.diag)
        r1 = q.shape[2] // K
        x = q if K == 1 else q.view(B, Q, r1, K).transpose(2, 3).reshape(B, Q * K, r1)
        if self.gidx is None:
            out = torch.bmm(x, self.dense[:, 0])  # H0 is symmetric: (H0 x^T)^T = x H0
        else:
            out = torch.zeros_like(x)
            rows = self.gidx.repeat_interleave(K, 1)[..., None]  # [B, Q * K, 1]
            for g in range(self.dense.shape[1]):
                if bool((rows == g).any()):
                    out = torch.where(rows == g, torch.bmm(x, self.dense[:, g]), out)
        out = out.view(B, Q, K, r1).mul_(self.kscale[..., None].to(out.dtype))
        return out.transpose(2, 3).reshape(B, Q, r1 * K)

    def scaling(self, s: Tensor, y: Tensor, sy: Tensor, zs2: Tensor | None, lam: Tensor, rK: int) -> Tensor:
        """L-BFGS's scale of ``H0`` after the step ``s`` with gradient change ``y`` (rows layout; ``sy = s . y``).

        Diagonal: ``s.y / y.H0 y`` (Nocedal & Wright's choice). Dense: ``s.M s / s.y`` with ``M = H0^-1``,
        the other Barzilai-Borwein scale, which needs no product: ``s.M s = kscale^-1 (c |Z s|^2 +
        lam |s|^2)`` from ``zs2 = |Z s|^2`` per problem and class ``[B, Q, K]``; ``rK``: penalised entries.
        """
        if self.diag is not None:
            return sy / torch.linalg.vecdot(y * self.diag, y).double().clamp_min(1e-300)
        B, Q, _ = s.shape
        ss = s[..., :rK].view(B, Q, -1, self.K).square().sum(2).double()  # [B, Q, K]
        inv = torch.where(self.kscale > 0, 1.0 / self.kscale.clamp_min(1e-300), 0.0)
        sms = (inv * (self.c[:, None, None] * zs2 + lam[..., None] * ss)).sum(-1)
        return sms / sy.clamp_min(1e-300)


_C1, _C2 = 1e-4, 0.9  # sufficient decrease and curvature constants of the (strong) Wolfe conditions


def _line_trial(P: _Problems, ctx: tuple[Tensor, ...], ls: int, st: dict[str, Tensor], fdat: Tensor, gd: Tensor,
                lam: Tensor, wd: Tensor, dd: Tensor, feps: Tensor) -> tuple[Tensor, Tensor]:
    """Trial ``ls`` of every problem's line search at ``st["t"]``; updates ``st`` (t, lo, hi, acc, done) in place.

    ``fdat``: data loss at ``t = 0``; ``gd``: slope of the objective there; ``wd``, ``dd``: ``w.d`` and
    ``d.d`` over penalised coordinates; ``feps``: rounding level of the objective. Returns the data loss and
    :meth:`_Problems.line`'s state at ``st["t"]``.
    """
    t, done = st["t"], st["done"]
    ldat, d1, d2, state = P.line(ctx, t, second=ls > 0)
    dphi = ldat - fdat + lam * (t * wd + 0.5 * t * t * dd)
    p1 = d1 + lam * (wd + t * dd)
    # Armijo, or -- where the decrease is below the resolution of the objective -- Hager & Zhang's
    # approximate Wolfe test, which relies on slopes (computed accurately) instead of differences
    approx = (dphi <= feps) & (p1 <= (2 * _C1 - 1) * gd)
    armijo = (dphi <= _C1 * t * gd) | approx
    ok = ~done & armijo & ((p1.abs() <= _C2 * gd.abs()) if ls > 0 else True)
    st["acc"] = torch.where(ok, t, st["acc"])
    done = st["done"] = done | ok
    if bool(done.all()):
        return ldat, state
    far = ~armijo | (p1 > 0)
    hi = st["hi"] = torch.where(~done & far, torch.minimum(st["hi"], t), st["hi"])
    lo = st["lo"] = torch.where(~done & ~far, torch.maximum(st["lo"], t), st["lo"])
    if ls == 0:  # minimiser of the quadratic through phi(0), phi'(0), phi(1), kept in [0.1, 0.5]
        tq = -gd / (2 * (dphi - gd)).clamp_min(1e-300)
        tn = torch.where(armijo, 4.0 * t, tq.clamp(0.1, 0.5))
    else:
        p2 = d2 + lam * dd
        tn = t - p1 / p2.clamp_min(1e-300)
        inside = torch.isfinite(tn) & (tn > lo) & (tn < hi)
        tn = torch.where(inside, tn, torch.where(torch.isinf(hi), 4.0 * t, 0.5 * (lo + hi)))
    st["t"] = torch.where(done, t, tn)
    return ldat, state


def _lbfgs(P: _Problems, W: Tensor, frozen: Tensor, max_iter: int, tol: float, history: int
           ) -> tuple[Tensor, Tensor, Tensor]:
    """Minimise every problem of ``P`` from ``W`` ``[B, r1, Q, K]``; ``frozen`` ``[B, Q]`` ones stay as given.

    Weight-space vectors (weights, gradients, directions, the L-BFGS memory) are kept per problem, one
    contiguous row each (``[B, Q, r1 * K]``, the work dtype), so the two-loop recursion and the dot products
    are streaming passes; per-problem scalars (losses, slopes, step sizes) are float64.

    Returns:
        ``(W, n_iter [B, Q], converged [B, Q])``.
    """
    B, r1, Q, K = W.shape
    dev = W.device
    vdt = P.Z.dtype
    rK = (r1 - 1) * K  # penalised entries of a row: all but the intercept's K (the last ones)
    W = W.permute(0, 2, 1, 3).to(vdt, memory_format=torch.contiguous_format, copy=True).view(B, Q, r1 * K)
    W_out = W.clone()
    it_out = torch.zeros(B, Q, dtype=torch.int64, device=dev)
    conv_out = frozen.clone()
    cols = torch.arange(Q, device=dev)
    rows = torch.arange(B, device=dev)

    def dot(a: Tensor, b: Tensor) -> Tensor:
        return torch.linalg.vecdot(a, b).double()

    A = P.fwd_rows(W)
    fdat, R = P.loss_resid(A)
    g = P.grad_rows(R, W)
    prec = _Precond.build(P, A)
    conv = P.grad_ok_rows(g, tol)
    active = ~frozen & ~conv
    conv_out |= conv
    S: list[Tensor] = []
    Yh: list[Tensor] = []
    rho: list[Tensor] = []
    gamma = torch.ones(B, Q, dtype=torch.float64, device=dev)
    its = torch.zeros(B, Q, dtype=torch.int64, device=dev)
    fe = max(1e-10, 16 * torch.finfo(P.edt).eps)  # rounding level of the objective's elementwise terms

    for _ in range(max_iter):
        if not bool(active.any()):
            break
        # compact: drop layers whose problems are all done, and problems done in every layer
        keep_b, keep_q = active.any(1), active.any(0)
        if int(keep_q.sum()) <= len(cols) // 2 or int(keep_b.sum()) <= (3 * len(rows)) // 4:
            W_out[rows[:, None], cols[None, :]] = W
            it_out[rows[:, None], cols[None, :]] = its
            kb, kq = torch.nonzero(keep_b).flatten(), torch.nonzero(keep_q).flatten()
            rows, cols = rows[kb], cols[kq]

            def sub(x: Tensor, qdim: int = 1, kb: Tensor = kb, kq: Tensor = kq) -> Tensor:
                return x[kb].index_select(qdim, kq)

            W, g, A = sub(W), sub(g), sub(A, 2)
            prec = prec.subset(kb, kq)
            fdat, gamma, active, its = sub(fdat), sub(gamma), sub(active), sub(its)
            S = [sub(x) for x in S]
            Yh = [sub(x) for x in Yh]
            rho = [sub(x) for x in rho]
            P = P.subset(kb, kq)
            B = len(rows)
        # two-loop recursion; a pair with rho = 0 (not stored: curvature condition failed) is inert
        q = g.clone()
        alphas = []
        for s, y, rh in zip(reversed(S), reversed(Yh), reversed(rho)):
            a = rh * dot(s, q)
            alphas.append(a)
            q.addcmul_(y, (-a).to(vdt)[..., None])
        dvec = prec.per_problem(q).mul_(gamma.to(vdt)[..., None])
        for s, y, rh, a in zip(S, Yh, rho, reversed(alphas)):
            bcoef = rh * dot(y, dvec)
            dvec.addcmul_(s, (a - bcoef).to(vdt)[..., None])
        dvec.mul_(active.to(vdt).neg_()[..., None])
        gd = dot(g, dvec)
        bad = active & ~(gd < 0)
        if bool(bad.any()):  # not a descent direction: restart those problems from the preconditioned gradient
            dvec = torch.where(bad[..., None], prec.per_problem(g.clone()).neg_(), dvec)
            rho = [torch.where(bad, 0.0, r) for r in rho]
            gamma = torch.where(bad, 1.0, gamma)
            gd = dot(g, dvec)
        Bd = P.fwd_rows(dvec)
        if P.kind != "binary":
            Bd = Bd.sub_(P.bias)
        pw, pd = W[..., :rK], dvec[..., :rK]
        wd, dd = dot(pw, pd), dot(pd, pd)
        feps = fe * (fdat.abs() + 0.5 * P.lam * dot(pw, pw))
        # 1-D line search per problem, elementwise only: t = 1 is accepted on the Armijo test (the usual
        # case); otherwise quadratic interpolation, then safeguarded Newton steps to a strong-Wolfe step. The
        # first trial runs on every problem; the rest only on the columns of the problems still searching.
        done = ~active | ~(gd < 0)
        t = torch.where(done, 0.0, torch.ones(B, len(cols), dtype=torch.float64, device=dev))
        st = {"t": t, "lo": torch.zeros_like(t), "hi": torch.full_like(t, math.inf), "acc": torch.zeros_like(t),
              "done": done}
        terms = (fdat, gd, P.lam, wd, dd, feps)
        ctx = P.line_setup(A, Bd)
        ldat, state = _line_trial(P, ctx, 0, st, *terms)
        reuse = True  # the last evaluation of every problem was at its accepted step
        if not bool(st["done"].all()):
            bi, qi = torch.nonzero(~st["done"], as_tuple=True)
            gather = 2 * len(bi) <= st["done"].numel()  # few still searching: continue on their columns only
            if gather:
                Pc, cc = P.columns(bi, qi), P.line_columns(ctx, bi, qi)
                sc = {k: v[bi, qi][None] for k, v in st.items()}
                tc = tuple(x[bi, qi][None] for x in terms)
            else:
                Pc, cc, sc, tc = P, ctx, st, terms
            for ls in range(1, 30):
                ldat_c, state_c = _line_trial(Pc, cc, ls, sc, *tc)
                if bool(sc["done"].all()):
                    break
            reuse = bool(sc["done"].all())
            if not gather:
                ldat, state = ldat_c, state_c
            else:
                for k, v in sc.items():
                    st[k][bi, qi] = v[0]
                if reuse:
                    ldat[bi, qi] = ldat_c[0]
                    state[bi, :, qi] = state_c[0].movedim(1, 0)
            del Pc, cc
        del ctx
        done = st["done"]
        stalled = ~done & (st["lo"] <= 0)
        acc_t = torch.where(done, st["acc"], st["lo"])
        acc_t = torch.where(active, acc_t, 0.0)
        s_k = dvec.mul_(acc_t.to(vdt)[..., None])
        W = W + s_k
        A.addcmul_(acc_t.to(A.dtype)[:, None, :, None], Bd)
        if reuse:
            fdat = fdat + torch.where(active, ldat - fdat, 0.0)
            R = P.resid(state)
        else:
            fdat, R = P.loss_resid(A)
        g_new = P.grad_rows(R, W)
        y_k = g_new - g
        sy = dot(s_k, y_k)
        upd = active & (sy > 1e-10 * (dot(s_k, s_k) * dot(y_k, y_k)).sqrt()) & (sy > 0)
        S.append(s_k)
        Yh.append(y_k)
        rho.append(torch.where(upd, 1.0 / sy.clamp_min(1e-300), 0.0))
        zs2 = None if prec.diag is not None else Bd.square().sum(1).double() * acc_t.square()[..., None]
        gamma = torch.where(upd, prec.scaling(s_k, y_k, sy, zs2, P.lam, rK), gamma)
        if len(S) > history:
            S.pop(0)
            Yh.pop(0)
            rho.pop(0)
        g = g_new
        its = its + active.to(torch.int64)
        conv = P.grad_ok_rows(g, tol)
        conv_out[rows[:, None], cols[None, :]] |= conv & active
        active = active & ~conv & ~stalled
    W_out[rows[:, None], cols[None, :]] = W
    it_out[rows[:, None], cols[None, :]] = its
    B0 = W_out.shape[0]
    return W_out.view(B0, Q, r1, K).permute(0, 2, 1, 3).double(), it_out, conv_out


# ----------------------------------------------------------------------------------------------------------
# Data preparation
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Prepared:
    mean: Tensor  # [B, d]
    scale: Tensor  # [B, d]
    V: Tensor | None  # [B, d, r] float64, zero-padded beyond each layer's rank; None: not rotated (r = d)
    Z: Tensor  # [B, n_train, r + 1] work dtype, last column ones
    Zt: Tensor  # Z transposed, contiguous
    G: Tensor | None  # [B, r + 1, r + 1] Gram matrix Z^T Z (work dtype) for the dense preconditioner, else None
    r: int


def _prepare(X: Tensor, standardize: bool, work: torch.dtype, preconditioner: str) -> _Prepared:
    """Standardise on these (training) rows; rotate to the Gram eigenbasis (``"eigen"``) or form it (``"cholesky"``).

    The eigendecomposition runs in the work dtype: the fitted logits are ``Z w = Xc (V w)`` whatever V is, so
    V's own rounding only perturbs the penalty at the working precision. Centring and scaling run in X's
    dtype (sums in float64 only when that is float64: a float32 sum of a few thousand rows is accurate to
    float32 resolution); the returned mean and scale are exactly the values applied.
    """
    B, n, d = X.shape
    mean = X.mean(1)
    Xc = X - mean[:, None]
    if standardize:
        sd = Xc.square().mean(1).sqrt_()
        scale = torch.where(sd > 0, sd, torch.ones_like(sd))
        Xc = Xc.div_(scale[:, None])
    else:
        scale = torch.ones_like(mean)
    mean, scale = mean.double(), scale.double()
    ones = torch.ones(B, n, 1, dtype=work, device=X.device)
    V = None
    r = d
    if preconditioner != "eigen":
        Z = torch.cat([Xc.to(work), ones], 2)
    else:
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
        Z = torch.cat([Xw @ V, ones], 2)
        V = V.double()
    Zt = Z.mT.contiguous()
    G = torch.bmm(Zt, Z) if preconditioner == "cholesky" else None
    return _Prepared(mean=mean, scale=scale, V=V, Z=Z, Zt=Zt, G=G, r=r)


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


def _layer_bytes(n: int, d: int, Q: int, nC: int, K: int, history: int, work_bytes: int) -> int:
    """Memory of one layer's solve: ``Q`` problems at a time (``K`` outputs each), ``nC`` penalties on the C path."""
    r1 = d + 1
    elementwise = 8 * n * Q * K * 8 + 4 * n * Q * nC * K  # [n, Q, K] work arrays; held-out logits of the C grid
    state = 8 * r1 * Q * K * (2 * history + 10) + 8 * r1 * Q * nC * K  # L-BFGS memory, vectors; the C path
    precond = 20 * nC * r1 * r1  # dense preconditioner: float64 factor + work-dtype inverse per penalty
    return int(elementwise + state + 2 * work_bytes * n * r1 + 8 * (2 * n * d + 3 * d * d) + precond)


def _auto_preconditioner(n: int, d: int, QK: int, nC: int) -> str:
    """``"eigen"`` or ``"cholesky"``, whichever costs less for ``QK`` outputs per solve on ``n`` rows x ``d`` features.

    Per layer the eigen route costs an eigendecomposition (~9 d^3 at LAPACK's speed) and the rotation
    (2 n d^2); the Cholesky route a factorisation and inverse (~1.5 d^3) plus ``2 d^2 QK`` per L-BFGS
    iteration (about 20 per C on the path). When d > n the eigen route also shrinks the problem to n
    dimensions (from the n x n kernel), so it always wins there.
    """
    if d > n:
        return "eigen"
    iterations = 20 * nC
    return "eigen" if 2 * iterations * QK > 7.5 * d + 2 * n else "cholesky"


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

    # problems solved together: (fold, target) along the C path, then the targets of the refit
    q_solve = max(Fn, 1) * q_fit
    precond = cfg.preconditioner if cfg.preconditioner != "auto" else _auto_preconditioner(n_tr, d, q_solve * K, nC)
    per_layer = _layer_bytes(n_tr, d, q_solve, nC, K, cfg.history, torch.finfo(work).bits // 8)
    budget = cfg.max_batch_bytes or (128 * 2**20 if dev.type == "cpu" else 2**30)
    lb = max(1, min(L, int(budget) // max(per_layer, 1)))
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
        prep = _prepare(Xb[:, tr.to(dev)], cfg.standardize, work, precond)
        r = prep.r
        W0 = None
        if nC > 1:
            # the regularisation path: Cs ascending, each warm-started from the previous C's solutions;
            # one batch holds every (fold, target) problem, columns ordered (fold, target)
            col_fold = torch.arange(Fn, device=dev).repeat_interleave(q_fit)
            col_t = torch.arange(q_fit, device=dev).repeat(Fn)
            P = _Problems(prep, lab.kind, y_dev, fold_w.to(dev), col_fold, col_t,
                          lam_C[0].expand(Bsz, len(col_fold)).clone(), K, class_presence(fold_w), d)
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
        P = _Problems(prep, lab.kind, y_dev, ones, torch.zeros(q_fit, dtype=torch.int64, device=dev),
                      torch.arange(q_fit, device=dev), lam_fit, K, class_presence(ones.cpu()), d)
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
    if "rotate" in cfg:  # files written before the preconditioner option
        cfg["preconditioner"] = "eigen" if cfg.pop("rotate") else "diagonal"
    split = Split(train=tensors.pop("split.train"), test=tensors.pop("split.test"),
                  heldout_objects=tuple(json.loads(meta["heldout_objects"])),
                  test_heldout=tensors.pop("split.test_heldout"), dropped=tensors.pop("split.dropped"))
    kw = {name: tensors.get(name) for name in _TENSORS}
    return ProbeResult(kind=meta["kind"], split=split, n_examples=int(meta["n_examples"]),
                       config=ProbeConfig(**cfg), **kw)
