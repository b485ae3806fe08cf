"""The structure of a boxes prompt: character spans of its description, operations and query.

:func:`parse_prompt` parses a prompt's text with regular expressions into a :class:`PromptStructure`: the
final query ``Box N contains``, the initial description (the last description before the operations, so a
few-shot prefix in front of it is skipped) with each box's mention and contents, and every operation
sentence with its kind, its objects, its boxes and the period that ends it. The testbed's compact prompts
(``"B0 car ; ... | B3"``) are parsed by :func:`compact_structure` into the same structure. The role finder
(:mod:`entitylens.activations.roles`) maps these spans to tokens; the probe labels
(:mod:`entitylens.probing.world`) replay the operations on the description.

Surface forms understood: the K&S base form (``Box 0 contains the A and the B, Box 1 contains nothing``
or ``... is empty``; ``Move/Remove/Put`` sentences; ``Move the contents of Box 2 to Box 6.``), the
AltForms variant (``The A and the B are in Container A, ..., there is nothing in Container G.``;
``Pick up ... and place it into``, ``Pick up the contents of ...``, ``Take ... out of``,
``Place ... inside``), the P24 form (``The magnet is in Box X, ...``) and the compact form. A query may end
with `` the`` (the P24 next-token form).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from entitylens.errors import EntitylensError
from entitylens.task.compact import is_compact_prompt

__all__ = ["OperationSpans", "PromptStructure", "Span", "compact_structure", "parse_prompt"]

Span = tuple[int, int]
"""A half-open character range ``[start, end)`` in the prompt text."""

_LABEL = r"(?:\d+|[A-Z])"
_KW = r"(?:Box|Container)"

_QUERY_RE = re.compile(rf"(?P<kw>{_KW}) (?P<label>{_LABEL}) (?P<contains>contains)(?: the)?\s*$")

# Description clauses (searched inside the description sentence).
_DESC_CONTAINS_RE = re.compile(
    rf"\b{_KW} (?P<label>{_LABEL}) (?:contains (?:nothing|(?P<objs>the [^,.]+?))|is empty)(?=\s*(?:,|\.|$))"
)
_DESC_IN_RE = re.compile(rf"(?P<objs>\b[Tt]he [^,.]+?) (?:is|are) in {_KW} (?P<label>{_LABEL})\b")
_DESC_NOTHING_RE = re.compile(rf"\b[Tt]here is nothing in {_KW} (?P<label>{_LABEL})\b")

# Operation sentences (each must match a whole sentence, from its verb to its period), with their kind.
_OP_RES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(p), kind)
    for p, kind in (
        (rf"Move the contents of {_KW} (?P<box>{_LABEL}) to {_KW} (?P<dest>{_LABEL})\.", "move_contents"),
        (rf"Pick up the contents of {_KW} (?P<box>{_LABEL}) and place them into {_KW} (?P<dest>{_LABEL})\.",
         "move_contents"),
        (rf"Move (?P<objs>the [^.]+?) from {_KW} (?P<box>{_LABEL}) to {_KW} (?P<dest>{_LABEL})\.", "move"),
        (rf"Remove (?P<objs>the [^.]+?) from {_KW} (?P<box>{_LABEL})\.", "remove"),
        (rf"Put (?P<objs>the [^.]+?) into {_KW} (?P<box>{_LABEL})\.", "put"),
        (rf"Pick up (?P<objs>the [^.]+?) in {_KW} (?P<box>{_LABEL}) and place (?:it|them) into "
         rf"{_KW} (?P<dest>{_LABEL})\.", "move"),
        (rf"Take (?P<objs>the [^.]+?) out of {_KW} (?P<box>{_LABEL})\.", "remove"),
        (rf"Place (?P<objs>the [^.]+?) inside {_KW} (?P<box>{_LABEL})\.", "put"),
    )
)
_SENTENCE_RE = re.compile(r"[^.]*\.")
_OBJ_SPLIT_RE = re.compile(r"(?:,? and |, )(?=the )")


@dataclass(frozen=True)
class OperationSpans:
    """Character spans of one operation sentence.

    Attributes:
        objects: Span of each object name, in the order the sentence lists them (empty for
            ``Move the contents of ...``).
        box: Span of the first box label the sentence names.
        dest: Span of the destination box label (moves only).
        kind: ``"move"``, ``"remove"``, ``"put"`` or ``"move_contents"``.
        end: Span of the period that ends the sentence (the compact form's ``.``).
        object_names: The objects' names, in the order of ``objects``.

    """

    objects: tuple[Span, ...]
    box: Span
    dest: Span | None
    kind: str = ""
    end: Span | None = None
    object_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class PromptStructure:
    """Character spans of the parts of one boxes prompt (see :func:`parse_prompt`).

    Attributes:
        query_label: The queried box's label as written (``"3"``, ``"A"``), or ``None`` without a query.
        query_box: Span of that label in the final query.
        query_contains: Span of the query's ``contains``.
        desc_boxes: Box label -> span of its mention in the initial description (in text order).
        desc_objects: Object name -> span of its (last) mention in the initial description.
        operations: The operation sentences after the description, in order.
        desc_contents: Box label -> the objects the description puts in it, each with its span, in text order.

    """

    query_label: str | None
    query_box: Span | None
    query_contains: Span | None
    desc_boxes: Mapping[str, Span]
    desc_objects: Mapping[str, Span]
    operations: tuple[OperationSpans, ...]
    desc_contents: Mapping[str, tuple[tuple[str, Span], ...]] = field(default_factory=dict)


def _object_spans(text: str, start: int, end: int) -> list[tuple[str, Span]]:
    """Split ``text[start:end]`` (``"the X and the Y"``) into object names with their spans."""
    out = []
    pos = start
    for piece in _OBJ_SPLIT_RE.split(text[start:end]):
        offset = text.index(piece, pos)
        name = piece[4:] if piece.startswith(("the ", "The ")) else piece
        name_start = offset + (len(piece) - len(name))
        out.append((name, (name_start, name_start + len(name))))
        pos = offset + len(piece)
    return out


def _match_operation(text: str, start: int, end: int) -> OperationSpans | None:
    """Parse ``text[start:end]`` as one operation sentence, or return ``None``."""
    sentence = text[start:end]
    stripped = sentence.lstrip()
    base = start + len(sentence) - len(stripped)
    for pattern, kind in _OP_RES:
        m = pattern.fullmatch(stripped)
        if m is None:
            continue
        groups = m.groupdict()
        named: list[tuple[str, Span]] = []
        if groups.get("objs") is not None:
            s, e = m.span("objs")
            named = _object_spans(text, base + s, base + e)
        box = (base + m.start("box"), base + m.end("box"))
        dest = (base + m.start("dest"), base + m.end("dest")) if groups.get("dest") is not None else None
        stop = base + len(stripped)
        return OperationSpans(objects=tuple(span for _, span in named), box=box, dest=dest, kind=kind,
                              end=(stop - 1, stop), object_names=tuple(name for name, _ in named))
    return None


def _parse_description(text: str, start: int, end: int
                       ) -> tuple[dict[str, Span], dict[str, Span], dict[str, tuple[tuple[str, Span], ...]]]:
    """Box mentions, object mentions and each box's objects inside the description sentence ``text[start:end]``."""
    boxes: dict[str, Span] = {}
    objects: dict[str, Span] = {}
    contents: dict[str, tuple[tuple[str, Span], ...]] = {}
    sentence = text[start:end]
    for pattern in (_DESC_CONTAINS_RE, _DESC_IN_RE, _DESC_NOTHING_RE):
        for m in pattern.finditer(sentence):
            label = m.group("label")
            boxes.setdefault(label, (start + m.start("label"), start + m.end("label")))
            named: list[tuple[str, Span]] = []
            if m.groupdict().get("objs") is not None:
                s, e = m.span("objs")
                named = _object_spans(text, start + s, start + e)
                for name, span in named:
                    objects[name] = span
            contents.setdefault(label, tuple(named))
    boxes = dict(sorted(boxes.items(), key=lambda kv: kv[1]))
    return boxes, objects, {label: contents[label] for label in boxes}


_COMPACT_WORD_RE = re.compile(r"\S+")
_COMPACT_LABEL_RE = re.compile(r"^B(\d+)$")


def compact_structure(text: str) -> PromptStructure:
    """Parse a compact prompt into the role finder's ``PromptStructure`` (character spans).

    ``query_box`` is the final ``Bk`` label, ``desc_boxes`` maps each label's number (``"3"``) to its
    ``Bk`` token in the description, ``desc_objects`` each described object to its token, and each
    operation's spans are its objects, its (source) box, its destination and its ``.``. ``query_contains``
    is ``None`` (the compact format has no ``contains``).

    Args:
        text: A compact prompt (``is_compact_prompt``).

    Returns:
        The :class:`PromptStructure`.

    Raises:
        EntitylensError: If ``text`` is not a compact prompt.
    """
    if not is_compact_prompt(text):
        raise EntitylensError("not a compact prompt (expected 'B0 ... | Bk'); build it with compact_prompt()")
    words = [(m.group(), m.span()) for m in _COMPACT_WORD_RE.finditer(text)]
    bar = max(i for i, (w, _) in enumerate(words) if w == "|")
    q_word, q_span = words[-1]
    desc_boxes: dict[str, Span] = {}
    desc_objects: dict[str, Span] = {}
    desc_contents: dict[str, tuple[tuple[str, Span], ...]] = {}
    operations = []
    i = 0
    # description: "Bk objects ;" per box, then operations, each ended by "."
    while i < bar:
        m = _COMPACT_LABEL_RE.match(words[i][0])
        if m is None or m.group(1) in desc_boxes:
            break
        desc_boxes[m.group(1)] = words[i][1]
        i += 1
        named = []
        while i < bar and words[i][0] != ";":
            desc_objects[words[i][0]] = words[i][1]
            named.append(words[i])
            i += 1
        desc_contents[m.group(1)] = tuple(named)
        i += 1  # the ";"
    while i < bar:
        verb = words[i][0]
        j = i + 1
        objs: list[tuple[str, Span]] = []
        while j < bar and not _COMPACT_LABEL_RE.match(words[j][0]) and words[j][0] != ".":
            objs.append(words[j])
            j += 1
        boxes = []
        while j < bar and _COMPACT_LABEL_RE.match(words[j][0]):
            boxes.append(words[j][1])
            j += 1
        if verb not in ("put", "remove", "move") or not boxes or j >= bar or words[j][0] != ".":
            raise EntitylensError(
                f"cannot parse the compact operation starting at {text[words[i][1][0] :][:40]!r}"
            )
        operations.append(
            OperationSpans(
                objects=tuple(span for _, span in objs),
                box=boxes[0],
                dest=boxes[1] if verb == "move" and len(boxes) > 1 else None,
                kind=verb,
                end=words[j][1],
                object_names=tuple(w for w, _ in objs),
            )
        )
        i = j + 1
    qm = _COMPACT_LABEL_RE.match(q_word)
    assert qm is not None
    return PromptStructure(
        query_label=qm.group(1),
        query_box=q_span,
        query_contains=None,
        desc_boxes=desc_boxes,
        desc_objects=desc_objects,
        operations=tuple(operations),
        desc_contents=desc_contents,
    )


def parse_prompt(text: str) -> PromptStructure:
    """Parse a boxes prompt into the character spans that roles point at.

    The prompt is ``[any prefix] <description> <operations> <query>``. The query is a final
    ``Box N contains`` (optionally followed by `` the``). Walking back from the query, every sentence
    that is an operation belongs to the state; the first sentence that is not is the initial
    description, so a few-shot prefix (with its own descriptions and statements) is never confused with
    the state being asked about.

    Args:
        text: The prompt text.

    Returns:
        The spans found; parts that are absent are ``None`` / empty. The testbed's compact prompts
        (``"B0 car ; ... | B3"``) are parsed by :func:`compact_structure`, so every role means the same
        tokens in both forms.

    """
    if is_compact_prompt(text):
        return compact_structure(text)
    m = _QUERY_RE.search(text)
    if m is not None:
        label = m.group("label")
        query_box: Span | None = m.span("label")
        query_contains: Span | None = m.span("contains")
        body_end = m.start()
    else:
        label, query_box, query_contains, body_end = None, None, None, len(text)
    sentences = [s.span() for s in _SENTENCE_RE.finditer(text, 0, body_end)]
    operations: list[OperationSpans] = []
    desc_boxes: dict[str, Span] = {}
    desc_objects: dict[str, Span] = {}
    desc_contents: dict[str, tuple[tuple[str, Span], ...]] = {}
    for s, e in reversed(sentences):
        op = _match_operation(text, s, e)
        if op is not None:
            operations.append(op)
            continue
        desc_boxes, desc_objects, desc_contents = _parse_description(text, s, e)
        break
    return PromptStructure(
        query_label=label,
        query_box=query_box,
        query_contains=query_contains,
        desc_boxes=desc_boxes,
        desc_objects=desc_objects,
        operations=tuple(reversed(operations)),
        desc_contents=desc_contents,
    )
