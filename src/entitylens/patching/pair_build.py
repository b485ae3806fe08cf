"""Building :class:`~entitylens.patching.text_pair.TextPair` s from a dataset, one corruption kind at a time.

:func:`build_pairs` visits states in a seed-determined order and keeps the first that admit a pair: a K&S
pair applies one edit of :mod:`entitylens.patching.pair_edits` and queries a box whose gold contents differ
between the two replayed worlds; a P24 pair queries two boxes of one context. :func:`compact_pairs` renders
K&S pairs in the testbed's compact protocol.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Any

from entitylens.activations.roles import parse_prompt
from entitylens.errors import EntitylensError
from entitylens.patching.pair_edits import (
    Edit,
    alias_spans,
    drop_op_edits,
    init_object_edits,
    op_box_edits,
    op_object_edits,
    shared_roles,
    state_objects,
)
from entitylens.patching.text_pair import PAIR_KINDS, Span, TextPair
from entitylens.progress import progress
from entitylens.task.compact import COMPACT, context_words, ordered_contents, query_words
from entitylens.task.io import P24Item, state_form
from entitylens.task.prompts import p24_prompt
from entitylens.task.text import box_name, object_list, parse_context, render_context
from entitylens.task.types import State
from entitylens.task.vocab import BNC_OBJECTS, DISJOINT_OBJECTS
from entitylens.task.world import replay

__all__ = ["build_pairs", "compact_pairs"]


def _answer_text(contents: Sequence[str]) -> str:

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

    if objects <= set(BNC_OBJECTS):
        return tuple(BNC_OBJECTS)
    if objects <= set(DISJOINT_OBJECTS):
        return tuple(DISJOINT_OBJECTS)
    known = set(BNC_OBJECTS) | set(DISJOINT_OBJECTS)
    return tuple(BNC_OBJECTS) + tuple(DISJOINT_OBJECTS) + tuple(sorted(objects - known))


def _split_word(a: str, b: str) -> int | None:
    """Index of the first word where two answers differ (``None`` when one's words are a prefix of the other's)."""
    for k, (x, y) in enumerate(zip(a.split(), b.split())):
        if x != y:
            return k
    return None


def _answers_ok(clean: str, corr: str, cf: str) -> bool:
    """Whether a pair's answers can be scored at one position: clean and counterfactual part from corr together.

    The clean and corrupted answers need a distinguishing word; a counterfactual answer other than the clean
    one must part from the corrupted answer at the same word, with a word of its own there (so the scored
    token tells the counterfactual answer from both the corrupted and the clean one).
    """
    if not _distinguishable(clean, corr):
        return False
    if cf == clean:
        return True
    k = _split_word(clean, corr)
    if not _distinguishable(cf, corr) or _split_word(cf, corr) != k or k is None:
        return False
    return _distinguishable(" ".join(clean.split()[k:k + 1]), " ".join(cf.split()[k:k + 1]))


def _edits(kind: str, state: Any, rng: random.Random, pool: Sequence[str]) -> list[Edit]:

    if kind == "op_object":
        return op_object_edits(state, rng, pool)
    if kind == "op_box":
        return op_box_edits(state)
    if kind == "init_object":
        return init_object_edits(state, rng, pool)
    return drop_op_edits(state)


def _ks_pair(kind: str, state: Any, rng: random.Random, pool: Sequence[str], prefix: str,
             cross_query: bool = False) -> TextPair | None:
    """The first edit of ``state`` (in shuffled order) that changes some box; ``None`` when none does.

    The corrupted (base) side queries a box the edit changed; with ``cross_query`` the clean (source) side
    queries another box, whose answer differs from the counterfactual one (the clean world read at the base's
    box), so an interchange that copies the source's *answer* is told apart from one that moves the variable.
    """
    edits = _edits(kind, state, rng, pool)
    rng.shuffle(edits)
    variant, form = state.variant, state_form(state)
    clean_world = replay(state.initial, state.operations)[-1]
    clean_ctx = render_context(state.initial, state.operations, variant, form)
    n = len(clean_world)
    for edit in edits:
        try:
            corr_world = replay(edit.initial, edit.ops)[-1]
        except EntitylensError:
            continue  # a later operation became impossible: not a valid world
        ans = _answer_text
        boxes = [b for b in range(n)
                 if clean_world[b] != corr_world[b] and _distinguishable(ans(clean_world[b]), ans(corr_world[b]))]
        if not boxes:
            continue
        box = src = rng.choice(boxes)
        if cross_query:
            cf, base = ans(clean_world[box]), ans(corr_world[box])
            others = [r for r in range(n)
                      if r != box and ans(clean_world[r]) != cf and _answers_ok(ans(clean_world[r]), base, cf)]
            if not others:
                continue
            src = rng.choice(others)
        clean = f"{prefix}{clean_ctx} {box_name(src, variant)} contains"
        corr = f"{prefix}{render_context(edit.initial, edit.ops, variant, form)} {box_name(box, variant)} contains"
        cs, xs = parse_prompt(clean), parse_prompt(corr)
        aliases = alias_spans(kind, cs, xs, clean, corr, edit, state)
        n_ops = len(state.operations) if kind != "drop_op" else int(edit.changed_op or 0)
        return TextPair(
            kind=kind,
            state_id=state.state_id,
            query_box=src,
            corrupted_query_box=box if cross_query else None,
            clean_prompt=clean,
            corrupted_prompt=corr,
            clean_answer=ans(clean_world[src]),
            corrupted_answer=ans(corr_world[box]),
            counterfactual_answer=ans(clean_world[box]),
            variable=edit.variable or None,
            changed_op=edit.changed_op,
            roles=tuple(_pair_roles(clean, corr, cs, xs, aliases, n_ops)),
            role_spans=aliases,
            description=edit.description,
            meta={
                "sample_id": state.sample_id,
                "num_operations": state.num_operations,
                "numops": state.numops[box],
                "clean_contents": list(clean_world[src]),
                "corrupted_contents": list(corr_world[box]),
                "counterfactual_contents": list(clean_world[box]),
                "variant": variant,
            },
        )
    return None


def _pair_roles(clean: str, corr: str, cs: Any, xs: Any, aliases: Mapping[str, Any], n_ops: int) -> list[str]:
    """The catalogue roles both prompts have (descriptions, the first ``n_ops`` operations, the query) and aliases."""
    candidates = [f"box{lab}_desc" for lab in cs.desc_boxes] + ["query_box_desc"]
    candidates += [f"op{j}_{part}" for j in range(n_ops) for part in ("object", "box", "dest")]
    roles = shared_roles(clean, corr, cs, xs, candidates)
    return roles + list(aliases) + shared_roles(clean, corr, cs, xs, ["query_box", "query_contains", "last"])


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
    roles = shared_roles(clean, corr, cs, xs, [f"box{lab}_desc" for lab in cs.desc_boxes] + ["query_box_desc"])
    roles += list(aliases) + shared_roles(clean, corr, cs, xs, ["query_box", "query_contains", "last"])
    return TextPair(
        kind="p24",
        state_id=state_id,
        query_box=a.query_box,
        corrupted_query_box=b.query_box,
        clean_prompt=clean,
        corrupted_prompt=corr,
        clean_answer=f" {a.answer}",
        corrupted_answer=f" {b.answer}",
        counterfactual_answer=f" {a.answer}",
        variable="query_box",
        changed_op=None,
        roles=tuple(roles),
        role_spans=aliases,
        description=f"query Box {a.query_box} -> Box {b.query_box}",
        meta={"sample_id": a.sample_id, "clean_contents": [a.answer], "corrupted_contents": [b.answer]},
    )


def _generated_p24(n: int, seed: int, pool: Sequence[str], num_boxes: int) -> list[list[Any]]:

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
    cross_query: bool = False,
) -> list[TextPair]:
    """Build clean/corrupted text pairs of one kind from a dataset (at most one pair per state).

    States are visited in a seed-determined order and the first ``max_pairs`` that admit a pair are kept
    (returned in dataset order). For each state the edit (which operation / object / box changes) and the
    queried box are drawn from a generator seeded by ``(kind, seed, state)``: the same arguments give the
    same pairs in any process. The queried box is one whose gold contents differ between the two worlds
    (both replayed from their operations) and whose answers have a first distinguishing word.

    Each pair records the task's causal-model answer (``counterfactual_answer``): the clean context's world
    read at the corrupted side's queried box -- what the corrupted run should answer when the one variable
    the contexts differ in (``variable``) takes its clean value. With ``cross_query`` the clean side queries
    another box (its own answer differs from the counterfactual one), so interchange accuracy separates a
    site that carries the changed variable from one that carries the source's answer.

    Args:
        data: :class:`~entitylens.task.types.State` s for the K&S kinds; :class:`~entitylens.task.io.P24Item` s
            (from :func:`~entitylens.task.io.read_p24_jsonl`) or ``None`` (generate) for ``p24``.
        kind: One of :data:`PAIR_KINDS`.
        seed: Seed of every random choice.
        max_pairs: Keep at most this many pairs (required when generating P24 pairs).
        prefix: Text put before both prompts (e.g. a few-shot prefix); default none.
        vocabulary: Objects replacements are drawn from (default: the dataset's vocabulary, BNC or disjoint).
        num_boxes: Boxes per generated P24 context.
        cross_query: Let the clean side query another box than the corrupted side (K&S kinds only).

    Returns:
        The pairs.

    Raises:
        EntitylensError: unknown kind, data of the wrong type for the kind, ``cross_query`` with ``p24``, or no
            pair could be built.
    """
    if kind not in PAIR_KINDS:
        raise EntitylensError(f"unknown pair kind {kind!r}; use one of {', '.join(PAIR_KINDS)}")
    if max_pairs is not None and (isinstance(max_pairs, bool) or int(max_pairs) < 1):
        raise EntitylensError(f"max_pairs must be a positive number, got {max_pairs!r}; pass max_pairs=N with N >= 1")
    if not isinstance(prefix, str):
        raise EntitylensError("prefix must be a string; pass the few-shot text itself")
    if cross_query and kind == "p24":
        raise EntitylensError("p24 pairs already query two boxes of one context; drop cross_query (--cross-query)")
    pool: tuple[str, ...] = ()
    if kind == "p24":
        units, ids = _p24_units(data, seed, max_pairs, vocabulary, num_boxes)
    else:
        units, ids, pool = _ks_units(data, kind, vocabulary)
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
            pair = _ks_pair(kind, units[idx], rng, pool, prefix, cross_query)
        if pair is not None:
            found.append((idx, pair))
    if not found:
        raise EntitylensError(
            f"no {kind} pair could be built from {len(units)} states (e.g. no operations to change); "
            f"use states with operations or another kind"
        )
    found.sort(key=lambda t: t[0])
    return [p for _, p in found]


def _p24_units(
    data: Sequence[Any] | None, seed: int, max_pairs: int | None, vocabulary: Sequence[str] | None, num_boxes: int
) -> tuple[list[Any], list[str]]:
    """The P24 contexts ``p24`` pairs are drawn from (each a list of rows) and their ids: from ``data`` or generated."""
    if data is None:
        if max_pairs is None:
            raise EntitylensError("generating P24 pairs needs max_pairs (how many); pass max_pairs=N / --max-pairs")

        pool = tuple(vocabulary) if vocabulary is not None else tuple(BNC_OBJECTS)
        if not 2 <= num_boxes <= min(26, len(pool)):
            raise EntitylensError(f"num_boxes={num_boxes} must be in 2..{min(26, len(pool))}; use fewer boxes")
        groups = _generated_p24(int(max_pairs), seed, pool, num_boxes)
        return groups, [f"gen{i}" for i in range(len(groups))]
    bad = next((x for x in data if not isinstance(x, P24Item)), None)
    if bad is not None:
        raise EntitylensError(
            f"kind p24 needs P24 rows (read_p24_jsonl), got a {type(bad).__name__}; pass a P24 JSONL "
            f"file, or no data to generate P24 pairs"
        )
    by_ctx: dict[tuple[int, str], list[Any]] = {}
    for it in data:
        by_ctx.setdefault((it.sample_id, it.context), []).append(it)
    return list(by_ctx.values()), [str(k[0]) for k in by_ctx]


def _ks_units(
    data: Sequence[Any] | None, kind: str, vocabulary: Sequence[str] | None
) -> tuple[list[Any], list[str], tuple[str, ...]]:
    """The K&S states a pair of ``kind`` is drawn from, their ids, and the objects replacements come from."""
    if data is None:
        raise EntitylensError(f"kind {kind} needs a boxes dataset; pass --data (a K&S JSONL file)")
    bad = next((x for x in data if not isinstance(x, State)), None)
    if bad is not None:
        hint = " (P24 rows go with kind p24)" if isinstance(bad, P24Item) else ""
        raise EntitylensError(
            f"kind {kind} needs boxes states (read_ks_jsonl), got a {type(bad).__name__}{hint}; pass a K&S JSONL file"
        )
    units = list(data)
    ids = [s.state_id for s in units]
    objs: set[str] = set()
    for s in units:
        objs |= state_objects(s)
    pool = tuple(vocabulary) if vocabulary is not None else _default_vocabulary(objs)
    return units, ids, pool


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
    out = []
    for tp in pairs:
        if tp.kind == "p24":
            raise EntitylensError(
                "p24 pairs have no compact form; use --kind op_object, op_box, init_object or drop_op"
            )
        variant = str(tp.meta.get("variant", "base"))
        cbox = int(tp.query_box)
        xbox = cbox if tp.corrupted_query_box is None else int(tp.corrupted_query_box)
        sides = []
        for text, box in ((tp.clean_prompt, cbox), (tp.corrupted_prompt, xbox)):
            query = f" {box_name(box, variant)} contains"
            if not text.endswith(query):
                raise EntitylensError(
                    f"pair {tp.name}: prompt does not end with {query.strip()!r}; build pairs "
                    "without a prefix or query suffix"
                )
            ctx = parse_context(text[: -len(query)])
            prompt = " ".join([*context_words(ctx.initial, ctx.operations), "|", *query_words(box)])
            sides.append((ctx, prompt, ordered_contents(ctx.initial, ctx.operations)))
        (cctx, clean, cworld), (xctx, corr, xworld) = sides
        cans, xans = COMPACT.answer_text(cworld[cbox]), COMPACT.answer_text(xworld[xbox])
        cf = None if tp.counterfactual_answer is None else COMPACT.answer_text(cworld[xbox])
        if not _answers_ok(cans, xans, cans if cf is None else cf):
            continue
        cs, xs = parse_prompt(clean), parse_prompt(corr)
        edit = Edit(xctx.initial, xctx.operations, tp.changed_op, tp.description)
        aliases = alias_spans(tp.kind, cs, xs, clean, corr, edit, SimpleNamespace(operations=cctx.operations))
        n_ops = len(cctx.operations) if tp.kind != "drop_op" else int(tp.changed_op or 0)
        out.append(TextPair(
            kind=tp.kind, state_id=tp.state_id, query_box=tp.query_box, corrupted_query_box=tp.corrupted_query_box,
            clean_prompt=clean, corrupted_prompt=corr, clean_answer=cans, corrupted_answer=xans,
            counterfactual_answer=cf, variable=tp.variable, changed_op=tp.changed_op,
            roles=tuple(_pair_roles(clean, corr, cs, xs, aliases, n_ops)), role_spans=aliases,
            description=tp.description, meta={**dict(tp.meta), "protocol": "compact"},
        ))  # fmt: skip
    return out
