"""Read and write boxes-task datasets: the K&S T5 JSONL format and P24's single-object files.

K&S T5 JSONL (Kim & Schuster 2023; also KST24's test set and P24's ``box_datasets``): one JSON object per
line, one line per (state, queried box), the 7 rows of a state consecutive and in box order::

    {"sentence": "<context> Box 3 contains the bottle.",
     "sentence_masked": "<context> Box 3 contains <extra_id_0> .",
     "masked_content": "<extra_id_0> the bottle",
     "sample_id": 12, "numops": 2, "numops_by_op": {"move": 1, "remove": 0, "put": 1}}

(the T5 form writes ``Box 3 <extra_id_0> .`` / ``<extra_id_0> contains the bottle`` / ``<extra_id_0> is
empty``; see :mod:`entitylens.task.text`). Lines are written with :func:`json.dumps` defaults, exactly as the
K&S generator writes them, so files are byte-compatible.

Reading groups consecutive rows that have the same ``sample_id`` and the same context (``sentence_masked``
before the final query) into one :class:`~entitylens.task.types.State` (a box already seen starts a new
state). The context is parsed (every surface form), replayed, and checked against every row: the gold
answer in ``masked_content``, ``numops``, ``numops_by_op`` and ``sentence`` must agree with the operations,
otherwise a one-line error names the file, the line and the fix. ``State.extra`` keeps what a lossless
re-write needs:

* ``"form"``: ``"fewshot"`` or ``"t5"`` (always present; also set by the generator);
* ``"fields"``: per row, a dict of any fields beyond the six K&S fields (only when some row has them);
* ``"boxes"``: the queried boxes in file order (only when they are not exactly ``0 .. N-1``);
* ``"answer_order"``: per row, the answer's objects in the file's order, for rows that do not list them
  alphabetically (``None`` for the others; only when some row does not).

Lists of objects need not be alphabetical (K&S's disjoint-vocabulary files substitute rare nouns into a
sorted file; ``--include_modifiers`` files sort by the bare noun, ``the green bomb and the blue plate``):
contents are sets, so they are read as sorted tuples and the text is kept as written;
:func:`listed_out_of_order` tells which states list objects in another order (``entitylens data stats``
reports them). Multi-word objects (modifiers) are objects like any other.

so ``write_ks_jsonl(read_ks_jsonl(f))`` reproduces ``f`` byte for byte. ``State.variant`` is detected from the
text (``altforms`` from Containers, ``move-contents`` from a ``Move the contents`` sentence); a file that has
any move-contents sentence is one move-contents dataset, so all its Box states get that variant.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from entitylens._io import atomic_write
from entitylens.errors import EntitylensError
from entitylens.task.text import (
    MASK,
    ParsedContext,
    check_form,
    describe_boxes,
    describe_operation,
    parse_context,
    parse_masked_content_ordered,
    parse_masked_query,
    render_row,
)
from entitylens.task.types import MAX_PER_BOX, OP_KINDS, State
from entitylens.task.world import count_numops

KS_FIELDS: tuple[str, ...] = (
    "sentence",
    "sentence_masked",
    "masked_content",
    "sample_id",
    "numops",
    "numops_by_op",
)
"""The K&S T5 JSONL fields, in the order they are written."""


def state_form(state: State) -> str:
    """Return the form of a state's context (``state.extra["form"]``, default ``"fewshot"``)."""
    return str(state.extra.get("form", "fewshot"))


def state_records(state: State) -> list[dict[str, Any]]:
    """Build the K&S rows of one state, in the order they are written.

    Args:
        state: A state (from the generator or :func:`read_ks_jsonl`).

    Returns:
        One dict per queried box with the six K&S fields (plus any extra fields the state carries).

    """
    form = check_form(state_form(state))
    boxes = cast("Sequence[int]", state.extra.get("boxes") or range(state.num_boxes))
    extras: Sequence[Mapping[str, Any]] | None = state.extra.get("fields")  # type: ignore[assignment]
    orders: Sequence[Sequence[str] | None] = state.extra.get("answer_order") or ()  # type: ignore[assignment]
    rows = []
    for i, box in enumerate(boxes):
        order = orders[i] if i < len(orders) else None
        rec: dict[str, Any] = render_row(
            state.context, box, order or state.contents[box], state.variant, form, keep_order=order is not None
        )
        rec["sample_id"] = state.sample_id
        rec["numops"] = state.numops[box]
        rec["numops_by_op"] = {k: int(state.numops_by_op[box].get(k, 0)) for k in OP_KINDS}
        if extras:
            rec.update(extras[i])
        rows.append(rec)
    return rows


def write_ks_jsonl(path: str | os.PathLike[str], states: Iterable[State]) -> int:
    """Write states as K&S T5 JSONL (atomically: on error nothing is written).

    Args:
        path: Output file.
        states: States, written in order, each as its box rows.

    Returns:
        Number of rows written.

    """
    n = 0
    with atomic_write(path) as f:
        for state in states:
            for rec in state_records(state):
                f.write(json.dumps(rec))
                f.write("\n")
                n += 1
    return n


def _err(path: Path | str, line: int, msg: str) -> EntitylensError:
    return EntitylensError(f"{path} line {line}: {msg}")


def iter_jsonl(path: str | os.PathLike[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line number, object)`` for every non-blank line of a JSONL file.

    Raises:
        EntitylensError: If the file is missing or a line is not a JSON object.

    """
    p = Path(path)
    try:
        f = open(p, encoding="utf-8-sig")  # a byte-order mark (some editors write one) is not part of the data
    except OSError as e:
        raise EntitylensError(f"cannot read {p}: {e.strerror}; check the path") from None
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise _err(p, lineno, f"not valid JSON ({e.msg}); fix or delete the line") from None
            if not isinstance(obj, dict):
                raise _err(p, lineno, "not a JSON object; each line must be one K&S row object")
            yield lineno, obj


def _check_fields(p: Path, lineno: int, rec: Mapping[str, Any], fields: Sequence[str]) -> None:
    for k in fields:
        if k not in rec:
            raise _err(p, lineno, f"missing field {k!r}; add it or regenerate with `entitylens data generate`")
    for k in ("sentence", "sentence_masked", "masked_content"):
        if k in fields and not isinstance(rec[k], str):
            raise _err(p, lineno, f"field {k!r} must be a string; fix the row")
    for k in ("sample_id", "numops"):
        if k in fields and (not isinstance(rec[k], int) or isinstance(rec[k], bool)):
            raise _err(p, lineno, f"field {k!r} must be an integer; fix the row")


@dataclass
class _Group:
    sample_id: int
    context: str
    form: str
    parsed: ParsedContext
    lines: list[int] = field(default_factory=list)
    recs: list[dict[str, Any]] = field(default_factory=list)
    boxes: list[int] = field(default_factory=list)


def _build_state(p: Path, g: _Group) -> State:
    parsed = g.parsed
    n = len(parsed.initial)
    numops, by_op = count_numops(parsed.operations, n)
    contents = parsed.boxes
    extras: list[dict[str, Any]] = []
    orders: list[tuple[str, ...] | None] = []
    for lineno, rec, box in zip(g.lines, g.recs, g.boxes, strict=True):
        try:
            written = parse_masked_content_ordered(rec["masked_content"], g.form)
        except EntitylensError as e:
            raise _err(p, lineno, str(e)) from None
        gold = tuple(sorted(written))
        order = written if written != gold else None
        orders.append(order)
        if gold != contents[box]:
            raise _err(
                p,
                lineno,
                f"masked_content says box {box} holds {list(gold) or 'nothing'} but the operations leave "
                f"{list(contents[box]) or 'nothing'}; fix the row or regenerate the file",
            )
        if rec["numops"] != numops[box]:
            raise _err(
                p,
                lineno,
                f"numops is {rec['numops']} but {numops[box]} operations change box {box}; fix the row or regenerate",
            )
        rb = rec["numops_by_op"]
        if rb != by_op[box]:
            raise _err(
                p,
                lineno,
                f"numops_by_op is {json.dumps(rb)} but the operations give {json.dumps(by_op[box])}; "
                "fix the row or regenerate",
            )
        want = render_row(g.context, box, order or contents[box], parsed.variant, g.form, keep_order=True)
        for k in ("sentence", "sentence_masked"):
            if rec[k] != want[k]:
                raise _err(p, lineno, f"field {k!r} does not match the context and answer ({want[k]!r}); fix the row")
        extras.append({k: v for k, v in rec.items() if k not in KS_FIELDS})
    extra: dict[str, Any] = {"form": g.form}
    if any(extras):
        extra["fields"] = tuple(extras)
    if g.boxes != list(range(n)):
        extra["boxes"] = tuple(g.boxes)
    if any(o is not None for o in orders):
        extra["answer_order"] = tuple(orders)
    return State(
        sample_id=g.sample_id,
        initial=parsed.initial,
        operations=parsed.operations,
        contents=contents,
        numops=numops,
        numops_by_op=by_op,
        context=g.context,
        variant=parsed.variant,
        extra=extra,
    )


def read_ks_jsonl(path: str | os.PathLike[str], max_per_box: int = MAX_PER_BOX) -> list[State]:
    """Read a K&S T5 JSONL file (few-shot or T5 form, any surface variant) into states.

    Args:
        path: The file.
        max_per_box: Box capacity used to validate the operations (3 in K&S data).

    Returns:
        The states in file order (see the module docstring for grouping and checks).

    Raises:
        EntitylensError: On a malformed line, a missing field, unparsable text, a box index out of range, or
            a row that disagrees with its operations; the message names the file and line.

    """
    p = Path(path)
    states: list[State] = []
    last_context: str | None = None
    parsed: ParsedContext | None = None
    group: _Group | None = None
    for lineno, rec in iter_jsonl(p):
        _check_fields(p, lineno, rec, KS_FIELDS)
        try:
            context, noun, label, form = parse_masked_query(rec["sentence_masked"])
        except EntitylensError as e:
            raise _err(p, lineno, str(e)) from None
        if context != last_context or parsed is None:
            try:
                parsed = parse_context(context, max_per_box)
            except EntitylensError as e:
                hint = " (this looks like a P24 file; use read_p24_jsonl)" if " is in Box " in context else ""
                raise _err(p, lineno, f"{e}{hint}") from None
            last_context = context
        want_noun = "Container" if parsed.variant == "altforms" else "Box"
        n = len(parsed.initial)
        if noun != want_noun or (label.isdigit() != (want_noun == "Box")):
            raise _err(
                p,
                lineno,
                f"query names {noun} {label} but the context names its boxes '{want_noun} ...'; fix the query",
            )
        box = int(label) if label.isdigit() else ord(label) - 65
        if not 0 <= box < n:
            raise _err(
                p,
                lineno,
                f"query names {noun} {label} but the context has {n} boxes; query a box that exists",
            )
        if parsed.form is not None and parsed.form != form:
            raise _err(
                p,
                lineno,
                f"the context is in the {parsed.form} form but the query in the {form} form; fix it",
            )
        same = (
            group is not None
            and group.sample_id == rec["sample_id"]
            and group.context == context
            and group.form == form
            and box not in group.boxes
        )
        if not same:
            if group is not None:
                states.append(_build_state(p, group))
            group = _Group(rec["sample_id"], context, form, parsed)
        assert group is not None
        group.lines.append(lineno)
        group.recs.append(rec)
        group.boxes.append(box)
    if group is not None:
        states.append(_build_state(p, group))
    if any(s.variant == "move-contents" for s in states):
        # one file is one dataset: base-looking states of a move-contents file are move-contents states
        states = [dataclasses.replace(s, variant="move-contents") if s.variant == "base" else s for s in states]
    return states


# ------------------------------------------------------------------------------------------------- P24

_P24_CLAUSE = re.compile(r"^[Tt]he (?P<obj>.+) is in Box (?P<label>\w+)$")
_P24_QUERY = re.compile(rf"^(?P<context>.*\.) Box (?P<label>\w+) contains {re.escape(MASK)} \.$", re.DOTALL)


@dataclass(frozen=True)
class P24Item:
    """One row of Prakash et al. (2024)'s single-object boxes files.

    Attributes:
        context: The description, e.g. ``"The spatula is in Box X, the coffee is in Box A."``.
        query_box: The queried box label (a letter), e.g. ``"X"``.
        answer: The object in the queried box, e.g. ``"spatula"``.
        sample_id: The context's id (shared by its query rows).
        assignments: ``(object, box label)`` pairs in the order the description lists them. Labels are drawn
            with replacement in P24's files, so two objects can share a box.

    """

    context: str
    query_box: str
    answer: str
    sample_id: int
    assignments: tuple[tuple[str, str], ...]

    @property
    def entity_index(self) -> int:
        """Position of the queried ``(answer, query_box)`` pair in the description."""
        return self.assignments.index((self.answer, self.query_box))

    @property
    def ambiguous(self) -> bool:
        """Whether the queried box holds more than one object (then the next token is not unique)."""
        return sum(b == self.query_box for _, b in self.assignments) > 1

    @property
    def prompt(self) -> str:
        """The next-token prompt: ``"<context> Box X contains the"``."""
        return f"{self.context} Box {self.query_box} contains the"


def read_p24_jsonl(path: str | os.PathLike[str]) -> list[P24Item]:
    """Read a P24 file (``"The X is in Box L, ..."``, letter labels, one object per box, no operations).

    Args:
        path: E.g. ``box_datasets/no_instructions/alternative/Random/3/train.jsonl``.

    Returns:
        One item per row, in file order.

    Raises:
        EntitylensError: On a malformed line, missing field, unparsable text or inconsistent answer.

    """
    p = Path(path)
    items: list[P24Item] = []
    last: tuple[str, tuple[tuple[str, str], ...]] | None = None
    for lineno, rec in iter_jsonl(p):
        _check_fields(p, lineno, rec, ("sentence_masked", "masked_content", "sample_id"))
        m = _P24_QUERY.match(rec["sentence_masked"])
        if not m:
            raise _err(p, lineno, "sentence_masked does not end with 'Box L contains <extra_id_0> .'; fix the row")
        context = m.group("context")
        if last is not None and last[0] == context:
            pairs = last[1]
        else:
            pairs_list = []
            for clause in context[:-1].split(", "):
                cm = _P24_CLAUSE.match(clause)
                if not cm:
                    raise _err(p, lineno, f"cannot parse {clause!r}; expected 'the X is in Box L'")
                pairs_list.append((cm.group("obj"), cm.group("label")))
            pairs = tuple(pairs_list)
            last = (context, pairs)
        label = m.group("label")
        mc = rec["masked_content"]
        if not mc.startswith(f"{MASK} the ") or (mc[len(MASK) + 5 :], label) not in pairs:
            raise _err(
                p,
                lineno,
                f"masked_content {mc!r} is not '{MASK} the X' for an object X the context puts in Box {label}; "
                "fix the row",
            )
        answer = mc[len(MASK) + 5 :]
        items.append(P24Item(context, label, answer, rec["sample_id"], pairs))
    return items


# ----------------------------------------------------------------------------------------------- stats


@dataclass(frozen=True)
class DatasetStats:
    """Summary of a dataset.

    Attributes:
        rows: Number of (state, box) rows.
        states: Number of states.
        scenarios: Number of distinct ``sample_id``.
        numops_histogram: Rows per ``numops`` value, index = numops (0 .. max).
        by_op: Sum over rows of ``numops_by_op`` per operation type.
        operations_histogram: States per number of operations in the prompt.
        out_of_order_states: States whose text lists some objects out of alphabetical order (read as sets).
        multiword_objects: Distinct objects of more than one word (e.g. K&S modifiers, ``green bomb``).

    """

    rows: int
    states: int
    scenarios: int
    numops_histogram: tuple[int, ...]
    by_op: Mapping[str, int]
    operations_histogram: tuple[int, ...]
    out_of_order_states: int = 0
    multiword_objects: int = 0


def dataset_stats(states: Sequence[State]) -> DatasetStats:
    """Compute :class:`DatasetStats` over the rows the states write."""
    hist: list[int] = []
    ops_hist: list[int] = []
    by_op = dict.fromkeys(OP_KINDS, 0)
    rows = 0
    for s in states:
        boxes = s.extra.get("boxes") or range(s.num_boxes)
        for b in boxes:  # type: ignore[attr-defined]
            rows += 1
            k = s.numops[b]
            hist.extend([0] * (k + 1 - len(hist)))
            hist[k] += 1
            for kind in OP_KINDS:
                by_op[kind] += int(s.numops_by_op[b].get(kind, 0))
        k = s.num_operations
        ops_hist.extend([0] * (k + 1 - len(ops_hist)))
        ops_hist[k] += 1
    objects = {o for s in states for b in s.initial for o in b} | {
        o for s in states for op in s.operations for o in op.objects
    }
    return DatasetStats(
        rows=rows,
        states=len(states),
        scenarios=len({s.sample_id for s in states}),
        numops_histogram=tuple(hist),
        by_op=by_op,
        operations_histogram=tuple(ops_hist),
        out_of_order_states=sum(listed_out_of_order(s) for s in states),
        multiword_objects=sum(" " in o for o in objects),
    )


def listed_out_of_order(state: State) -> bool:
    """Whether a state's text lists some objects out of alphabetical order (its context or an answer)."""
    if state.extra.get("answer_order"):
        return True
    form = state_form(state)
    canonical = " ".join(
        [describe_boxes(state.initial, state.variant, form)]
        + [describe_operation(op, state.variant) for op in state.operations]
    )
    return canonical != state.context


def format_stats(stats: DatasetStats, bins: int = 8) -> str:
    """Human-readable multi-line summary (numops values ``>= bins-1`` are pooled as ``7+``)."""
    h = list(stats.numops_histogram) + [0] * max(0, bins - len(stats.numops_histogram))
    shown = h[: bins - 1] + [sum(h[bins - 1 :])]
    labels = [str(i) for i in range(bins - 1)] + [f"{bins - 1}+"]
    width = max(len(str(x)) for x in [*shown, "rows"]) + 1
    lines = [
        f"rows       {stats.rows}",
        f"states     {stats.states}",
        f"scenarios  {stats.scenarios}",
        "numops     " + "".join(f"{lab:>{width}}" for lab in labels),
        "rows       " + "".join(f"{x:>{width}}" for x in shown),
        "by op      " + ", ".join(f"{k} {v}" for k, v in stats.by_op.items()),
        "ops/state  " + ", ".join(f"{k}: {v}" for k, v in enumerate(stats.operations_histogram) if v),
    ]
    if stats.out_of_order_states:
        lines.append(
            f"note       {stats.out_of_order_states} states list objects out of alphabetical order; read as sets "
            "(box contents are unordered), text kept as written"
        )
    if stats.multiword_objects:
        lines.append(f"note       {stats.multiword_objects} objects have several words (modifiers, e.g. 'green bomb')")
    return "\n".join(lines)
