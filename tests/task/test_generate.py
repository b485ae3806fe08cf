"""Generator: config validation, state layout, variants, vocabularies, train-on-N-ops, split filtering."""

from __future__ import annotations

import pytest

from entitylens.errors import EntitylensError
from entitylens.task.generate import GeneratorConfig, generate_dataset, generate_states, make_state
from entitylens.task.splits import signature_split
from entitylens.task.text import parse_context
from entitylens.task.vocab import BNC_OBJECTS, DISJOINT_OBJECTS
from entitylens.task.world import replay


@pytest.mark.usefixtures("no_shape_checks")
@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"variant": "fancy"}, "unknown variant 'fancy'"),
        ({"vocab": "wiki"}, "unknown vocabulary 'wiki'"),
        ({"form": "zero"}, "unknown form 'zero'"),
        ({"profile": "icml"}, "unknown profile 'icml'"),
        ({"split": "valid"}, "unknown split 'valid'"),
        ({"num_states": 0}, "num_states must be an integer >= 1"),
        ({"num_operations": -1}, "num_operations"),
        ({"max_prefix_ops": 13}, "max_prefix_ops must be an integer in 0..12"),
        ({"objects": ("a", "b", "c")}, "need 21 objects but the vocabulary holds 3"),
        ({"objects": ("the cup",) * 30}, "not a single word"),
        ({"objects": tuple(BNC_OBJECTS[:20]) + ("book",)}, "twice"),
        ({"num_boxes": 8, "max_per_box": 9, "objects": tuple(BNC_OBJECTS[:70])}, "need 72 objects"),
        ({"profile": "paper", "num_states": 100}, "exactly 716 states"),
        ({"profile": "paper", "num_operations": 5}, "at least 7 operations"),
        ({"profile": "paper", "num_boxes": 5}, "needs 7 boxes"),
        ({"split": "dev", "split_fractions": (0.9, 0.0, 0.1)}, "fraction 0"),
        ({"split_fractions": (0.5, 0.5, 0.5)}, "summing to 1"),
        ({"expected_per_box": 0}, "expected_per_box"),
        ({"seed": 1.5}, "seed must be an integer"),
    ],
)
def test_bad_config_is_a_one_line_error(kwargs, fragment):
    with pytest.raises(EntitylensError, match=fragment) as e:
        GeneratorConfig(**kwargs)
    assert "\n" not in str(e.value) and ";" in str(e.value)


def test_config_is_frozen():
    c = GeneratorConfig()
    with pytest.raises(AttributeError):
        c.seed = 3  # type: ignore[misc]
    assert c.total_states == 1000 and GeneratorConfig(profile="paper").total_states == 716


def test_layout_states_per_scenario_in_order():
    states = generate_states(GeneratorConfig(seed=2, num_states=30, sampling="prefixes"))
    assert len(states) == 30
    # 13 prefixes per scenario (k = 0..12), scenarios in stream order, the last one truncated
    assert [s.num_operations for s in states] == list(range(13)) * 2 + [0, 1, 2, 3]
    ids = [s.sample_id for s in states]
    assert ids == sorted(ids) and len(set(ids)) == 3
    for s in states:
        full = states[[t.sample_id for t in states].index(s.sample_id)]
        assert s.initial == full.initial
        assert s.contents == replay(s.initial, s.operations)[-1]
        assert s.numops_by_op[0].keys() == {"move", "remove", "put"}
        assert sum(s.numops) == sum(len(op.boxes) for op in s.operations)
        assert s.extra == {"form": "fewshot"}


def test_num_operations_and_train_on_n_ops():
    full = generate_states(GeneratorConfig(seed=4, num_states=13 * 10, sampling="prefixes"))
    short = generate_states(GeneratorConfig(seed=4, max_prefix_ops=2, num_states=30, sampling="prefixes"))
    assert max(s.num_operations for s in short) == 2
    assert [s.num_operations for s in short[:6]] == [0, 1, 2, 0, 1, 2]
    # K&S train-on-2: the same 12-operation scenarios, truncated to prefixes <= 2 ops
    by_key = {(s.sample_id, s.num_operations): s for s in full}
    for s in short:
        if (s.sample_id, s.num_operations) in by_key:
            assert s == by_key[(s.sample_id, s.num_operations)]
    assert max(s.num_operations for s in generate_states(GeneratorConfig(num_operations=3, num_states=20))) == 3


def test_distinct_sampling_is_one_state_per_scenario_at_a_seeded_prefix():
    states = generate_states(GeneratorConfig(seed=2, num_states=40))
    assert len({s.sample_id for s in states}) == 40
    prefixes = generate_states(GeneratorConfig(seed=2, num_states=13 * 40, sampling="prefixes"))
    by_key = {(s.sample_id, s.num_operations): s for s in prefixes}
    for s in states:  # the same worlds as the K&S layout, one prefix each
        assert s == by_key[(s.sample_id, s.num_operations)]
    short = generate_states(GeneratorConfig(seed=2, num_states=40, max_prefix_ops=2))
    assert {s.num_operations for s in short} <= {0, 1, 2}
    assert generate_states(GeneratorConfig(seed=2, num_states=40)) == states  # deterministic


def test_variants_describe_the_same_worlds():
    cfg = {"seed": 6, "num_states": 60}
    base = generate_states(GeneratorConfig(**cfg))
    alt = generate_states(GeneratorConfig(variant="altforms", **cfg))
    mc = generate_states(GeneratorConfig(variant="move-contents", **cfg))
    t5 = generate_states(GeneratorConfig(form="t5", **cfg))
    for b, a, m, t in zip(base, alt, mc, t5, strict=True):
        assert b.initial == a.initial == m.initial == t.initial
        assert b.contents == a.contents == m.contents == t.contents
        assert b.numops == m.numops and b.numops_by_op == m.numops_by_op
        assert a.context.startswith(("The ", "There ")) and "Container" in a.context
        assert "Box" not in a.context
        assert b.context.replace("contains nothing", "is empty") == t.context
        for ob, om, boxes in zip(b.operations, m.operations, replay(b.initial, b.operations), strict=False):
            whole = ob.kind == "move" and len(ob.objects) == len(boxes[ob.box])
            assert om.kind == ("move_contents" if whole else ob.kind)
    assert any(op.kind == "move_contents" for s in mc for op in s.operations)
    assert any("Move the contents of Box" in s.context for s in mc)


def test_vocabularies():
    bnc = {o for s in generate_states(GeneratorConfig(num_states=50)) for b in s.initial for o in b}
    dis = {o for s in generate_states(GeneratorConfig(vocab="disjoint", num_states=50)) for b in s.contents for o in b}
    assert bnc <= set(BNC_OBJECTS) and dis <= set(DISJOINT_OBJECTS)
    mine = ("ant", "bee", "cat", "dog", "eel", "fox", "gnu", "hen", "ibis", "jay")
    small = generate_states(GeneratorConfig(num_boxes=3, objects=mine, num_states=30))
    assert all(len(s.contents) == 3 for s in small)
    assert {o for s in small for b in s.contents for o in b} <= set(mine)


def test_splits_from_one_seed_are_disjoint():
    train = generate_states(GeneratorConfig(seed=8, split="train", max_prefix_ops=2, num_states=300))
    test = generate_states(GeneratorConfig(seed=8, split="test", num_states=300))
    sig = lambda s: tuple(len(b) for b in s.initial)  # noqa: E731
    assert {sig(s) for s in train}.isdisjoint({sig(s) for s in test})
    assert {s.sample_id for s in train}.isdisjoint({s.sample_id for s in test})
    assert all(signature_split(sig(s), seed=8) == "test" for s in test)


def test_no_duplicate_initial_states_and_tiny_worlds_run_out():
    states = generate_states(GeneratorConfig(seed=1, num_states=13 * 200))
    inits = {s.sample_id: s.initial for s in states}
    assert len(set(inits.values())) == len(inits)
    # 2 boxes x 1 object from 2 objects: only a handful of distinct initial states exist
    with pytest.raises(EntitylensError, match="request fewer states"):
        generate_states(
            GeneratorConfig(num_boxes=2, max_per_box=1, objects=("a", "b"), num_operations=0, num_states=500)
        )


def test_generated_text_parses_back_to_the_state():
    for s in generate_states(GeneratorConfig(seed=9, variant="altforms", form="t5", num_states=40)):
        p = parse_context(s.context)
        assert (p.initial, p.operations, p.boxes) == (s.initial, s.operations, s.contents)


def test_make_state_rejects_bad_prefix():
    s = generate_states(GeneratorConfig(num_states=1))[0]
    from entitylens.task.world import Scenario

    with pytest.raises(EntitylensError, match="prefix length 3"):
        make_state(Scenario(0, s.initial, ()), 3)


def test_generate_dataset_writes_file(tmp_path):
    out = tmp_path / "sub" / "d.jsonl"
    states = generate_dataset(GeneratorConfig(seed=3, num_states=20), out)
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 20 * 7 and len(states) == 20
