"""The model-independent clean/corrupted pair: :class:`TextPair`, its kinds, roles and role checks.

A :class:`TextPair` holds two prompts, the text each prompt's gold answer continues with, and the token
*roles* both prompts have (catalogue names of :mod:`entitylens.activations.roles`, plus the pair-specific
:data:`ALIAS_ROLES` stored as character spans). :func:`default_roles` and :func:`validate_role_names` choose and
check the roles a grid patches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from entitylens.activations.roles import parse_prompt, role_span, validate_roles
from entitylens.errors import EntitylensError
from entitylens.patching.types import PatchPair

__all__ = [
    "ALIAS_ROLES",
    "DEFAULT_ROLES",
    "PAIR_FORMAT",
    "PAIR_KINDS",
    "TOKEN_PAIR_FORMAT",
    "Span",
    "TextPair",
    "default_roles",
    "validate_role_names",
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
        corrupted_query_box: The corrupted prompt's queried box when it differs (``p24``, cross-query pairs),
            else ``None``.
        description: What was changed, in words.
        meta: Extra JSON-serialisable information (gold contents, numops, ...).
        counterfactual_answer: The task's causal model's answer to the corrupted prompt when the variable the
            pair changes takes its clean value (an interchange intervention's expected answer): the clean
            context's world read at the corrupted side's queried box. Equal to ``clean_answer`` when both
            sides query the same box; ``None`` when the pair records none (files from older versions,
            hand-written pairs): interchange accuracy then needs explicit targets.
        variable: The causal-model variable the two contexts differ in (``"op2.object"``, ``"op1.box"``,
            ``"op3.present"``, ``"initial.box4"``, ``"query_box"``), or ``None``.

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
    counterfactual_answer: str | None = None
    variable: str | None = None

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
        cf = self.counterfactual_answer
        if cf is not None and (not isinstance(cf, str) or not cf.strip()):
            raise EntitylensError(f"pair {name}: counterfactual_answer must be a non-empty string or null; fix it")
        if cf is not None and cf.strip() == self.corrupted_answer.strip():
            raise EntitylensError(f"pair {name}: the counterfactual answer equals the corrupted answer "
                                  f"({cf.strip()!r}), so no intervention can be scored; drop the pair")
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
            "counterfactual_answer": self.counterfactual_answer,
            "variable": self.variable,
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
            counterfactual_answer=rec.get("counterfactual_answer"),
            variable=rec.get("variable"),
        )


def default_roles(pairs: Sequence[TextPair] | Sequence[PatchPair]) -> list[str]:
    """The roles of :data:`DEFAULT_ROLES` that every pair has (``last`` is always there)."""
    sets = []
    for p in pairs:
        if isinstance(p, TextPair):
            sets.append(set(p.roles) | {"last"})
        else:
            sets.append(set(p.clean_roles) & set(p.corrupted_roles))
    return [r for r in DEFAULT_ROLES if all(r in s for s in sets)]


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
