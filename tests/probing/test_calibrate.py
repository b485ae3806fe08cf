"""``ProbeConfig(estimator="ridge", calibrate=True)``: the fitted scale and biases against independent references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from entitylens.errors import EntitylensError
from entitylens.probing import ProbeConfig, fit_probes, split_by_group
from entitylens.probing.calibrate import fit_scale_bias

PENALTY = 1e-6


def _reference_one(s: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The same objective minimised naively for one problem: autograd + L-BFGS, float64."""
    theta = torch.tensor([1.0] + [0.0] * (s.shape[1] - 1), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        b = torch.cat([theta.new_zeros(1), theta[1:]])
        z = theta[0] * s + b
        nll = torch.logsumexp(z, -1) - z[torch.arange(len(y)), y]
        loss = (w * nll).sum() / w.sum() + 0.5 * PENALTY * theta.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return theta.detach()


def _reference(s: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.stack([_reference_one(s[p], y[p], w[p]) for p in range(s.shape[0])])


def _problems(seed: int, P: int = 3, m: int = 400, K: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    y = torch.multinomial(torch.tensor([0.7, 0.2, 0.1])[:K], P * m, replacement=True, generator=gen).view(P, m)
    s = torch.randn(P, m, K, generator=gen, dtype=torch.float64) * 0.8
    s += 0.9 * torch.nn.functional.one_hot(y, K) * torch.tensor([0.5, 1.5, 3.0])[:P, None, None]
    w = torch.rand(P, m, generator=gen, dtype=torch.float64) + 0.2
    return s, y, w


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-6), (torch.float32, 2e-4)])
def test_newton_matches_a_naive_lbfgs(dtype: torch.dtype, tol: float) -> None:
    s, y, w = _problems(0)
    got = fit_scale_bias(s, y, w, dtype=dtype)
    np.testing.assert_allclose(got.numpy(), _reference(s, y, w).numpy(), atol=tol, rtol=tol)


def test_newton_on_many_rows_uses_a_subset_start_and_still_converges() -> None:
    """Above 32k rows the first iterations run on a subset; the optimum is the full data's (naive reference)."""
    s, y, w = _problems(1, P=2, m=40_000)
    got = fit_scale_bias(s, y, w)
    np.testing.assert_allclose(got.numpy(), _reference(s, y, w).numpy(), atol=2e-4, rtol=2e-4)


def test_platt_scaling_matches_sklearn_logistic_regression() -> None:
    """Two classes with scores ``(0, s)``: logistic regression on the one feature ``s`` (sklearn, weighted)."""
    from sklearn.linear_model import LogisticRegression

    gen = torch.Generator().manual_seed(2)
    m = 500
    y = (torch.rand(m, generator=gen) < 0.3).long()
    s = torch.randn(m, generator=gen, dtype=torch.float64) + 1.3 * y
    w = torch.rand(m, generator=gen, dtype=torch.float64) + 0.5
    got = fit_scale_bias(torch.stack([torch.zeros_like(s), s], -1)[None], y, w, dtype=torch.float64)[0]
    # sklearn: 0.5 |coef|^2 + C sum w_i loss_i  ==  (sum w) C (mean loss + |coef|^2 / (2 C sum w))
    ref = LogisticRegression(C=1.0 / (PENALTY * float(w.sum())), tol=1e-12, max_iter=10_000).fit(
        s[:, None].numpy(), y.numpy(), sample_weight=w.numpy())
    np.testing.assert_allclose(float(got[0]), ref.coef_[0, 0], rtol=1e-5)
    # its intercept has no penalty, ours 1e-6 |b|^2 / 2: a shift of ~1e-5 here
    np.testing.assert_allclose(float(got[1]), ref.intercept_[0], rtol=1e-4)


def _tags(seed: int, n: int = 300, entries: int = 5, d: int = 8) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(2, n, d, generator=gen, dtype=torch.float64)
    labels = torch.zeros(n, entries * 3, dtype=torch.bool)
    for e in range(entries):
        cls = torch.multinomial(torch.tensor([0.85, 0.12, 0.03]), n, replacement=True, generator=gen)
        X[:, :, e] += 1.2 * (cls == 1).double() - 1.2 * (cls == 2).double()
        labels[torch.arange(n), e * 3 + cls] = True
    return X, labels, [str(i // 2) for i in range(n)]


@pytest.mark.parametrize("class_weight", [None, "balanced"])
def test_grouped_calibration_is_stationary_for_their_weighted_loss(class_weight: str | None) -> None:
    """Tags: the calibrated logits are a stationary point of Tang et al.'s class-weighted softmax loss over every
    entry, with respect to a further scale and class biases (autograd, weights computed here by hand)."""
    X, labels, groups = _tags(3)
    split = split_by_group(groups, 0.25, 0)
    cg = [e for e in range(5) for _ in range(3)]
    cfg = ProbeConfig(Cs=(0.1,), estimator="ridge", class_weight=class_weight, calibrate=True)
    res = fit_probes(X, labels, groups, cfg, split=split, column_groups=cg)
    raw = fit_probes(X, labels, groups, ProbeConfig(Cs=(0.1,), estimator="ridge", class_weight=class_weight),
                     split=split, column_groups=cg)
    tr = split.train
    cls = labels[tr].view(len(tr), 5, 3).int().argmax(-1)  # [n, entry]
    counts = torch.bincount(cls.flatten(), minlength=3).double()
    weight = counts.sum() / (3 * counts) if class_weight else torch.ones(3, dtype=torch.float64)
    for layer in range(2):
        # the reported logits are each column's log-odds within its entry: sigmoid = the softmax probability
        p = torch.sigmoid(res.train_logits[layer]).view(len(tr), 5, 3)
        np.testing.assert_allclose(p.sum(-1).numpy(), 1.0, atol=1e-9)
        z = p.log()  # softmax logits up to a per-entry constant (which no scale or class bias below sees)
        ab = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64, requires_grad=True)
        zz = ab[0] * z + ab[1:]
        nll = torch.logsumexp(zz, -1) - zz.gather(-1, cls[..., None].long())[..., 0]
        loss = (weight[cls] * nll).sum() / weight[cls].sum()
        (g,) = torch.autograd.grad(loss, ab)
        assert float(g.abs().max()) < 1e-4
        # and the calibration is a scale and per-class shift of the ridge scores, folded into the probe
        a = float((res.coef[layer] / raw.coef[layer])[0, 0])
        np.testing.assert_allclose(res.coef[layer].numpy(), a * raw.coef[layer].numpy(), rtol=1e-9)
        shift = (res.intercept[layer] - a * raw.intercept[layer]).view(5, 3)
        np.testing.assert_allclose(shift.numpy(), np.broadcast_to(shift[:1].numpy(), shift.shape), atol=1e-9)
        assert abs(float(shift[0, 0])) < 1e-9 and float(shift[0].abs().max()) > 1e-3  # (0, b_1, b_2)
        soft = torch.softmax(_softmax_logits(res, X, layer, tr).view(-1, 5, 3), -1)
        np.testing.assert_allclose(soft.numpy(), p.numpy(), atol=1e-5)  # coef/intercept: the softmax logits
    # the fit's logits come from float32 products (ProbeConfig.dtype); decision_function is float64
    np.testing.assert_allclose(res.decision_function(X[:, split.test]).numpy(), res.test_logits.numpy(), atol=1e-5)
    proba = res.predict_proba(X[:, split.test]).view(2, len(split.test), 5, 3)
    np.testing.assert_allclose(proba.sum(-1).numpy(), 1.0, atol=1e-9)
    # per-column decisions are p > 1/2; the entry's argmax is the softmax's
    assert torch.equal(res.test_logits.view(2, -1, 5, 3).argmax(-1), proba.argmax(-1))


def _softmax_logits(res: object, X: torch.Tensor, layer: int, rows: torch.Tensor) -> torch.Tensor:
    """The linear map the calibrated probe stores (standardised features @ coef + intercept), computed here."""
    Z = (X[layer, rows] - res.mean[layer]) / res.scale[layer]  # type: ignore[attr-defined]
    return Z @ res.coef[layer] + res.intercept[layer]  # type: ignore[attr-defined]


def test_calibration_lowers_the_training_loss_and_gives_probabilities() -> None:
    """Class labels: the calibrated fit's weighted log-loss is no higher than the raw scores' (a = 1, b = 0 is a
    candidate), ``predict_proba`` is a softmax that sums to one, and the decision still tracks the labels."""
    gen = torch.Generator().manual_seed(4)
    n = 360
    y = torch.multinomial(torch.tensor([0.6, 0.3, 0.1]), n, replacement=True, generator=gen)
    X = torch.randn(1, n, 6, generator=gen, dtype=torch.float64)
    X[0, :, :3] += 1.5 * torch.nn.functional.one_hot(y, 3)
    groups = [str(i // 3) for i in range(n)]
    split = split_by_group(groups, 0.25, 0)
    cal = fit_probes(X, y, groups, ProbeConfig(Cs=(1.0,), estimator="ridge", calibrate=True), split=split)
    raw = fit_probes(X, y, groups, ProbeConfig(Cs=(1.0,), estimator="ridge"), split=split)
    yt = y[split.train]

    def loss(z: torch.Tensor) -> float:
        return float((torch.logsumexp(z, -1) - z.gather(-1, yt[:, None])[:, 0]).mean())

    assert loss(cal.train_logits[0]) < loss(raw.train_logits[0]) - 1e-3
    proba = cal.predict_proba(X[:, split.test])
    np.testing.assert_allclose(proba.sum(-1).numpy(), 1.0, atol=1e-12)
    assert float(cal.metrics()["accuracy"][0]) > 0.7


def test_independent_binary_columns_get_platt_scaling_per_column() -> None:
    """0/1 columns without groups: each column's calibrated score is sklearn's weighted logistic regression on its
    ridge score (balanced weights per column)."""
    from sklearn.linear_model import LogisticRegression

    gen = torch.Generator().manual_seed(5)
    n = 300
    y = torch.rand(n, 3, generator=gen) < torch.tensor([0.1, 0.3, 0.5])
    X = torch.randn(1, n, 6, generator=gen, dtype=torch.float64)
    X[0, :, :3] += 1.3 * y.double()
    groups = [str(i // 3) for i in range(n)]
    split = split_by_group(groups, 0.25, 0)
    cfg = dict(Cs=(0.5,), estimator="ridge", class_weight="balanced", dtype="float64")
    cal = fit_probes(X, y, groups, ProbeConfig(**cfg, calibrate=True), split=split)  # type: ignore[arg-type]
    raw = fit_probes(X, y, groups, ProbeConfig(**cfg), split=split)  # type: ignore[arg-type]
    yt = y[split.train].numpy()
    for t in range(3):
        s = raw.train_logits[0, :, t].numpy()
        pos = yt[:, t].mean()
        w = np.where(yt[:, t], 0.5 / pos, 0.5 / (1 - pos))
        ref = LogisticRegression(C=1.0 / (PENALTY * w.sum()), tol=1e-12, max_iter=10_000).fit(
            s[:, None], yt[:, t], sample_weight=w)
        np.testing.assert_allclose(cal.train_logits[0, :, t].numpy(), ref.decision_function(s[:, None]),
                                   rtol=1e-4, atol=1e-4)
    proba = cal.predict_proba(X[:, split.test])
    assert proba.shape == (1, len(split.test), 3) and float(proba.min()) >= 0 and float(proba.max()) <= 1


@pytest.mark.usefixtures("no_shape_checks")
def test_calibration_errors() -> None:
    with pytest.raises(EntitylensError, match="calibrate applies to ridge"):
        ProbeConfig(calibrate=True)
    X, labels, groups = _tags(7, n=60)
    raw = fit_probes(X, labels, groups, ProbeConfig(Cs=(0.1,), estimator="ridge"))
    with pytest.raises(EntitylensError, match="uncalibrated ridge probes give decision scores"):
        raw.predict_proba(X)


def test_calibrated_grouped_probes_round_trip_through_a_file(tmp_path: object) -> None:
    """Saved and loaded, a calibrated tag probe keeps its groups: the same log-odds from ``decision_function``."""
    from pathlib import Path

    from entitylens.probing.io import load_probe_result, save_probe_result

    X, labels, groups = _tags(8)
    cg = [e for e in range(5) for _ in range(3)]
    res = fit_probes(X, labels, groups, ProbeConfig(Cs=(0.1,), estimator="ridge", calibrate=True),
                     column_groups=cg)
    path = Path(str(tmp_path)) / "p.safetensors"
    save_probe_result(res, path)
    back = load_probe_result(path)
    assert back.column_groups == tuple(cg) and back.config.calibrate
    np.testing.assert_allclose(back.decision_function(X).numpy(), res.decision_function(X).numpy(), atol=1e-12)
    assert not torch.allclose(back.decision_function(X), _softmax_logits(res, X, 0, torch.arange(len(groups)))[None])
