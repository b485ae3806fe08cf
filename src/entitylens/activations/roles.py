"""Token *roles*: named positions in a boxes-task prompt, computed from the prompt text itself.

A role names a token by what it is in the prompt (the queried box's number, the last object of the
second operation, ...) instead of by a raw position, so the same role means the same thing in every
prompt whatever its length, its tokenizer or where it came from (generated in memory or read from a
file). Roles are found in two steps, both independent of the tokenizer's vocabulary:

1. :func:`parse_prompt` parses the text with regular expressions into character spans: the final query
   ``Box N contains``, the initial description (the last description before the operations, so a
   few-shot prefix in front of it is skipped) and every operation sentence.
2. :func:`find_roles` maps each span to a token through the fast tokenizer's character offsets
   (``return_offsets_mapping=True``): a token belongs to a span when their character ranges overlap.
   Multi-token objects therefore work, and a number merged with its neighbours into one token
   (``" 3."``) maps to that token.

Role catalogue (boxes and operations are numbered from 0, as in ``Box 0``):

============================ ===========================================================================
role                         token
============================ ===========================================================================
``last``                     the last token of the prompt
``query_box``                the number (label) token of the final ``Box N`` / ``Container X`` query;
                             for a multi-token number, its last token
``query_contains``           the ``contains`` token of the final query
``query_box_desc``           the queried box's number token in the initial description
``box{k}_desc``              the number token of ``Box k`` in the initial description (``k`` is the
                             label as written: ``box3_desc``, or ``boxA_desc`` for ``Container A``)
``op{i}_object``             the LAST token of the first object named by operation ``i``
``op{i}_object_first``       the first token of that object
``op{i}_box``                the number token of the first box operation ``i`` names (the source of a
                             move, the box of a remove or put)
``op{i}_dest``               the number token of the destination box of move ``i``
``obj:<name>``               the last token of object ``<name>``'s mention in the initial description
============================ ===========================================================================

Surface forms understood: the K&S base form (``Box 0 contains the A and the B, Box 1 contains nothing``
or ``... is empty``; ``Move/Remove/Put`` sentences; ``Move the contents of Box 2 to Box 6.``), the
AltForms variant (``The A and the B are in Container A, ..., there is nothing in Container G.``;
``Pick up ... and place it into``, ``Pick up the contents of ...``, ``Take ... out of``,
``Place ... inside``) and the P24 form (``The magnet is in Box X, ...``). A query may end with
`` the`` (the P24 next-token form).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, overload

from entitylens.errors import EntitylensError
from entitylens.task.compact import is_compact_prompt

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

# Operation sentences (each must match a whole sentence, from its verb to its period).
_OP_RES: tuple[re.Pattern[str], ...] = tuple(
    re.compile(p)
    for p in (
        rf"Move the contents of {_KW} (?P<box>{_LABEL}) to {_KW} (?P<dest>{_LABEL})\.",
        rf"Pick up the contents of {_KW} (?P<box>{_LABEL}) and place them into {_KW} (?P<dest>{_LABEL})\.",
        rf"Move (?P<objs>the [^.]+?) from {_KW} (?P<box>{_LABEL}) to {_KW} (?P<dest>{_LABEL})\.",
        rf"Remove (?P<objs>the [^.]+?) from {_KW} (?P<box>{_LABEL})\.",
        rf"Put (?P<objs>the [^.]+?) into {_KW} (?P<box>{_LABEL})\.",
        rf"Pick up (?P<objs>the [^.]+?) in {_KW} (?P<box>{_LABEL}) and place (?:it|them) into "
        rf"{_KW} (?P<dest>{_LABEL})\.",
        rf"Take (?P<objs>the [^.]+?) out of {_KW} (?P<box>{_LABEL})\.",
        rf"Place (?P<objs>the [^.]+?) inside {_KW} (?P<box>{_LABEL})\.",
    )
)
_SENTENCE_RE = re.compile(r"[^.]*\.")
_OBJ_SPLIT_RE = re.compile(r"(?:,? and |, )(?=the )")

_ROLE_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"last"), "last"),
    (re.compile(r"query_box"), "query_box"),
    (re.compile(r"query_contains"), "query_contains"),
    (re.compile(r"query_box_desc"), "query_box_desc"),
    (re.compile(rf"box(?P<label>{_LABEL})_desc"), "box_desc"),
    (re.compile(r"op(?P<i>\d+)_object"), "op_object"),
    (re.compile(r"op(?P<i>\d+)_object_first"), "op_object_first"),
    (re.compile(r"op(?P<i>\d+)_box"), "op_box"),
    (re.compile(r"op(?P<i>\d+)_dest"), "op_dest"),
    (re.compile(r"obj:(?P<name>\S+)"), "obj"),
)

ROLE_CATALOGUE: dict[str, str] = {
    "last": "last token of the prompt",
    "query_box": "number token of the final 'Box N contains' query",
    "query_contains": "'contains' token of the final query",
    "query_box_desc": "the queried box's number token in the initial description",
    "box{k}_desc": "number token of 'Box k' in the initial description (k as written: 3, or A)",
    "op{i}_object": "last token of the first object of operation i (0-based)",
    "op{i}_object_first": "first token of the first object of operation i",
    "op{i}_box": "number token of the first box operation i names (source of a move)",
    "op{i}_dest": "number token of the destination box of move operation i",
    "obj:<name>": "last token of object <name>'s mention in the initial description",
}
"""Role name patterns and what token each selects (see the module docstring)."""


@dataclass(frozen=True)
class OperationSpans:
    """Character spans of one operation sentence.

    Attributes:
        objects: Span of each object name, in the order the sentence lists them (empty for
            ``Move the contents of ...``).
        box: Span of the first box label the sentence names.
        dest: Span of the destination box label (moves only).

    """

    objects: tuple[Span, ...]
    box: Span
    dest: Span | None


@dataclass(frozen=True)
class PromptStructure:
    """Character spans of the parts of one boxes prompt (see :func:`parse_prompt`).

    Attributes:
        query_label: The queried box's label as written (``"3"``, ``"A"``), or ``None`` without a query.
        query_box: Span of that label in the final query.
        query_contains: Span of the query's ``contains``.
        desc_boxes: Box label -> span of its mention in the initial description.
        desc_objects: Object name -> span of its (last) mention in the initial description.
        operations: The operation sentences after the description, in order.

    """

    query_label: str | None
    query_box: Span | None
    query_contains: Span | None
    desc_boxes: Mapping[str, Span]
    desc_objects: Mapping[str, Span]
    operations: tuple[OperationSpans, ...]


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
    for pattern in _OP_RES:
        m = pattern.fullmatch(stripped)
        if m is None:
            continue
        groups = m.groupdict()
        objects: tuple[Span, ...] = ()
        if groups.get("objs") is not None:
            s, e = m.span("objs")
            objects = tuple(span for _, span in _object_spans(text, base + s, base + e))
        box = (base + m.start("box"), base + m.end("box"))
        dest = (base + m.start("dest"), base + m.end("dest")) if groups.get("dest") is not None else None
        return OperationSpans(objects=objects, box=box, dest=dest)
    return None


def _parse_description(text: str, start: int, end: int) -> tuple[dict[str, Span], dict[str, Span]]:
    """Find the box mentions and object mentions inside the description sentence ``text[start:end]``."""
    boxes: dict[str, Span] = {}
    objects: dict[str, Span] = {}
    sentence = text[start:end]
    for pattern in (_DESC_CONTAINS_RE, _DESC_IN_RE, _DESC_NOTHING_RE):
        for m in pattern.finditer(sentence):
            boxes.setdefault(m.group("label"), (start + m.start("label"), start + m.end("label")))
            if m.groupdict().get("objs") is not None:
                s, e = m.span("objs")
                for name, span in _object_spans(text, start + s, start + e):
                    objects[name] = span
    boxes = dict(sorted(boxes.items(), key=lambda kv: kv[1]))
    return boxes, objects


_COMPACT_WORD_RE = re.compile(r"\S+")
_COMPACT_LABEL_RE = re.compile(r"^B(\d+)$")
def compact_structure(text: str) -> PromptStructure:
    """Parse a compact prompt into the role finder's ``PromptStructure`` (character spans).

    ``query_box`` is the final ``Bk`` label, ``desc_boxes`` maps each label's number (``"3"``) to its
    ``Bk`` token in the description, ``desc_objects`` each described object to its token, and each
    operation's spans are its objects, its (source) box and its destination. ``query_contains`` is
    ``None`` (the compact format has no ``contains``).

    Args:
        text: A compact prompt (:func:`is_compact_prompt`).

    Returns:
        The :class:`~entitylens.activations.roles.PromptStructure`.

    Raises:
        EntitylensError: If ``text`` is not a compact prompt.
    """
    if not is_compact_prompt(text):
        raise EntitylensError("not a compact prompt (expected 'B0 ... | Bk'); build it with compact_prompt()")
    words = [(m.group(), m.span()) for m in _COMPACT_WORD_RE.finditer(text)]
    bar = max(i for i, (w, _) in enumerate(words) if w == "|")
    q_word, q_span = words[-1]
    desc_boxes: dict[str, tuple[int, int]] = {}
    desc_objects: dict[str, tuple[int, int]] = {}
    operations = []
    i = 0
    # description: "Bk objects ;" per box, then operations, each ended by "."
    while i < bar:
        m = _COMPACT_LABEL_RE.match(words[i][0])
        if m is None or m.group(1) in desc_boxes:
            break
        desc_boxes[m.group(1)] = words[i][1]
        i += 1
        while i < bar and words[i][0] != ";":
            desc_objects[words[i][0]] = words[i][1]
            i += 1
        i += 1  # the ";"
    while i < bar:
        verb = words[i][0]
        j = i + 1
        objs: list[tuple[int, int]] = []
        while j < bar and not _COMPACT_LABEL_RE.match(words[j][0]) and words[j][0] != ".":
            objs.append(words[j][1])
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
                objects=tuple(objs),
                box=boxes[0],
                dest=boxes[1] if verb == "move" and len(boxes) > 1 else None,
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
    for s, e in reversed(sentences):
        op = _match_operation(text, s, e)
        if op is not None:
            operations.append(op)
            continue
        desc_boxes, desc_objects = _parse_description(text, s, e)
        break
    return PromptStructure(
        query_label=label,
        query_box=query_box,
        query_contains=query_contains,
        desc_boxes=desc_boxes,
        desc_objects=desc_objects,
        operations=tuple(reversed(operations)),
    )


def _classify(role: str) -> tuple[str, dict[str, str]] | None:
    for pattern, kind in _ROLE_PATTERNS:
        m = pattern.fullmatch(role)
        if m is not None:
            return kind, m.groupdict()
    return None


def validate_roles(roles: Sequence[str]) -> tuple[str, ...]:
    """Check role names against the catalogue.

    Args:
        roles: Role names.

    Returns:
        The roles as a tuple, in the given order.

    Raises:
        EntitylensError: For an unknown or repeated role, or an empty list.

    """
    roles = tuple(roles)
    if not roles:
        raise EntitylensError("no roles given; pass at least one role, e.g. --roles query_box,last")
    seen: set[str] = set()
    for role in roles:
        if _classify(role) is None:
            known = ", ".join(ROLE_CATALOGUE)
            raise EntitylensError(f"unknown role {role!r}; use one of: {known}")
        if role in seen:
            raise EntitylensError(f"role {role!r} is listed twice; list each role once")
        if "/" in role:
            raise EntitylensError(f"role {role!r} contains '/'; object names in obj:<name> cannot contain '/'")
        seen.add(role)
    return roles


def role_span(structure: PromptStructure, role: str, n_chars: int) -> tuple[Span, str] | None:
    """Character span a role points at, and which token of the span to take (``"first"``/``"last"``).

    Args:
        structure: The parsed prompt.
        role: A valid role name.
        n_chars: Length of the prompt text (for ``last``).

    Returns:
        ``(span, which)``, or ``None`` when the prompt has no such part.

    """
    parsed = _classify(role)
    if parsed is None:
        raise EntitylensError(f"unknown role {role!r}; use one of: {', '.join(ROLE_CATALOGUE)}")
    kind, g = parsed
    span: Span | None = None
    which = "last"
    if kind == "last":
        span = (0, n_chars)
    elif kind == "query_box":
        span = structure.query_box
    elif kind == "query_contains":
        span = structure.query_contains
    elif kind == "query_box_desc":
        if structure.query_label is not None:
            span = structure.desc_boxes.get(structure.query_label)
    elif kind == "box_desc":
        span = structure.desc_boxes.get(g["label"])
    elif kind == "obj":
        span = structure.desc_objects.get(g["name"])
    else:
        i = int(g["i"])
        if i < len(structure.operations):
            op = structure.operations[i]
            if kind in ("op_object", "op_object_first"):
                span = op.objects[0] if op.objects else None
                which = "first" if kind == "op_object_first" else "last"
            elif kind == "op_box":
                span = op.box
            else:
                span = op.dest
    return None if span is None else (span, which)


def span_to_token(offsets: Sequence[tuple[int, int]], span: Span, which: str = "last") -> int | None:
    """Index of the first or last token whose character range overlaps ``span``.

    Zero-width tokens (special tokens such as BOS, whose offsets are ``(0, 0)``) never overlap.

    Args:
        offsets: Per-token ``(start, end)`` character offsets, as a fast tokenizer returns them.
        span: The character span.
        which: ``"first"`` or ``"last"`` overlapping token.

    Returns:
        The token index, or ``None`` when no token overlaps (e.g. the span was truncated away).

    """
    start, end = span
    hits = [i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > start]
    if not hits:
        return None
    return hits[0] if which == "first" else hits[-1]


def tokenize_with_offsets(
    tokenizer: Any, text: str, prepend_bos: bool = False
) -> tuple[list[int], list[tuple[int, int]]]:
    """Tokenize ``text`` with a fast tokenizer, returning token ids and per-token character offsets.

    No special tokens are added by the tokenizer; with ``prepend_bos`` the BOS id is put in front with
    the zero-width offset ``(0, 0)``. For the models entitylens uses this is exactly what
    ``TransformerBridge.to_tokens`` produces (tests check it).

    Args:
        tokenizer: A Hugging Face *fast* tokenizer.
        text: The prompt.
        prepend_bos: Put ``tokenizer.bos_token_id`` first.

    Returns:
        ``(input_ids, offsets)``.

    Raises:
        EntitylensError: If the tokenizer cannot return offsets (a slow tokenizer).

    """
    if not getattr(tokenizer, "is_fast", False):
        raise EntitylensError(
            f"tokenizer {type(tokenizer).__name__} is not a fast tokenizer (no offsets for roles); "
            "load the model with its fast (tokenizers-backed) tokenizer"
        )
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = [(int(s), int(e)) for s, e in enc["offset_mapping"]]
    if prepend_bos:
        if tokenizer.bos_token_id is None:
            raise EntitylensError("the model wants a BOS token but its tokenizer has none; set prepend_bos=False")
        ids = [int(tokenizer.bos_token_id), *ids]
        offsets = [(0, 0), *offsets]
    return ids, offsets


@overload
def find_roles(
    text: str, offsets: Sequence[tuple[int, int]] | Any, roles: Sequence[str], *,
    allow_missing: Literal[False] = False, row: str | int | None = None,
) -> dict[str, int]: ...


@overload
def find_roles(
    text: str, offsets: Sequence[tuple[int, int]] | Any, roles: Sequence[str], *,
    allow_missing: bool, row: str | int | None = None,
) -> dict[str, int | None]: ...


def find_roles(
    text: str,
    offsets: Sequence[tuple[int, int]] | Any,
    roles: Sequence[str],
    *,
    allow_missing: bool = False,
    row: str | int | None = None,
) -> dict[str, int] | dict[str, int | None]:
    """Token index of each role in one prompt.

    Args:
        text: The prompt text.
        offsets: Per-token character offsets of the prompt's tokens (from
            :func:`tokenize_with_offsets`), or a fast tokenizer, in which case the text is tokenized
            without special tokens and indices refer to those tokens.
        roles: Role names (see :data:`ROLE_CATALOGUE`).
        allow_missing: Return ``None`` for a role the prompt does not have instead of raising.
        row: Row id used in error messages.

    Returns:
        Role -> token index (``None`` only with ``allow_missing``).

    Raises:
        EntitylensError: Unknown role, or (without ``allow_missing``) a role absent from the prompt.

    """
    roles = validate_roles(roles)
    if not isinstance(offsets, Sequence):
        _, offsets = tokenize_with_offsets(offsets, text)
    structure = parse_prompt(text)
    n_tokens = len(offsets)
    out: dict[str, int | None] = {}
    for role in roles:
        found = role_span(structure, role, len(text))
        if role == "last":
            idx: int | None = n_tokens - 1 if n_tokens else None
        else:
            idx = None if found is None else span_to_token(offsets, found[0], found[1])
        if idx is None and not allow_missing:
            where = f"row {row}" if row is not None else "the prompt"
            raise EntitylensError(
                f"role {role!r} is not present in {where} (prompt ends {text[-60:]!r}); "
                "choose roles every prompt has or pass --allow-missing-roles to store it masked"
            )
        out[role] = idx
    return out
