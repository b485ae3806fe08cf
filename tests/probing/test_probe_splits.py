"""Group (state) splits and folds: no group on both sides, deterministic, order independent, held-out objects."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entitylens.errors import EntitylensError
from entitylens.probing.splits import group_codes, group_folds, split_by_group


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 9), min_size=2, max_size=40),
    frac=st.floats(0.05, 0.95),
    seed=st.integers(0, 2**31 - 1),
)
def test_no_group_on_both_sides_and_everything_assigned(sizes, frac, seed):
    groups = np.repeat(np.arange(len(sizes)) * 7 + 3, sizes)  # non-contiguous group ids
    sp = split_by_group(groups, frac, seed)
    train_groups, test_groups = set(groups[sp.train.numpy()]), set(groups[sp.test.numpy()])
    assert not train_groups & test_groups
    assert train_groups and test_groups
    assert sorted(sp.train.tolist() + sp.test.tolist()) == list(range(len(groups)))
    assert sp.train.tolist() == sorted(sp.train.tolist()) and not sp.test_heldout.any()


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 9), min_size=5, max_size=40), folds=st.integers(2, 5), seed=st.integers(0, 99))
def test_folds_keep_groups_whole_and_are_balanced(sizes, folds, seed):
    groups = np.repeat(np.arange(len(sizes)), sizes)
    f = group_folds(groups, folds, seed).numpy()
    for g in np.unique(groups):
        assert len(set(f[groups == g])) == 1
    counts = np.bincount(f, minlength=folds)
    assert counts.min() > 0 or len(sizes) < folds
    assert counts.max() - counts.min() <= max(sizes)  # greedy lightest-fold assignment


def test_split_is_deterministic_and_independent_of_example_order():
    groups = np.array([f"{s}:{k}" for s in range(30) for k in range(3) for _ in range(7)])  # state_id strings
    a = split_by_group(groups, 0.2, seed=4)
    assert torch.equal(a.test, split_by_group(groups, 0.2, seed=4).test)
    assert not torch.equal(a.test, split_by_group(groups, 0.2, seed=5).test)
    perm = np.random.default_rng(0).permutation(len(groups))
    b = split_by_group(groups[perm], 0.2, seed=4)
    assert set(groups[a.test.numpy()]) == set(groups[perm][b.test.numpy()])
    fa = group_folds(groups, 4, seed=1).numpy()
    fb = group_folds(groups[perm], 4, seed=1).numpy()
    assert {g: f for g, f in zip(groups, fa)} == {g: f for g, f in zip(groups[perm], fb)}
    assert 0.2 <= len(a.test) / len(groups) < 0.2 + 7 / len(groups) + 1e-9  # whole groups, just past the target


def test_disjoint_objects_never_reach_training():
    rng = np.random.default_rng(2)
    n, n_obj = 300, 20
    groups = np.arange(n) // 3
    objects = rng.random((n, n_obj)) < 0.08
    sp = split_by_group(groups, 0.3, seed=0, objects=torch.tensor(objects), heldout_object_fraction=0.25)
    held = list(sp.heldout_objects)
    assert len(held) == 5
    assert not objects[sp.train.numpy()][:, held].any()
    assert not set(groups[sp.train.numpy()]) & set(groups[sp.test.numpy()])
    assert sp.test_heldout.tolist() == objects[sp.test.numpy()][:, held].any(1).tolist()
    assert bool(sp.test_heldout.any()) and not bool(sp.test_heldout.all())
    # dropped = training-side examples that involve a held-out object; nothing else is lost
    assert objects[sp.dropped.numpy()][:, held].any(1).all()
    assert sorted(sp.train.tolist() + sp.test.tolist() + sp.dropped.tolist()) == list(range(n))
    explicit = split_by_group(groups, 0.3, seed=0, objects=torch.tensor(objects), heldout_objects=held)
    assert torch.equal(explicit.train, sp.train) and explicit.heldout_objects == sp.heldout_objects


def test_group_codes_accept_strings_ints_and_tensors():
    assert group_codes(["b", "a", "b", "c"]).tolist() == [1, 0, 1, 2]
    assert group_codes(torch.tensor([10, 3, 10])).tolist() == [1, 0, 1]
    assert group_codes(np.array([5, 5, 1])).tolist() == [1, 1, 0]


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: split_by_group([1, 1, 1], 0.2), "at least 2"),
        (lambda: split_by_group([1, 2, 3], 1.5), "test_fraction"),
        (lambda: group_folds([1, 2, 3], 5), "folds"),
        (lambda: group_folds([1, 2, 3], 1), "folds"),
        (lambda: split_by_group([1, 2, 3], 0.3, heldout_object_fraction=0.5), "objects"),
        (lambda: split_by_group([1, 2, 3], 0.3, objects=torch.ones(3, 2, dtype=torch.bool), heldout_objects=[5]),
         "heldout_objects"),
        (lambda: split_by_group([1, 2], 0.5, objects=torch.ones(2, 2, dtype=torch.bool), heldout_objects=[0]),
         "no training"),
        (lambda: group_codes(np.zeros((2, 2))), "1-D"),
    ],
)
def test_split_errors(call, match):
    with pytest.raises(EntitylensError, match=match):
        call()
