"""fit_probes against scikit-learn's LogisticRegression / LogisticRegressionCV on the same features and split."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from entitylens.errors import EntitylensError
from entitylens.probing import (
    ProbeConfig,
    fit_probes,
    group_folds,
    load_probe_result,
    save_probe_result,
    split_by_group,
)

sklearn = pytest.importorskip("sklearn")
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

SIGNAL = (0.0, 0.6, 1.5, 6.0)  # pure noise, weak, clear, nearly separable


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny problems: one BLAS/OpenMP thread is much faster on a shared, loaded machine (both methods)."""
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(before)


def synthetic(n_states: int = 60, per_state: int = 4, d: int = 24, targets: int = 5, classes: int = 5,
              signal: tuple[float, ...] = SIGNAL, seed: int = 0) -> dict[str, np.ndarray]:
    """Multi-layer features: layer l = signal[l] * (label-driven directions) + anisotropic noise + offset."""
    rng = np.random.default_rng(seed)
    n = n_states * per_state
    groups = np.repeat(np.arange(n_states), per_state)
    latent = rng.standard_normal((n, targets))
    Y = latent > 0.6  # sparse-ish binary targets (about 27% positive)
    cls = rng.integers(0, classes, n)
    emb_t = rng.standard_normal((targets, d))
    emb_c = rng.standard_normal((classes, d))
    mix = rng.standard_normal((d, d)) * np.geomspace(3, 0.2, d)  # correlated, anisotropic noise
    X = np.empty((len(signal), n, d))
    for layer, s in enumerate(signal):
        noise = rng.standard_normal((n, d)) @ mix
        X[layer] = s * (latent @ emb_t + 2 * emb_c[cls]) + noise + rng.standard_normal(d) * 4
    return {"X": X, "Y": Y, "cls": cls, "groups": groups}


def sklearn_probe(X: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray, C: float,
                  standardize: bool = True) -> dict[str, np.ndarray]:
    """The reference: StandardScaler on the training rows, then LogisticRegression(C) (lbfgs, tight tol)."""
    A, B = X[train], X[test]
    if standardize:
        sc = StandardScaler().fit(A)
        A, B = sc.transform(A), sc.transform(B)
    m = LogisticRegression(C=C, tol=1e-10, max_iter=100_000).fit(A, y[train])
    return {"pred": m.predict(B), "proba": m.predict_proba(B), "coef": m.coef_, "intercept": m.intercept_,
            "acc": float(np.mean(m.predict(B) == y[test]))}


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    return synthetic()


@pytest.fixture(scope="module")
def split(data):
    return split_by_group(data["groups"], 0.25, seed=3)


@pytest.mark.parametrize(("C", "preconditioner"),
                         [(0.05, "cholesky"), (1.0, "cholesky"), (0.05, "eigen"), (1.0, "eigen"), (1.0, "diagonal")])
def test_binary_targets_agree_with_sklearn_per_layer(data, split, C, preconditioner):
    tight = ProbeConfig(Cs=(C,), tol=1e-9, dtype="float64", max_iter=5000, preconditioner=preconditioner)
    res = fit_probes(torch.tensor(data["X"]), torch.tensor(data["Y"]), data["groups"], tight, split=split)
    tr, te = split.train.numpy(), split.test.numpy()
    assert res.kind == "binary" and res.coef.shape == (4, 24, 5)
    assert bool(res.converged.all())
    ours_acc = res.metrics()["accuracy_per_target"].numpy()
    for layer in range(4):
        for t in range(5):
            ref = sklearn_probe(data["X"][layer], data["Y"][:, t], tr, te, C)
            assert abs(ours_acc[layer, t] - ref["acc"]) <= 0.01
            np.testing.assert_allclose(res.coef[layer, :, t].numpy(), ref["coef"][0], rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(res.intercept[layer, t].item(), ref["intercept"][0], rtol=1e-4, atol=1e-5)
            proba = torch.sigmoid(res.test_logits[layer, :, t]).numpy()
            np.testing.assert_allclose(proba, ref["proba"][:, 1], atol=1e-5)
    # the layers really differ: noise layer near the majority baseline, nearly separable layer near perfect
    bal = res.metrics()["balanced_accuracy"].numpy()
    assert bal[0] < 0.62 and bal[3] > 0.8


def test_default_float32_solver_is_within_one_point_of_sklearn(data, split):
    res = fit_probes(torch.tensor(data["X"], dtype=torch.float32), torch.tensor(data["Y"]), data["groups"],
                     ProbeConfig(Cs=(1.0,)), split=split)
    tr, te = split.train.numpy(), split.test.numpy()
    acc = res.metrics()["accuracy_per_target"].numpy()
    for layer in range(4):
        ref = np.mean([sklearn_probe(data["X"][layer], data["Y"][:, t], tr, te, 1.0)["acc"] for t in range(5)])
        assert abs(acc[layer].mean() - ref) <= 0.01


def test_multiclass_softmax_agrees_with_sklearn(data, split):
    cfg = ProbeConfig(Cs=(0.5,), tol=1e-9, dtype="float64", max_iter=5000)
    res = fit_probes(torch.tensor(data["X"]), torch.tensor(data["cls"]), data["groups"], cfg, split=split)
    tr, te = split.train.numpy(), split.test.numpy()
    assert res.kind == "multiclass" and res.coef.shape == (4, 24, 5)
    acc = res.metrics()["accuracy"].numpy()
    for layer in range(4):
        ref = sklearn_probe(data["X"][layer], data["cls"], tr, te, 0.5)
        assert abs(acc[layer] - ref["acc"]) <= 0.01
        np.testing.assert_allclose(torch.softmax(res.test_logits[layer], -1).numpy(), ref["proba"], atol=1e-5)
        # softmax weights are identified (the penalty centres them); intercepts up to a common shift
        np.testing.assert_allclose(res.coef[layer].numpy(), ref["coef"].T, rtol=1e-4, atol=1e-5)
        b = ref["intercept"] - ref["intercept"].mean()
        np.testing.assert_allclose(res.intercept[layer].numpy(), b, atol=1e-5)


def test_two_class_index_labels_fit_one_binary_probe_like_sklearn(data, split):
    y = np.where(data["Y"][:, 0], 7, 3)  # arbitrary label values
    cfg = ProbeConfig(Cs=(1.0,), tol=1e-9, dtype="float64", max_iter=5000)
    res = fit_probes(torch.tensor(data["X"]), torch.tensor(y), data["groups"], cfg, split=split)
    ref = sklearn_probe(data["X"][2], y, split.train.numpy(), split.test.numpy(), 1.0)
    assert res.kind == "binary" and res.classes.tolist() == [3, 7]
    assert res.predictions().shape == (4, len(split.test))
    np.testing.assert_array_equal(res.predictions()[2].numpy(), ref["pred"])
    assert res.metrics()["accuracy"][2].item() == pytest.approx(ref["acc"])
    np.testing.assert_allclose(res.coef[2, :, 0].numpy(), ref["coef"][0], rtol=1e-4, atol=1e-5)


def test_rank_deficient_features_fewer_examples_than_dims():
    # d > n: the exact rotation drops the null space; the optimum is unchanged
    d = synthetic(n_states=10, per_state=3, d=60, targets=2, signal=(0.0, 2.0))
    sp = split_by_group(d["groups"], 0.3, seed=0)
    cfg = ProbeConfig(Cs=(0.3,), tol=1e-10, dtype="float64", max_iter=10000)
    res = fit_probes(torch.tensor(d["X"]), torch.tensor(d["Y"]), d["groups"], cfg, split=sp)
    for layer in range(2):
        for t in range(2):
            ref = sklearn_probe(d["X"][layer], d["Y"][:, t], sp.train.numpy(), sp.test.numpy(), 0.3)
            np.testing.assert_allclose(res.coef[layer, :, t].numpy(), ref["coef"][0], rtol=1e-4, atol=1e-6)


def test_without_standardisation_matches_sklearn_on_raw_features(data, split):
    cfg = ProbeConfig(Cs=(0.2,), tol=1e-10, dtype="float64", max_iter=10000, standardize=False)
    res = fit_probes(torch.tensor(data["X"][2:3]), torch.tensor(data["Y"][:, :2]), data["groups"], cfg, split=split)
    for t in range(2):
        ref = sklearn_probe(data["X"][2], data["Y"][:, t], split.train.numpy(), split.test.numpy(), 0.2,
                            standardize=False)
        np.testing.assert_allclose(res.coef_raw[0, :, t].numpy(), ref["coef"][0], rtol=1e-3, atol=1e-5)
        np.testing.assert_allclose(res.intercept_raw[0, t].item(), ref["intercept"][0], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("kind", ["binary", "multiclass"])
def test_cv_choice_matches_sklearn_logistic_regression_cv(data, split, kind):
    """Same folds, same Cs, same scoring (held-out log loss): the same C and the same CV curve."""
    Cs = (0.01, 0.1, 1.0, 10.0)
    labels = data["Y"] if kind == "binary" else data["cls"]
    cfg = ProbeConfig(Cs=Cs, folds=4, tol=1e-8, dtype="float64", select="target", max_iter=5000, seed=5)
    X = data["X"][1:3]  # a weak and a clear layer: the choice is not trivial
    res = fit_probes(torch.tensor(X), torch.tensor(labels), data["groups"], cfg, split=split)
    tr = split.train.numpy()
    fold = group_folds(data["groups"][tr], 4, seed=5).numpy()
    cv = [(np.where(fold != f)[0], np.where(fold == f)[0]) for f in range(4)]
    targets = range(labels.shape[1]) if kind == "binary" else [None]
    for layer in range(2):
        A = StandardScaler().fit_transform(X[layer][tr])
        for t in targets:
            y = labels[tr] if t is None else labels[tr, t]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ref = LogisticRegressionCV(Cs=list(Cs), cv=cv, scoring="neg_log_loss", tol=1e-10, max_iter=100_000,
                                           l1_ratios=(0.0,), use_legacy_attributes=False).fit(A, y)
            ref_curve = ref.scores_.reshape(len(cv), len(Cs)).mean(0)
            ours_curve = res.cv_score[layer].numpy() if t is None else res.cv_score[layer, :, t].numpy()
            np.testing.assert_allclose(ours_curve, ref_curve, atol=2e-5)
            ours_C = res.C[layer].item() if t is None else res.C[layer, t].item()
            assert ours_C == pytest.approx(float(np.ravel(ref.C_)[0]))


def test_cv_picks_strong_regularisation_for_noise_and_weak_for_signal():
    rng = np.random.default_rng(1)
    n, d = 400, 30
    groups = np.arange(n) // 2
    y = rng.random(n) < 0.5
    w = rng.standard_normal(d)
    Xs = rng.standard_normal((n, d))
    Xs -= np.outer(Xs @ w / (w @ w), w)
    Xs += np.outer(np.where(y, 1.0, -1.0) * 3.0, w / np.linalg.norm(w))  # margin 6 along w: separable, clean
    X = np.stack([rng.standard_normal((n, d)), Xs])  # layer 0: labels independent of features
    res = fit_probes(torch.tensor(X), torch.tensor(y), groups, ProbeConfig(Cs=(0.001, 0.01, 0.1, 1.0, 10.0)))
    assert res.C[0].item() == 0.001  # noise: the most regularised probe (closest to the base rate) wins
    assert res.C[1].item() == 10.0  # clean separable signal: the least regularised wins
    assert res.cv_score[1, -1] > res.cv_score[1, 0]


def test_same_seed_gives_bit_identical_probes_and_batching_does_not_change_predictions(data):
    X, Y = torch.tensor(data["X"], dtype=torch.float32), torch.tensor(data["Y"])
    cfg = ProbeConfig(Cs=(0.1, 1.0), folds=3, seed=11)
    a = fit_probes(X, Y, data["groups"], cfg)
    b = fit_probes(X, Y, data["groups"], cfg)
    for name in ("coef", "intercept", "C", "cv_score", "test_logits", "train_logits"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(a.split.test, b.split.test)
    one_by_one = fit_probes(X, Y, data["groups"], ProbeConfig(Cs=(0.1, 1.0), folds=3, seed=11, max_batch_bytes=1))
    assert torch.equal(a.C, one_by_one.C)
    assert torch.equal(a.predictions(), one_by_one.predictions())
    torch.testing.assert_close(a.coef, one_by_one.coef, rtol=1e-3, atol=1e-4)
    single = fit_probes(X[2:3], Y, data["groups"], cfg)
    assert torch.equal(single.predictions()[0], a.predictions()[2])
    assert not torch.equal(fit_probes(X, Y, data["groups"], ProbeConfig(Cs=(0.1, 1.0), folds=3, seed=12)).split.test,
                           a.split.test)


def test_constant_and_unseen_targets_are_handled(data, split):
    Y = data["Y"].copy()
    Y[:, 1] = False  # never true
    res = fit_probes(torch.tensor(data["X"][:2]), torch.tensor(Y), data["groups"], ProbeConfig(Cs=(1.0,)),
                     split=split)
    assert res.constant_targets.tolist() == [False, True, False, False, False]
    assert not bool(res.predictions()[:, :, 1].any())
    assert torch.all(res.coef[:, :, 1] == 0)
    assert bool(torch.isfinite(res.test_logits).all())


def test_multiclass_with_a_class_missing_from_folds_and_test_only_classes(data, split):
    cls = data["cls"].copy()
    tr = split.train.numpy()
    cls[tr[:3]] = 9  # a rare class: absent from most folds' training rows
    cls[split.test.numpy()[:2]] = 42  # a class never seen in training: always wrong, never crashes
    res = fit_probes(torch.tensor(data["X"][2:4]), torch.tensor(cls), data["groups"],
                     ProbeConfig(Cs=(0.1, 1.0), folds=3), split=split)
    assert res.classes.tolist() == [0, 1, 2, 3, 4, 9]
    assert (res.y_test[:2] == 42).all()
    assert not bool(res.correct()[:, :2].any())
    # predictions are label values (as sklearn's predict), so they compare directly with the labels
    pred = res.predictions()
    assert set(pred.unique().tolist()) <= {0, 1, 2, 3, 4, 9}
    torch.testing.assert_close(res.metrics()["accuracy"], (pred == res.y_test).double().mean(-1))
    assert bool(torch.isfinite(res.cv_score).all())


def test_stratified_accuracy_of_a_result_is_per_numops(data, split):
    res = fit_probes(torch.tensor(data["X"][3:]), torch.tensor(data["Y"]), data["groups"], ProbeConfig(Cs=(1.0,)),
                     split=split)
    numops = np.arange(len(data["groups"])) % 3
    strat = res.stratified(numops)
    correct = res.correct()[0].numpy()
    te_ops = numops[split.test.numpy()]
    for j, s in enumerate(strat.strata.tolist()):
        assert strat.count[j] == np.sum(te_ops == s)
        assert strat.accuracy[0, j].item() == pytest.approx(correct[te_ops == s].mean())
    assert torch.equal(res.stratified(te_ops).accuracy, strat.accuracy)


def test_save_load_round_trip(tmp_path, data, split):
    res = fit_probes(torch.tensor(data["X"][:2]), torch.tensor(data["cls"]), data["groups"],
                     ProbeConfig(Cs=(0.1, 1.0), folds=3), split=split)
    path = tmp_path / "probes.safetensors"
    save_probe_result(res, path)
    back = load_probe_result(path)
    assert back.kind == res.kind and back.config == res.config and back.n_examples == res.n_examples
    for name in ("coef", "intercept", "mean", "scale", "C", "cv_score", "test_logits", "classes", "y_test"):
        assert torch.equal(getattr(back, name), getattr(res, name)), name
    assert torch.equal(back.split.test, split.test)
    X = torch.tensor(data["X"][:2])
    assert torch.equal(back.predict(X), res.predict(X))
    for i in range(4):  # the same probes give the same bytes, save after save (no header-order noise)
        save_probe_result(res, tmp_path / f"again{i}.safetensors")
        assert (tmp_path / f"again{i}.safetensors").read_bytes() == path.read_bytes()
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(EntitylensError):
        load_probe_result(tmp_path / "bad.safetensors")


def test_predict_on_raw_features_reproduces_test_logits(data, split):
    res = fit_probes(torch.tensor(data["X"]), torch.tensor(data["Y"]), data["groups"], ProbeConfig(Cs=(1.0,)),
                     split=split)
    X_test = torch.tensor(data["X"])[:, split.test]
    torch.testing.assert_close(res.decision_function(X_test), res.test_logits)
    raw = X_test.double() @ res.coef_raw + res.intercept_raw[:, None]
    torch.testing.assert_close(raw, res.test_logits)


@pytest.mark.usefixtures("no_shape_checks")
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"Cs": ()}, "Cs"), ({"Cs": (1.0, -1.0)}, "Cs"), ({"folds": 1}, "folds"), ({"tol": 0}, "tol"),
     ({"dtype": "float16"}, "dtype"), ({"cv_metric": "auc"}, "cv_metric"), ({"device": "nope"}, "device"),
     ({"test_fraction": 1.0}, "test_fraction"), ({"select": "x"}, "select"),
     ({"preconditioner": "lu"}, "preconditioner"), ({"max_batch_bytes": 0}, "max_batch_bytes")],
)
def test_config_validation(kwargs, match):
    with pytest.raises(EntitylensError, match=match):
        ProbeConfig(**kwargs)


@pytest.mark.usefixtures("no_shape_checks")
def test_bad_inputs_raise_one_line_errors(data):
    X, Y, g = torch.tensor(data["X"]), torch.tensor(data["Y"]), data["groups"]
    cfg = ProbeConfig(Cs=(1.0,))
    cases = [
        (lambda: fit_probes(X[0], Y, g, cfg), "layer, n, d_model"),
        (lambda: fit_probes(X, Y[:-1], g, cfg), "rows"),
        (lambda: fit_probes(X, Y, g[:-1], cfg), "groups"),
        (lambda: fit_probes(X, torch.full(Y.shape, 2), g, cfg), "0/1"),
        (lambda: fit_probes(X, torch.zeros(len(g), dtype=torch.int64), g, cfg), "class"),
        (lambda: fit_probes(X.long(), Y, g, cfg), "floating point"),
    ]
    for call, match in cases:
        with pytest.raises(EntitylensError, match=match) as e:
            call()
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("case", ["binary", "multiclass", "cv_per_target", "cv_multiclass"])
def test_every_preconditioner_reaches_the_same_probes(data, split, case):
    """The preconditioner only changes the path: eigen (rotation), Cholesky (dense, one matrix per penalty --
    several when C is chosen per target) and diagonal all stop at the same optimum, float64, tight tol."""
    labels = data["cls"] if "multiclass" in case else data["Y"]
    cv = case.startswith("cv")
    base = {"Cs": (0.05, 0.5, 5.0) if cv else (0.5,), "folds": 3, "tol": 1e-10, "dtype": "float64",
            "max_iter": 10_000, "select": "target" if case == "cv_per_target" else "layer"}
    res = {p: fit_probes(torch.tensor(data["X"][1:3]), torch.tensor(labels), data["groups"],
                         ProbeConfig(preconditioner=p, **base), split=split)
           for p in ("cholesky", "eigen", "diagonal")}
    ref = res["eigen"]
    assert bool(ref.converged.all())
    if case == "cv_per_target":
        assert len(torch.unique(ref.C)) > 1  # the refit really mixes penalties (several Cholesky factors)
    for p in ("cholesky", "diagonal"):
        assert bool(res[p].converged.all()), p
        assert torch.equal(res[p].C, ref.C), p
        torch.testing.assert_close(res[p].coef, ref.coef, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(res[p].intercept, ref.intercept, rtol=1e-6, atol=1e-7)
        if cv:
            torch.testing.assert_close(res[p].cv_score, ref.cv_score, rtol=1e-7, atol=1e-9)


def test_auto_preconditioner_follows_the_cost_of_each_route():
    from entitylens.probing.solver import auto_preconditioner

    # SmolLM2-like residuals (d = 576) with 1,200 prompts: 48 targets at one C -> one Cholesky factor;
    # a 4-C grid over 5 folds (240 problems per solve) -> the eigen rotation, whose per-iteration cost is nil
    assert auto_preconditioner(1200, 576, 48, 1) == "cholesky"
    assert auto_preconditioner(1200, 576, 240, 4) == "eigen"
    # 7B residuals (d = 4096) with fewer prompts than dimensions: the rotation also shrinks d to n
    assert auto_preconditioner(1200, 4096, 48, 1) == "eigen"
    assert ProbeConfig().preconditioner == "auto"


def test_results_saved_with_the_old_rotate_option_still_load(tmp_path, data, split):
    import json

    from safetensors.torch import load_file, save_file

    res = fit_probes(torch.tensor(data["X"][:1]), torch.tensor(data["Y"]), data["groups"], ProbeConfig(Cs=(1.0,)),
                     split=split)
    save_probe_result(res, tmp_path / "new.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "new.safetensors"), framework="pt") as f:
        meta = json.loads(dict(f.metadata())["entitylens"])  # one header key (deterministic bytes)
    for rotate, expected in ((True, "eigen"), (False, "diagonal")):
        cfg = json.loads(meta["config"])
        del cfg["preconditioner"], cfg["max_batch_bytes"]
        cfg.update(rotate=rotate, max_batch_bytes=512 * 2**20)  # as written before the option existed
        old = tmp_path / f"old-{rotate}.safetensors"
        # files of that time kept the metadata as several flat header keys
        save_file(load_file(tmp_path / "new.safetensors"), old, metadata={**meta, "config": json.dumps(cfg)})
        back = load_probe_result(old)
        assert back.config.preconditioner == expected
        assert torch.equal(back.coef, res.coef)
