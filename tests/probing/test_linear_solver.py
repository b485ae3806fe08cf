"""The batched solver's pieces against torch's own losses, autograd and dense solves (independent references)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from entitylens.probing.objective import Problems, neg_log_sigmoid_sum
from entitylens.probing.prepare import Prepared
from entitylens.probing.solver import Preconditioner


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_neg_log_sigmoid_sum_matches_bce_including_extreme_logits(dtype):
    sa = torch.tensor([[-1000.0, -45.0, -30.5, -29.5, -3.0, 0.0, 2.0, 17.0, 40.0, 1000.0]], dtype=dtype).T[None]
    w = torch.linspace(0.5, 2.0, sa.shape[1], dtype=dtype)[:, None]
    ours = neg_log_sigmoid_sum(sa, torch.sigmoid(sa), w)
    # -log sigmoid(s) is the logistic loss of logit s with label 1
    ref = F.binary_cross_entropy_with_logits(sa.double(), torch.ones_like(sa, dtype=torch.float64),
                                             weight=w.double().expand_as(sa), reduction="none").sum(1)
    assert ours.dtype == torch.float64
    rtol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(ours, ref, rtol=rtol, atol=1e-6 if dtype == torch.float32 else 1e-12)


def _problem(kind: str, dtype: torch.dtype, seed: int = 0, unit: bool = False):
    g = torch.Generator().manual_seed(seed)
    B, n, r, Q = 2, 40, 6, 3
    Z = torch.cat([torch.randn(B, n, r, generator=g), torch.ones(B, n, 1)], 2).to(dtype)
    Zt = Z.mT.contiguous()
    prep = Prepared(mean=torch.zeros(B, r), scale=torch.ones(B, r), V=None, Z=Z, Zt=Zt, G=torch.bmm(Zt, Z), r=r)
    fold_w = (torch.rand(n, 2, generator=g) > 0.3).double()
    if unit:  # no fold masks (a fit on the whole training split)
        fold_w = torch.ones_like(fold_w)
    col_fold = torch.tensor([0, 1, 0])
    lam = torch.full((B, Q), 0.5, dtype=torch.float64)
    if kind == "binary":
        y = (torch.rand(n, Q, generator=g) < 0.3).double()
        P = Problems(prep, "binary", y, fold_w, col_fold, torch.arange(Q), lam, 1, None, r)
        K = 1
    else:
        K = 4
        y = torch.randint(0, K, (n,), generator=g)
        present = torch.stack([torch.bincount(y[fold_w[:, f] > 0], minlength=K) > 0 for f in range(2)])
        P = Problems(prep, "multiclass", y, fold_w, col_fold, torch.zeros(Q, dtype=torch.int64), lam, K, present, r)
    W = torch.randn(B, r + 1, Q, K, generator=g, dtype=torch.float64)
    D = torch.randn(B, r + 1, Q, K, generator=g, dtype=torch.float64)
    return P, W, D, y, fold_w[:, col_fold]


def _data_loss(P: Problems, logits: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Weighted sum of per-example losses ``[B, Q]`` by torch's own loss functions (float64)."""
    if P.kind == "binary":
        a = logits[..., 0]
        return (F.binary_cross_entropy_with_logits(a, y.expand_as(a), reduction="none") * w).sum(1)
    B, n, Q, K = logits.shape
    logits = logits + P.bias.double()  # classes absent from a fold's training rows
    ce = F.cross_entropy(logits.permute(0, 3, 1, 2), y.view(1, n, 1).expand(B, n, Q), reduction="none")
    return (ce * w).sum(1)


@pytest.mark.parametrize("kind", ["binary", "multiclass"])
def test_line_search_terms_match_autograd(kind):
    P, W, D, y, w = _problem(kind, torch.float64)
    Zd = P.Z.double()
    t0 = torch.tensor([[0.3, 0.7, 1.5], [0.0, 1.0, 2.5]], dtype=torch.float64)

    t = t0.clone().requires_grad_(True)
    logits = torch.einsum("bnr,brqk->bnqk", Zd, W + t[:, None, :, None] * D)
    f = _data_loss(P, logits, y, w)
    (d1,) = torch.autograd.grad(f.sum(), t, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), t)

    A, Bd = P.fwd(W), P.fwd(D) - (P.bias if kind != "binary" else 0.0)
    loss, slope, curv, state = P.line(P.line_setup(A, Bd), t0, second=True)
    torch.testing.assert_close(loss, f.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(slope, d1.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(curv, d2, rtol=1e-10, atol=1e-10)

    # the residual is dloss/dlogit at the evaluated point, and loss_resid there agrees
    At = logits.detach().requires_grad_(True)
    (R_ref,) = torch.autograd.grad(_data_loss(P, At, y, w).sum(), At)
    torch.testing.assert_close(P.resid(state), R_ref, rtol=1e-10, atol=1e-12)
    A_t = A + t0[:, None, :, None] * Bd
    loss2, R2 = P.loss_resid(A_t)
    torch.testing.assert_close(loss2, f.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(R2, R_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["binary", "multiclass"])
def test_float32_elementwise_terms_are_float32_accurate_and_returned_as_float64(kind):
    P64, W, D, y, w = _problem(kind, torch.float64, seed=3)
    P32, *_ = _problem(kind, torch.float32, seed=3)
    t0 = torch.full((2, 3), 0.8, dtype=torch.float64)
    out64 = P64.line(P64.line_setup(P64.fwd(W), P64.fwd(D) - (P64.bias if kind != "binary" else 0.0)), t0)
    A32, B32 = P32.fwd(W), P32.fwd(D) - (P32.bias if kind != "binary" else 0.0)
    assert A32.dtype == torch.float32
    out32 = P32.line(P32.line_setup(A32, B32), t0)
    for a, b in zip(out64[:3], out32[:3], strict=True):
        assert b.dtype == torch.float64
        torch.testing.assert_close(b, a, rtol=2e-5, atol=1e-4)


@pytest.mark.parametrize("kind", ["binary", "multiclass"])
def test_row_layout_logits_and_gradient_match_autograd(kind):
    P, W, _, y, w = _problem(kind, torch.float64)
    B, r1, Q, K = W.shape
    Wv = W.clone().requires_grad_(True)
    logits = torch.einsum("bnr,brqk->bnqk", P.Z, Wv)
    penalty = 0.5 * (P.lam[:, None, :, None] * P.pen * Wv * Wv).sum()  # the intercept (last row) is free
    (g_ref,) = torch.autograd.grad(_data_loss(P, logits, y, w).sum() + penalty, Wv)

    rows = W.permute(0, 2, 1, 3).reshape(B, Q, r1 * K)  # one contiguous row per problem
    A = P.fwd_rows(rows)
    torch.testing.assert_close(A, P.fwd(W), rtol=1e-12, atol=1e-12)
    _, R = P.loss_resid(A)
    g = P.grad_rows(R, rows)
    torch.testing.assert_close(g, g_ref.permute(0, 2, 1, 3).reshape(B, Q, r1 * K), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["binary", "multiclass"])
def test_dense_preconditioner_solves_the_curvature_weighted_gram_system(kind):
    """``H0 x = (c / c_qk) (c G + lam I_pen)^-1 x``: c the layer's geometric-mean start curvature, one factor per
    distinct penalty (layer 0 mixes two), checked against ``torch.linalg.solve`` in float64."""
    P, W, _, y, w = _problem(kind, torch.float64, seed=1)
    B, r1, Q, K = W.shape
    n = P.n
    P.lam = torch.tensor([[0.5, 2.0, 0.5], [0.5, 0.5, 0.5]], dtype=torch.float64)
    A = P.fwd(W)
    prec = Preconditioner.build(P, A)
    assert prec.gidx is not None  # several penalties: the grouped application
    x = torch.randn(B, Q, r1 * K, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out = prec.per_problem(x.clone()).view(B, Q, r1, K)

    cq = P.curvature(A).sum(1) / n  # [B, Q, K]: each problem's mean curvature at the start
    live = cq > 1e-12
    if kind != "binary":
        live &= P.bias == 0
    pen = torch.diag(P.pen.view(r1))
    for b in range(B):
        c = torch.exp(cq[b][live[b]].log().mean())
        for q in range(Q):
            M = c * P.G[b] + P.lam[b, q] * pen
            sol = torch.linalg.solve(M, x[b, q].view(r1, K))
            expected = torch.where(live[b, q], (c / cq[b, q]).clamp(1e-4, 1e4), 0.0) * sol
            torch.testing.assert_close(out[b, q], expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("kind", ["binary", "multiclass"])
@pytest.mark.parametrize("unit", [False, True])
def test_line_search_on_gathered_columns_equals_the_full_batch(kind, unit):
    P, W, D, y, w = _problem(kind, torch.float32, seed=2, unit=unit)
    A, Bd = P.fwd(W), P.fwd(D) - (P.bias if kind != "binary" else 0.0)
    ctx = P.line_setup(A, Bd)
    t = torch.tensor([[0.3, 0.7, 1.5], [0.2, 1.0, 2.5]], dtype=torch.float64)
    full = P.line(ctx, t)
    bi, qi = torch.tensor([1, 0, 1]), torch.tensor([2, 1, 0])
    part = P.columns(bi, qi).line(P.line_columns(ctx, bi, qi), t[bi, qi][None])
    for a, b in zip(full[:3], part[:3], strict=True):
        torch.testing.assert_close(b[0], a[bi, qi], rtol=1e-6, atol=1e-6)
    # the state (sigmoids, or the residual) of those columns, as the solver scatters it back into the batch
    torch.testing.assert_close(part[3][0].movedim(1, 0), full[3][bi, :, qi], rtol=1e-6, atol=1e-7)
