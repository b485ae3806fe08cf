"""The configuration of :func:`~entitylens.probing.linear.fit_probes`: one frozen dataclass, checked when built."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from entitylens.errors import EntitylensError

__all__ = ["ProbeConfig"]

_DTYPE_NAMES = ("float32", "float64")


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
        class_weight: ``"balanced"``: weight each example by ``n / (classes * n_class)`` of its class, per
            binary target (its two classes) or over the classes of a class label -- scikit-learn's
            ``class_weight="balanced"``, computed on the training split (and used unchanged on the
            cross-validation folds); ``None`` (default): unit weights. The held-out CV score stays unweighted.
            With ``estimator="ridge"`` the balance comes from the target coding instead (see there).
        estimator: ``"logistic"`` (default): L2 logistic regression as above (calibrated probabilities).
            ``"ridge"``: a least-squares probe in closed form (:mod:`~entitylens.probing.ridge`): per layer one
            Gram matrix and one Cholesky solve per C for every target at once, no iterations -- scikit-learn's
            ``Ridge(alpha=1/C)`` on standardised features and coded targets (indicator ``y``, or
            ``y / prior`` with ``class_weight="balanced"``, whose argmax is the balanced-accuracy decision).
            It gives decision scores, not probabilities; made for many targets at once (object tags, every
            box's contents), where it is one matrix solve instead of hundreds of logistic fits. CV selects C
            by the pooled out-of-fold squared error (``cv_metric="log_loss"``) or accuracy.
        calibrate: Ridge only. After the fit (and C's choice), fit per layer a scale and class biases of the
            scores by the (class-weighted, as ``class_weight``) cross-entropy on the training split
            (:mod:`~entitylens.probing.calibrate`): the logits become log-odds and the decisions those of
            that loss -- Tang et al.'s class-weighted softmax for the ternary tags -- instead of the coding's
            fixed argmax. A few Newton steps on ``K`` numbers per layer (per column for independent binary
            targets): a small fraction of the ridge fit.
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
    class_weight: Literal["balanced"] | None = None
    estimator: Literal["logistic", "ridge"] = "logistic"
    calibrate: bool = False

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
        if self.dtype not in _DTYPE_NAMES:
            raise EntitylensError(f"unknown dtype {self.dtype!r}; use 'float32' or 'float64'")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as e:
            raise EntitylensError(f"invalid device {self.device!r}; use 'cpu' or 'cuda'") from e
        if self.max_batch_bytes is not None and int(self.max_batch_bytes) < 1:
            raise EntitylensError("max_batch_bytes must be positive (or None for the default)")
        if self.class_weight not in (None, "balanced"):
            raise EntitylensError(f"unknown class_weight {self.class_weight!r}; use None or 'balanced'")
        if self.estimator not in ("logistic", "ridge"):
            raise EntitylensError(f"unknown estimator {self.estimator!r}; use 'logistic' or 'ridge'")
        if self.calibrate and self.estimator != "ridge":
            raise EntitylensError("calibrate applies to ridge probes (logistic probes are fitted by log-loss "
                                  "already); drop calibrate or use estimator='ridge'")
        if self.preconditioner not in ("auto", "cholesky", "eigen", "diagonal"):
            raise EntitylensError(f"unknown preconditioner {self.preconditioner!r}; use 'auto', 'cholesky', 'eigen' "
                                  "or 'diagonal'")
