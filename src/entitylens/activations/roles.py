"""Token *roles*: named positions in a boxes-task prompt, computed from the prompt text itself.

A role names a token by what it is in the prompt (the queried box's number, the last object of the
second operation, ...) instead of by a raw position, so the same role means the same thing in every
prompt whatever its length, its tokenizer or where it came from (generated in memory or read from a
file). Roles are found in two steps, both independent of the tokenizer's vocabulary:

1. :func:`~entitylens.activations.structure.parse_prompt` parses the text with regular expressions into
   character spans: the final query ``Box N contains``, the initial description (the last description
   before the operations, so a few-shot prefix in front of it is skipped) and every operation sentence
   (:mod:`entitylens.activations.structure`, which also lists the surface forms understood).
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
``op{i}_end``                the period that ends operation ``i`` (the compact form's ``.``)
``op{i}_object{j}``          the last token of the ``j``-th object operation ``i`` names
``box{k}_object{j}``         the last token of the ``j``-th object the initial description puts in box ``k``
``obj:<name>``               the last token of object ``<name>``'s mention in the initial description
============================ ===========================================================================

Role *groups* name every role of one kind that a dataset's prompts have (:func:`expand_roles`, used when
caching): ``@mentions`` (every box mention of the context: ``box{k}_desc``, ``op{i}_box``, ``op{i}_dest``),
``@op_ends`` (``op{i}_end``) and ``@objects`` (``box{k}_object{j}``, ``op{i}_object{j}``). A prompt with
fewer operations than the longest has the extra roles stored masked. These are the positions of the
mention, incremental and tag probes (:mod:`entitylens.probing.family`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal, overload

from entitylens.activations.structure import (
    OperationSpans,
    PromptStructure,
    Span,
    compact_structure,
    parse_prompt,
)
from entitylens.errors import EntitylensError

__all__ = [  # the prompt structure is re-exported: roles and their spans are one subject for a reader
    "ROLE_CATALOGUE",
    "ROLE_GROUPS",
    "OperationSpans",
    "PromptStructure",
    "Span",
    "compact_structure",
    "expand_roles",
    "find_roles",
    "parse_prompt",
    "role_span",
    "span_to_token",
    "tokenize_with_offsets",
    "validate_roles",
]

_LABEL = r"(?:\d+|[A-Z])"

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
    (re.compile(r"op(?P<i>\d+)_end"), "op_end"),
    (re.compile(r"op(?P<i>\d+)_object(?P<j>\d+)"), "op_object_j"),
    (re.compile(rf"box(?P<label>{_LABEL})_object(?P<j>\d+)"), "box_object_j"),
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
    "op{i}_end": "the period ending operation i (the compact form's '.')",
    "op{i}_object{j}": "last token of the j-th object (0-based) operation i names",
    "box{k}_object{j}": "last token of the j-th object the initial description puts in box k",
    "obj:<name>": "last token of object <name>'s mention in the initial description",
}
"""Role name patterns and what token each selects (see the module docstring)."""


def _classify(role: str) -> tuple[str, dict[str, str]] | None:
    for pattern, kind in _ROLE_PATTERNS:
        m = pattern.fullmatch(role)
        if m is not None:
            return kind, m.groupdict()
    return None


ROLE_GROUPS: dict[str, str] = {
    "@mentions": "every box mention of the context: box{k}_desc, op{i}_box, op{i}_dest",
    "@op_ends": "the end of every operation: op{i}_end",
    "@objects": "every object mention of the context: box{k}_object{j}, op{i}_object{j}",
}
"""Role groups :func:`expand_roles` expands against a dataset's prompts."""


def _group_roles(group: str, structure: PromptStructure) -> list[str]:
    """The roles of ``group`` one parsed prompt has, in text order of their kind."""
    ops = structure.operations
    if group == "@mentions":
        desc = [f"box{label}_desc" for label in structure.desc_boxes]
        return desc + [f"op{i}_{part}" for i, op in enumerate(ops) for part in ("box", "dest")
                       if part == "box" or op.dest is not None]
    if group == "@op_ends":
        return [f"op{i}_end" for i, op in enumerate(ops) if op.end is not None]
    return ([f"box{label}_object{j}" for label, objs in structure.desc_contents.items() for j in range(len(objs))]
            + [f"op{i}_object{j}" for i, op in enumerate(ops) for j in range(len(op.objects))])


def expand_roles(roles: Sequence[str], texts: Sequence[str]) -> tuple[tuple[str, ...], bool]:
    """Replace role groups (``@mentions``, ``@op_ends``, ``@objects``) by the roles the prompts have.

    Each group becomes the union of its roles over ``texts``, ordered by kind and then by number
    (descriptions by box, operations by index); plain roles are kept in place. A role listed both plainly
    and through a group appears once, where it is first listed.

    Args:
        roles: Role names and group names.
        texts: The prompts the roles will be found in.

    Returns:
        The expanded roles, and whether a group was expanded (some prompts then lack some of its roles:
        cache with missing roles allowed).

    Raises:
        EntitylensError: An unknown group, or a group no prompt has a role of.
    """
    if not any(r.startswith("@") for r in roles):
        return tuple(roles), False
    structures = [parse_prompt(t) for t in texts]
    out: list[str] = []
    for role in roles:
        if not role.startswith("@"):
            if role not in out:
                out.append(role)
            continue
        if role not in ROLE_GROUPS:
            raise EntitylensError(f"unknown role group {role!r}; use one of: {', '.join(ROLE_GROUPS)}")
        found = {r for s in structures for r in _group_roles(role, s)}
        if not found:
            raise EntitylensError(f"no prompt has a role of {role} ({ROLE_GROUPS[role]}); check the data")
        out += [r for r in sorted(found, key=_role_order) if r not in out]
    return tuple(out), True


def _role_order(role: str) -> tuple[int, int, int, str]:
    """Sort key of grouped roles: description roles by box, then operation roles by index and part."""
    m = re.fullmatch(r"op(\d+)_(box|dest|end|object)(\d*)", role)
    if m is not None:
        part = ("box", "object", "dest", "end").index(m.group(2))
        return (1, int(m.group(1)), part * 100 + int(m.group(3) or 0), role)
    m = re.fullmatch(rf"box({_LABEL})_(?:desc|object(\d+))", role)
    assert m is not None
    label = m.group(1)
    return (0, int(label) if label.isdigit() else ord(label) - 65, int(m.group(2) or -1), role)


def validate_roles(roles: Sequence[str], *, allow_groups: bool = False) -> tuple[str, ...]:
    """Check role names against the catalogue.

    Args:
        roles: Role names.
        allow_groups: Also accept the :data:`ROLE_GROUPS` (expanded later by :func:`expand_roles`).

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
        if allow_groups and role in ROLE_GROUPS:
            seen.add(role)
            continue
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
    elif kind == "box_object_j":
        described = structure.desc_contents.get(g["label"], ())
        j = int(g["j"])
        span = described[j][1] if j < len(described) else None
    else:
        i = int(g["i"])
        if i < len(structure.operations):
            op = structure.operations[i]
            if kind in ("op_object", "op_object_first"):
                span = op.objects[0] if op.objects else None
                which = "first" if kind == "op_object_first" else "last"
            elif kind == "op_object_j":
                j = int(g["j"])
                span = op.objects[j] if j < len(op.objects) else None
            elif kind == "op_box":
                span = op.box
            elif kind == "op_end":
                span = op.end
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
