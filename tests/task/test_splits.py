"""Signature splits: no signature in two splits, determinism, proportions."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from entitylens.errors import EntitylensError
from entitylens.task.generate import GeneratorConfig, generate_states
from entitylens.task.splits import SPLIT_NAMES, signature, signature_split, split_by_signature


@pytest.fixture(scope="module")
def states():
    return generate_states(GeneratorConfig(seed=5, num_states=13 * 300))


def test_no_signature_in_two_splits(states):
    parts = split_by_signature(states, (0.8, 0.1, 0.1), seed=0)
    assert list(parts) == list(SPLIT_NAMES)
    sigs = {name: {signature(s) for s in part} for name, part in parts.items()}
    for a, b in itertools.combinations(SPLIT_NAMES, 2):
        assert sigs[a].isdisjoint(sigs[b])
    # a partition that keeps input order inside each split
    assert sorted(id(s) for p in parts.values() for s in p) == sorted(id(s) for s in states)
    for part in parts.values():
        pos = [states.index(s) for s in part[:50]]
        assert pos == sorted(pos)
    # all prefixes of a scenario stay together
    where = {s.sample_id: name for name, part in parts.items() for s in part}
    assert all(where[s.sample_id] == name for name, part in parts.items() for s in part)


def test_proportions_and_determinism(states):
    parts = split_by_signature(states, (0.8, 0.1, 0.1), seed=0)
    n = len(states)
    for name, f in zip(SPLIT_NAMES, (0.8, 0.1, 0.1), strict=True):
        assert abs(len(parts[name]) / n - f) < 0.02
    assert split_by_signature(states, seed=0) == parts
    other = split_by_signature(states, seed=1)
    assert other != parts
    assert split_by_signature(states, (0.45, 0.1, 0.45), seed=0)["test"] != parts["test"]


@pytest.mark.usefixtures("no_shape_checks")
def test_zero_fraction_and_bad_fractions(states):
    parts = split_by_signature(states, (0.5, 0.0, 0.5), seed=3)
    assert parts["dev"] == [] and parts["train"] and parts["test"]
    for bad in [(0.5, 0.5), (0.5, 0.6, -0.1), (0.3, 0.3, 0.3), ("a", 0, 1)]:
        with pytest.raises(EntitylensError, match="fractions"):
            split_by_signature(states, bad)


def test_signature_split_is_data_independent():
    sigs = list(itertools.product(range(4), repeat=7))
    c = Counter(signature_split(s, (0.8, 0.1, 0.1), seed=2) for s in sigs)
    assert abs(c["train"] / len(sigs) - 0.8) < 0.02 and abs(c["dev"] / len(sigs) - 0.1) < 0.02
    assert signature_split((1, 2, 3, 0, 0, 1, 2), seed=2) == signature_split([1, 2, 3, 0, 0, 1, 2], seed=2)
    assert Counter(signature_split(s, (0.0, 0.0, 1.0), seed=2) for s in sigs[:100]) == {"test": 100}
