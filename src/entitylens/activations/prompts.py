"""Caching prompts: one prompt per dataset row, with the row metadata probe labels are built from.

:func:`build_prompts` turns boxes rows, states, P24 items, plain strings or ready :class:`CachePrompt` s into
prompts; a row's text is ``prefix + context + " " + query_text(...)`` and its metadata comes from
:func:`row_meta`; :func:`compact_cache_prompts` does the same for the compact form (the testbed's
prompts). :func:`prompts_sha256` identifies a list of prompts (the cache's dataset identity).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from entitylens._io import sha256_json
from entitylens.errors import EntitylensError
from entitylens.task.compact import COMPACT, CompactProtocol
from entitylens.task.io import P24Item
from entitylens.task.text import box_name
from entitylens.task.types import BoxRow, State


@dataclass(frozen=True)
class CachePrompt:
    """One prompt to cache.

    Attributes:
        row_id: Unique id of the row (stored in ``rows.json``).
        text: The full prompt text (prefix + context + query).
        meta: JSON-serialisable row metadata kept for building probe labels.

    """

    row_id: str
    text: str
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.text, str) or not self.text:
            raise EntitylensError(f"row {self.row_id}: empty prompt text; give every row a non-empty prompt")


def query_text(variant: str, box: int) -> str:
    """Return the query ending a caching prompt: ``"Box 3 contains"`` (``"Container D contains"``)."""
    return f"{box_name(box, variant)} contains"


def row_meta(row: Any) -> dict[str, Any]:
    """The metadata of a boxes row kept in ``rows.json``: ids, box, numops, gold, initial contents, objects.

    Args:
        row: A :class:`~entitylens.task.types.BoxRow`.

    Returns:
        A JSON-ready dict (``state_id``, ``sample_id``, ``num_operations``, ``box``, ``numops``,
        ``numops_by_op``, ``gold``, ``initial``, ``variant`` and the sorted ``objects`` of the state).
    """
    state = row.state
    objects = set(o for box in state.initial for o in box)
    for op in state.operations:
        objects.update(op.objects)
    return {
        "state_id": state.state_id,
        "sample_id": state.sample_id,
        "num_operations": state.num_operations,
        "box": row.box,
        "numops": row.numops,
        "numops_by_op": dict(sorted(row.numops_by_op.items())),
        "gold": list(row.gold),
        "initial": list(state.initial[row.box]),
        "variant": state.variant,
        "objects": sorted(objects),
    }


def build_prompts(data: Sequence[Any], prefix: str = "") -> list[CachePrompt]:
    """Turn a dataset into caching prompts, one per row.

    Args:
        data: :class:`~entitylens.task.types.BoxRow` s (one prompt each),
            :class:`~entitylens.task.types.State` s (one prompt per box),
            :class:`~entitylens.task.io.P24Item` s (their next-token prompt), plain strings (used
            verbatim, ids ``"0"``, ``"1"``, ...) or :class:`CachePrompt` s.
        prefix: Text put before each row's context (e.g. a few-shot prefix). Not applied to strings or
            :class:`CachePrompt` s, which are taken as complete prompts.

    Returns:
        The prompts. A row's text is ``prefix + context + " " + "Box N contains"``.

    Raises:
        EntitylensError: Mixed or unsupported items, or duplicate row ids.

    """
    prompts: list[CachePrompt] = []
    for i, item in enumerate(data):
        if isinstance(item, CachePrompt):
            prompts.append(item)
        elif isinstance(item, str):
            prompts.append(CachePrompt(row_id=str(i), text=item))
        elif isinstance(item, P24Item):
            meta = {
                "sample_id": item.sample_id,
                "box": item.query_box,
                "gold": [item.answer],
                "initial": sorted(o for o, b in item.assignments if b == item.query_box),
                "objects": sorted(o for o, _ in item.assignments),
            }
            text = f"{prefix}{item.prompt}"
            prompts.append(CachePrompt(row_id=f"{item.sample_id}:{item.query_box}", text=text, meta=meta))
        elif isinstance(item, (BoxRow, State)):
            rows = [item] if isinstance(item, BoxRow) else [BoxRow(item, b) for b in range(item.num_boxes)]
            for row in rows:
                ctx = row.state.context.rstrip()
                text = f"{prefix}{ctx} {query_text(row.state.variant, row.box)}"
                meta = row_meta(row)
                prompts.append(CachePrompt(row_id=f"{row.state.state_id}:{row.box}", text=text, meta=meta))
        else:
            raise EntitylensError(
                f"item {i} of the data is a {type(item).__name__}; pass BoxRow, State, str or CachePrompt items"
            )
    seen: set[str] = set()
    for p in prompts:
        if p.row_id in seen:
            raise EntitylensError(f"row id {p.row_id!r} appears twice; give every row a unique id")
        seen.add(p.row_id)
    if not prompts:
        raise EntitylensError("the data has no rows; pass a non-empty dataset")
    return prompts


def prompts_sha256(prompts: Sequence[CachePrompt]) -> str:
    """SHA-256 identifying a list of prompts (ids, texts and row metadata)."""
    return sha256_json([[p.row_id, p.text, dict(p.meta)] for p in prompts])


def compact_cache_prompts(states: Sequence[State], protocol: CompactProtocol = COMPACT) -> list[CachePrompt]:
    """Caching prompts in the compact form (the testbed's): one row per (state, box).

    Row ``i`` of state ``s`` has id ``"<state_id>:<box>"``, the text ``protocol.prompt(s, box)``
    (``"B0 car ; ... | B3"``) and the metadata the K&S rows carry (:func:`row_meta`: ``box``, ``numops``,
    ``gold``, ``objects`` ...) plus ``protocol``.

    Args:
        states: The states.
        protocol: The compact protocol whose prompts to cache.

    Returns:
        The prompts, state by state and box by box.
    """
    rows = []
    for s in states:
        for b in range(s.num_boxes):
            meta = dict(row_meta(BoxRow(s, b)))
            meta["protocol"] = protocol.name
            rows.append(CachePrompt(row_id=f"{s.state_id}:{b}", text=protocol.prompt(s, b), meta=meta))
    return rows
