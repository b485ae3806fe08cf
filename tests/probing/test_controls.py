"""Control task (Hewitt & Liang) and random-model comparison."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from entitylens.errors import EntitylensError
from entitylens.probing import ProbeConfig, control_labels, metric_difference, run_controls, split_by_group


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_control_labels_are_one_fixed_draw_per_type():
    rng = np.random.default_rng(0)
    types = rng.integers(0, 12, 300)
    labels = torch.tensor(rng.integers(0, 4, 300))
    ctrl = control_labels(labels, types, seed=3)
    assert ctrl.shape == labels.shape and ctrl.dtype == labels.dtype
    for t in np.unique(types):
        assert len(set(ctrl[torch.tensor(types == t)].tolist())) == 1  # consistent within a type
    assert set(ctrl.tolist()) <= set(labels.tolist())  # drawn from the task's labels
    assert torch.equal(ctrl, control_labels(labels, types, seed=3))
    draws = [tuple(control_labels(labels, types, seed=s)[torch.tensor(types == 0)][:1].tolist()) for s in range(40)]
    assert len(set(draws)) > 1  # the seed matters
    # independent of example order: a type gets the same label however the examples are shuffled
    perm = rng.permutation(300)
    ctrl_p = control_labels(labels[perm], types[perm], seed=3)
    assert {int(t): int(c) for t, c in zip(types, ctrl)} == {int(t): int(c) for t, c in zip(types[perm], ctrl_p)}


def test_multilabel_control_draws_whole_label_rows():
    rng = np.random.default_rng(1)
    Y = torch.tensor(rng.random((200, 5)) < 0.3)
    types = [f"obj{k}" for k in rng.integers(0, 9, 200)]
    ctrl = control_labels(Y, types, seed=0)
    rows = {tuple(r) for r in Y.tolist()}
    assert all(tuple(r) in rows for r in ctrl.tolist())
    for t in set(types):
        idx = torch.tensor([x == t for x in types])
        assert (ctrl[idx] == ctrl[idx][0]).all()


def _features_encoding(n_states=80, per_state=5, d=16, encode_type=False, seed=0):
    rng = np.random.default_rng(seed)
    n = n_states * per_state
    groups = np.repeat(np.arange(n_states), per_state)
    types = rng.integers(0, 10, n)
    y = rng.integers(0, 3, n)
    emb_y, emb_t = rng.standard_normal((3, d)), rng.standard_normal((10, d))
    X = 3 * emb_y[y] + rng.standard_normal((n, d))
    if encode_type:
        X = X + 3 * emb_t[types]
    return torch.tensor(np.stack([rng.standard_normal((n, d)), X])), torch.tensor(y), groups, types


def test_selectivity_is_high_when_only_the_task_is_encoded():
    X, y, groups, types = _features_encoding()
    res = run_controls(X, y, groups, types, ProbeConfig(Cs=(0.1, 1.0), folds=3))
    assert res.metric == "accuracy"
    task, ctrl = res.task.metrics()["accuracy"], res.control.metrics()["accuracy"]
    assert task[1] > 0.95
    assert ctrl[1] < 0.75  # types are not in the features: the control cannot be memorised
    torch.testing.assert_close(res.selectivity, task - ctrl)
    assert torch.equal(res.task.split.test, res.control.split.test)
    assert res.over_random is None
    rows = res.rows()
    assert rows[1]["selectivity"] == pytest.approx(float(task[1] - ctrl[1])) and rows[1]["random_model"] is None


def test_control_is_learnable_when_types_are_encoded_and_random_model_comparison():
    X, y, groups, types = _features_encoding(encode_type=True)
    Xr = torch.randn(X.shape, generator=torch.Generator().manual_seed(0), dtype=X.dtype)  # "random model"
    res = run_controls(X, y, groups, types, ProbeConfig(Cs=(1.0,)), random_features=Xr)
    ctrl = res.control.metrics()["accuracy"]
    assert ctrl[1] > 0.9  # type identity is linearly decodable, so the control task is solved too
    assert ctrl[1] > ctrl[0] + 0.2
    rand = res.random_model.metrics()["accuracy"]
    torch.testing.assert_close(res.over_random, res.task.metrics()["accuracy"] - rand)
    assert res.over_random[1] > 0.4
    assert torch.equal(res.random_model.split.train, res.task.split.train)


@pytest.mark.usefixtures("no_shape_checks")
def test_metric_difference_checks_inputs():
    X, y, groups, types = _features_encoding(n_states=30)
    sp = split_by_group(groups, 0.25, 0)
    from entitylens.probing import fit_probes

    a = fit_probes(X, y, groups, ProbeConfig(Cs=(1.0,)), split=sp)
    b = fit_probes(X[:1], y, groups, ProbeConfig(Cs=(1.0,)), split=sp)
    with pytest.raises(EntitylensError, match="shape"):
        metric_difference(a, b)
    with pytest.raises(EntitylensError, match="metric"):
        metric_difference(a, a, "f1")
    with pytest.raises(EntitylensError, match="random_features"):
        run_controls(X, y, groups, types, ProbeConfig(Cs=(1.0,)), random_features=X[:, :10])
    with pytest.raises(EntitylensError, match="one entry per example"):
        control_labels(y, types[:5])
