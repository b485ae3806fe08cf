"""Least-squares (ridge) probes for every layer and every target at once, in closed form.

``ProbeConfig(estimator="ridge")``. Per layer, scikit-learn's ``Ridge(alpha=1/C)`` on the standardised
features (unpenalised intercept) with *coded* targets, one column per output:

* independent 0/1 targets (``[n, T]``): the indicator ``y``; with ``class_weight="balanced"`` the
  prior-scaled indicator ``y / pi`` (``pi`` the column's positive rate on the training split). The
  least-squares fit estimates ``E[y | x] = P(1 | x)`` or ``P(1 | x) / pi``; the decision score ("logit")
  is the fit minus ``0.5`` or minus ``1``, so ``> 0`` is the Bayes decision (plain or balanced: ``P > pi``).
  Columns that form one categorical variable (e.g. an object's never / present / removed tag) are
  decided by the argmax of their scores, which with the prior-scaled coding is ``argmax P(c | x) / pi_c``:
  the decision that maximises balanced accuracy -- the balance their class-weighted softmax aims for,
  without weights (so one Gram matrix serves every column).
* a class label (``[n]``): one-hot columns (scaled by ``1 / pi_c`` when balanced); argmax.

Cost per layer: one Gram matrix ``X^T X`` and ``X^T Y`` for all targets, then per C one Cholesky
factorisation and two triangular solves -- no iterations. Cross-validation reuses the training split's Gram
matrix: each fold's is a downdate by its held-out rows (and a rank-one re-centring), so the folds cost one
more Gram's worth of products. C is chosen by the pooled out-of-fold squared error of the coded targets
(``cv_metric="log_loss"``: the loss ridge minimises), or accuracy / balanced accuracy of the decisions,
per layer (or per target), ties to the smaller C. Folds reuse the whole training split's standardisation,
as the logistic path does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from entitylens.errors import EntitylensError
from entitylens.probing import metrics as M
from entitylens.probing.config import ProbeConfig
from entitylens.probing.prepare import Labels, Outputs, standardize_rows
from entitylens.probing.splits import group_folds
from entitylens.progress import progress

__all__ = ["coded_targets", "column_ranks", "fit_ridge", "group_index"]

_WORK = {"float32": torch.float32, "float64": torch.float64}


def column_ranks(column_groups: Sequence[int]) -> Tensor:
    """``[T]`` each column's position within its group (the class it stands for in a one-vs-rest group).

    Raises:
        EntitylensError: when the groups do not all have the same number of columns.
    """
    seen: dict[int, int] = {}
    ranks = []
    for g in column_groups:
        ranks.append(seen.get(g, 0))
        seen[g] = ranks[-1] + 1
    if len(set(seen.values())) > 1:
        raise EntitylensError("column_groups must give every group the same number of columns (one per class); "
                              "pass the target's own column_groups")
    return torch.tensor(ranks, dtype=torch.int64)


def group_index(column_groups: Sequence[int]) -> Tensor:
    """``[group, class]`` the column of each group's each class (groups ordered by their id).

    Raises:
        EntitylensError: when the groups do not all have the same number of columns.
    """
    rank = column_ranks(column_groups)
    order = sorted(range(len(column_groups)), key=lambda j: (column_groups[j], int(rank[j])))
    return torch.tensor(order).view(-1, int(rank.max()) + 1)


def coded_targets(lab: Labels, y_tr: Tensor, class_weight: str | None, column_groups: Sequence[int] = ()
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """The regression targets of the training rows, the decision offset and the constant-column fix.

    Args:
        lab: The encoded labels (binary ``[n, T]`` 0/1 or a class index ``[n]``).
        y_tr: The training rows' labels (``lab.y[train]``).
        class_weight: ``None`` (indicator coding) or ``"balanced"`` (indicator / prior).
        column_groups: Binary columns that form one-vs-rest groups of one categorical variable each (the
            ternary tags: three columns per entry): with ``"balanced"`` the prior of a column is pooled over
            every group's column of the same class -- one prior per class, as a class-weighted softmax over
            all entries weighs them -- instead of the column's own positive rate.

    Returns:
        ``T`` ``[n_tr, out]`` float64 coded targets; ``offset`` ``[out]`` subtracted from the fit to give the
        decision score; ``always`` ``[out]`` bool: binary columns positive on every training row (their
        score is set to +1: the coded column is constant there and its fit would sit on the threshold).
    """
    if lab.kind == "binary":
        y = y_tr.double()
        out = y.shape[1]
        always = y.min(0).values > 0
    else:
        y = F.one_hot(y_tr, lab.K).double()
        out = lab.K
        always = torch.zeros(out, dtype=torch.bool)
    if class_weight == "balanced":
        pi = y.mean(0)
        if column_groups and lab.kind == "binary":
            rank = column_ranks(column_groups)
            pooled = torch.zeros(int(rank.max()) + 1, dtype=torch.float64).index_add_(0, rank, pi)
            pi = (pooled / torch.bincount(rank).double())[rank]
        T = torch.where(pi > 0, y / pi.clamp_min(1e-300), torch.zeros_like(y))
        offset = torch.ones(out, dtype=torch.float64)
    else:
        T = y
        offset = torch.full((out,), 0.5, dtype=torch.float64)
    if lab.kind != "binary":
        offset = torch.zeros(out, dtype=torch.float64)  # argmax decides; no threshold
    return T, offset, always


def _chol_solve(A: Tensor, R: Tensor, C: float) -> Tensor:
    """``A^-1 R`` for a batch of symmetric positive definite ``A`` (one Cholesky), or a one-line error."""
    Lc, info = torch.linalg.cholesky_ex(A)
    if bool((info != 0).any()):
        Lc, info = torch.linalg.cholesky_ex(A.double())
        if bool((info != 0).any()):
            raise EntitylensError(f"the ridge system at C={C:g} is not positive definite; use a smaller C "
                                  "(a stronger penalty) or dtype='float64'")
        return torch.cholesky_solve(R.double(), Lc).to(R.dtype)
    return torch.cholesky_solve(R, Lc)


def _fold_systems(Xc: Tensor, Tc: Tensor, G: Tensor, R: Tensor, held: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A fold's Gram matrix and right-hand side on its kept rows, re-centred on them (downdate of ``G``, ``R``).

    Returns:
        ``G_k`` ``[B, d, d]``, ``R_k`` ``[B, d, out]``, the kept rows' feature mean ``[B, d]`` and target
        mean ``[out]`` (both relative to the training split's centring).
    """
    n_tr = Xc.shape[1]
    Xh, Th = Xc[:, held], Tc[held]
    n_k = n_tr - int(held.sum())
    m = -Xh.sum(1) / n_k  # the split is centred: the kept rows' sum is minus the held rows'
    tm = -Th.sum(0) / n_k
    Gk = G - Xh.mT @ Xh - n_k * m[:, :, None] * m[:, None, :]
    Rk = R - Xh.mT @ Th - n_k * m[:, :, None] * tm[None, None, :]
    return Gk, Rk, m, tm


def _grouped_scores(fit: Tensor, y: Tensor, column_groups: Sequence[int], metric: str) -> Tensor:
    """``[B, nC, out]`` accuracy (or balanced accuracy) of the groups' argmax decisions, pooled over every group.

    Args:
        fit: ``[B, n, nC, out]`` out-of-fold fits of the coded targets.
        y: ``[n, out]`` 0/1 labels (one positive column per group).
        column_groups: The group of each column.
        metric: ``"accuracy"`` or ``"balanced_accuracy"`` (mean over classes of the pooled recall).

    Returns:
        The score of each (layer, C), repeated over the columns (every column shares its layer's decision).
    """
    B, n, nC, out = fit.shape
    idx = group_index(column_groups).to(fit.device)  # [entry, class] -> column
    K = idx.shape[1]
    pred = fit[..., idx].argmax(-1)  # [B, n, nC, entry]
    truth = y[:, idx].double().argmax(-1)  # [n, entry]
    hit = (pred == truth[None, :, None]).double()
    if metric == "accuracy":
        score = hit.mean((1, 3))
    else:
        by_row = hit.permute(0, 2, 1, 3)  # [B, nC, n, entry]
        recalls = [by_row[:, :, truth == k].mean(-1) for k in range(K) if bool((truth == k).any())]
        score = torch.stack(recalls).mean(0)
    return score[..., None].expand(B, nC, out)


def _cv_scores(Xc: Tensor, Tc: Tensor, T: Tensor, G: Tensor, R: Tensor, lab: Labels, y_tr: Tensor,
               fold: Tensor, cfg: ProbeConfig, offset: Tensor, column_groups: Sequence[int] = ()) -> Tensor:
    """Pooled out-of-fold scores ``[B, nC, out]`` (binary) or ``[B, nC, 1]`` (class label); higher is better.

    With ``column_groups`` and an accuracy metric, the decisions scored are each group's argmax.
    """
    B, n_tr, d = Xc.shape
    nC, out = len(cfg.Cs), Tc.shape[1]
    eye = torch.eye(d, dtype=Xc.dtype, device=Xc.device)
    oof = torch.zeros(B, n_tr, nC, out, dtype=Xc.dtype, device=Xc.device)
    for f in range(cfg.folds):
        held = fold == f
        if not bool(held.any()):
            continue
        Gk, Rk, m, tm = _fold_systems(Xc, Tc, G, R, held)
        Xh = Xc[:, held] - m[:, None]
        for ci, c in enumerate(cfg.Cs):
            W = _chol_solve(Gk + eye / c, Rk, c)
            oof[:, held, ci] = Xh @ W + tm
    fit = oof + T.mean(0).to(oof)  # back from the centred targets to the coded ones
    if cfg.cv_metric == "log_loss":  # ridge's own loss: pooled squared error of the coded targets
        se = -(fit.double() - T.to(fit.device)[None, :, None]).square().mean(1)  # [B, nC, out]
        return se if lab.kind == "binary" else se.mean(-1, keepdim=True)
    if lab.kind == "binary" and column_groups:
        return _grouped_scores(fit.double(), y_tr.to(fit.device), column_groups, cfg.cv_metric)
    if lab.kind == "binary":
        logits = (fit.double() - offset.to(fit.device)).reshape(B, n_tr, nC * out, 1)
        yq = y_tr.double().to(fit.device).repeat(1, nC)
        sc = M.heldout_scores(logits, "binary", yq, torch.ones_like(yq, dtype=torch.bool), cfg.cv_metric)
        return sc.view(B, nC, out)
    ones = torch.ones(n_tr, nC, dtype=torch.bool, device=fit.device)
    return M.heldout_scores(fit.double(), "multiclass", y_tr.to(fit.device), ones, cfg.cv_metric)[:, :, None]


def _layers_per_batch(n_tr: int, d: int, out: int, L: int, cfg: ProbeConfig) -> int:
    nC = len(cfg.Cs)
    per_layer = 8 * (2 * n_tr * d + 3 * d * d + d * out + (n_tr * nC * out if nC > 1 else 0))
    budget = cfg.max_batch_bytes or (128 * 2**20 if torch.device(cfg.device).type == "cpu" else 2**30)
    return max(1, min(L, int(budget) // per_layer))


def fit_ridge(X: Tensor, lab: Labels, codes: Tensor, tr: Tensor, te: Tensor, cfg: ProbeConfig,
              column_groups: Sequence[int] = ()) -> Outputs:
    """Ridge probes on every layer of ``X`` ``[L, n, d]`` (see the module docstring).

    Args:
        X: Features of every layer.
        lab: Encoded labels (:func:`~entitylens.probing.prepare.as_labels`).
        codes: ``[n]`` group code per example (folds never split a group).
        tr: Training row indices.
        te: Test row indices.
        cfg: The configuration (``Cs``, ``folds``, ``cv_metric``, ``select``, ``class_weight``, ``dtype``,
            ``standardize``, ``device``, ``max_batch_bytes``, ``seed``).
        column_groups: One-vs-rest column groups (see :func:`coded_targets`): pooled priors, and CV
            accuracy scored on each group's argmax.

    Returns:
        The :class:`~entitylens.probing.prepare.Outputs` (no iterations: ``n_iter`` 0, ``converged`` True).
    """
    dev, work = torch.device(cfg.device), _WORK[cfg.dtype]
    L, _, d = X.shape
    y_tr = lab.y[tr]
    groups = tuple(column_groups) if lab.kind == "binary" else ()
    T, offset, always = coded_targets(lab, y_tr, cfg.class_weight, groups)
    n_tr, out = T.shape
    nC = len(cfg.Cs)
    per_target = cfg.select == "target" and lab.kind == "binary"
    fold = group_folds(codes[tr], cfg.folds, cfg.seed).to(dev) if nC > 1 else None
    Td = T.to(device=dev, dtype=work)
    tbar = Td.mean(0)
    Tc = Td - tbar
    b = tbar.double().cpu() - offset
    b = torch.where(always, torch.ones_like(b), b)
    q = out if lab.kind == "binary" else 1
    res = Outputs.empty(L, d, out, q, n_tr, len(te), cfg.Cs[0], nC, out if per_target else None)
    res.intercept[:] = b
    res.converged[:] = True  # closed form: nothing to converge
    lb = _layers_per_batch(n_tr, d, out, L, cfg)
    bar = progress(total=L, desc="ridge probes", unit="layer")
    eye = torch.eye(d, dtype=work, device=dev)
    Cs = torch.tensor(cfg.Cs, dtype=torch.float64)
    for l0 in range(0, L, lb):
        sl = slice(l0, min(L, l0 + lb))
        Xb = X[sl].to(device=dev, dtype=torch.promote_types(X.dtype, work))
        Xc, mean, scale = standardize_rows(Xb[:, tr.to(dev)], cfg.standardize)
        Xc = Xc.to(work)
        G = Xc.mT @ Xc
        R = Xc.mT @ Tc
        B = Xc.shape[0]
        if nC > 1:
            assert fold is not None and res.cv_score is not None
            sc = _cv_scores(Xc, Tc, T, G, R, lab, y_tr, fold, cfg, offset, groups).cpu()  # [B, nC, out or 1]
            if per_target:
                res.cv_score[sl] = sc
                best = sc.argmax(1)  # [B, out]; first max = smallest C
            else:
                res.cv_score[sl] = sc.mean(-1)
                best = sc.mean(-1).argmax(1)[:, None].expand(B, out)
            W = torch.zeros(B, d, out, dtype=work, device=dev)
            for ci in sorted(set(best.flatten().tolist())):
                Wc = _chol_solve(G + eye / cfg.Cs[ci], R, cfg.Cs[ci])
                W = torch.where((best == ci).to(dev)[:, None, :], Wc, W)
            res.C[sl] = Cs[best] if per_target else Cs[best[:, 0]]
        else:
            W = _chol_solve(G + eye / cfg.Cs[0], R, cfg.Cs[0])
        Wd = W.double()
        res.coef[sl] = Wd.cpu()
        res.mean[sl], res.scale[sl] = mean.cpu(), scale.cpu()
        bd = b.to(dev)
        res.train_logits[sl] = ((Xc @ W).double() + bd).cpu()  # products in cfg.dtype, as the fit's
        if len(te):
            Xt = ((Xb[:, te.to(dev)] - mean[:, None].to(Xb)) / scale[:, None].to(Xb)).to(work)
            res.test_logits[sl] = ((Xt @ W).double() + bd).cpu()
        bar.update(sl.stop - sl.start)
    bar.close()
    return res
