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
  ``"auto"`` takes the cheaper for the problem at hand. See :class:`~entitylens.probing.solver.Preconditioner`.
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

Where (one job per module): this module holds the result and :func:`fit_probes`, which lays out the
problems, runs the C path and the refit and collects the outputs (:mod:`~entitylens.probing.config` holds
:class:`ProbeConfig`; ``estimator="ridge"`` hands the fit to :mod:`~entitylens.probing.ridge`);
:mod:`~entitylens.probing.prepare` standardises (and rotates) the features and encodes the labels,
:mod:`~entitylens.probing.objective` evaluates the batched losses and gradients,
:mod:`~entitylens.probing.solver` is the L-BFGS, and :mod:`~entitylens.probing.io` saves and loads results.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from entitylens.errors import EntitylensError
from entitylens.probing import metrics as M
from entitylens.probing.calibrate import calibrate_outputs, group_log_odds
from entitylens.probing.config import ProbeConfig
from entitylens.probing.objective import Problems
from entitylens.probing.prepare import Labels, Outputs, Prepared, as_features, as_labels, class_weights, prepare
from entitylens.probing.ridge import fit_ridge
from entitylens.probing.solver import auto_preconditioner, layer_bytes, lbfgs
from entitylens.probing.splits import GroupsLike, Split, group_codes, group_folds, split_by_group
from entitylens.progress import progress

__all__ = ["ProbeConfig", "ProbeResult", "fit_probes"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


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
        column_groups: The one-vs-rest column groups the probe was fitted with (``()``: none). Calibrated
            ridge probes report each grouped column's log-odds within its group (see
            :mod:`~entitylens.probing.calibrate`); ``coef`` / ``intercept`` then give the groups' softmax logits.
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
    column_groups: tuple[int, ...] = ()

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
        X = as_features(features).to(torch.float64).cpu()
        if X.shape[0] != self.num_layers or X.shape[2] != self.coef.shape[1]:
            raise EntitylensError(f"features {tuple(X.shape)} do not match the probes "
                                  f"[{self.num_layers}, n, {self.coef.shape[1]}]; pass the same layers and width")
        z = ((X - self.mean[:, None]) / self.scale[:, None]) @ self.coef + self.intercept[:, None]
        return group_log_odds(z, self.column_groups) if self._grouped_log_odds else z

    @property
    def _grouped_log_odds(self) -> bool:
        return bool(self.config.calibrate and self.column_groups and self.kind == "binary")

    def predict(self, features: Float[Tensor, "layer n d_model"]) -> Tensor:
        """Predictions in label space, as scikit-learn's ``predict``.

        2-D binary targets: ``[layer, n, target]`` bool. 1-D class labels (multiclass, or two classes):
        ``[layer, n]`` label values from :attr:`classes`.
        """
        return self._to_labels(self._decide(self.decision_function(features)))

    def predict_proba(self, features: Float[Tensor, "layer n d_model"]) -> Float[Tensor, "layer n out"]:
        """Probabilities: per-target sigmoid (binary) or softmax over :attr:`classes` (multiclass).

        Ridge probes have probabilities only when calibrated (``ProbeConfig(calibrate=True)``); fitted with
        ``column_groups``, each column's probability is its class's softmax probability within its group
        (the groups sum to one).
        """
        if self.config.estimator == "ridge" and not self.config.calibrate:
            raise EntitylensError("uncalibrated ridge probes give decision scores, not probabilities; use "
                                  "decision_function, or fit with calibrate=True or estimator='logistic'")
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
        assert self.classes is not None  # multiclass probes always have classes
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


@dataclass
class _Layout:
    """What stays fixed across the layer batches of one :func:`fit_probes` call.

    Problems are columns: with several Cs, one per (fold, target) along the C path and one per
    (fold, C, target) when the held-out scores are taken; in the refit, one per target (binary) or one
    softmax (multiclass). ``q_fit`` is the number of refit problems, ``out`` the outputs of a layer's probe.
    """

    cfg: ProbeConfig
    lab: Labels
    dev: torch.device
    work: torch.dtype
    d: int
    n_tr: int
    y_tr: Tensor  # training labels (CPU)
    y_dev: Tensor  # the same on the device
    folds: int  # cross-validation folds (0: one C, no CV)
    fold_w: Tensor | None  # [n_tr, folds] 1 where a row is in a fold's training part
    row_w: Tensor  # [n_tr, 1] example weights (class weights of a class label; else ones)
    target_w: Tensor | None  # [n_tr, targets] class weights per binary target (None: unit)
    q_fit: int
    out: int
    per_target: bool  # C chosen per (layer, target)
    lam_C: Tensor  # [nC] penalties 1 / C on the device
    precond: str

    @property
    def nC(self) -> int:
        """Number of Cs."""
        return len(self.cfg.Cs)

    def class_presence(self, fw: Tensor) -> Tensor | None:
        """``[F, K]`` whether each class has rows in each fold's training part (multiclass; binary: ``None``)."""
        if self.lab.kind == "binary":
            return None
        onehot = F.one_hot(self.y_tr, self.lab.K).double()
        return (fw.T @ onehot > 0).to(self.dev)  # [F, K]


def _layout(cfg: ProbeConfig, lab: Labels, codes: Tensor, tr: Tensor, d: int) -> _Layout:
    """The problem layout of a fit: folds, problems per solve, preconditioner route, penalties."""
    dev = torch.device(cfg.device)
    nC = len(cfg.Cs)
    fold_w = None
    if nC > 1:
        fold = group_folds(codes[tr], cfg.folds, cfg.seed)
        fold_w = torch.stack([(fold != f) for f in range(cfg.folds)], 1).double()  # [n_tr, F]
    out, q_fit = (lab.T, lab.T) if lab.kind == "binary" else (lab.K, 1)
    y_tr = lab.y[tr]
    row_w, target_w = class_weights(cfg.class_weight, lab.kind, y_tr, lab.K)
    if fold_w is not None:
        fold_w = fold_w * row_w
    # problems solved together: (fold, target) along the C path, then the targets of the refit
    q_solve = max(cfg.folds if nC > 1 else 0, 1) * q_fit
    n_tr = len(tr)
    precond = cfg.preconditioner if cfg.preconditioner != "auto" else auto_preconditioner(n_tr, d, q_solve * lab.K, nC)
    return _Layout(cfg=cfg, lab=lab, dev=dev, work=_DTYPES[cfg.dtype], d=d, n_tr=n_tr, y_tr=y_tr,
                   y_dev=y_tr.to(dev), folds=cfg.folds if nC > 1 else 0, fold_w=fold_w, row_w=row_w,
                   target_w=None if target_w is None else target_w.to(dev), q_fit=q_fit, out=out,
                   per_target=cfg.select == "target" and lab.kind == "binary",
                   lam_C=torch.tensor([1.0 / c for c in cfg.Cs], dtype=torch.float64, device=dev), precond=precond)


def _layers_per_batch(lay: _Layout, L: int) -> int:
    """How many layers are solved in one batch, from the memory budget."""
    cfg = lay.cfg
    q_solve = max(lay.folds, 1) * lay.q_fit
    per_layer = layer_bytes(lay.n_tr, lay.d, q_solve, lay.nC, lay.lab.K, cfg.history, torch.finfo(lay.work).bits // 8)
    budget = cfg.max_batch_bytes or (128 * 2**20 if lay.dev.type == "cpu" else 2**30)
    return max(1, min(L, int(budget) // max(per_layer, 1)))


def _cv_path(prep: Prepared, lay: _Layout, res: Outputs, sl: slice) -> tuple[Tensor, Tensor]:
    """The regularisation path on the folds of the layers ``sl``: scores and chosen C into ``res``.

    Returns:
        The refit's start (mean of the fold solutions at the chosen C, ``[B, r1, q, K]``) and its penalties
        ``[B, q]``.
    """
    cfg, lab, dev, Fn, q_fit, nC, lam_C = lay.cfg, lay.lab, lay.dev, lay.folds, lay.q_fit, lay.nC, lay.lam_C
    Bsz, r, K = prep.Z.shape[0], prep.r, lab.K
    fold_w = lay.fold_w
    assert fold_w is not None and res.cv_score is not None  # several Cs: folds and held-out scores exist
    # the regularisation path: Cs ascending, each warm-started from the previous C's solutions;
    # one batch holds every (fold, target) problem, columns ordered (fold, target)
    col_fold = torch.arange(Fn, device=dev).repeat_interleave(q_fit)
    col_t = torch.arange(q_fit, device=dev).repeat(Fn)
    P = Problems(prep, lab.kind, lay.y_dev, fold_w.to(dev), col_fold, col_t,
                 lam_C[0].expand(Bsz, len(col_fold)).clone(), K, lay.class_presence(fold_w), lay.d, lay.target_w)
    Wi, frozen = P.initial_weights()
    path = []
    for ci in range(nC):
        P.set_cols(col_fold, col_t, lam_C[ci].expand(Bsz, len(col_fold)).clone())
        Wi, _, _ = lbfgs(P, Wi, frozen, cfg.max_iter, cfg.tol, cfg.history)
        path.append(Wi)
    # columns ordered (fold, C, target) from here on
    Wcv = torch.stack([w.view(Bsz, r + 1, Fn, 1, q_fit, K) for w in path], 3).view(Bsz, r + 1, -1, K)
    col_fold = torch.arange(Fn, device=dev).repeat_interleave(nC * q_fit)
    col_c = torch.arange(nC, device=dev).repeat_interleave(q_fit).repeat(Fn)
    col_t = torch.arange(q_fit, device=dev).repeat(Fn * nC)
    P.set_cols(col_fold, col_t, lam_C[col_c].expand(Bsz, -1).clone())
    logits = P.fwd(Wcv).double()
    held = (fold_w.to(dev) == 0)[:, col_fold]
    yv = P.Yq if lab.kind == "binary" else lay.y_dev
    sc = M.heldout_scores(logits, lab.kind, yv, held, cfg.cv_metric).view(Bsz, Fn, nC, q_fit).mean(1)  # [B,nC,q]
    if lay.per_target:
        best = sc.argmax(1)  # [B, T]; first max = smallest C
        res.cv_score[sl] = sc.cpu()
    else:
        best = sc.mean(-1).argmax(1)[:, None].expand(Bsz, q_fit)  # [B, q]
        res.cv_score[sl] = sc.mean(-1).cpu()
    Wcv = Wcv.view(Bsz, r + 1, Fn, nC, q_fit, K)
    gi = best.view(Bsz, 1, 1, 1, q_fit, 1).expand(Bsz, r + 1, Fn, 1, q_fit, K)
    W0 = Wcv.gather(3, gi)[:, :, :, 0].mean(2)  # [B, r1, q, K]
    lam_fit = lam_C[best]  # [B, q]
    res.C[sl] = (1.0 / lam_fit if lay.per_target else 1.0 / lam_fit[:, 0]).cpu()
    return W0, lam_fit


def _refit(prep: Prepared, lay: _Layout, W0: Tensor | None, lam_fit: Tensor
           ) -> tuple[Problems, Tensor, Tensor, Tensor]:
    """The final fit on the whole training split, from ``W0`` (or the base rate); returns the problems and solution."""
    cfg, dev, q_fit = lay.cfg, lay.dev, lay.q_fit
    ones = lay.row_w.to(dev)
    P = Problems(prep, lay.lab.kind, lay.y_dev, ones, torch.zeros(q_fit, dtype=torch.int64, device=dev),
                 torch.arange(q_fit, device=dev), lam_fit, lay.lab.K, lay.class_presence(ones.cpu()), lay.d,
                 lay.target_w)
    Wi, frozen = P.initial_weights()
    if W0 is not None:
        Wi = torch.where(frozen[:, None, :, None], Wi, W0)
    Wf, its, ok = lbfgs(P, Wi, frozen, cfg.max_iter, cfg.tol, cfg.history)
    return P, Wf, its, ok


def _fit_layers(X: Tensor, sl: slice, tr: Tensor, te: Tensor, lay: _Layout, res: Outputs) -> None:
    """Fit the layers ``sl`` of ``X`` (C path, then refit) and write their outputs into ``res``."""
    dev, q_fit, K = lay.dev, lay.q_fit, lay.lab.K
    # centre and scale in the work dtype, unless the features are more precise than that
    Xb = X[sl].to(device=dev, dtype=torch.promote_types(X.dtype, lay.work))
    Bsz = Xb.shape[0]
    prep = prepare(Xb[:, tr.to(dev)], lay.cfg.standardize, lay.work, lay.precond)
    r = prep.r
    if lay.nC > 1:
        W0, lam_fit = _cv_path(prep, lay, res, sl)
    else:
        W0, lam_fit = None, lay.lam_C[0].expand(Bsz, q_fit).clone()
    P, Wf, its, ok = _refit(prep, lay, W0, lam_fit)
    lg = P.fwd(Wf).double()
    res.n_iter[sl] = its.cpu()
    res.converged[sl] = ok.cpu()
    # back to the standardised feature basis: coef = V w
    wq = Wf[:, :r].reshape(Bsz, r, q_fit * K)
    cb = wq if prep.V is None else torch.bmm(prep.V, wq)  # [B, d, q*K]
    b = Wf[:, r].reshape(Bsz, q_fit * K)
    if lay.lab.kind != "binary":
        b = b - b.mean(-1, keepdim=True)
        lg = lg - lg.mean(-1, keepdim=True)
    res.coef[sl] = cb.cpu()
    res.intercept[sl] = b.cpu()
    res.mean[sl] = prep.mean.cpu()
    res.scale[sl] = prep.scale.cpu()
    res.train_logits[sl] = lg.reshape(Bsz, lay.n_tr, lay.out).cpu()
    if len(te):
        Xt = (Xb[:, te.to(dev)].double() - prep.mean[:, None]) / prep.scale[:, None]
        res.test_logits[sl] = (Xt @ cb + b[:, None]).cpu()


def _ridge_outputs(X: Tensor, lab: Labels, codes: Tensor, tr: Tensor, te: Tensor, cfg: ProbeConfig,
                   column_groups: Sequence[int]) -> Outputs:
    """The ridge fit, calibrated when ``cfg.calibrate``."""
    rf = fit_ridge(X, lab, codes, tr, te, cfg, column_groups)
    if cfg.calibrate:
        calibrate_outputs(rf, lab, lab.y[tr], cfg.class_weight, column_groups, cfg.dtype)
    return rf


def fit_probes(
    features: Float[Tensor, "layer n d_model"],
    labels: Tensor,
    groups: GroupsLike,
    config: ProbeConfig | None = None,
    *,
    split: Split | None = None,
    column_groups: Sequence[int] = (),
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
        column_groups: For 2-D labels whose columns form one-vs-rest groups of one categorical variable each
            (the ternary tags' ``ProbeTarget.column_groups``), the group of each column. Ridge only: with
            ``class_weight="balanced"`` one prior per class pooled over the groups (Tang et al.'s class-weighted
            loss), CV accuracy scored on each group's argmax and, with ``calibrate``, one softmax per group;
            the logistic fit weighs every column by its own balance and ignores it.

    Returns:
        The :class:`ProbeResult`.
    """
    cfg = config or ProbeConfig()
    X = as_features(features)
    L, n, d = X.shape
    codes = group_codes(groups)
    if len(codes) != n:
        raise EntitylensError(f"groups has {len(codes)} entries but features have {n} examples; align them")
    if split is None:
        split = split_by_group(codes, cfg.test_fraction, cfg.seed)
    tr, te = split.train.to(torch.int64), split.test.to(torch.int64)
    if len(tr) and (int(tr.max()) >= n or int(tr.min()) < 0) or len(te) and (int(te.max()) >= n or int(te.min()) < 0):
        raise EntitylensError(f"split indices out of range for {n} examples; build the split from these groups")
    lab = as_labels(labels, n, tr)
    if lab.raw is None:  # 2-D binary targets (1-D labels keep their raw values and classes)
        y_train, y_test = lab.y[tr].bool(), lab.y[te].bool()
    else:
        y_train, y_test = lab.raw[tr], lab.raw[te]
    if column_groups and (lab.kind != "binary" or len(column_groups) != lab.T):
        raise EntitylensError(f"column_groups has {len(column_groups)} entries for {lab.T} label columns; pass one "
                              "group per column of 2-D labels (the target's column_groups)")
    if cfg.estimator == "ridge":
        rf = _ridge_outputs(X, lab, codes, tr, te, cfg, column_groups)
        pos = lab.y[tr].sum(0) if lab.kind == "binary" else None
        return ProbeResult(
            kind=lab.kind, coef=rf.coef, intercept=rf.intercept, mean=rf.mean, scale=rf.scale, C=rf.C,
            cv_score=rf.cv_score, n_iter=rf.n_iter, converged=rf.converged, classes=lab.classes,
            constant_targets=None if pos is None else (pos == 0) | (pos == len(tr)), split=split, n_examples=n,
            y_train=y_train, y_test=y_test, train_logits=rf.train_logits, test_logits=rf.test_logits, config=cfg,
            column_groups=tuple(column_groups))
    lay = _layout(cfg, lab, codes, tr, d)
    res = Outputs.empty(L, lay.d, lay.out, lay.q_fit, lay.n_tr, len(te), cfg.Cs[0], lay.nC,
                        lay.lab.T if lay.per_target else None)
    lb = _layers_per_batch(lay, L)
    bar = progress(total=L, desc="probes", unit="layer")
    for l0 in range(0, L, lb):
        l1 = min(L, l0 + lb)
        _fit_layers(X, slice(l0, l1), tr, te, lay, res)
        bar.update(l1 - l0)
    bar.close()
    conv = res.converged
    if not bool(conv.all()):
        warnings.warn(f"{int((~conv).sum())} of {conv.numel()} probe fits did not reach tol={cfg.tol} within "
                      f"max_iter={cfg.max_iter}; raise max_iter or tol", RuntimeWarning, stacklevel=2)
    pos = lay.y_tr.sum(0) if lab.kind == "binary" else None
    constant = None if pos is None else (pos == 0) | (pos == lay.n_tr)
    return ProbeResult(
        kind=lab.kind, coef=res.coef, intercept=res.intercept, mean=res.mean, scale=res.scale, C=res.C,
        cv_score=res.cv_score, n_iter=res.n_iter, converged=conv, classes=lab.classes, constant_targets=constant,
        split=split, n_examples=n, y_train=y_train, y_test=y_test, train_logits=res.train_logits,
        test_logits=res.test_logits, config=cfg, column_groups=tuple(column_groups))
