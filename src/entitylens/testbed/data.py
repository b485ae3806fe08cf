"""Training and evaluation text of the testbed: compact boxes episodes, code programs, prose.

Every text is a sequence of space-separated words, each one token of
:mod:`entitylens.models.testbed.tokenizer`, so a text's token count is its word count plus the BOS token and
:func:`encode_words` can map words to ids directly (a test checks it equals the tokenizer).

**Compact boxes format** (the testbed's *compact protocol*; one token per word)::

    B0 car map ; B1 ; B2 bag ; B3 paper string ; B4 bill ; B5 apple cash glass ; B6 bottle ;
    put coat B3 . move map B0 B2 . remove bill B4 . | B3 coat paper string ; B0 car ; ...

* description: per box its label, its objects (alphabetical) and ``;`` (an empty box is ``B1 ;``);
* operations, each ended by ``.``: ``put X [Y ...] Bk`` · ``remove X [Y ...] Bk`` ·
  ``move X [Y ...] Bsrc Bdst`` (objects alphabetical, as in the K&S sentences);
* ``|`` then queries: a box label followed by its gold contents and ``;`` (in list order: the initial
  objects as described, then arrivals in order; see :func:`ordered_contents`). A training episode queries
  all 7 boxes in a random order; an evaluation prompt ends at one query label (``... | B3``) and the
  model writes the contents and ``;``.

The format is 2-3 times shorter than the K&S sentences and an answer at ``numops`` 0 is a plain copy of
the tokens after the queried label in the description, which a two-layer model learns quickly.

**Code arm** (valid Python once every object name is bound to its own string; a test ``exec``-s it):
containers ``B0`` ... ``B6`` (lists or sets) change state and ``assert`` statements reveal contents::

    B0 = [ car , map ] ; B1 = [ ] ; ... ; B3 . append ( coat ) ; x = B0 . pop ( ) ; B2 . append ( x ) ;
    assert B2 == [ bag , map ] ; B5 . extend ( B2 ) ; B2 . clear ( ) ; assert B5 == [ bag , map ] ; ...

**Prose arm**: descriptive sentences about the same objects and box labels, with no state changes
(``the car is red and old . B3 is a big box . the map looks like a card .``).

Every generator is deterministic for ``(seed, index)``: one private :class:`random.Random` per item, seeded
from a string, so item ``i`` never depends on how many other items were drawn.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from dataclasses import dataclass

from entitylens.errors import EntitylensError
from entitylens.models.testbed.tokenizer import testbed_tokenizer
from entitylens.task.compact import (
    BOX_LABELS,
    context_words,
    ordered_contents,
    query_words,
)
from entitylens.task.types import MAX_PER_BOX, NUM_BOXES
from entitylens.task.vocab import BNC_OBJECTS
from entitylens.task.world import sample_initial, sample_scenario

SOURCES: tuple[str, ...] = ("boxes", "code", "prose")
"""Data sources of the testbed mixtures."""

TRAIN_OBJECTS: tuple[str, ...] = BNC_OBJECTS
"""Objects of all training text (the disjoint nouns are kept for a disjoint-vocabulary evaluation)."""


def _rng(kind: str, seed: int, index: int) -> random.Random:
    return random.Random(f"entitylens-testbed:{kind}:{int(seed)}:{int(index)}")


# ---------------------------------------------------------------------------------------- token ids


@functools.lru_cache(maxsize=1)
def _word_tables() -> tuple[dict[str, int], dict[str, int]]:
    tok = testbed_tokenizer()
    vocab = tok.get_vocab()
    spaced: dict[str, int] = {}
    bare: dict[str, int] = {}
    for piece, i in vocab.items():
        if piece.startswith("Ġ"):
            spaced[piece[1:]] = i
        elif not piece.startswith("<"):
            bare[piece] = i
    return spaced, bare


def encode_words(words: Sequence[str], bos: bool = True) -> list[int]:
    """Token ids of ``" ".join(words)`` (with BOS first), without running the tokenizer.

    Args:
        words: The words (each one token).
        bos: Prepend the BOS id.

    Returns:
        The ids, equal to ``tokenizer(" ".join(words))["input_ids"]``.

    Raises:
        EntitylensError: A word that is not one token of the testbed vocabulary.
    """
    spaced, bare = _word_tables()
    ids = [testbed_tokenizer().bos_token_id] if bos else []
    for j, w in enumerate(words):
        table = bare if j == 0 else spaced
        if w not in table:
            raise EntitylensError(
                f"word {w!r} is not a token of the testbed vocabulary; "
                "use the words of entitylens.models.testbed.tokenizer"
            )
        ids.append(table[w])
    return ids


# ------------------------------------------------------------------------------------- compact boxes


TOKEN_CONTEXT, TOKEN_ANSWER, TOKEN_ANSWER_OPERATED = 0, 1, 2
"""Token classes of a boxes episode (``Episode.token_class``): the context and query labels, the answer of
a box no operation touched, the answer of a box some operation changed. A recipe weighs them in the loss."""


@dataclass(frozen=True)
class Episode:
    """One training row: token ids and, per id, whether it is an answer token.

    Attributes:
        ids: Token ids, BOS first.
        answer: ``answer[j]`` is True when ``ids[j]`` is part of a query's answer (objects and ``;``).
        source: ``"boxes"``, ``"code"`` or ``"prose"``.
        token_class: Per id, :data:`TOKEN_CONTEXT`, :data:`TOKEN_ANSWER` or :data:`TOKEN_ANSWER_OPERATED`
            (empty for filler rows).
    """

    ids: tuple[int, ...]
    answer: tuple[bool, ...]
    source: str
    token_class: tuple[int, ...] = ()

    def __len__(self) -> int:
        return len(self.ids)


def boxes_episode(
    seed: int, index: int, ops_weights: Sequence[float], max_ops_per_box: int | None = None
) -> Episode:
    """A compact boxes episode: description, ``k`` operations, then all 7 boxes queried in random order.

    Args:
        seed: Stream seed.
        index: Episode index.
        ops_weights: Relative weight of ``k = 0, 1, 2, ...`` operations in the episode.
        max_ops_per_box: At most this many operations change any one box (K&S sampling, capped draws
            redrawn; see :func:`entitylens.task.world.sample_operations`). ``None``: no cap.

    Returns:
        The episode (answer tokens flagged, token classes set).
    """
    rng = _rng("boxes", seed, index)
    k = rng.choices(range(len(ops_weights)), weights=ops_weights)[0]
    sc = sample_scenario(seed, index, TRAIN_OBJECTS, num_operations=k, max_ops_per_box=max_ops_per_box)
    final = ordered_contents(sc.initial, sc.operations)
    touched = {b for op in sc.operations for b in op.boxes}
    words = context_words(sc.initial, sc.operations) + ["|"]
    answer = [False] * (len(words) + 1)  # + BOS
    classes = [TOKEN_CONTEXT] * (len(words) + 1)
    order = list(range(NUM_BOXES))
    rng.shuffle(order)
    for b in order:
        q = query_words(b, final[b])
        words.extend(q)
        answer.extend([False] + [True] * (len(q) - 1))
        kind = TOKEN_ANSWER_OPERATED if b in touched else TOKEN_ANSWER
        classes.extend([TOKEN_CONTEXT] + [kind] * (len(q) - 1))
    return Episode(tuple(encode_words(words)), tuple(answer), "boxes", tuple(classes))


# ------------------------------------------------------------------------------------------------ code


def _fill_initial(rng: random.Random) -> list[list[str]]:
    return [list(b) for b in sample_initial(rng, TRAIN_OBJECTS)]


def _free_objects(boxes: Sequence[Sequence[str]]) -> list[str]:
    used = {o for b in boxes for o in b}
    return [o for o in TRAIN_OBJECTS if o not in used]


def _render_container(contents: Sequence[str], kind: str) -> list[str]:
    if kind == "set":
        items = sorted(contents)
        if not items:
            return ["set", "(", ")"]
        open_, close = "{", "}"
    else:
        items = list(contents)
        open_, close = "[", "]"
    words = [open_]
    for j, o in enumerate(items):
        if j:
            words.append(",")
        words.append(o)
    words.append(close)
    return words


def _code_op(
    rng: random.Random, boxes: list[list[str]], kind: str
) -> tuple[list[str], tuple[int, ...]] | None:
    """One random container operation (mutates ``boxes``); ``None`` when the draw is invalid."""
    n = len(boxes)
    i = rng.randrange(n)
    j = rng.choice([b for b in range(n) if b != i])
    src, dst = BOX_LABELS[i], BOX_LABELS[j]
    op = rng.randrange(5)
    if op == 0:  # a new object enters box i
        if len(boxes[i]) >= MAX_PER_BOX:
            return None
        o = rng.choice(_free_objects(boxes))
        if kind == "set":
            boxes[i].append(o)
            return [src, ".", "add", "(", o, ")", ";"], (i,)
        if rng.randrange(3) == 0:
            boxes[i].insert(0, o)
            return [src, ".", "insert", "(", "0", ",", o, ")", ";"], (i,)
        boxes[i].append(o)
        return [src, ".", "append", "(", o, ")", ";"], (i,)
    if not boxes[i]:
        return None
    if op == 1:  # an object leaves box i
        o = rng.choice(boxes[i])
        boxes[i].remove(o)
        verb = "discard" if kind == "set" and rng.randrange(2) else "remove"
        return [src, ".", verb, "(", o, ")", ";"], (i,)
    if op == 2:  # one object moves from i to j
        if len(boxes[j]) >= MAX_PER_BOX:
            return None
        if kind == "list" and rng.randrange(2):
            o = boxes[i].pop()
            boxes[j].append(o)
            return ["x", "=", src, ".", "pop", "(", ")", ";", dst, ".", "append", "(", "x", ")", ";"], (i, j)
        o = rng.choice(boxes[i])
        boxes[i].remove(o)
        boxes[j].append(o)
        add = "add" if kind == "set" else "append"
        rem = "discard" if kind == "set" else "remove"
        return [dst, ".", add, "(", o, ")", ";", src, ".", rem, "(", o, ")", ";"], (i, j)
    if op == 3:  # all of box i moves to j
        if len(boxes[j]) + len(boxes[i]) > MAX_PER_BOX:
            return None
        boxes[j].extend(boxes[i])
        boxes[i].clear()
        verb = "update" if kind == "set" else "extend"
        return [dst, ".", verb, "(", src, ")", ";", src, ".", "clear", "(", ")", ";"], (i, j)
    # op == 4: box i is emptied
    boxes[i].clear()
    return [src, ".", "clear", "(", ")", ";"], (i,)


def _assert_words(boxes: Sequence[Sequence[str]], b: int, kind: str) -> list[str]:
    return ["assert", BOX_LABELS[b], "==", *_render_container(boxes[b], kind), ";"]


def code_program(rng: random.Random, min_words: int) -> list[str]:
    """Words of Python programs (concatenated) until at least ``min_words`` words.

    Each program declares ``B0`` ... ``B6`` as lists or sets holding a boxes-world initial state, then
    applies random operations (new object, removal, a move between containers, moving or clearing all
    contents); after each operation, with probability 1/2, an ``assert`` states a changed container's
    contents (lists in insertion order, sets sorted).

    Args:
        rng: The generator.
        min_words: Stop once this many words are written.

    Returns:
        The words (valid Python when joined with spaces, given object names bound to strings).
    """
    words: list[str] = []
    while len(words) < min_words:
        kind = "set" if rng.randrange(5) < 2 else "list"
        boxes = _fill_initial(rng)
        for b, contents in enumerate(boxes):
            words.extend([BOX_LABELS[b], "=", *_render_container(contents, kind), ";"])
        for _ in range(rng.randint(4, 12)):
            drawn = None
            while drawn is None:
                drawn = _code_op(rng, boxes, kind)
            stmt, changed = drawn
            words.extend(stmt)
            if rng.randrange(2):
                words.extend(_assert_words(boxes, rng.choice(changed), kind))
            if len(words) >= min_words:
                break
    return words


# ----------------------------------------------------------------------------------------------- prose

_ADJECTIVES: tuple[str, ...] = (
    "red", "blue", "green", "yellow", "black", "white", "brown", "grey", "old", "new", "small", "big",
    "heavy", "light", "soft", "hard", "cheap", "dear", "clean", "dirty", "round", "flat", "long", "short",
    "warm", "cold", "dry", "wet", "plain", "bright", "dark",
)  # fmt: skip


def prose_sentence(rng: random.Random) -> list[str]:
    """One descriptive sentence about an object or a box (no state change)."""
    o, o2 = rng.sample(TRAIN_OBJECTS, 2)
    a, a2 = rng.sample(_ADJECTIVES, 2)
    box = rng.choice(BOX_LABELS)
    t = rng.randrange(8)
    if t == 0:
        return ["the", o, "is", a, "."]
    if t == 1:
        return ["the", o, "is", a, "and", a2, "."]
    if t == 2:
        return ["the", o, "is", "not", a, "."]
    if t == 3:
        return ["a", o, "is", "a", a, "thing", "."]
    if t == 4:
        return ["the", o, "looks", "like", "a", o2, "."]
    if t == 5:
        return [box, "is", "a", a, "box", "."]
    if t == 6:
        return ["the", o, "is", "very", a, "and", "quite", a2, "."]
    return ["the", o, "is", "near", "the", o2, "."]


def prose_text(rng: random.Random, min_words: int) -> list[str]:
    """Prose sentences until at least ``min_words`` words (the first sentence starts with ``the``)."""
    words = ["the", rng.choice(TRAIN_OBJECTS), "is", rng.choice(_ADJECTIVES), "."]
    while len(words) < min_words:
        words.extend(prose_sentence(rng))
    return words


def filler_episode(source: str, seed: int, index: int, length: int) -> Episode:
    """A code or prose training row of exactly ``length`` tokens (BOS included; the text is cut there).

    Args:
        source: ``"code"`` or ``"prose"``.
        seed: Stream seed.
        index: Row index.
        length: Tokens in the row (>= 2).

    Returns:
        The row (no answer tokens).
    """
    if source not in ("code", "prose"):
        raise EntitylensError(f"unknown filler source {source!r}; use code or prose")
    if length < 2:
        raise EntitylensError(f"a filler row needs at least 2 tokens, got {length}; raise the row length")
    rng = _rng(source, seed, index)
    words = code_program(rng, length - 1) if source == "code" else prose_text(rng, length - 1)
    ids = encode_words(words[: length - 1])
    return Episode(tuple(ids), (False,) * len(ids), source)


def check_op_count_weights(weights: Sequence[float]) -> tuple[float, ...]:
    """Validate operation-count weights (non-negative, not all zero)."""
    w = tuple(float(x) for x in weights)
    if not w or any(x < 0 for x in w) or sum(w) <= 0:
        raise EntitylensError(
            f"ops weights {weights!r} must be non-negative with a positive sum; e.g. (1, 1, 1)"
        )
    return w


__all__ = [
    "SOURCES",
    "TOKEN_ANSWER",
    "TOKEN_ANSWER_OPERATED",
    "TOKEN_CONTEXT",
    "TRAIN_OBJECTS",
    "Episode",
    "boxes_episode",
    "check_op_count_weights",
    "code_program",
    "encode_words",
    "filler_episode",
    "prose_sentence",
    "prose_text",
]
