"""Surface forms of the boxes task: render states as K&S text, and parse that text back.

Templates are those of Kim & Schuster (2023)'s ``generate_boxes_data.py``.

Base and move-contents (boxes ``Box 0`` ... ``Box 6``):

* description: ``Box 0 contains the A and the B, Box 1 contains nothing, ..., Box 6 contains the C.``
  (``Box 1 is empty`` in the T5 form)
* move: ``Move the X and the Y from Box 1 to Box 3.``
* move-contents (whole box moved, move-contents variant only): ``Move the contents of Box 2 to Box 6.``
* remove: ``Remove the X from Box 1.``
* put: ``Put the X into Box 1.``
* query: ``Box 3 contains the X.`` / ``Box 3 contains nothing.`` (T5 form: ``Box 3 is empty.``)

AltForms (containers ``Container A`` ... ``Container G``):

* description: ``The A and the B are in Container A, there is nothing in Container B, ..., the C is in
  Container G.`` (the same in both forms)
* move: ``Pick up the X and the Y in Container B and place them into Container D.`` (``it`` for one object);
  whole-box moves in move-contents style: ``Pick up the contents of Container C and place them into
  Container G.``
* remove: ``Take the X out of Container B.``
* put: ``Place the X inside Container B.``
* query: not rephrased by K&S: ``Container D contains the X.`` / ``Container D contains nothing.``
  (T5 form: ``Container D is empty.``)

Objects are listed alphabetically, each with ``the``, joined by `` and ``. Files that list them in another
order are read too (K&S's disjoint-vocabulary files substitute rare nouns into an already sorted file;
``--include_modifiers`` files sort by the bare noun): contents are sets, so they are normalised to
alphabetical tuples, and :func:`parse_objects_ordered` keeps the order as written.

Two *forms* exist (``FORMS``): ``"fewshot"`` (K&S ``--zero_shot``; empty boxes "contain nothing", the masked
query is ``Box N contains <extra_id_0> .`` and the answer ``<extra_id_0> the X`` or ``<extra_id_0> nothing``)
— the form KST24 evaluate on — and ``"t5"`` (empty boxes "are empty", masked query ``Box N <extra_id_0> .``,
answer ``<extra_id_0> contains the X`` or ``<extra_id_0> is empty``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from entitylens.errors import EntitylensError
from entitylens.task.types import MAX_PER_BOX, Contents, Operation, sorted_contents
from entitylens.task.world import Boxes, apply_operation, validate_boxes

VARIANTS: tuple[str, ...] = ("base", "altforms", "move-contents")
"""Surface variants: K&S base sentences, AltForms (Containers A-G), move-contents operations."""

FORMS: tuple[str, ...] = ("fewshot", "t5")
"""Dataset forms: few-shot ("contains nothing"), T5 ("is empty")."""

MASK = "<extra_id_0>"
"""The T5 sentinel K&S use for the masked answer."""

MAX_BOXES = 26
"""Containers are labelled with letters, so at most 26 boxes can be rendered."""


def check_variant(variant: str) -> str:
    """Return ``variant`` or raise a one-line error listing the valid variants."""
    if variant not in VARIANTS:
        raise EntitylensError(f"unknown variant {variant!r}; use one of: {', '.join(VARIANTS)}")
    return variant


def check_form(form: str) -> str:
    """Return ``form`` or raise a one-line error listing the valid forms."""
    if form not in FORMS:
        raise EntitylensError(f"unknown form {form!r}; use one of: {', '.join(FORMS)}")
    return form


def box_noun(variant: str) -> str:
    """``"Container"`` for altforms, ``"Box"`` otherwise."""
    return "Container" if variant == "altforms" else "Box"


def box_label(box: int, variant: str) -> str:
    """Return the label of a box: ``"3"`` for base/move-contents, ``"D"`` for altforms."""
    if not 0 <= box < MAX_BOXES:
        raise EntitylensError(f"box index {box} is out of range 0-{MAX_BOXES - 1}; use a valid box index")
    return chr(65 + box) if variant == "altforms" else str(box)


def box_name(box: int, variant: str) -> str:
    """``"Box 3"`` or ``"Container D"``."""
    return f"{box_noun(variant)} {box_label(box, variant)}"


def object_list(objects: Sequence[str], keep_order: bool = False) -> str:
    """Render ``objects`` as ``"the a and the b"`` (alphabetical, or in the given order with ``keep_order``)."""
    return " and ".join(f"the {o}" for o in (objects if keep_order else sorted_contents(objects)))


def _capitalize(s: str) -> str:
    return s[0].upper() + s[1:] if s else s


def describe_box(box: int, contents: Sequence[str], variant: str = "base", form: str = "fewshot") -> str:
    """One box's clause of the initial description (no capital, no period)."""
    name = box_name(box, variant)
    if variant == "altforms":
        if not contents:
            return f"there is nothing in {name}"
        verb = "is" if len(contents) == 1 else "are"
        return f"{object_list(contents)} {verb} in {name}"
    if not contents:
        return f"{name} contains nothing" if form == "fewshot" else f"{name} is empty"
    return f"{name} contains {object_list(contents)}"


def describe_boxes(boxes: Sequence[Sequence[str]], variant: str = "base", form: str = "fewshot") -> str:
    """Render the initial description sentence of all boxes."""
    check_variant(variant)
    check_form(form)
    return _capitalize(", ".join(describe_box(b, c, variant, form) for b, c in enumerate(boxes))) + "."


def describe_operation(op: Operation, variant: str = "base") -> str:
    """Render the sentence of one operation."""
    check_variant(variant)
    src = box_name(op.box, variant)
    dst = box_name(op.dest, variant) if op.dest is not None else ""
    objs = object_list(op.objects)
    if variant == "altforms":
        if op.kind == "move_contents":
            return f"Pick up the contents of {src} and place them into {dst}."
        if op.kind == "move":
            pronoun = "it" if len(op.objects) == 1 else "them"
            return f"Pick up {objs} in {src} and place {pronoun} into {dst}."
        if op.kind == "remove":
            return f"Take {objs} out of {src}."
        return f"Place {objs} inside {src}."
    if op.kind == "move_contents":
        return f"Move the contents of {src} to {dst}."
    if op.kind == "move":
        return f"Move {objs} from {src} to {dst}."
    if op.kind == "remove":
        return f"Remove {objs} from {src}."
    return f"Put {objs} into {src}."


def render_context(
    initial: Sequence[Sequence[str]],
    operations: Sequence[Operation],
    variant: str = "base",
    form: str = "fewshot",
) -> str:
    """Render a state's prompt text: the initial description followed by the operation sentences."""
    parts = [describe_boxes(initial, variant, form)]
    parts.extend(describe_operation(op, variant) for op in operations)
    return " ".join(parts)


def query_sentence(
    box: int, contents: Sequence[str], variant: str = "base", form: str = "fewshot", keep_order: bool = False
) -> str:
    """Render the unmasked query with its answer (K&S never rephrase the query for altforms)."""
    check_form(form)
    name = box_name(box, variant)
    if not contents:
        return f"{name} contains nothing." if form == "fewshot" else f"{name} is empty."
    return f"{name} contains {object_list(contents, keep_order)}."


def masked_query(box: int, variant: str = "base", form: str = "fewshot") -> str:
    """Render the masked query: ``Box 3 contains <extra_id_0> .`` (few-shot) / ``Box 3 <extra_id_0> .``."""
    check_form(form)
    name = box_name(box, variant)
    return f"{name} contains {MASK} ." if form == "fewshot" else f"{name} {MASK} ."


def masked_content(contents: Sequence[str], form: str = "fewshot", keep_order: bool = False) -> str:
    """Render the answer field.

    Few-shot form: ``<extra_id_0> the X`` / ``<extra_id_0> nothing``; T5 form: ``<extra_id_0> contains the X``
    / ``<extra_id_0> is empty``.
    """
    check_form(form)
    if form == "fewshot":
        return f"{MASK} {object_list(contents, keep_order) if contents else 'nothing'}"
    return f"{MASK} contains {object_list(contents, keep_order)}" if contents else f"{MASK} is empty"


def render_row(
    context: str, box: int, contents: Sequence[str], variant: str, form: str, keep_order: bool = False
) -> dict[str, str]:
    """Render the text fields of one K&S row: ``sentence``, ``sentence_masked``, ``masked_content``.

    With ``keep_order`` the answer lists ``contents`` in the given order (a file's own order), else
    alphabetically.
    """
    return {
        "sentence": f"{context} {query_sentence(box, contents, variant, form, keep_order)}",
        "sentence_masked": f"{context} {masked_query(box, variant, form)}",
        "masked_content": masked_content(contents, form, keep_order),
    }


# ---------------------------------------------------------------------------------------------- parsing

_OBJS = r"(?P<objs>the .+?)"
_BOX_DESC = re.compile(rf"^Box (?P<box>\d+) (?:contains (?:(?P<nothing>nothing)|{_OBJS})|(?P<empty>is empty))$")
_ALT_DESC = re.compile(
    r"^(?:[Tt]here is nothing in Container (?P<ebox>[A-Z])"
    r"|(?P<objs>[Tt]he .+?) (?:is|are) in Container (?P<box>[A-Z]))$"
)
_OPS: tuple[tuple[re.Pattern[str], str, str], ...] = (
    (re.compile(r"^Move the contents of Box (?P<box>\d+) to Box (?P<dest>\d+)$"), "move_contents", "base"),
    (re.compile(rf"^Move {_OBJS} from Box (?P<box>\d+) to Box (?P<dest>\d+)$"), "move", "base"),
    (re.compile(rf"^Remove {_OBJS} from Box (?P<box>\d+)$"), "remove", "base"),
    (re.compile(rf"^Put {_OBJS} into Box (?P<box>\d+)$"), "put", "base"),
    (
        re.compile(
            r"^Pick up the contents of Container (?P<box>[A-Z]) "
            r"and place them into Container (?P<dest>[A-Z])$"
        ),
        "move_contents",
        "altforms",
    ),
    (
        re.compile(
            rf"^Pick up {_OBJS} in Container (?P<box>[A-Z]) "
            r"and place (?:it|them) into Container (?P<dest>[A-Z])$"
        ),
        "move",
        "altforms",
    ),
    (re.compile(rf"^Take {_OBJS} out of Container (?P<box>[A-Z])$"), "remove", "altforms"),
    (re.compile(rf"^Place {_OBJS} inside Container (?P<box>[A-Z])$"), "put", "altforms"),
)
_QUERY = re.compile(
    r"^(?P<context>.*\.) (?P<noun>Box|Container) (?P<label>[0-9]+|[A-Z]) "
    rf"(?P<contains>contains )?{re.escape(MASK)} \.$",
    re.DOTALL,
)
_SENT_SPLIT = re.compile(r"(?<=\.) +")


@dataclass(frozen=True)
class ParsedContext:
    """A context parsed back from text.

    Attributes:
        initial: Initial contents of every box.
        operations: Operations, in order (``move_contents`` objects filled in by replaying).
        boxes: Contents of every box after all operations.
        variant: ``"altforms"`` when the text uses Containers, ``"move-contents"`` when it contains a
            ``Move the contents`` operation, else ``"base"``.
        form: ``"fewshot"`` / ``"t5"`` when the description shows an empty box, else ``None``.

    """

    initial: Boxes
    operations: tuple[Operation, ...]
    boxes: Boxes
    variant: str
    form: str | None


def parse_objects_ordered(text: str) -> tuple[str, ...]:
    """Parse ``"the b and the a"`` into ``("b", "a")``: the objects in the order written.

    Objects may be several words (K&S ``--include_modifiers``: ``"the green bomb and the red plate"``).

    Raises:
        EntitylensError: If the list is not of the form ``the X and the Y ...`` or names an object twice.

    """
    if not text.startswith("the "):
        raise EntitylensError(f"object list {text!r} does not start with 'the'; write objects as 'the X and the Y'")
    objs = tuple(text[4:].split(" and the "))
    if any(not o or o != o.strip() or "," in o for o in objs):
        raise EntitylensError(f"cannot parse object list {text!r}; write objects as 'the X and the Y'")
    if len(set(objs)) != len(objs):
        raise EntitylensError(f"object list {text!r} names an object twice; list each object once")
    return objs


def parse_objects(text: str) -> Contents:
    """Parse ``"the a and the b"`` (in any order) into ``("a", "b")``: sorted, as contents are sets.

    Raises:
        EntitylensError: If the list is not of the form ``the X and the Y ...``.

    """
    return sorted_contents(parse_objects_ordered(text))


def _label_to_index(label: str, num_boxes: int, what: str) -> int:
    idx = int(label) if label.isdigit() else ord(label) - 65
    if not 0 <= idx < num_boxes:
        raise EntitylensError(
            f"{what} names box {label} but the description has {num_boxes} boxes; use a box that exists"
        )
    return idx


def parse_description(sentence: str) -> tuple[Boxes, str, str | None]:
    """Parse an initial description sentence.

    Args:
        sentence: E.g. ``"Box 0 contains the car, Box 1 contains nothing, ..."`` (trailing ``.`` optional).

    Returns:
        ``(boxes, variant, form)``; ``variant`` is ``"altforms"`` or ``"base"``, ``form`` ``None`` when no
        box is empty (or for altforms, whose description does not depend on the form).

    Raises:
        EntitylensError: If a clause is not a known description or boxes are not listed in order.

    """
    body = sentence[:-1] if sentence.endswith(".") else sentence
    clauses = body.split(", ")
    boxes: list[Contents] = []
    forms: set[str] = set()
    alt = clauses[0].startswith(("The ", "There ", "the ", "there "))
    for i, clause in enumerate(clauses):
        if alt:
            m = _ALT_DESC.match(clause)
            if not m:
                raise EntitylensError(f"cannot parse description clause {clause!r}; use the K&S AltForms template")
            label = m.group("ebox") or m.group("box")
            contents = () if m.group("ebox") else parse_objects("t" + m.group("objs")[1:])
            idx = ord(label) - 65
        else:
            m = _BOX_DESC.match(clause)
            if not m:
                raise EntitylensError(
                    f"cannot parse description clause {clause!r}; expected 'Box N contains the X', "
                    "'Box N contains nothing' or 'Box N is empty'"
                )
            idx = int(m.group("box"))
            if m.group("nothing"):
                forms.add("fewshot")
                contents = ()
            elif m.group("empty"):
                forms.add("t5")
                contents = ()
            else:
                contents = parse_objects(m.group("objs"))
        if idx != i:
            raise EntitylensError(
                f"description clause {i} ({clause!r}) names box {label if alt else idx}; list boxes in order "
                "from the first box"
            )
        boxes.append(contents)
    if len(forms) > 1:
        raise EntitylensError("description mixes 'contains nothing' and 'is empty'; use one form")
    if len(boxes) > MAX_BOXES:
        raise EntitylensError(f"description has {len(boxes)} boxes, more than {MAX_BOXES}; use fewer boxes")
    return tuple(boxes), ("altforms" if alt else "base"), (forms.pop() if forms else None)


def parse_operation(sentence: str, boxes: Boxes) -> tuple[Operation, str]:
    """Parse one operation sentence, given the world state it applies to.

    Args:
        sentence: E.g. ``"Move the car from Box 0 to Box 3."``.
        boxes: The contents before the operation (needed for ``move the contents``).

    Returns:
        ``(operation, variant)`` where variant is ``"base"`` or ``"altforms"`` (the sentence's style).

    Raises:
        EntitylensError: If the sentence is not a known operation or names a box out of range.

    """
    body = sentence[:-1] if sentence.endswith(".") else sentence
    n = len(boxes)
    for pattern, kind, style in _OPS:
        m = pattern.match(body)
        if not m:
            continue
        box = _label_to_index(m.group("box"), n, "operation")
        dest = _label_to_index(m.group("dest"), n, "operation") if "dest" in pattern.groupindex else None
        objs = boxes[box] if kind == "move_contents" else parse_objects(m.group("objs"))
        if kind == "move_contents" and not objs:
            raise EntitylensError(f"{sentence!r} moves the contents of an empty box; fix the operation")
        return Operation(kind, objs, box, dest), style  # type: ignore[arg-type]
    raise EntitylensError(
        f"cannot parse operation {sentence!r}; expected a K&S move/remove/put sentence (base or AltForms)"
    )


def split_sentences(text: str) -> list[str]:
    """Split a context into sentences (each keeps its final period)."""
    parts = _SENT_SPLIT.split(text.strip())
    for p in parts:
        if not p.endswith("."):
            raise EntitylensError(f"sentence {p!r} does not end with a period; end every sentence with '.'")
    return parts


def parse_context(text: str, max_per_box: int = MAX_PER_BOX) -> ParsedContext:
    """Parse a context (description + operations) in any surface form and replay it.

    Args:
        text: The context, e.g. a K&S ``sentence_masked`` without its final query.
        max_per_box: Capacity used to validate the replay.

    Returns:
        The parsed context.

    Raises:
        EntitylensError: If the text cannot be parsed or the operations are impossible.

    """
    sentences = split_sentences(text)
    initial, variant, form = parse_description(sentences[0])
    boxes = validate_boxes(initial, max_per_box)
    ops: list[Operation] = []
    for s in sentences[1:]:
        op, style = parse_operation(s, boxes)
        if (style == "altforms") != (variant == "altforms"):
            raise EntitylensError(
                f"operation {s!r} does not match the description's style ({variant}); use one variant per context"
            )
        boxes = apply_operation(boxes, op, max_per_box)
        ops.append(op)
    if variant == "base" and any(op.kind == "move_contents" for op in ops):
        variant = "move-contents"
    return ParsedContext(initial, tuple(ops), boxes, variant, form)


def parse_masked_query(sentence_masked: str) -> tuple[str, str, str, str]:
    """Split a K&S ``sentence_masked`` into its context and query.

    Args:
        sentence_masked: E.g. ``"<context> Box 3 contains <extra_id_0> ."``.

    Returns:
        ``(context, noun, label, form)``: noun ``"Box"``/``"Container"``, the box label as written, and the
        form (``"fewshot"`` for ``contains <extra_id_0> .``, ``"t5"`` for ``<extra_id_0> .``).

    Raises:
        EntitylensError: If the text does not end with a masked query.

    """
    m = _QUERY.match(sentence_masked)
    if not m:
        raise EntitylensError(
            "sentence_masked does not end with 'Box N contains <extra_id_0> .' or 'Box N <extra_id_0> .'; fix the row"
        )
    form = "fewshot" if m.group("contains") else "t5"
    return m.group("context"), m.group("noun"), m.group("label"), form


def parse_masked_content(text: str, form: str) -> Contents:
    """Parse a K&S ``masked_content`` answer into box contents (sorted; see :func:`parse_masked_content_ordered`).

    Raises:
        EntitylensError: If the answer does not match the form.

    """
    return sorted_contents(parse_masked_content_ordered(text, form))


def parse_masked_content_ordered(text: str, form: str) -> tuple[str, ...]:
    """Parse a K&S ``masked_content`` answer into the objects in the order the file lists them.

    Args:
        text: E.g. ``"<extra_id_0> the bottle"``, ``"<extra_id_0> nothing"``, ``"<extra_id_0> is empty"``.
        form: The row's form (from :func:`parse_masked_query`).

    Returns:
        The objects as written (empty for "nothing" / "is empty").

    Raises:
        EntitylensError: If the answer does not match the form.

    """
    prefix = f"{MASK} "
    if not text.startswith(prefix):
        raise EntitylensError(f"masked_content {text!r} does not start with '{MASK} '; fix the row")
    body = text[len(prefix) :]
    if form == "fewshot":
        if body == "nothing":
            return ()
        objs = body
    else:
        if body == "is empty":
            return ()
        if not body.startswith("contains "):
            raise EntitylensError(
                f"masked_content {text!r} is not '{MASK} contains ...' or '{MASK} is empty' "
                "as the T5 form needs; "
                "fix the row"
            )
        objs = body[len("contains ") :]
    return parse_objects_ordered(objs)
