"""Data preparation for the probe solver: features standardised (and rotated) on the training rows, labels encoded.

:func:`prepare` centres and scales one batch of layers on the training rows and, for the ``"eigen"``
preconditioner, rotates the features into their Gram eigenbasis (or, for ``"cholesky"``, forms the Gram
matrix); :func:`as_features` and :func:`as_labels` check the caller's arrays and encode the labels the way
the solver needs them (independent binary targets, or one class index per row).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from entitylens.errors import EntitylensError

__all__ = ["Labels", "Outputs", "Prepared", "as_features", "as_labels", "class_weights", "prepare", "standardize_rows"]


@dataclass
class Prepared:
    """One batch of layers' training features as the solver uses them.

    Attributes:
        mean: ``[B, d]`` training mean of each feature (float64; exactly the value subtracted).
        scale: ``[B, d]`` training standard deviation (1 where zero or when not standardising; float64).
        V: ``[B, d, r]`` float64 rotation into the Gram eigenbasis, zero-padded beyond each layer's rank;
            ``None`` when not rotated (then ``r = d``).
        Z: ``[B, n_train, r + 1]`` standardised (possibly rotated) features in the work dtype; the last
            column is all ones (the intercept).
        Zt: ``Z`` transposed, contiguous.
        G: ``[B, r + 1, r + 1]`` Gram matrix ``Z^T Z`` (work dtype) for the dense preconditioner, else ``None``.
        r: Number of feature columns of ``Z`` (without the intercept).
    """

    mean: Tensor
    scale: Tensor
    V: Tensor | None
    Z: Tensor
    Zt: Tensor
    G: Tensor | None
    r: int


@dataclass
class Outputs:
    """The per-layer outputs of a probe fit (CPU, float64), filled batch by batch; see ``ProbeResult``.

    ``n_iter`` / ``converged`` ``[layer, q]``: solver iterations and convergence (closed-form fits: 0 / True).
    """

    coef: Tensor
    intercept: Tensor
    mean: Tensor
    scale: Tensor
    C: Tensor
    cv_score: Tensor | None
    n_iter: Tensor
    converged: Tensor
    train_logits: Tensor
    test_logits: Tensor

    @staticmethod
    def empty(L: int, d: int, out: int, q: int, n_tr: int, n_te: int, C0: float, nC: int,
              per_target: int | None) -> Outputs:
        """Zeros (scales ones, C the first C, not converged) for ``L`` layers.

        Args:
            L: Layers.
            d: Features.
            out: Outputs per layer.
            q: Problems per layer (``n_iter`` / ``converged``).
            n_tr: Training rows.
            n_te: Test rows.
            C0: The first C.
            nC: Number of Cs (``cv_score`` when > 1).
            per_target: Number of targets when C is chosen per target, else ``None``.
        """
        sel = (L,) if per_target is None else (L, per_target)
        return Outputs(
            coef=torch.zeros(L, d, out, dtype=torch.float64),
            intercept=torch.zeros(L, out, dtype=torch.float64),
            mean=torch.zeros(L, d, dtype=torch.float64),
            scale=torch.ones(L, d, dtype=torch.float64),
            C=torch.full(sel, C0, dtype=torch.float64),
            cv_score=(torch.zeros((L, nC) + sel[1:], dtype=torch.float64) if nC > 1 else None),
            n_iter=torch.zeros(L, q, dtype=torch.int64),
            converged=torch.zeros(L, q, dtype=torch.bool),
            train_logits=torch.zeros(L, n_tr, out, dtype=torch.float64),
            test_logits=torch.zeros(L, n_te, out, dtype=torch.float64),
        )


def prepare(X: Tensor, standardize: bool, work: torch.dtype, preconditioner: str) -> Prepared:
    """Standardise on these (training) rows; rotate to the Gram eigenbasis (``"eigen"``) or form it (``"cholesky"``).

    The eigendecomposition runs in the work dtype: the fitted logits are ``Z w = Xc (V w)`` whatever V is, so
    V's own rounding only perturbs the penalty at the working precision. Centring and scaling run in X's
    dtype (sums in float64 only when that is float64: a float32 sum of a few thousand rows is accurate to
    float32 resolution); the returned mean and scale are exactly the values applied.

    Args:
        X: ``[B, n_train, d]`` features of a batch of layers, training rows only.
        standardize: Scale each feature to unit variance (features are always centred).
        work: The solver's work dtype (of ``Z``, ``Zt``, ``G``).
        preconditioner: ``"eigen"`` (rotate), ``"cholesky"`` (form the Gram matrix) or ``"diagonal"``.

    Returns:
        The :class:`Prepared` batch.
    """
    B, n, d = X.shape
    Xc, mean, scale = standardize_rows(X, standardize)
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
    return Prepared(mean=mean, scale=scale, V=V, Z=Z, Zt=Zt, G=G, r=r)


def standardize_rows(X: Tensor, standardize: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Centre (and scale to unit variance) each feature of ``[B, n, d]`` on its rows.

    Returns:
        The centred (scaled) features in X's dtype, and the float64 ``[B, d]`` mean and scale exactly applied
        (scale 1 where a feature is constant or when not standardising).
    """
    mean = X.mean(1)
    Xc = X - mean[:, None]
    if standardize:
        sd = Xc.square().mean(1).sqrt_()
        scale = torch.where(sd > 0, sd, torch.ones_like(sd))
        Xc = Xc.div_(scale[:, None])
    else:
        scale = torch.ones_like(mean)
    return Xc, mean.double(), scale.double()


def as_features(features: Any) -> Tensor:
    """Check probe features: a non-empty floating-point ``[layer, n, d_model]`` tensor (converted if not one).

    Args:
        features: Activations, a tensor or anything ``torch.as_tensor`` takes.

    Returns:
        The features as a tensor (not copied when already one).

    Raises:
        EntitylensError: Wrong rank, not floating point, or an empty dimension.
    """
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
class Labels:
    """Labels encoded for the solver.

    Attributes:
        kind: ``"binary"`` (independent logistic targets) or ``"multiclass"`` (one softmax).
        y: Binary: ``[n, T]`` float64 0/1; multiclass: ``[n]`` int64 class index (-1: class unseen in training).
        classes: Label value of each class (1-D labels), else ``None``.
        T: Number of binary targets (1 for class labels).
        K: Number of outputs per problem (classes of a multiclass target, else 1).
        raw: 1-D labels as given (int64), else ``None``.
    """

    kind: str
    y: Tensor
    classes: Tensor | None
    T: int
    K: int
    raw: Tensor | None = None


def as_labels(labels: Any, n: int, train: Tensor) -> Labels:
    """Encode labels: 2-D 0/1 as binary targets, 1-D as class indices over the classes seen in ``train``.

    Two classes make one binary target (as scikit-learn fits them).

    Args:
        labels: ``[n, target]`` 0/1 (or bool) or ``[n]`` integer class labels.
        n: Number of examples in the features.
        train: Indices of the training rows (they define the classes).

    Returns:
        The :class:`Labels`.

    Raises:
        EntitylensError: Misaligned, non-integer or non-0/1 labels, or fewer than two training classes.
    """
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
            return Labels("binary", (idx == 1).double().unsqueeze(1), classes, 1, 1, y)
        return Labels("multiclass", idx.to(torch.int64), classes, 1, len(classes), y)
    if y.ndim == 1:
        y = y.unsqueeze(1)
    if y.ndim != 2:
        raise EntitylensError(f"labels must be [n] class indices or [n, target] 0/1, got shape {tuple(y.shape)}")
    yd = y.double()
    if not bool(((yd == 0) | (yd == 1)).all()):
        raise EntitylensError("2-D labels must be 0/1 (binary targets); pass class indices as a 1-D tensor")
    return Labels("binary", yd, None, y.shape[1], 1)


def class_weights(class_weight: str | None, kind: str, y_tr: Tensor, K: int) -> tuple[Tensor, Tensor | None]:
    """Example weights ``[n_tr, 1]`` and per-target weights ``[n_tr, T]`` of ``class_weight`` (ones / ``None``).

    ``"balanced"``: ``n / (classes * n_class)``, per binary target (``kind == "binary"``, ``y_tr`` ``[n, T]``) or
    over the classes of a class label (``y_tr`` ``[n]`` class indices, ``K`` classes).
    """
    n = y_tr.shape[0]
    ones = torch.ones(n, 1, dtype=torch.float64)
    if class_weight is None:
        return ones, None
    if kind == "binary":
        yb = y_tr.double()
        pos = yb.sum(0)
        neg = n - pos
        w_pos = torch.where(pos > 0, n / (2 * pos.clamp_min(1)), torch.ones_like(pos))
        w_neg = torch.where(neg > 0, n / (2 * neg.clamp_min(1)), torch.ones_like(neg))
        return ones, torch.where(yb > 0, w_pos, w_neg)
    counts = torch.bincount(y_tr, minlength=K).double()
    present = int((counts > 0).sum())
    return (n / (present * counts.clamp_min(1)))[y_tr][:, None], None
