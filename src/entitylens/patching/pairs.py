"""Clean/corrupted prompt pairs built from boxes datasets, and their tokenisation for a model.

Two levels:

* :class:`TextPair` -- model independent, stored as JSONL (:func:`write_pairs` / :func:`read_pairs`). A
  pair is two prompts in the K&S query form ``<context> Box N contains`` (or the P24 next-token form
  ``The X is in Box A, ... Box A contains the``), optionally behind a few-shot prefix, the text each
  prompt's gold answer continues with (``" the car and the map"``, ``" nothing"``, ``" spatula"``), and
  the token *roles* both prompts have (names from :mod:`entitylens.activations.roles`, plus a few
  pair-specific aliases such as ``changed_object`` that point at character spans).
  :func:`build_pairs` makes them from a dataset for one corruption *kind* (:data:`PAIR_KINDS`); golds are
  recomputed by replaying both worlds and a pair whose two answers are equal is refused.
* :class:`~entitylens.patching.exact.PatchPair` -- token ids for one tokenizer. :func:`to_patch_pairs`
  tokenises text pairs (through ``PatchPair.from_texts``) and maps every role to a token position on
  each side *by name*: prompts of different lengths (``drop_op``) stay aligned role by role. Tokenised
  pairs carry the tokenizer's fingerprint; :func:`write_patch_pairs` / :func:`read_patch_pairs` store
  them so a file tokenised for one model cannot silently be run on another.

Kinds (each pair changes one thing; every world stays valid, checked by replaying with
:func:`~entitylens.task.world.apply_operation`):

``op_object``   the object(s) of one move/remove/put become other valid objects (same number);
``op_box``      the destination of one move (or the box of one put) becomes another box with room;
``init_object`` one object of the initial description, untouched by every operation, becomes an object
                the scenario never mentions;
``drop_op``     one operation is removed (the corrupted prompt is shorter; later roles shift);
``p24``         P24 single-object next-token form; the corrupted prompt queries another box of the same
                context (pairs from a P24 file, or generated from the object vocabulary).
"""

from __future__ import annotations

import itertools
import json
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, SimpleNamespace
from typing import Any

import torch

from entitylens._io import atomic_write
from entitylens.activations.roles import (
    PromptStructure,
    find_roles,
    parse_prompt,
    role_span,
    span_to_token,
    tokenize_with_offsets,
    validate_roles,
)
from entitylens.errors import EntitylensError
from entitylens.patching.exact import PatchPair, tokenizer_fingerprint
from entitylens.progress import progress

__all__ = [
    "ALIAS_ROLES",
    "DEFAULT_ROLES",
    "PAIR_KINDS",
    "TextPair",
    "build_pairs",
    "compact_pairs",
    "default_roles",
    "read_any_pairs",
    "read_pairs",
    "read_patch_pairs",
    "to_patch_pairs",
    "write_pairs",
    "write_patch_pairs",
]

PAIR_KINDS: tuple[str, ...] = ("op_object", "op_box", "init_object", "drop_op", "p24")
"""Corruption kinds :func:`build_pairs` understands."""

ALIAS_ROLES: tuple[str, ...] = (
    "changed_object",
    "changed_box",
    "clean_object",
    "corrupted_object",
    "clean_box_desc",
    "corrupted_box_desc",
)
"""Pair-specific role names (stored as character spans on each side, last token of the span):

- ``changed_object``: the first object that differs in the changed operation (``op_object``), or the
  swapped object's mention in the description (``init_object``: the old name on the clean side, the new
  one on the corrupted side);
- ``changed_box``: the box label that changed in the changed operation (``op_box``);
- ``clean_object`` / ``corrupted_object`` (``p24``): the description mention of the clean / corrupted answer
  (same position on both sides: the contexts are identical);
- ``clean_box_desc`` / ``corrupted_box_desc`` (``p24``): the label of the clean / corrupted queried box in the
  description.
"""

DEFAULT_ROLES: tuple[str, ...] = (
    "query_box_desc",
    "clean_box_desc",
    "clean_object",
    "corrupted_box_desc",
    "corrupted_object",
    "changed_object",
    "changed_box",
    "query_box",
    "query_contains",
    "last",
)
"""Roles a patching grid uses by default: those of this list that every pair has (``last`` always)."""

PAIR_FORMAT = "entitylens.text_pair/1"
TOKEN_PAIR_FORMAT = "entitylens.token_pair/1"

Span = tuple[int, int]


# --------------------------------------------------------------------------------------------------
# TextPair
# --------------------------------------------------------------------------------------------------


def _check_span(span: Any, n: int, what: str) -> Span:
    try:
        s, e = (int(x) for x in span)
    except (TypeError, ValueError):
        raise EntitylensError(f"{what} must be a [start, end] character span; fix the pair") from None
    if not 0 <= s < e <= n:
        raise EntitylensError(f"{what}={[s, e]} is outside the {n}-character prompt; fix the pair")
    return (s, e)


@dataclass(frozen=True)
class TextPair:
    """A clean/corrupted prompt pair at the text level (independent of any tokenizer).

    Attributes:
        kind: Corruption kind (one of :data:`PAIR_KINDS`).
        state_id: The dataset state the pair comes from (``"<sample_id>:<num_operations>"``; P24: the
            context's ``sample_id``).
        query_box: The queried box (index for K&S data, label as written for P24 files).
        clean_prompt: Clean prompt, ending ``Box N contains`` (P24: ``... contains the``).
        corrupted_prompt: Corrupted prompt.
        clean_answer: What follows the clean prompt when the model is right (``" the car and the map"``,
            ``" nothing"``, P24 ``" spatula"``); leading space included.
        corrupted_answer: The same for the corrupted prompt; must differ from ``clean_answer``.
        changed_op: Index of the changed (or dropped) operation, ``None`` when no operation changed.
        roles: Role names present on both sides: catalogue roles of
            :mod:`entitylens.activations.roles` and aliases of :data:`ALIAS_ROLES` (in ``role_spans``).
        role_spans: Alias role -> ``(clean span, corrupted span)`` character spans; the role is the last
            token overlapping the span.
        corrupted_query_box: The corrupted prompt's queried box when it differs (``p24``), else ``None``.
        description: What was changed, in words.
        meta: Extra JSON-serialisable information (gold contents, numops, ...).

    Raises:
        EntitylensError: (in ``__post_init__``) unknown kind, equal answers, or a role missing from a side.
    """

    kind: str
    state_id: str
    query_box: int | str
    clean_prompt: str
    corrupted_prompt: str
    clean_answer: str
    corrupted_answer: str
    changed_op: int | None = None
    roles: tuple[str, ...] = ()
    role_spans: Mapping[str, tuple[Span, Span]] = field(default_factory=dict)
    corrupted_query_box: int | str | None = None
    description: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in PAIR_KINDS:
            raise EntitylensError(f"unknown pair kind {self.kind!r}; use one of {', '.join(PAIR_KINDS)}")
        name = self.name
        for what in ("clean_prompt", "corrupted_prompt", "clean_answer", "corrupted_answer"):
            v = getattr(self, what)
            if not isinstance(v, str) or not v.strip():
                raise EntitylensError(f"pair {name}: {what} must be a non-empty string; fix the pair")
        if self.clean_answer.strip() == self.corrupted_answer.strip():
            raise EntitylensError(
                f"pair {name}: clean and corrupted answers are both {self.clean_answer.strip()!r}; query a box "
                f"whose contents differ between the two prompts, or drop the pair"
            )
        if self.changed_op is not None:
            object.__setattr__(self, "changed_op", int(self.changed_op))
        roles = tuple(str(r) for r in self.roles)
        if len(set(roles)) != len(roles):
            raise EntitylensError(f"pair {name}: roles lists a role twice; list each role once")
        spans: dict[str, tuple[Span, Span]] = {}
        for role, (cs, xs) in dict(self.role_spans).items():
            if role not in roles:
                raise EntitylensError(f"pair {name}: role_spans names {role!r}, which is not in roles; add it")
            spans[role] = (
                _check_span(cs, len(self.clean_prompt), f"pair {name}: clean span of {role!r}"),
                _check_span(xs, len(self.corrupted_prompt), f"pair {name}: corrupted span of {role!r}"),
            )
        catalogue = tuple(r for r in roles if r not in spans)
        if catalogue:
            validate_roles(catalogue)
            for side, text in (("clean", self.clean_prompt), ("corrupted", self.corrupted_prompt)):
                structure = parse_prompt(text)
                for role in catalogue:
                    if role_span(structure, role, len(text)) is None:
                        raise EntitylensError(
                            f"pair {name}: role {role!r} is missing from the {side} prompt; drop it from roles"
                        )
        object.__setattr__(self, "roles", roles)
        object.__setattr__(self, "role_spans", MappingProxyType(spans))
        object.__setattr__(self, "meta", MappingProxyType(dict(self.meta)))

    @property
    def name(self) -> str:
        """A readable id: ``"<kind>:<state_id>:<query_box>"``."""
        return f"{self.kind}:{self.state_id}:{self.query_box}"

    def to_json(self) -> dict[str, Any]:
        """The pair as a JSON-serialisable dict (the JSONL record)."""
        rec: dict[str, Any] = {
            "format": PAIR_FORMAT,
            "kind": self.kind,
            "state_id": self.state_id,
            "query_box": self.query_box,
            "corrupted_query_box": self.corrupted_query_box,
            "changed_op": self.changed_op,
            "clean_prompt": self.clean_prompt,
            "corrupted_prompt": self.corrupted_prompt,
            "clean_answer": self.clean_answer,
            "corrupted_answer": self.corrupted_answer,
            "roles": list(self.roles),
            "role_spans": {k: [list(c), list(x)] for k, (c, x) in self.role_spans.items()},
            "description": self.description,
            "meta": dict(self.meta),
        }
        return rec

    @classmethod
    def from_json(cls, rec: Mapping[str, Any]) -> TextPair:
        """Rebuild a pair from :meth:`to_json`'s dict (validated like any new pair)."""
        need = ("kind", "state_id", "query_box", "clean_prompt", "corrupted_prompt", "clean_answer",
                "corrupted_answer")  # fmt: skip
        missing = [k for k in need if k not in rec]
        if missing:
            raise EntitylensError(f"missing field {missing[0]!r}; rebuild the file with `entitylens patch pairs`")
        spans = rec.get("role_spans") or {}
        if not isinstance(spans, Mapping):
            raise EntitylensError("role_spans must be an object; rebuild the file with `entitylens patch pairs`")
        return cls(
            kind=rec["kind"],
            state_id=str(rec["state_id"]),
            query_box=rec["query_box"],
            clean_prompt=rec["clean_prompt"],
            corrupted_prompt=rec["corrupted_prompt"],
            clean_answer=rec["clean_answer"],
            corrupted_answer=rec["corrupted_answer"],
            changed_op=rec.get("changed_op"),
            roles=tuple(rec.get("roles") or ()),
            role_spans={k: (tuple(v[0]), tuple(v[1])) for k, v in spans.items()},
            corrupted_query_box=rec.get("corrupted_query_box"),
            description=str(rec.get("description", "")),
            meta=dict(rec.get("meta") or {}),
        )


# --------------------------------------------------------------------------------------------------
# JSONL I/O
# --------------------------------------------------------------------------------------------------


def _dumps(rec: Mapping[str, Any]) -> str:
    return json.dumps(rec, sort_keys=True, ensure_ascii=False)


def write_pairs(path: str | os.PathLike[str], pairs: Sequence[TextPair]) -> int:
    """Write text pairs as JSONL, atomically (nothing partial is ever left); returns the count.

    Raises:
        EntitylensError: when ``pairs`` holds something other than :class:`TextPair`.
    """
    lines = []
    for i, p in enumerate(pairs):
        if not isinstance(p, TextPair):
            raise EntitylensError(f"pairs[{i}] is a {type(p).__name__}, not a TextPair; build it with build_pairs")
        lines.append(_dumps(p.to_json()))
    with atomic_write(path) as f:
        for line in lines:
            f.write(line + "\n")
    return len(lines)


def _iter_records(path: str | os.PathLike[str]) -> list[tuple[int, dict[str, Any]]]:
    from entitylens.task.io import iter_jsonl

    p = Path(path)
    if not p.is_file():
        raise EntitylensError(f"pairs file {p} does not exist; build one with `entitylens patch pairs`")
    out = list(iter_jsonl(p))
    if not out:
        raise EntitylensError(f"pairs file {p} is empty; build pairs with `entitylens patch pairs`")
    return out


def read_pairs(path: str | os.PathLike[str]) -> list[TextPair]:
    """Read text pairs written by :func:`write_pairs`.

    Raises:
        EntitylensError: naming the file and line of a malformed or invalid record.
    """
    out = []
    for lineno, rec in _iter_records(path):
        fmt = rec.get("format")
        if fmt == TOKEN_PAIR_FORMAT:
            raise EntitylensError(f"{path} line {lineno}: holds tokenised pairs; read it with read_patch_pairs")
        if fmt != PAIR_FORMAT:
            raise EntitylensError(
                f"{path} line {lineno}: not an entitylens text pair (format {fmt!r}); "
                f"build the file with `entitylens patch pairs`"
            )
        try:
            out.append(TextPair.from_json(rec))
        except EntitylensError as e:
            raise EntitylensError(f"{path} line {lineno}: {e}") from None
    return out


def _pair_to_json(p: PatchPair) -> dict[str, Any]:
    return {
        "format": TOKEN_PAIR_FORMAT,
        "name": p.name,
        "clean_tokens": [int(x) for x in p.clean_tokens],
        "corrupted_tokens": [int(x) for x in p.corrupted_tokens],
        "clean_answer": p.clean_answer,
        "corrupted_answer": p.corrupted_answer,
        "clean_answer_pos": p.clean_answer_pos,
        "corrupted_answer_pos": p.corrupted_answer_pos,
        "clean_roles": dict(p.clean_roles),
        "corrupted_roles": dict(p.corrupted_roles),
        "tokenizer_fingerprint": p.tokenizer_fingerprint,
    }


def write_patch_pairs(path: str | os.PathLike[str], pairs: Sequence[PatchPair]) -> int:
    """Write tokenised pairs (token ids, answer ids, role positions, tokenizer fingerprint) as JSONL, atomically."""
    lines = []
    for i, p in enumerate(pairs):
        if not isinstance(p, PatchPair):
            raise EntitylensError(f"pairs[{i}] is a {type(p).__name__}, not a PatchPair; tokenise with to_patch_pairs")
        lines.append(_dumps(_pair_to_json(p)))
    with atomic_write(path) as f:
        for line in lines:
            f.write(line + "\n")
    return len(lines)


def read_patch_pairs(path: str | os.PathLike[str], tokenizer: Any | None = None) -> list[PatchPair]:
    """Read tokenised pairs; with ``tokenizer`` also check they were made with it (same fingerprint).

    Raises:
        EntitylensError: a malformed record (file and line named), or pairs tokenised with another tokenizer.
    """
    want = None if tokenizer is None else tokenizer_fingerprint(tokenizer)
    out = []
    for lineno, rec in _iter_records(path):
        if rec.get("format") != TOKEN_PAIR_FORMAT:
            raise EntitylensError(
                f"{path} line {lineno}: not a tokenised pair (format {rec.get('format')!r}); "
                f"read text pairs with read_pairs"
            )
        fp = rec.get("tokenizer_fingerprint")
        if want is not None and fp != want:
            raise EntitylensError(
                f"{path} line {lineno}: pairs were tokenised with another tokenizer than the model's "
                f"(fingerprint {str(fp)[:12]} vs {want[:12]}); rebuild them from the text pairs for this model"
            )
        try:
            out.append(
                PatchPair(
                    clean_tokens=torch.tensor(rec["clean_tokens"], dtype=torch.long),
                    corrupted_tokens=torch.tensor(rec["corrupted_tokens"], dtype=torch.long),
                    clean_answer=rec["clean_answer"],
                    corrupted_answer=rec["corrupted_answer"],
                    clean_roles=rec.get("clean_roles") or {},
                    corrupted_roles=rec.get("corrupted_roles") or {},
                    clean_answer_pos=rec.get("clean_answer_pos", -1),
                    corrupted_answer_pos=rec.get("corrupted_answer_pos", -1),
                    tokenizer_fingerprint=fp,
                    name=str(rec.get("name", "")),
                )
            )
        except KeyError as e:
            raise EntitylensError(f"{path} line {lineno}: missing field {e.args[0]!r}; rebuild the file") from None
        except (TypeError, ValueError, RuntimeError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise EntitylensError(f"{path} line {lineno}: {msg}; rebuild the file") from None
    return out


def read_any_pairs(path: str | os.PathLike[str]) -> list[TextPair] | list[PatchPair]:
    """Read a pairs file of either kind (text pairs, or tokenised pairs), detected from its first record."""
    first = _iter_records(path)[0][1]
    return read_patch_pairs(path) if first.get("format") == TOKEN_PAIR_FORMAT else read_pairs(path)


# --------------------------------------------------------------------------------------------------
# Building pairs from a dataset
# --------------------------------------------------------------------------------------------------


def _answer_text(contents: Sequence[str]) -> str:
    from entitylens.task.text import object_list

    return f" {object_list(contents)}" if contents else " nothing"


def _distinguishable(a: str, b: str) -> bool:
    """Whether two answers have a first differing word and neither word is a prefix of the other.

    Guards ``PatchPair.from_texts`` against answers with no distinguishing token in any tokenizer
    (``" the car"`` vs ``" the car and the map"``, or ``car`` vs ``card``).
    """
    for x, y in zip(a.split(), b.split()):
        if x != y:
            return not (x.startswith(y) or y.startswith(x))
    return False


def _default_vocabulary(objects: set[str]) -> tuple[str, ...]:
    from entitylens.task.vocab import BNC_OBJECTS, DISJOINT_OBJECTS

    if objects <= set(BNC_OBJECTS):
        return tuple(BNC_OBJECTS)
    if objects <= set(DISJOINT_OBJECTS):
        return tuple(DISJOINT_OBJECTS)
    known = set(BNC_OBJECTS) | set(DISJOINT_OBJECTS)
    return tuple(BNC_OBJECTS) + tuple(DISJOINT_OBJECTS) + tuple(sorted(objects - known))


def _state_objects(state: Any) -> set[str]:
    objs = {o for box in state.initial for o in box}
    for op in state.operations:
        objs.update(op.objects)
    return objs


@dataclass
class _Edit:
    initial: Any
    ops: tuple[Any, ...]
    changed_op: int | None
    description: str


def _op_object_edits(state: Any, rng: random.Random, pool: Sequence[str]) -> list[_Edit]:
    from entitylens.task.types import Operation, sorted_contents
    from entitylens.task.world import replay

    worlds = replay(state.initial, state.operations)
    used = _state_objects(state)
    unused = [o for o in pool if o not in used]
    edits = []
    for i, op in enumerate(state.operations):
        if op.kind == "move_contents":
            continue
        if op.kind == "put":
            if len(unused) < len(op.objects):
                continue
            alts = [sorted_contents(rng.sample(unused, len(op.objects)))]
        else:
            before = worlds[i][op.box]
            alts = [c for c in itertools.combinations(before, len(op.objects)) if tuple(c) != op.objects]
        for alt in alts:
            new = Operation(op.kind, tuple(alt), op.box, op.dest)
            ops = state.operations[:i] + (new,) + state.operations[i + 1 :]
            edits.append(_Edit(state.initial, ops, i, f"op {i} ({op.kind}): objects {list(op.objects)} -> {list(alt)}"))
    return edits


def _op_box_edits(state: Any) -> list[_Edit]:
    import dataclasses

    from entitylens.task.types import MAX_PER_BOX
    from entitylens.task.world import replay

    worlds = replay(state.initial, state.operations)
    n = len(state.initial)
    edits = []
    for i, op in enumerate(state.operations):
        before = worlds[i]
        if op.kind in ("move", "move_contents"):
            for b in range(n):
                if b in (op.box, op.dest) or len(before[b]) + len(op.objects) > MAX_PER_BOX:
                    continue
                new = dataclasses.replace(op, dest=b)
                ops = state.operations[:i] + (new,) + state.operations[i + 1 :]
                edits.append(_Edit(state.initial, ops, i, f"op {i} ({op.kind}): destination box {op.dest} -> {b}"))
        elif op.kind == "put":
            for b in range(n):
                if b == op.box or len(before[b]) + len(op.objects) > MAX_PER_BOX:
                    continue
                new = dataclasses.replace(op, box=b)
                ops = state.operations[:i] + (new,) + state.operations[i + 1 :]
                edits.append(_Edit(state.initial, ops, i, f"op {i} (put): box {op.box} -> {b}"))
    return edits


def _init_object_edits(state: Any, rng: random.Random, pool: Sequence[str]) -> list[_Edit]:
    from entitylens.task.types import sorted_contents

    used = _state_objects(state)
    touched = {o for op in state.operations for o in op.objects}
    unused = [o for o in pool if o not in used]
    edits = []
    for b, box in enumerate(state.initial):
        for old in box:
            if old in touched or not unused:
                continue
            new = rng.choice(unused)
            initial = tuple(
                sorted_contents([new if o == old else o for o in c]) if k == b else c
                for k, c in enumerate(state.initial)
            )
            edits.append(_Edit(initial, state.operations, None, f"initial box {b}: {old} -> {new}"))
    return edits


def _drop_op_edits(state: Any) -> list[_Edit]:
    from entitylens.task.text import describe_operation

    edits = []
    for i, op in enumerate(state.operations):
        ops = state.operations[:i] + state.operations[i + 1 :]
        edits.append(_Edit(state.initial, ops, i, f"dropped op {i}: {describe_operation(op, state.variant)}"))
    return edits


def _first_diff(a: Sequence[Any], b: Sequence[Any]) -> int | None:
    for k, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return k
    return None


def _alias_spans(
    kind: str,
    clean: PromptStructure,
    corr: PromptStructure,
    clean_text: str,
    corr_text: str,
    edit: _Edit,
    state: Any,
) -> dict[str, tuple[Span, Span]]:
    i = edit.changed_op
    if kind == "op_object" and i is not None:
        co, xo = clean.operations[i].objects, corr.operations[i].objects
        k = _first_diff([clean_text[s:e] for s, e in co], [corr_text[s:e] for s, e in xo])
        return {} if k is None else {"changed_object": (co[k], xo[k])}
    if kind == "op_box" and i is not None:
        op = state.operations[i]
        if op.kind in ("move", "move_contents"):
            cs, xs = clean.operations[i].dest, corr.operations[i].dest
        else:
            cs, xs = clean.operations[i].box, corr.operations[i].box
        return {} if cs is None or xs is None else {"changed_box": (cs, xs)}
    if kind == "init_object":
        old = set(clean.desc_objects) - set(corr.desc_objects)
        new = set(corr.desc_objects) - set(clean.desc_objects)
        if len(old) == 1 and len(new) == 1:
            return {"changed_object": (clean.desc_objects[old.pop()], corr.desc_objects[new.pop()])}
    return {}


def _shared_roles(
    clean: str, corr: str, cs: PromptStructure, xs: PromptStructure, candidates: Sequence[str]
) -> list[str]:
    out = []
    for role in candidates:
        if role == "last" or (
            role_span(cs, role, len(clean)) is not None and role_span(xs, role, len(corr)) is not None
        ):
            out.append(role)
    return out


def _ks_pair(kind: str, state: Any, rng: random.Random, pool: Sequence[str], prefix: str) -> TextPair | None:
    from entitylens.task.io import state_form
    from entitylens.task.text import box_name, render_context
    from entitylens.task.world import replay

    if kind == "op_object":
        edits = _op_object_edits(state, rng, pool)
    elif kind == "op_box":
        edits = _op_box_edits(state)
    elif kind == "init_object":
        edits = _init_object_edits(state, rng, pool)
    else:
        edits = _drop_op_edits(state)
    rng.shuffle(edits)
    variant, form = state.variant, state_form(state)
    clean_world = replay(state.initial, state.operations)[-1]
    clean_ctx = render_context(state.initial, state.operations, variant, form)
    for edit in edits:
        try:
            corr_world = replay(edit.initial, edit.ops)[-1]
        except EntitylensError:
            continue  # a later operation became impossible: not a valid world
        boxes = [
            b
            for b in range(len(clean_world))
            if clean_world[b] != corr_world[b]
            and _distinguishable(_answer_text(clean_world[b]), _answer_text(corr_world[b]))
        ]
        if not boxes:
            continue
        box = rng.choice(boxes)
        query = f" {box_name(box, variant)} contains"
        clean = f"{prefix}{clean_ctx}{query}"
        corr = f"{prefix}{render_context(edit.initial, edit.ops, variant, form)}{query}"
        cs, xs = parse_prompt(clean), parse_prompt(corr)
        aliases = _alias_spans(kind, cs, xs, clean, corr, edit, state)
        labels = list(cs.desc_boxes)
        n_ops = len(state.operations) if kind != "drop_op" else int(edit.changed_op or 0)
        candidates = [f"box{lab}_desc" for lab in labels] + ["query_box_desc"]
        candidates += [f"op{j}_{part}" for j in range(n_ops) for part in ("object", "box", "dest")]
        roles = _shared_roles(clean, corr, cs, xs, candidates)
        roles += list(aliases) + _shared_roles(clean, corr, cs, xs, ["query_box", "query_contains", "last"])
        return TextPair(
            kind=kind,
            state_id=state.state_id,
            query_box=box,
            clean_prompt=clean,
            corrupted_prompt=corr,
            clean_answer=_answer_text(clean_world[box]),
            corrupted_answer=_answer_text(corr_world[box]),
            changed_op=edit.changed_op,
            roles=tuple(roles),
            role_spans=aliases,
            description=edit.description,
            meta={
                "sample_id": state.sample_id,
                "num_operations": state.num_operations,
                "numops": state.numops[box],
                "clean_contents": list(clean_world[box]),
                "corrupted_contents": list(corr_world[box]),
                "variant": variant,
            },
        )
    return None


def _p24_pair(items: Sequence[Any], rng: random.Random, prefix: str, state_id: str) -> TextPair | None:
    usable = [it for it in items if not it.ambiguous]
    combos = [(a, b) for a in usable for b in usable if a.query_box != b.query_box]
    combos = [(a, b) for a, b in combos if _distinguishable(f" {a.answer}", f" {b.answer}")]
    if not combos:
        return None
    a, b = rng.choice(combos)
    clean, corr = f"{prefix}{a.prompt}", f"{prefix}{b.prompt}"
    cs, xs = parse_prompt(clean), parse_prompt(corr)
    aliases: dict[str, tuple[Span, Span]] = {}
    for alias, obj in (("clean_object", a.answer), ("corrupted_object", b.answer)):
        if obj in cs.desc_objects and obj in xs.desc_objects:
            aliases[alias] = (cs.desc_objects[obj], xs.desc_objects[obj])
    for alias, lab in (("clean_box_desc", a.query_box), ("corrupted_box_desc", b.query_box)):
        if lab in cs.desc_boxes and lab in xs.desc_boxes:
            aliases[alias] = (cs.desc_boxes[lab], xs.desc_boxes[lab])
    roles = _shared_roles(clean, corr, cs, xs, [f"box{lab}_desc" for lab in cs.desc_boxes] + ["query_box_desc"])
    roles += list(aliases) + _shared_roles(clean, corr, cs, xs, ["query_box", "query_contains", "last"])
    return TextPair(
        kind="p24",
        state_id=state_id,
        query_box=a.query_box,
        corrupted_query_box=b.query_box,
        clean_prompt=clean,
        corrupted_prompt=corr,
        clean_answer=f" {a.answer}",
        corrupted_answer=f" {b.answer}",
        changed_op=None,
        roles=tuple(roles),
        role_spans=aliases,
        description=f"query Box {a.query_box} -> Box {b.query_box}",
        meta={"sample_id": a.sample_id, "clean_contents": [a.answer], "corrupted_contents": [b.answer]},
    )


def _generated_p24(n: int, seed: int, pool: Sequence[str], num_boxes: int) -> list[list[Any]]:
    from entitylens.task.io import P24Item
    from entitylens.task.prompts import p24_prompt

    groups = []
    for i in range(n):
        rng = random.Random(f"entitylens-p24:{seed}:{i}")
        objects = rng.sample(list(pool), num_boxes)
        labels = rng.sample([chr(65 + k) for k in range(26)], num_boxes)
        context = p24_prompt(objects, 0, labels).prompt.rsplit(" Box ", 1)[0]
        assignments = tuple(zip(objects, labels))
        groups.append([P24Item(context, lab, obj, i, assignments) for obj, lab in assignments])
    return groups


def build_pairs(
    data: Sequence[Any] | None,
    kind: str,
    *,
    seed: int = 0,
    max_pairs: int | None = None,
    prefix: str = "",
    vocabulary: Sequence[str] | None = None,
    num_boxes: int = 7,
) -> list[TextPair]:
    """Build clean/corrupted text pairs of one kind from a dataset (at most one pair per state).

    States are visited in a seed-determined order and the first ``max_pairs`` that admit a pair are kept
    (returned in dataset order). For each state the edit (which operation / object / box changes) and the
    queried box are drawn from a generator seeded by ``(kind, seed, state)``: the same arguments give the
    same pairs in any process. The queried box is one whose gold contents differ between the two worlds
    (both replayed from their operations) and whose answers have a first distinguishing word.

    Args:
        data: :class:`~entitylens.task.types.State` s for the K&S kinds; :class:`~entitylens.task.io.P24Item` s
            (from :func:`~entitylens.task.io.read_p24_jsonl`) or ``None`` (generate) for ``p24``.
        kind: One of :data:`PAIR_KINDS`.
        seed: Seed of every random choice.
        max_pairs: Keep at most this many pairs (required when generating P24 pairs).
        prefix: Text put before both prompts (e.g. a few-shot prefix); default none.
        vocabulary: Objects replacements are drawn from (default: the dataset's vocabulary, BNC or disjoint).
        num_boxes: Boxes per generated P24 context.

    Returns:
        The pairs.

    Raises:
        EntitylensError: unknown kind, data of the wrong type for the kind, or no pair could be built.
    """
    from entitylens.task.io import P24Item
    from entitylens.task.types import State

    if kind not in PAIR_KINDS:
        raise EntitylensError(f"unknown pair kind {kind!r}; use one of {', '.join(PAIR_KINDS)}")
    if max_pairs is not None and (isinstance(max_pairs, bool) or int(max_pairs) < 1):
        raise EntitylensError(f"max_pairs must be a positive number, got {max_pairs!r}; pass max_pairs=N with N >= 1")
    if not isinstance(prefix, str):
        raise EntitylensError("prefix must be a string; pass the few-shot text itself")
    if kind == "p24":
        if data is None:
            if max_pairs is None:
                raise EntitylensError("generating P24 pairs needs max_pairs (how many); pass max_pairs=N / --max-pairs")
            from entitylens.task.vocab import BNC_OBJECTS

            pool = tuple(vocabulary) if vocabulary is not None else tuple(BNC_OBJECTS)
            if not 2 <= num_boxes <= min(26, len(pool)):
                raise EntitylensError(f"num_boxes={num_boxes} must be in 2..{min(26, len(pool))}; use fewer boxes")
            groups = _generated_p24(int(max_pairs), seed, pool, num_boxes)
            ids = [f"gen{i}" for i in range(len(groups))]
        else:
            bad = next((x for x in data if not isinstance(x, P24Item)), None)
            if bad is not None:
                raise EntitylensError(
                    f"kind p24 needs P24 rows (read_p24_jsonl), got a {type(bad).__name__}; pass a P24 JSONL "
                    f"file, or no data to generate P24 pairs"
                )
            by_ctx: dict[tuple[int, str], list[Any]] = {}
            for it in data:
                by_ctx.setdefault((it.sample_id, it.context), []).append(it)
            groups = list(by_ctx.values())
            ids = [str(k[0]) for k in by_ctx]
        units: list[Any] = groups
    else:
        if data is None:
            raise EntitylensError(f"kind {kind} needs a boxes dataset; pass --data (a K&S JSONL file)")
        bad = next((x for x in data if not isinstance(x, State)), None)
        if bad is not None:
            hint = " (P24 rows go with kind p24)" if isinstance(bad, P24Item) else ""
            raise EntitylensError(
                f"kind {kind} needs boxes states (read_ks_jsonl), got a {type(bad).__name__}{hint}; "
                f"pass a K&S JSONL file"
            )
        units = list(data)
        ids = [s.state_id for s in units]
        objs: set[str] = set()
        for s in units:
            objs |= _state_objects(s)
        pool = tuple(vocabulary) if vocabulary is not None else _default_vocabulary(objs)
    order = list(range(len(units)))
    random.Random(f"entitylens-pairs-order:{kind}:{seed}").shuffle(order)
    found: list[tuple[int, TextPair]] = []
    limit = len(units) if max_pairs is None else int(max_pairs)
    for idx in progress(order, desc=f"pairs {kind}", unit="state"):
        if len(found) >= limit:
            break
        rng = random.Random(f"entitylens-pairs:{kind}:{seed}:{idx}:{ids[idx]}")
        if kind == "p24":
            pair = _p24_pair(units[idx], rng, prefix, ids[idx])
        else:
            pair = _ks_pair(kind, units[idx], rng, pool, prefix)
        if pair is not None:
            found.append((idx, pair))
    if not found:
        raise EntitylensError(
            f"no {kind} pair could be built from {len(units)} states (e.g. no operations to change); "
            f"use states with operations or another kind"
        )
    found.sort(key=lambda t: t[0])
    return [p for _, p in found]


# --------------------------------------------------------------------------------------------------
# Tokenising for a model
# --------------------------------------------------------------------------------------------------


def default_roles(pairs: Sequence[TextPair] | Sequence[PatchPair]) -> list[str]:
    """The roles of :data:`DEFAULT_ROLES` that every pair has (``last`` is always there)."""
    sets = []
    for p in pairs:
        if isinstance(p, TextPair):
            sets.append(set(p.roles) | {"last"})
        else:
            sets.append(set(p.clean_roles) & set(p.corrupted_roles))
    return [r for r in DEFAULT_ROLES if all(r in s for s in sets)]


def _tokenizer_of(model: Any) -> tuple[Any, bool]:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return model, False
    from entitylens.models.tokens import model_prepends_bos

    return tok, model_prepends_bos(model)


def to_patch_pairs(
    model: Any,
    pairs: Sequence[TextPair],
    *,
    roles: Sequence[str] | None = None,
    prepend_bos: bool | None = None,
) -> list[PatchPair]:
    """Tokenise text pairs for a model and place every role on each side by name.

    Prompts are tokenised as ``TransformerBridge.to_tokens`` does (BOS when the model prepends one), the
    answers through ``PatchPair.from_texts`` (their shared leading tokens, e.g. ``" the"``, are appended
    to both prompts and the first distinguishing tokens become the answer ids). Catalogue roles are found
    in each prompt's own text (:func:`~entitylens.activations.roles.find_roles`), alias roles from their
    stored character spans; ``last`` is the scored position (the last token, after any appended answer
    prefix). Lengths may differ between the sides: alignment is by role name, never by raw position.

    Args:
        model: A ``TransformerBridge`` (its tokenizer and ``cfg.default_prepend_bos`` are used), or a
            tokenizer (then pass ``prepend_bos``; default no BOS).
        pairs: Text pairs.
        roles: Roles to place on every pair (default: each pair's own ``roles``). A requested role missing
            from a side of a pair is an error naming the pair.
        prepend_bos: Override the BOS choice.

    Returns:
        One :class:`PatchPair` per text pair, named like it, with the tokenizer fingerprint set.

    Raises:
        EntitylensError: a role missing from a side, answers without a distinguishing token, or a
            non-fast tokenizer.
    """
    tok, model_bos = _tokenizer_of(model)
    bos = model_bos if prepend_bos is None else bool(prepend_bos)
    fp = tokenizer_fingerprint(tok)
    wanted = None if roles is None else list(validate_role_names(roles))
    out = []
    for i, tp in enumerate(pairs):
        if not isinstance(tp, TextPair):
            raise EntitylensError(f"pairs[{i}] is a {type(tp).__name__}, not a TextPair; build it with build_pairs")
        names = list(tp.roles) if wanted is None else wanted
        try:
            base = PatchPair.from_texts(
                tok, tp.clean_prompt, tp.corrupted_prompt, tp.clean_answer, tp.corrupted_answer,
                bos=False, name=tp.name,
            )  # fmt: skip
        except EntitylensError as e:
            raise EntitylensError(f"pair {i} ({tp.name}): {e}") from None
        sides = []
        for side, text, toks in (("clean", tp.clean_prompt, base.clean_tokens),
                                 ("corrupted", tp.corrupted_prompt, base.corrupted_tokens)):  # fmt: skip
            ids, offsets = tokenize_with_offsets(tok, text, prepend_bos=bos)
            head = ids[1:] if bos else ids
            if toks[: len(head)].tolist() != head:  # pragma: no cover - tokenizer inconsistency guard
                raise EntitylensError(f"pair {i} ({tp.name}): the {side} prompt tokenises inconsistently; report this")
            positions: dict[str, int] = {}
            catalogue = [r for r in names if r != "last" and r not in tp.role_spans]
            for r in names:
                if r in tp.role_spans:
                    span = tp.role_spans[r][0 if side == "clean" else 1]
                    idx = span_to_token(offsets, span, "last")
                    if idx is None:  # pragma: no cover - a non-empty span always overlaps a token
                        raise EntitylensError(f"pair {i} ({tp.name}): role {r!r} has no token on the {side} side")
                    positions[r] = idx
            if catalogue:
                try:
                    found = find_roles(text, offsets, catalogue)
                except EntitylensError:
                    missing = [r for r in catalogue if find_roles(text, offsets, [r], allow_missing=True)[r] is None]
                    raise EntitylensError(
                        f"pair {i} ({tp.name}): role {missing[0]!r} is missing from the {side} prompt; "
                        f"drop it from the roles (--roles) or the pair from the file"
                    ) from None
                positions.update({r: int(v) for r, v in found.items() if v is not None})
            sides.append((torch.cat([torch.tensor(ids[:1]), toks]) if bos else toks, positions))
        (ct, cr), (xt, xr) = sides
        order = [r for r in names if r != "last"]
        out.append(
            PatchPair(
                clean_tokens=ct,
                corrupted_tokens=xt,
                clean_answer=base.clean_answer,
                corrupted_answer=base.corrupted_answer,
                clean_roles={r: cr[r] for r in order},
                corrupted_roles={r: xr[r] for r in order},
                tokenizer_fingerprint=fp,
                name=tp.name,
            )
        )
    return out


def validate_role_names(roles: Sequence[str]) -> tuple[str, ...]:
    """Check a role selection: catalogue roles (:mod:`entitylens.activations.roles`) or :data:`ALIAS_ROLES`.

    Raises:
        EntitylensError: an empty list, a repeated role, or an unknown role name.
    """
    roles = tuple(str(r) for r in roles)
    if not roles:
        raise EntitylensError("no roles given; name at least one, e.g. --roles query_box,last")
    if len(set(roles)) != len(roles):
        raise EntitylensError("a role is listed twice; list each role once")
    catalogue = [r for r in roles if r not in ALIAS_ROLES]
    if catalogue:
        try:
            validate_roles(catalogue)
        except EntitylensError as e:
            raise EntitylensError(f"{e} (or a pair alias: {', '.join(ALIAS_ROLES)})") from None
    return roles


def compact_pairs(pairs: Sequence[TextPair]) -> list[TextPair]:
    """Render K&S text pairs (``build_pairs``) in the testbed's compact protocol.

    Each side's context is parsed back (:func:`entitylens.task.text.parse_context`) and written as a compact
    prompt (``"B0 car ; ... put coat B3 . | B3"``); the answers are the queried box's contents in list
    order (``" car coat ;"``); roles are found in the compact text by name (the same catalogue and the same
    ``changed_object`` / ``changed_box`` aliases as the K&S pairs). A pair whose compact answers share no
    distinguishing word is dropped.

    Args:
        pairs: :class:`~entitylens.patching.pairs.TextPair` s of the kinds ``op_object``, ``op_box``,
            ``init_object`` or ``drop_op``, built without a prefix.

    Returns:
        The compact pairs (same kind, state id, queried box and changed operation).

    Raises:
        EntitylensError: A ``p24`` pair, or a prompt that is not ``<context> Box N contains``.
    """
    from entitylens.activations.roles import parse_prompt
    from entitylens.task.text import box_name, parse_context
    from entitylens.testbed.data import context_words, ordered_contents, query_words
    from entitylens.testbed.protocol import COMPACT

    out = []
    for tp in pairs:
        if tp.kind == "p24":
            raise EntitylensError(
                "p24 pairs have no compact form; use --kind op_object, op_box, init_object or drop_op"
            )
        variant = str(tp.meta.get("variant", "base"))
        query = f" {box_name(int(tp.query_box), variant)} contains"
        sides = []
        for text in (tp.clean_prompt, tp.corrupted_prompt):
            if not text.endswith(query):
                raise EntitylensError(f"pair {tp.name}: prompt does not end with {query.strip()!r}; build pairs "
                                      "without a prefix or query suffix")
            ctx = parse_context(text[: -len(query)])
            prompt = " ".join([*context_words(ctx.initial, ctx.operations), "|", *query_words(int(tp.query_box))])
            answer = COMPACT.answer_text(ordered_contents(ctx.initial, ctx.operations)[int(tp.query_box)])
            sides.append((ctx, prompt, answer))
        (cctx, clean, cans), (xctx, corr, xans) = sides
        if not _distinguishable(cans, xans):
            continue
        cs, xs = parse_prompt(clean), parse_prompt(corr)
        edit = _Edit(xctx.initial, xctx.operations, tp.changed_op, tp.description)
        aliases = _alias_spans(tp.kind, cs, xs, clean, corr, edit, SimpleNamespace(operations=cctx.operations))
        n_ops = len(cctx.operations) if tp.kind != "drop_op" else int(tp.changed_op or 0)
        candidates = [f"box{lab}_desc" for lab in cs.desc_boxes] + ["query_box_desc"]
        candidates += [f"op{j}_{part}" for j in range(n_ops) for part in ("object", "box", "dest")]
        roles = _shared_roles(clean, corr, cs, xs, candidates)
        roles += list(aliases) + _shared_roles(clean, corr, cs, xs, ["query_box", "query_contains", "last"])
        out.append(TextPair(
            kind=tp.kind, state_id=tp.state_id, query_box=tp.query_box, clean_prompt=clean, corrupted_prompt=corr,
            clean_answer=cans, corrupted_answer=xans, changed_op=tp.changed_op, roles=tuple(roles),
            role_spans=aliases, description=tp.description, meta={**dict(tp.meta), "protocol": "compact"},
        ))  # fmt: skip
    return out
