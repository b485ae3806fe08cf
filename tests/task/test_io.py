"""K&S T5 JSONL and P24 readers/writers: hand-written rows, lossless round trips, one-line errors."""

from __future__ import annotations

import csv
import json
import os
import re
import time
from pathlib import Path

import pytest

from entitylens.errors import EntitylensError
from entitylens.task.generate import GeneratorConfig, generate_states
from entitylens.task.io import (
    dataset_stats,
    format_stats,
    read_ks_jsonl,
    read_p24_jsonl,
    write_ks_jsonl,
)
from entitylens.task.vocab import BNC_OBJECTS, DISJOINT_OBJECTS

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
BOX_DATASETS = SHARED / "anchors" / "finetuning" / "box_datasets"
needs_shared = pytest.mark.skipif(not BOX_DATASETS.is_dir(), reason="../shared/anchors is not available")

# Two states of one scenario, written by hand in the K&S few-shot form (one operation apart).
D0 = (
    "Box 0 contains the car, Box 1 contains nothing, Box 2 contains the bag and the map, Box 3 contains nothing, "
    "Box 4 contains nothing, Box 5 contains the cup, Box 6 contains nothing."
)
D1 = D0 + " Move the map from Box 2 to Box 1."
GOLD0 = [["car"], [], ["bag", "map"], [], [], ["cup"], []]
GOLD1 = [["car"], ["map"], ["bag"], [], [], ["cup"], []]


def _row(ctx, box, gold, numops=0, by=None, sample_id=4, **extra):
    ans = " and ".join(f"the {o}" for o in gold) if gold else "nothing"
    rec = {
        "sentence": f"{ctx} Box {box} contains {ans}.",
        "sentence_masked": f"{ctx} Box {box} contains <extra_id_0> .",
        "masked_content": f"<extra_id_0> {ans}",
        "sample_id": sample_id,
        "numops": numops,
        "numops_by_op": by or {"move": 0, "remove": 0, "put": 0},
    }
    rec.update(extra)
    return rec


def _hand_rows():
    rows = [_row(D0, b, g) for b, g in enumerate(GOLD0)]
    for b, g in enumerate(GOLD1):
        n = 1 if b in (1, 2) else 0
        rows.append(_row(D1, b, g, numops=n, by={"move": n, "remove": 0, "put": 0}))
    return rows


def _write_lines(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_read_hand_written_rows(tmp_path):
    f = _write_lines(tmp_path / "hand.jsonl", _hand_rows())
    states = read_ks_jsonl(f)
    assert len(states) == 2
    s0, s1 = states
    assert s0.sample_id == s1.sample_id == 4
    assert s0.context == D0 and s1.context == D1
    assert [list(c) for c in s1.contents] == GOLD1
    assert s1.num_operations == 1 and s1.operations[0].kind == "move" and s1.operations[0].dest == 1
    assert s1.numops == (0, 1, 1, 0, 0, 0, 0)
    assert s0.extra["form"] == "fewshot"
    # writing the states again reproduces the hand-written file byte for byte
    out = tmp_path / "again.jsonl"
    assert write_ks_jsonl(out, states) == 14
    assert out.read_bytes() == f.read_bytes()


def test_t5_form_rows_by_hand(tmp_path):
    ctx = D0.replace("contains nothing", "is empty")
    rows = []
    for b, g in enumerate(GOLD0):
        if g:
            ans = " and ".join(f"the {o}" for o in g)
            rows.append(
                {
                    "sentence": f"{ctx} Box {b} contains {ans}.",
                    "sentence_masked": f"{ctx} Box {b} <extra_id_0> .",
                    "masked_content": f"<extra_id_0> contains {ans}",
                    "sample_id": 0,
                    "numops": 0,
                    "numops_by_op": {"move": 0, "remove": 0, "put": 0},
                }
            )
        else:
            rows.append(
                {
                    "sentence": f"{ctx} Box {b} is empty.",
                    "sentence_masked": f"{ctx} Box {b} <extra_id_0> .",
                    "masked_content": "<extra_id_0> is empty",
                    "sample_id": 0,
                    "numops": 0,
                    "numops_by_op": {"move": 0, "remove": 0, "put": 0},
                }
            )
    f = _write_lines(tmp_path / "t5.jsonl", rows)
    (state,) = read_ks_jsonl(f)
    assert state.extra["form"] == "t5" and [list(c) for c in state.contents] == GOLD0
    write_ks_jsonl(tmp_path / "o.jsonl", [state])
    assert (tmp_path / "o.jsonl").read_bytes() == f.read_bytes()


@pytest.mark.parametrize(
    "variant, form, vocab",
    [
        ("base", "fewshot", "bnc"),
        ("base", "t5", "disjoint"),
        ("altforms", "fewshot", "bnc"),
        ("altforms", "t5", "bnc"),
        ("move-contents", "fewshot", "disjoint"),
        ("move-contents", "t5", "bnc"),
    ],
)
def test_round_trip_is_lossless(tmp_path, variant, form, vocab):
    states = generate_states(GeneratorConfig(seed=11, variant=variant, form=form, vocab=vocab, num_states=60))
    a = tmp_path / "a.jsonl"
    write_ks_jsonl(a, states)
    back = read_ks_jsonl(a)
    assert back == states  # every field except extra (sample_id, initial, ops, contents, numops, context)
    assert [s.extra["form"] for s in back] == [form] * len(states)
    b = tmp_path / "b.jsonl"
    write_ks_jsonl(b, back)
    assert a.read_bytes() == b.read_bytes()
    if variant == "move-contents":
        assert any(op.kind == "move_contents" for s in back for op in s.operations)


def test_extra_fields_partial_groups_and_repeats_survive(tmp_path):
    rows = _hand_rows()
    rows[0]["note"] = "first"
    rows[3]["flag"] = [1, 2]
    partial = [
        _row(D1, 5, ["cup"], sample_id=9),
        _row(D1, 2, ["bag"], numops=1, sample_id=9, by={"move": 1, "remove": 0, "put": 0}),
    ]
    rows += partial + rows[:7]  # a partial state, then the first state again (a new state: its boxes repeat)
    f = _write_lines(tmp_path / "x.jsonl", rows)
    states = read_ks_jsonl(f)
    assert [len(s.extra.get("boxes", range(7))) for s in states] == [7, 7, 2, 7]
    assert states[2].extra["boxes"] == (5, 2) and states[2].sample_id == 9
    assert states[0].extra["fields"][0] == {"note": "first"} and states[0].extra["fields"][3] == {"flag": [1, 2]}
    assert states[3] == states[0]
    write_ks_jsonl(tmp_path / "y.jsonl", states)
    assert (tmp_path / "y.jsonl").read_bytes() == f.read_bytes()
    st = dataset_stats(states)
    assert st.rows == 23 and st.states == 4 and st.scenarios == 2


def _broken(tmp_path, mutate):
    rows = _hand_rows()
    lines = [json.dumps(r) for r in rows]
    mutate(rows, lines)
    f = tmp_path / "bad.jsonl"
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return f


def _set(i, key, value):
    def m(rows, lines):
        if value is KeyError:
            del rows[i][key]
        else:
            rows[i][key] = value
        lines[i] = json.dumps(rows[i])

    return m


@pytest.mark.parametrize(
    "mutate, line, fragment",
    [
        (lambda rows, lines: lines.__setitem__(2, '{"sentence": '), 3, "not valid JSON"),
        (lambda rows, lines: lines.__setitem__(4, "[1, 2]"), 5, "not a JSON object"),
        (_set(6, "numops", KeyError), 7, "missing field 'numops'"),
        (_set(1, "sample_id", "4"), 2, "'sample_id' must be an integer"),
        (_set(8, "masked_content", "<extra_id_0> the cup"), 9, "masked_content says box 1 holds"),
        (_set(9, "numops", 3), 10, "numops is 3"),
        (_set(9, "numops_by_op", {"move": 0, "remove": 1, "put": 0}), 10, "numops_by_op"),
        (_set(3, "sentence", "nonsense"), 4, "'sentence' does not match"),
        (_set(5, "sentence_masked", D0 + " Box 7 contains <extra_id_0> ."), 6, "query a box that exists"),
        (
            _set(10, "sentence_masked", D0 + " Move the map from Box 2 to Box 9. Box 3 contains <extra_id_0> ."),
            11,
            "box 9",
        ),
        (_set(0, "sentence_masked", "Box 0 contains the car."), 1, "sentence_masked does not end"),
    ],
)
def test_bad_rows_name_file_line_and_fix(tmp_path, mutate, line, fragment):
    f = _broken(tmp_path, mutate)
    with pytest.raises(EntitylensError) as e:
        read_ks_jsonl(f)
    msg = str(e.value)
    assert msg.startswith(f"{f} line {line}: "), msg
    assert fragment in msg and ";" in msg and "\n" not in msg


def test_missing_file_is_a_clean_error(tmp_path):
    with pytest.raises(EntitylensError, match="cannot read"):
        read_ks_jsonl(tmp_path / "nope.jsonl")


def test_failed_write_leaves_previous_file_and_no_temp(tmp_path):
    out = tmp_path / "data.jsonl"
    out.write_text("precious\n")
    states = generate_states(GeneratorConfig(seed=1, num_states=5))

    def boom():
        yield from states
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_ks_jsonl(out, boom())
    assert out.read_text() == "precious\n"
    assert os.listdir(tmp_path) == ["data.jsonl"]


def test_p24_like_file_gets_a_hint(tmp_path):
    rec = {
        "sentence": "The cup is in Box X, the pen is in Box T. Box X contains the cup.",
        "sentence_masked": "The cup is in Box X, the pen is in Box T. Box X contains <extra_id_0> .",
        "masked_content": "<extra_id_0> the cup",
        "sample_id": 0,
        "numops": 0,
        "numops_by_op": {"move": 0, "remove": 0, "put": 0},
    }
    f = _write_lines(tmp_path / "p.jsonl", [rec])
    with pytest.raises(EntitylensError, match="read_p24_jsonl"):
        read_ks_jsonl(f)
    (item,) = read_p24_jsonl(f)
    assert item.answer == "cup" and item.query_box == "X" and item.assignments == (("cup", "X"), ("pen", "T"))
    assert item.prompt == "The cup is in Box X, the pen is in Box T. Box X contains the"
    assert item.entity_index == 0 and not item.ambiguous
    bad = dict(rec, masked_content="<extra_id_0> the pen")
    f2 = _write_lines(tmp_path / "p2.jsonl", [rec, bad])
    with pytest.raises(EntitylensError, match=r"p2.jsonl line 2: masked_content"):
        read_p24_jsonl(f2)


@pytest.mark.usefixtures("no_shape_checks")
def test_reading_a_paper_sized_file_is_fast(tmp_path):
    states = generate_states(GeneratorConfig(seed=0, num_states=716))
    f = tmp_path / "big.jsonl"
    write_ks_jsonl(f, states)
    t = time.perf_counter()
    back = read_ks_jsonl(f)
    dt = time.perf_counter() - t
    assert len(back) == 716 and dataset_stats(back).rows == 5012
    assert dt < 2.0, f"reading 5,012 rows took {dt:.2f} s"  # typically ~0.2 s; generous for a busy machine
    assert "rows       5012" in format_stats(dataset_stats(back))


@needs_shared
def test_vocabularies_equal_the_anchor_csv():
    with open(BOX_DATASETS / "objects_with_bnc_frequency.csv", encoding="utf-8-sig", newline="") as fh:
        names = [r["object_name"] for r in csv.DictReader(fh)]
    assert len(names) == 198
    assert BNC_OBJECTS == tuple(names[:100])
    assert DISJOINT_OBJECTS == tuple(names[100:])
    assert not set(BNC_OBJECTS) & set(DISJOINT_OBJECTS)


@needs_shared
@pytest.mark.parametrize("n", [3, 5])
def test_read_p24_anchor_files(n):
    path = BOX_DATASETS / "no_instructions" / "alternative" / "Random" / str(n) / "train.jsonl"
    items = read_p24_jsonl(path)
    assert len(items) == 1500 * n
    raw = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    by_id: dict[int, list] = {}
    for item, rec in zip(items, raw, strict=True):
        by_id.setdefault(item.sample_id, []).append(item)
        # independent check: the unmasked sentence ends with the answer for the queried box
        m = re.search(r"Box (\w+) contains the (\S+)\.$", rec["sentence"])
        assert m and (m.group(1), m.group(2)) == (item.query_box, item.answer)
        assert rec["sentence"].startswith(item.context + " ")
        assert len(item.assignments) == n and (item.answer, item.query_box) in item.assignments
    assert len(by_id) == 1500 and all(len(v) == n for v in by_id.values())
    # P24 rows query the entities in description order; labels can repeat (then the box is ambiguous)
    assert all([it.entity_index for it in v] == list(range(n)) for v in by_id.values())
    for it in items:
        assert it.ambiguous == (len(re.findall(rf"Box {it.query_box}[,.]", it.context)) > 1)


# ------------------------------------------------------------------------------------------------
# Files the K&S generator writes beyond the standard ones (by K&S's own recipe, re-implemented here):
# * disjoint vocabulary: every object name of an already written, sorted file is replaced, line by
#   line, by another noun (regex on whole words), so the lists are no longer alphabetical;
# * --include_modifiers always: every object gets an adjective ("the green bomb"), lists stay in the
#   order of the bare nouns.
# ------------------------------------------------------------------------------------------------


def _substitute_objects(src: Path, dst: Path, mapping: dict[str, str]) -> None:
    lines = []
    for line in src.read_text(encoding="utf-8").splitlines(keepends=True):
        for key, val in mapping.items():
            line = re.sub(r"(\s)" + re.escape(key) + r'([,\.\s"])', r"\g<1>" + val + r"\g<2>", line)
        lines.append(line)
    dst.write_text("".join(lines), encoding="utf-8")


def _sorted_file(tmp_path: Path, form: str = "fewshot") -> tuple[Path, list]:
    states = generate_states(GeneratorConfig(seed=11, num_states=24, form=form))
    f = tmp_path / "sorted.jsonl"
    write_ks_jsonl(f, states)
    return f, states


@pytest.mark.parametrize("form", ["fewshot", "t5"])
def test_disjoint_vocabulary_file_with_unsorted_lists_loads_and_round_trips(tmp_path, form):
    src, states = _sorted_file(tmp_path, form)
    mapping = dict(zip(BNC_OBJECTS, reversed(DISJOINT_OBJECTS)))  # an order-scrambling substitution
    dst = tmp_path / "train-disjoint-vocab-t5.jsonl"
    _substitute_objects(src, dst, mapping)
    text = dst.read_text()
    assert any(
        re.search(r"the (\w+) and the (\w+)", line) and _first_pair_unsorted(line) for line in text.splitlines()
    )
    got = read_ks_jsonl(dst)
    assert len(got) == len(states)
    for a, b in zip(got, states):
        assert a.contents == tuple(tuple(sorted(mapping.get(o, o) for o in box)) for box in b.contents)
        assert a.numops == b.numops
    out = tmp_path / "rewritten.jsonl"
    write_ks_jsonl(out, got)
    assert out.read_bytes() == dst.read_bytes()  # lossless: the file's own order is kept on write
    stats = dataset_stats(got)
    assert stats.out_of_order_states > 0 and stats.out_of_order_states <= len(got)
    assert "out of alphabetical order" in format_stats(stats)
    assert dataset_stats(states).out_of_order_states == 0


def _first_pair_unsorted(line: str) -> bool:
    m = re.search(r"the (\w+) and the (\w+)", line)
    return bool(m) and m.group(1) > m.group(2)


def test_modifier_objects_load_parse_and_score(tmp_path):
    from entitylens.task.parse import parse_statement
    from entitylens.task.score import score_statement

    src, states = _sorted_file(tmp_path)
    colours = ("big", "small", "blue", "green", "red", "yellow")
    mapping = {o: f"{colours[i % len(colours)]} {o}" for i, o in enumerate(BNC_OBJECTS)}
    dst = tmp_path / "modifiers.jsonl"
    _substitute_objects(src, dst, mapping)
    got = read_ks_jsonl(dst)
    s = next(x for x in got if any(len(b) >= 2 for b in x.contents))
    assert all(" " in o for b in s.contents for o in b)  # multi-word objects
    assert dataset_stats(got).multiword_objects > 0
    write_ks_jsonl(tmp_path / "rt.jsonl", got)
    assert (tmp_path / "rt.jsonl").read_bytes() == dst.read_bytes()
    # A statement naming the modified objects, in any order, scores right box by box.
    parts = []
    for b, contents in enumerate(s.contents):
        objs = " and ".join(f"the {o}" for o in reversed(contents)) if contents else "nothing"
        parts.append(f"Box {b} contains {objs}")
    parsed = parse_statement("Statement: " + ", ".join(parts) + ".")
    assert parsed.boxes == s.contents
    assert all(score_statement(parsed, s.contents))


def test_generated_altforms_file_runs_through_stats_and_eval(tmp_path):
    from entitylens.behavior import EvalConfig, evaluate

    states = generate_states(GeneratorConfig(seed=5, num_states=8, variant="altforms", form="t5"))
    f = tmp_path / "alt.jsonl"
    write_ks_jsonl(f, states)
    got = read_ks_jsonl(f)
    assert all(s.variant == "altforms" for s in got) and "Container" in got[0].context
    assert dataset_stats(got).rows == 8 * 7
    result = evaluate("initial", got, EvalConfig())
    # "copy the initial contents" is right on every box no operation touched, and only there or by chance
    untouched = [p for p in result.predictions if p.numops == 0]
    assert untouched and all(p.correct for p in untouched)
