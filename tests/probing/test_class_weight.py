"""``ProbeConfig(class_weight="balanced")`` against scikit-learn's ``LogisticRegression(class_weight="balanced")``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from entitylens.errors import EntitylensError
from entitylens.probing import ProbeConfig, fit_probes, split_by_group


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    gen = torch.Generator().manual_seed(seed)
    n, d = 300, 12
    X = torch.randn(2, n, d, generator=gen, dtype=torch.float64)
    rare = torch.rand(n, 3, generator=gen) < torch.tensor([0.05, 0.15, 0.4])  # imbalanced binary targets
    X[:, :, :3] += 1.2 * rare.double()
    return X, rare, [str(i // 3) for i in range(n)]


def test_binary_balanced_matches_sklearn() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    X, y, groups = _data()
    split = split_by_group(groups, 0.25, 0)
    res = fit_probes(X, y, groups, ProbeConfig(Cs=(0.5,), class_weight="balanced", dtype="float64", tol=1e-9,
                                               max_iter=5000), split=split)
    tr = split.train.numpy()
    for layer in range(2):
        sc = StandardScaler().fit(X[layer, tr].numpy())
        for t in range(3):
            clf = LogisticRegression(C=0.5, class_weight="balanced", tol=1e-10, max_iter=10000)
            clf.fit(sc.transform(X[layer, tr].numpy()), y[tr, t].numpy())
            np.testing.assert_allclose(res.coef[layer, :, t].numpy(), clf.coef_[0], rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(float(res.intercept[layer, t]), clf.intercept_[0], rtol=1e-4, atol=1e-5)


def test_multiclass_balanced_matches_sklearn() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    X, y, groups = _data(1)
    cls = y.long().argmax(1) * y.any(1)  # 0 (most rows), 1 or 2: imbalanced classes
    split = split_by_group(groups, 0.25, 0)
    res = fit_probes(X, cls, groups, ProbeConfig(Cs=(0.5,), class_weight="balanced", dtype="float64", tol=1e-9,
                                                 max_iter=5000), split=split)
    tr = split.train.numpy()
    sc = StandardScaler().fit(X[0, tr].numpy())
    clf = LogisticRegression(C=0.5, class_weight="balanced", tol=1e-10, max_iter=10000)
    clf.fit(sc.transform(X[0, tr].numpy()), cls[tr].numpy())
    coef = clf.coef_ - clf.coef_.mean(0)  # softmax coefficients up to a shift
    np.testing.assert_allclose(res.coef[0].numpy().T - res.coef[0].numpy().T.mean(0), coef, rtol=1e-4, atol=1e-5)


def test_balanced_weights_raise_rare_class_recall() -> None:
    X, y, groups = _data(2)
    split = split_by_group(groups, 0.25, 0)
    plain = fit_probes(X, y, groups, ProbeConfig(Cs=(0.1,)), split=split)
    bal = fit_probes(X, y, groups, ProbeConfig(Cs=(0.1,), class_weight="balanced"), split=split)
    tp_plain = (plain.predictions().bool() & plain.y_test.bool())[..., 0].sum()
    tp_bal = (bal.predictions().bool() & bal.y_test.bool())[..., 0].sum()
    assert tp_bal > tp_plain


@pytest.mark.usefixtures("no_shape_checks")
def test_unknown_class_weight() -> None:
    with pytest.raises(EntitylensError, match="class_weight"):
        ProbeConfig(class_weight="auto")  # type: ignore[arg-type]
