"""Probe targets from cache row metadata, checked against labels written out by hand."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from entitylens.errors import EntitylensError
from entitylens.probing.splits import split_by_group
from entitylens.probing.targets import build_target

# Two 3-box states cached at every box, plus one state cached only at box 1 (incomplete).
S1 = {0: ["apple", "car"], 1: [], 2: ["map"]}
S2 = {0: ["map"], 1: ["apple", "bottle"], 2: []}
S3 = {1: ["car"]}


def _rows() -> list[dict[str, Any]]:
    rows = []
    for sid, boxes, numops in (("s1", S1, (0, 1, 2)), ("s2", S2, (3, 0, 1)), ("s3", S3, (None, 2, None))):
        for b, gold in boxes.items():
            rows.append({"state_id": sid, "box": b, "numops": numops[b], "gold": gold,
                         "objects": sorted({o for g in boxes.values() for o in g} | {"string"})})
    return rows


def test_box_contents_labels_by_hand() -> None:
    t = build_target(_rows(), "box_contents")
    assert t.target_names == ("apple", "bottle", "car", "map")
    expected = torch.tensor([
        [1, 0, 1, 0],  # s1 box0: apple, car
        [0, 0, 0, 0],  # s1 box1: nothing
        [0, 0, 0, 1],  # s1 box2: map
        [0, 0, 0, 1],  # s2 box0: map
        [1, 1, 0, 0],  # s2 box1: apple, bottle
        [0, 0, 0, 0],  # s2 box2: nothing
        [0, 0, 1, 0],  # s3 box1: car
    ], dtype=torch.bool)
    assert torch.equal(t.labels, expected)
    assert t.groups == ("s1", "s1", "s1", "s2", "s2", "s2", "s3")
    assert t.numops.tolist() == [0, 1, 2, 3, 0, 1, 2]
    assert t.types.tolist() == [-1] * 7  # rows without initial contents: no control type
    assert t.rows.tolist() == list(range(7))
    # Disjoint-object involvement for box_contents = the row's own label set.
    assert torch.equal(t.objects, expected)
    assert t.vocabulary == ("apple", "bottle", "car", "map")


INITIAL = {("s1", 0): ["car", "apple"], ("s1", 1): ["bottle"], ("s1", 2): [], ("s2", 0): ["bottle"],
           ("s2", 1): ["map"], ("s2", 2): [], ("s3", 1): ["car", "apple"]}


def test_control_type_is_the_queried_box_initial_object_set() -> None:
    rows = [{**r, "initial": INITIAL[(r["state_id"], r["box"])]} for r in _rows()]
    for target in ("box_contents", "object_in_box"):
        t = build_target(rows, target)
        assert t.type_names == ("", "apple+car", "bottle", "map")  # sorted within a type, "" = empty box
        names = [t.type_names[k] for k in t.types.tolist()]
        expected = ["+".join(sorted(INITIAL[(rows[i]["state_id"], rows[i]["box"])])) for i in t.rows.tolist()]
        assert names == expected
    # Same object type in different boxes and states shares one code (s1 box1 and s2 box0 both held a bottle).
    t = build_target(rows, "box_contents")
    assert t.types[1] == t.types[3] and t.types[0] == t.types[6] and t.types[2] == t.types[5]


def test_box_contents_min_count_drops_rare_objects() -> None:
    t = build_target(_rows(), "box_contents", min_count=2)
    assert t.target_names == ("apple", "car", "map")  # bottle occurs in one row only
    assert t.labels[:, 0].tolist() == [True, False, False, False, True, False, False]


def test_object_in_box_labels_by_hand_and_incomplete_state_dropped() -> None:
    t = build_target(_rows(), "object_in_box")
    assert t.dropped_states == ("s3",)
    assert t.rows.tolist() == [0, 1, 2, 3, 4, 5]
    assert t.target_names == ("box0:apple", "box0:car", "box0:map", "box1:apple", "box1:bottle", "box2:map")
    s1 = [1, 1, 0, 0, 0, 1]
    s2 = [0, 0, 1, 1, 1, 0]
    assert t.labels.int().tolist() == [s1] * 3 + [s2] * 3  # every row of a state carries the whole state
    assert t.column_objects == ("apple", "car", "map", "apple", "bottle", "map")
    assert t.objects[0].tolist() == [o in {"apple", "car", "map"} for o in t.vocabulary]


def test_object_in_box_min_count_counts_rows() -> None:
    # Each (box, object) pair is true in the 3 rows of one state: min_count 3 keeps all, 4 keeps none.
    assert len(build_target(_rows(), "object_in_box", min_count=3).target_names) == 6
    with pytest.raises(EntitylensError, match="no object_in_box label is true in >= 4 rows"):
        build_target(_rows(), "object_in_box", min_count=4)


def test_split_by_state_never_shares_a_state() -> None:
    rows = []
    for s in range(30):
        for b in range(7):
            rows.append({"state_id": f"st{s}", "box": b, "numops": b % 3, "gold": ["apple"] if (s + b) % 3 else []})
    t = build_target(rows, "box_contents")
    for seed in range(5):
        sp = split_by_group(list(t.groups), 0.2, seed)
        train = {t.groups[i] for i in sp.train.tolist()}
        test = {t.groups[i] for i in sp.test.tolist()}
        assert train and test and not (train & test)
        assert len(sp.train) + len(sp.test) == len(rows)


@pytest.mark.parametrize(
    ("rows", "target", "message"),
    [
        (_rows(), "box_set", "unknown target 'box_set'; use one of box_contents, object_in_box"),
        ([{"state_id": "a", "box": 0}], "box_contents", "cache row 0 has no 'gold' metadata"),
        ([{"box": 0, "gold": []}], "box_contents", "cache row 0 has no state_id or sample_id"),
        ([], "box_contents", "the cache has no rows"),
        ([{"state_id": "a", "box": 0, "gold": []}], "box_contents", "no box_contents label is true"),
        ([{"state_id": "a", "box": 1, "gold": ["x"]}, {"state_id": "b", "box": 0, "gold": ["y"]}], "object_in_box",
         "no state is cached at all 2 boxes"),
        ([{"state_id": "a", "box": 0, "gold": ["x"]}, {"state_id": "a", "box": 0, "gold": ["y"]}], "object_in_box",
         "state a has two rows for box 0 with different gold contents"),
    ],
)
def test_bad_input_is_one_line_error(rows: list[dict[str, Any]], target: str, message: str) -> None:
    with pytest.raises(EntitylensError) as e:
        build_target(rows, target)
    assert message in str(e.value)
    assert "\n" not in str(e.value)
