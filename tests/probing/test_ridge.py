"""``ProbeConfig(estimator="ridge")`` against scikit-learn's ``Ridge`` / ``RidgeClassifier`` and hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from entitylens.errors import EntitylensError
from entitylens.probing import ProbeConfig, Split, fit_probes, group_codes, split_by_group
from entitylens.probing.splits import group_folds


def _data(seed: int = 0, n: int = 300, d: int = 12) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(2, n, d, generator=gen, dtype=torch.float64)
    y = torch.rand(n, 3, generator=gen) < torch.tensor([0.05, 0.15, 0.4])  # imbalanced binary targets
    X[:, :, :3] += 1.2 * y.double()
    X[1] *= 3.0  # a differently scaled second layer
    return X, y, [str(i // 3) for i in range(n)]


def _naive_oof(Z: np.ndarray, target: np.ndarray, fold: np.ndarray, folds: int, c: float) -> np.ndarray:
    """Out-of-fold predictions of scikit-learn's ``Ridge(alpha=1/c)``, one fit per fold (the reference)."""
    from sklearn.linear_model import Ridge

    oof = np.zeros_like(target)
    for f in range(folds):
        keep, held = fold != f, fold == f
        oof[held] = Ridge(alpha=1 / c).fit(Z[keep], target[keep]).predict(Z[held])
    return oof


def _scaled(X: torch.Tensor, tr: np.ndarray, layer: int) -> np.ndarray:
    from sklearn.preprocessing import StandardScaler

    return StandardScaler().fit(X[layer, tr].numpy()).transform(X[layer].numpy())


@pytest.mark.parametrize("balanced", [False, True])
def test_binary_matches_sklearn_ridge(balanced: bool) -> None:
    from sklearn.linear_model import Ridge, RidgeClassifier

    X, y, groups = _data()
    split = split_by_group(groups, 0.25, 0)
    cw = "balanced" if balanced else None
    res = fit_probes(X, y, groups, ProbeConfig(Cs=(0.05,), class_weight=cw, dtype="float64", estimator="ridge"),
                     split=split)
    tr, te = split.train.numpy(), split.test.numpy()
    yt = y[tr].double().numpy()
    target = yt / yt.mean(0) if balanced else yt  # the coding: indicator, or indicator / prior
    offset = 1.0 if balanced else 0.5
    for layer in range(2):
        Z = _scaled(X, tr, layer)
        ref = Ridge(alpha=1 / 0.05).fit(Z[tr], target)
        np.testing.assert_allclose(res.coef[layer].numpy(), ref.coef_.T, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(res.intercept[layer].numpy(), ref.intercept_ - offset, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(res.test_logits[layer].numpy(), ref.predict(Z[te]) - offset, atol=1e-8)
        if not balanced:  # scikit-learn's ridge classifier: the same decisions (it codes -1/+1)
            for t in range(3):
                clf = RidgeClassifier(alpha=1 / 0.05).fit(Z[tr], y[tr, t].numpy())
                np.testing.assert_array_equal(res.predictions()[layer, :, t].numpy(), clf.predict(Z[te]))


def test_multiclass_matches_sklearn_ridge_classifier() -> None:
    from sklearn.linear_model import Ridge, RidgeClassifier

    X, y, groups = _data(1)
    cls = y.long().argmax(1) * y.any(1) + 3  # labels 3 (most rows), 4 or 5
    split = split_by_group(groups, 0.25, 0)
    tr, te = split.train.numpy(), split.test.numpy()
    plain = fit_probes(X, cls, groups, ProbeConfig(Cs=(0.2,), dtype="float64", estimator="ridge"), split=split)
    bal = fit_probes(X, cls, groups, ProbeConfig(Cs=(0.2,), dtype="float64", estimator="ridge",
                                                 class_weight="balanced"), split=split)
    onehot = np.eye(3)[cls[tr].numpy() - 3]
    for layer in range(2):
        Z = _scaled(X, tr, layer)
        clf = RidgeClassifier(alpha=5.0).fit(Z[tr], cls[tr].numpy())
        np.testing.assert_array_equal(plain.predictions()[layer].numpy(), clf.predict(Z[te]))
        ref = Ridge(alpha=5.0).fit(Z[tr], onehot / onehot.mean(0))
        np.testing.assert_allclose(bal.test_logits[layer].numpy(), ref.predict(Z[te]), atol=1e-8)
        np.testing.assert_array_equal(bal.predictions()[layer].numpy(), ref.predict(Z[te]).argmax(1) + 3)


def test_prior_scaled_coding_is_the_balanced_decision() -> None:
    """Hand-computed: one-hot features of a 2-valued cue saturate the fit at E[y / pi | cue] = P(c | cue) / pi_c."""
    # cue A (60 rows): classes 0/1/2 = 48/6/6; cue B (40 rows): 20/4/16. Priors 68/10/22 per 100.
    cue = torch.tensor([0] * 60 + [1] * 40)
    cls = torch.tensor([0] * 48 + [1] * 6 + [2] * 6 + [0] * 20 + [1] * 4 + [2] * 16)
    X = torch.nn.functional.one_hot(cue, 2).double().repeat(2, 1)[None]  # rows 100-199 repeat rows 0-99
    cls = cls.repeat(2)
    groups = [str(i) for i in range(200)]
    split = Split(train=torch.arange(100), test=torch.arange(100, 200))  # score the training rows' copies
    res = fit_probes(X, cls, groups, ProbeConfig(Cs=(1e9,), dtype="float64", estimator="ridge", standardize=False,
                                                 class_weight="balanced"), split=split)
    prior = torch.tensor([68, 10, 22], dtype=torch.float64) / 100
    p_a = torch.tensor([48, 6, 6], dtype=torch.float64) / 60
    p_b = torch.tensor([20, 4, 16], dtype=torch.float64) / 40
    torch.testing.assert_close(res.test_logits[0, 0], p_a / prior, atol=1e-6, rtol=0)
    torch.testing.assert_close(res.test_logits[0, 99], p_b / prior, atol=1e-6, rtol=0)
    # A -> argmax(0.80/0.68, 0.10/0.10, 0.10/0.22) = class 0; B -> argmax(0.5/0.68, 0.1/0.1, 0.4/0.22) = class 2
    assert int(res.predictions()[0, 0]) == 0 and int(res.predictions()[0, 99]) == 2
    plain = fit_probes(X, cls, groups, ProbeConfig(Cs=(1e9,), dtype="float64", estimator="ridge",
                                                   standardize=False), split=split)
    assert int(plain.predictions()[0, 99]) == 0  # unweighted: argmax P(c | B) = class 0


@pytest.mark.parametrize("metric", ["log_loss", "balanced_accuracy"])
def test_cv_matches_a_naive_fold_loop(metric: str) -> None:

    X, y, groups = _data(2)
    Cs = (0.001, 0.01, 0.1, 1.0)
    split = split_by_group(groups, 0.25, 0)
    res = fit_probes(X, y, groups, ProbeConfig(Cs=Cs, folds=4, dtype="float64", estimator="ridge",
                                               class_weight="balanced", cv_metric=metric), split=split)
    tr = split.train.numpy()
    fold = group_folds(group_codes(groups)[split.train], 4, 0).numpy()
    yt = y[tr].double().numpy()
    target = yt / yt.mean(0)
    assert res.cv_score is not None
    for layer in range(2):
        Z = _scaled(X, tr, layer)[tr]  # the training split's standardisation, as the folds reuse it
        scores = []
        for c in Cs:
            oof = _naive_oof(Z, target, fold, 4, c)
            if metric == "log_loss":
                scores.append(-((oof - target) ** 2).mean())
            else:  # mean over targets of the balanced accuracy of (fit - 1 > 0)
                pred = oof - 1 > 0
                bal = [(pred[yt[:, t] > 0, t].mean() + (~pred[yt[:, t] == 0, t]).mean()) / 2 for t in range(3)]
                scores.append(float(np.mean(bal)))
        np.testing.assert_allclose(res.cv_score[layer].numpy(), scores, rtol=1e-7, atol=1e-9)
        assert float(res.C[layer]) == Cs[int(np.argmax(scores))]


def test_cv_per_target_and_constant_columns() -> None:
    X, y, groups = _data(3)
    y = torch.cat([y, torch.ones(len(y), 1, dtype=torch.bool), torch.zeros(len(y), 1, dtype=torch.bool)], 1)
    res = fit_probes(X, y, groups, ProbeConfig(Cs=(0.01, 1.0), estimator="ridge", select="target",
                                               class_weight="balanced"))
    assert res.C.shape == (2, 5) and res.cv_score is not None and res.cv_score.shape == (2, 2, 5)
    pred = res.predictions()
    assert bool(pred[..., 3].all()) and not bool(pred[..., 4].any())
    assert res.constant_targets is not None and res.constant_targets.tolist() == [False, False, False, True, True]


def test_layer_batches_do_not_change_the_result() -> None:
    X, y, groups = _data(4)
    cfg = ProbeConfig(Cs=(0.01, 0.1), estimator="ridge", class_weight="balanced")
    one = fit_probes(X, y, groups, cfg)
    split = fit_probes(X, y, groups, ProbeConfig(Cs=(0.01, 0.1), estimator="ridge", class_weight="balanced",
                                                 max_batch_bytes=1))
    torch.testing.assert_close(one.test_logits, split.test_logits, rtol=0, atol=0)
    torch.testing.assert_close(one.coef, split.coef, rtol=0, atol=0)


def test_balanced_coding_raises_rare_recall_and_balanced_accuracy() -> None:
    """Three columns per entry decided by argmax: the prior-scaled coding trades majority recall for rare recall."""
    gen = torch.Generator().manual_seed(5)
    n, d = 600, 16
    cls = torch.multinomial(torch.tensor([0.8, 0.15, 0.05]), n, replacement=True, generator=gen)
    X = torch.randn(1, n, d, generator=gen)
    X[0, :, :3] += 1.0 * torch.nn.functional.one_hot(cls, 3)
    labels = torch.nn.functional.one_hot(cls, 3).bool()
    groups = [str(i) for i in range(n)]

    def recalls(cw: str | None) -> list[float]:
        res = fit_probes(X, labels, groups, ProbeConfig(Cs=(0.1,), estimator="ridge", class_weight=cw))  # type: ignore[arg-type]
        pred, truth = res.test_logits[0].argmax(-1), res.y_test.long().argmax(-1)
        return [float((pred[truth == c] == c).double().mean()) for c in range(3)]

    plain, bal = recalls(None), recalls("balanced")
    assert bal[2] > plain[2] and sum(bal) > sum(plain), (plain, bal)


@pytest.mark.usefixtures("no_shape_checks")
def test_ridge_errors() -> None:
    with pytest.raises(EntitylensError, match="estimator"):
        ProbeConfig(estimator="lasso")  # type: ignore[arg-type]
    X, y, groups = _data()
    res = fit_probes(X, y, groups, ProbeConfig(Cs=(1.0,), estimator="ridge"))
    with pytest.raises(EntitylensError, match="not probabilities"):
        res.predict_proba(X)


def _tags(seed: int, n: int = 240, entries: int = 4, d: int = 10) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Ternary tags: ``entries`` one-vs-rest groups of three columns, classes with skewed, per-entry priors."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(2, n, d, generator=gen, dtype=torch.float64)
    labels = torch.zeros(n, entries * 3, dtype=torch.bool)
    for e in range(entries):
        p = torch.tensor([0.7 - 0.1 * e, 0.2 + 0.05 * e, 0.1 + 0.05 * e])
        cls = torch.multinomial(p, n, replacement=True, generator=gen)
        X[:, :, e] += 1.5 * (cls == 1).double() - 1.5 * (cls == 2).double()
        labels[torch.arange(n), e * 3 + cls] = True
    return X, labels, [str(i // 2) for i in range(n)]


def test_pooled_prior_coding_matches_sklearn_ridge_by_hand() -> None:
    """``column_groups`` + balanced: one prior per class, pooled over the entries (hand-computed), then ``Ridge``."""
    from sklearn.linear_model import Ridge

    X, labels, groups = _tags(6)
    split = split_by_group(groups, 0.25, 0)
    col_groups = [e for e in range(4) for _ in range(3)]
    res = fit_probes(X, labels, groups, ProbeConfig(Cs=(0.05,), class_weight="balanced", dtype="float64",
                                                    estimator="ridge"), split=split, column_groups=col_groups)
    tr, te = split.train.numpy(), split.test.numpy()
    yt = labels[tr].double().numpy()
    prior = [np.mean([yt[:, e * 3 + c].mean() for e in range(4)]) for c in range(3)]  # by hand, per class
    target = yt / np.array(prior * 4)
    own = fit_probes(X, labels, groups, ProbeConfig(Cs=(0.05,), class_weight="balanced", dtype="float64",
                                                    estimator="ridge"), split=split)
    for layer in range(2):
        Z = _scaled(X, tr, layer)
        ref = Ridge(alpha=1 / 0.05).fit(Z[tr], target)
        np.testing.assert_allclose(res.coef[layer].numpy(), ref.coef_.T, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(res.test_logits[layer].numpy(), ref.predict(Z[te]) - 1.0, atol=1e-8)
    assert not torch.allclose(res.coef, own.coef)  # the per-column coding is a different fit


@pytest.mark.parametrize("metric", ["accuracy", "balanced_accuracy"])
def test_grouped_cv_scores_each_entrys_argmax(metric: str) -> None:
    """CV accuracy with ``column_groups`` = a naive fold loop scoring each entry's argmax tag, pooled."""

    X, labels, groups = _tags(7)
    Cs = (0.001, 0.01, 0.1)
    split = split_by_group(groups, 0.25, 0)
    col_groups = [e for e in range(4) for _ in range(3)]
    res = fit_probes(X, labels, groups, ProbeConfig(Cs=Cs, folds=3, dtype="float64", estimator="ridge",
                                                    class_weight="balanced", cv_metric=metric),
                     split=split, column_groups=col_groups)
    tr = split.train.numpy()
    fold = group_folds(group_codes(groups)[split.train], 3, 0).numpy()
    yt = labels[tr].double().numpy()
    prior = np.array([np.mean([yt[:, e * 3 + c].mean() for e in range(4)]) for c in range(3)] * 4)
    target = yt / prior
    truth = yt.reshape(len(tr), 4, 3).argmax(-1)
    assert res.cv_score is not None
    for layer in range(2):
        Z = _scaled(X, tr, layer)[tr]
        scores = []
        for c in Cs:
            oof = _naive_oof(Z, target, fold, 3, c)
            hit = oof.reshape(len(tr), 4, 3).argmax(-1) == truth
            if metric == "accuracy":
                scores.append(hit.mean())
            else:
                scores.append(np.mean([hit[truth == k].mean() for k in range(3)]))
        np.testing.assert_allclose(res.cv_score[layer].numpy(), scores, rtol=1e-9, atol=1e-12)
        assert float(res.C[layer]) == Cs[int(np.argmax(scores))]


@pytest.mark.usefixtures("no_shape_checks")
def test_column_groups_errors() -> None:
    X, labels, groups = _tags(8)
    cfg = ProbeConfig(Cs=(0.1,), estimator="ridge", class_weight="balanced")
    with pytest.raises(EntitylensError, match="column_groups has 5 entries for 12"):
        fit_probes(X, labels, groups, cfg, column_groups=[0, 0, 0, 1, 1])
    with pytest.raises(EntitylensError, match="same number of columns"):
        fit_probes(X, labels, groups, cfg, column_groups=[0] * 4 + [1] * 2 + [2] * 3 + [3] * 3)
