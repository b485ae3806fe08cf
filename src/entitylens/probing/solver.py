"""Batched L-BFGS for the probe problems: preconditioner, per-problem line search, iteration, cost model.

:func:`lbfgs` minimises every problem of a :class:`~entitylens.probing.objective.Problems` at once, each with
its own L-BFGS memory, step size and stopping test; converged problems and layers are dropped from the batch.
Its initial inverse Hessian is a :class:`Preconditioner`; its line search needs no extra matrix product
(along a direction the logits move linearly, so the 1-D loss, slope and curvature are elementwise sums).
:func:`layer_bytes` and :func:`auto_preconditioner` are the cost model that sizes the batches and picks the
preconditioner route.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from entitylens.probing.objective import Problems

__all__ = ["Preconditioner", "auto_preconditioner", "layer_bytes", "lbfgs"]


class Preconditioner:
    """L-BFGS's initial inverse Hessian ``H0`` for every problem of a :class:`Problems`, from the start's curvature.

    * Diagonal (features rotated to the Gram eigenbasis, or plain Jacobi): ``1 / (diag(Z^T D Z) + lam)``.
      With orthogonal feature columns this is the exact inverse Hessian of the quadratic model at the start.
    * Dense (``P.G`` set: the layer's Gram ``Z^T Z``): ``kscale * (c G + lam I_pen)^{-1}``, with ``c`` the
      layer's typical curvature ``p (1 - p)`` at the start (geometric mean over problems and classes) and
      ``kscale = c / c_qk`` each problem's (and class's) own. The inverse is exact for the quadratic model when
      every example has the same curvature (as at the start of a fit from the base rate), needs one Cholesky
      factorisation per layer and distinct penalty, and one ``[r1, r1]`` product per L-BFGS iteration --
      instead of the eigendecomposition and full rotation of the features that make ``H0`` diagonal.

    Built by :meth:`build`; the arguments are its parts.

    Args:
        K: Outputs per problem.
        diag: The diagonal in per-problem layout ``[B, Q, r1 * K]``, work dtype (``None``: dense).
        dense: ``[B, G, r1, r1]`` inverses, one per distinct penalty ``G`` (one per layer when ``gidx`` is None).
        gidx: ``[B, Q]`` index of each problem's penalty into ``dense``, or ``None``.
        kscale: ``[B, Q, K]`` scale ``c / c_qk`` of each problem and output (0 where dead).
        c: ``[B]`` each layer's typical start curvature.
    """

    def __init__(self, K: int, diag: Tensor | None = None, dense: Tensor | None = None, gidx: Tensor | None = None,
                 kscale: Tensor | None = None, c: Tensor | None = None) -> None:
        self.K, self.diag, self.dense, self.gidx, self.kscale, self.c = K, diag, dense, gidx, kscale, c

    @staticmethod
    def build(P: Problems, A: Tensor) -> Preconditioner:
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
            return Preconditioner(K, diag=diag.permute(0, 2, 1, 3).to(P.Z.dtype).contiguous().view(B, Q, -1))
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
        return Preconditioner(K, dense=dense, gidx=gidx, kscale=kscale, c=c)

    def subset(self, kb: Tensor, kq: Tensor) -> Preconditioner:
        """The preconditioner of layers ``kb`` and problems ``kq``."""
        if self.diag is not None:
            return Preconditioner(self.K, diag=self.diag[kb].index_select(1, kq))
        assert self.dense is not None and self.kscale is not None and self.c is not None  # dense: all three set
        return Preconditioner(self.K, dense=self.dense[kb], kscale=self.kscale[kb].index_select(1, kq), c=self.c[kb],
                        gidx=None if self.gidx is None else self.gidx[kb].index_select(1, kq))

    def per_problem(self, q: Tensor) -> Tensor:
        """``H0 q`` for ``q`` in per-problem layout ``[B, Q, r1 * K]`` (work dtype; may be overwritten)."""
        B, Q, _ = q.shape
        K = self.K
        if self.diag is not None:
            return q.mul_(self.diag)
        assert self.dense is not None and self.kscale is not None  # dense: both set
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
        assert self.kscale is not None and self.c is not None and zs2 is not None  # dense: all set
        B, Q, _ = s.shape
        ss = s[..., :rK].view(B, Q, -1, self.K).square().sum(2).double()  # [B, Q, K]
        inv = torch.where(self.kscale > 0, 1.0 / self.kscale.clamp_min(1e-300), 0.0)
        sms = (inv * (self.c[:, None, None] * zs2 + lam[..., None] * ss)).sum(-1)
        return sms / sy.clamp_min(1e-300)


_C1, _C2 = 1e-4, 0.9  # sufficient decrease and curvature constants of the (strong) Wolfe conditions


def _line_trial(P: Problems, ctx: tuple[Tensor, ...], ls: int, st: dict[str, Tensor], fdat: Tensor, gd: Tensor,
                lam: Tensor, wd: Tensor, dd: Tensor, feps: Tensor) -> tuple[Tensor, Tensor]:
    """Trial ``ls`` of every problem's line search at ``st["t"]``; updates ``st`` (t, lo, hi, acc, done) in place.

    ``fdat``: data loss at ``t = 0``; ``gd``: slope of the objective there; ``wd``, ``dd``: ``w.d`` and
    ``d.d`` over penalised coordinates; ``feps``: rounding level of the objective. Returns the data loss and
    :meth:`Problems.line`'s state at ``st["t"]``.
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
        assert d2 is not None  # P.line computes the curvature for every trial after the first
        p2 = d2 + lam * dd
        tn = t - p1 / p2.clamp_min(1e-300)
        inside = torch.isfinite(tn) & (tn > lo) & (tn < hi)
        tn = torch.where(inside, tn, torch.where(torch.isinf(hi), 4.0 * t, 0.5 * (lo + hi)))
    st["t"] = torch.where(done, t, tn)
    return ldat, state


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Dot products of rows-layout vectors ``[B, Q, m]`` per problem, ``[B, Q]`` float64."""
    return torch.linalg.vecdot(a, b).double()


def _take(x: Tensor, kb: Tensor, kq: Tensor, qdim: int = 1) -> Tensor:
    """The layers ``kb`` and the problems ``kq`` (along dimension ``qdim``) of a per-problem tensor."""
    return x[kb].index_select(qdim, kq)


class _Memory:
    """Each problem's L-BFGS memory: the last ``history`` steps ``s``, gradient changes ``y`` and ``rho = 1 / s.y``.

    A pair with ``rho = 0`` (not stored: the curvature condition failed) is inert in the recursion.
    """

    def __init__(self, history: int) -> None:
        self.history = history
        self.S: list[Tensor] = []
        self.Yh: list[Tensor] = []
        self.rho: list[Tensor] = []

    def direction(self, g: Tensor, prec: Preconditioner, gamma: Tensor, active: Tensor, vdt: torch.dtype) -> Tensor:
        """The search direction ``-H g`` (two-loop recursion, ``H0 = gamma * prec``); zero for inactive problems."""
        q = g.clone()
        alphas = []
        for s, y, rh in zip(reversed(self.S), reversed(self.Yh), reversed(self.rho)):
            a = rh * _dot(s, q)
            alphas.append(a)
            q.addcmul_(y, (-a).to(vdt)[..., None])
        dvec = prec.per_problem(q).mul_(gamma.to(vdt)[..., None])
        for s, y, rh, a in zip(self.S, self.Yh, self.rho, reversed(alphas)):
            bcoef = rh * _dot(y, dvec)
            dvec.addcmul_(s, (a - bcoef).to(vdt)[..., None])
        return dvec.mul_(active.to(vdt).neg_()[..., None])

    def forget(self, bad: Tensor) -> None:
        """Make every stored pair inert for the problems ``bad`` ``[B, Q]`` (a restart)."""
        self.rho = [torch.where(bad, 0.0, r) for r in self.rho]

    def push(self, s: Tensor, y: Tensor, rho: Tensor) -> None:
        """Store a pair (``rho = 0`` where it is not to be used), forgetting the oldest beyond ``history``."""
        self.S.append(s)
        self.Yh.append(y)
        self.rho.append(rho)
        if len(self.S) > self.history:
            self.S.pop(0)
            self.Yh.pop(0)
            self.rho.pop(0)

    def take(self, kb: Tensor, kq: Tensor) -> None:
        """Keep the layers ``kb`` and problems ``kq`` only."""
        self.S = [_take(x, kb, kq) for x in self.S]
        self.Yh = [_take(x, kb, kq) for x in self.Yh]
        self.rho = [_take(x, kb, kq) for x in self.rho]


def _line_search(P: Problems, A: Tensor, Bd: Tensor, W: Tensor, dvec: Tensor, fdat: Tensor, gd: Tensor,
                 active: Tensor, fe: float, rK: int) -> tuple[dict[str, Tensor], Tensor, Tensor, bool]:
    """Every active problem's 1-D line search along ``dvec`` from ``W`` (logits ``A``, moving as ``A + t Bd``).

    Elementwise only: ``t = 1`` is accepted on the Armijo test (the usual case); otherwise quadratic
    interpolation, then safeguarded Newton steps to a strong-Wolfe step. The first trial runs on every
    problem; the rest only on the columns of the problems still searching.

    Returns:
        The search state (``t``, ``lo``, ``hi``, ``acc``: the accepted step, ``done``), the data loss and
        :meth:`Problems.line`'s state at the last trial, and whether that trial was every problem's accepted
        step (then the loss and state are reused instead of evaluated again).
    """
    pw, pd = W[..., :rK], dvec[..., :rK]
    wd, dd = _dot(pw, pd), _dot(pd, pd)
    feps = fe * (fdat.abs() + 0.5 * P.lam * _dot(pw, pw))
    done = ~active | ~(gd < 0)
    t = torch.where(done, 0.0, torch.ones(active.shape, dtype=torch.float64, device=active.device))
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
    return st, ldat, state, reuse


def lbfgs(P: Problems, W: Tensor, frozen: Tensor, max_iter: int, tol: float, history: int
          ) -> tuple[Tensor, Tensor, Tensor]:
    """Minimise every problem of ``P`` from ``W`` ``[B, r1, Q, K]``; ``frozen`` ``[B, Q]`` ones stay as given.

    Weight-space vectors (weights, gradients, directions, the L-BFGS memory) are kept per problem, one
    contiguous row each (``[B, Q, r1 * K]``, the work dtype), so the two-loop recursion and the dot products
    are streaming passes; per-problem scalars (losses, slopes, step sizes) are float64. Each problem stops
    when its gradient test passes (:meth:`Problems.grad_ok_rows`) or its line search stalls.

    Long because the iteration's state -- weights, gradients, logits, losses, scales, the active set and the
    batch's layer and problem indices -- changes at every step, in place, and is narrowed together when
    problems converge; the self-contained parts (the memory's two-loop recursion, the line search) are helpers.

    Args:
        P: The problems.
        W: Starting weights ``[B, r1, Q, K]``.
        frozen: ``[B, Q]`` problems left at their start (counted as converged).
        max_iter: Iteration limit per problem.
        tol: Gradient tolerance (max-abs gradient of the mean loss).
        history: L-BFGS memory (pairs kept).

    Returns:
        ``(W, n_iter [B, Q], converged [B, Q])``, ``W`` in float64.
    """
    B, r1, Q, K = W.shape
    dev = W.device
    vdt = P.Z.dtype
    rK = (r1 - 1) * K  # penalised entries of a row: all but the intercept's K (the last ones)
    W = W.permute(0, 2, 1, 3).to(vdt, memory_format=torch.contiguous_format, copy=True).view(B, Q, r1 * K)
    W_out, it_out, conv_out = W.clone(), torch.zeros(B, Q, dtype=torch.int64, device=dev), frozen.clone()
    cols, rows = torch.arange(Q, device=dev), torch.arange(B, device=dev)
    A = P.fwd_rows(W)
    fdat, R = P.loss_resid(A)
    g = P.grad_rows(R, W)
    prec = Preconditioner.build(P, A)
    conv = P.grad_ok_rows(g, tol)
    active = ~frozen & ~conv
    conv_out |= conv
    mem = _Memory(history)
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
            W, g, A = _take(W, kb, kq), _take(g, kb, kq), _take(A, kb, kq, 2)
            fdat, gamma, active, its = (_take(x, kb, kq) for x in (fdat, gamma, active, its))
            prec, P = prec.subset(kb, kq), P.subset(kb, kq)
            mem.take(kb, kq)
        dvec = mem.direction(g, prec, gamma, active, vdt)
        gd = _dot(g, dvec)
        bad = active & ~(gd < 0)
        if bool(bad.any()):  # not a descent direction: restart those problems from the preconditioned gradient
            dvec = torch.where(bad[..., None], prec.per_problem(g.clone()).neg_(), dvec)
            mem.forget(bad)
            gamma = torch.where(bad, 1.0, gamma)
            gd = _dot(g, dvec)
        Bd = P.fwd_rows(dvec)
        if P.kind != "binary":
            Bd = Bd.sub_(P.bias)
        st, ldat, state, reuse = _line_search(P, A, Bd, W, dvec, fdat, gd, active, fe, rK)
        stalled = ~st["done"] & (st["lo"] <= 0)
        acc_t = torch.where(active, torch.where(st["done"], st["acc"], st["lo"]), 0.0)
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
        sy = _dot(s_k, y_k)
        upd = active & (sy > 1e-10 * (_dot(s_k, s_k) * _dot(y_k, y_k)).sqrt()) & (sy > 0)
        mem.push(s_k, y_k, torch.where(upd, 1.0 / sy.clamp_min(1e-300), 0.0))
        zs2 = None if prec.diag is not None else Bd.square().sum(1).double() * acc_t.square()[..., None]
        gamma = torch.where(upd, prec.scaling(s_k, y_k, sy, zs2, P.lam, rK), gamma)
        g = g_new
        its = its + active.to(torch.int64)
        conv = P.grad_ok_rows(g, tol)
        conv_out[rows[:, None], cols[None, :]] |= conv & active
        active = active & ~conv & ~stalled
    W_out[rows[:, None], cols[None, :]] = W
    it_out[rows[:, None], cols[None, :]] = its
    return W_out.view(W_out.shape[0], Q, r1, K).permute(0, 2, 1, 3).double(), it_out, conv_out


def layer_bytes(n: int, d: int, Q: int, nC: int, K: int, history: int, work_bytes: int) -> int:
    """Memory of one layer's solve: ``Q`` problems at a time (``K`` outputs each), ``nC`` penalties on the C path.

    Args:
        n: Training rows.
        d: Features.
        Q: Problems solved together.
        nC: Penalties (Cs) on the regularisation path.
        K: Outputs per problem.
        history: L-BFGS memory.
        work_bytes: Bytes per element of the work dtype.

    Returns:
        The estimate in bytes (sizes how many layers are solved in one batch).
    """
    r1 = d + 1
    elementwise = 8 * n * Q * K * 8 + 4 * n * Q * nC * K  # [n, Q, K] work arrays; held-out logits of the C grid
    state = 8 * r1 * Q * K * (2 * history + 10) + 8 * r1 * Q * nC * K  # L-BFGS memory, vectors; the C path
    precond = 20 * nC * r1 * r1  # dense preconditioner: float64 factor + work-dtype inverse per penalty
    return int(elementwise + state + 2 * work_bytes * n * r1 + 8 * (2 * n * d + 3 * d * d) + precond)


def auto_preconditioner(n: int, d: int, QK: int, nC: int) -> str:
    """``"eigen"`` or ``"cholesky"``, whichever costs less for ``QK`` outputs per solve on ``n`` rows x ``d`` features.

    Per layer the eigen route costs an eigendecomposition (~9 d^3 at LAPACK's speed) and the rotation
    (2 n d^2); the Cholesky route a factorisation and inverse (~1.5 d^3) plus ``2 d^2 QK`` per L-BFGS
    iteration (about 20 per C on the path). When d > n the eigen route also shrinks the problem to n
    dimensions (from the n x n kernel), so it always wins there.

    Args:
        n: Training rows.
        d: Features.
        QK: Outputs per solve (problems x outputs each).
        nC: Penalties (Cs) on the regularisation path.

    Returns:
        ``"eigen"`` or ``"cholesky"``.
    """
    if d > n:
        return "eigen"
    iterations = 20 * nC
    return "eigen" if 2 * iterations * QK > 7.5 * d + 2 * n else "cholesky"

