"""The compact prompt form of the boxes task (the testbed's format): render, query, parse answers.

One word per token of the testbed tokenizer; 2-3 times shorter than the K&S sentences::

    B0 car map ; B1 ; B2 bag ; B3 paper string ; B4 bill ; B5 apple cash glass ; B6 bottle ;
    put coat B3 . move map B0 B2 . remove bill B4 . | B3 coat paper string ; B0 car ; ...

* description: per box its label, its objects (alphabetical) and ``;`` (an empty box is ``B1 ;``);
* operations, each ended by ``.``: ``put X [Y ...] Bk`` · ``remove X [Y ...] Bk`` ·
  ``move X [Y ...] Bsrc Bdst`` (objects alphabetical, as in the K&S sentences);
* ``|`` then queries: a box label followed by its contents and ``;``. A training episode answers every box
  (in *list order*: initial objects as described, then arrivals in order; :func:`ordered_contents`); an
  evaluation prompt ends at one query label (``... | B3``) and the model writes the contents and ``;``.

:class:`CompactProtocol` is the prompt/answer side of the *compact protocol*: for every box the prompt is
the state's compact context followed by ``| Bk``; the answer is what the model writes before the first
``;`` -- valid when it names distinct objects (at most the box capacity). The per-box answers are assembled
into a K&S statement (:func:`statement_from_answers`) and scored like the paper's statements. How the
answers are decoded lives in :mod:`entitylens.behavior` (the one decode loop).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from entitylens.errors import EntitylensError
from entitylens.task.prompts import box_phrase
from entitylens.task.types import MAX_PER_BOX, NUM_BOXES, Operation, State
from entitylens.task.vocab import BNC_OBJECTS, DISJOINT_OBJECTS

BOX_LABELS: tuple[str, ...] = tuple(f"B{i}" for i in range(NUM_BOXES))
"""Box labels of the compact format."""

OBJECTS: tuple[str, ...] = BNC_OBJECTS + DISJOINT_OBJECTS
"""Every object the compact format names (the K&S nouns and the disjoint-vocabulary nouns)."""

_OBJECT_SET = frozenset(OBJECTS)
_COMPACT_RE = re.compile(r"^B0 .*\| B\d+$", re.DOTALL)


def describe_compact(boxes: Sequence[Sequence[str]]) -> list[str]:
    """Words of the compact description: ``B0 car map ; B1 ; ...``."""
    words: list[str] = []
    for i, contents in enumerate(boxes):
        words.append(BOX_LABELS[i])
        words.extend(sorted(contents))
        words.append(";")
    return words


def operation_compact(op: Operation) -> list[str]:
    """Words of one operation: ``put X Bk .``, ``remove X Bk .`` or ``move X Bsrc Bdst .``."""
    if op.kind == "put":
        return ["put", *op.objects, BOX_LABELS[op.box], "."]
    if op.kind == "remove":
        return ["remove", *op.objects, BOX_LABELS[op.box], "."]
    if op.kind in ("move", "move_contents"):
        assert op.dest is not None
        return ["move", *op.objects, BOX_LABELS[op.box], BOX_LABELS[op.dest], "."]
    raise EntitylensError(f"unknown operation kind {op.kind!r}; use move, remove or put")  # pragma: no cover


def context_words(initial: Sequence[Sequence[str]], operations: Sequence[Operation]) -> list[str]:
    """Words of a state's compact context (description then operations), without the ``|``."""
    if len(initial) > len(BOX_LABELS):
        raise EntitylensError(
            f"the compact format has {len(BOX_LABELS)} box labels but the state has {len(initial)} boxes; "
            f"use at most {len(BOX_LABELS)} boxes"
        )
    words = describe_compact(initial)
    for op in operations:
        words.extend(operation_compact(op))
    return words


def compact_context(state: State) -> str:
    """The compact text of a state (``B0 car ; ... ; put coat B3 .``), without the query part."""
    return " ".join(context_words(state.initial, state.operations))


def query_words(box: int, contents: Sequence[str] | None = None) -> list[str]:
    """``["B3"]`` (an evaluation query), or ``["B3", "car", "map", ";"]`` with the answer (order kept)."""
    words = [BOX_LABELS[box]]
    if contents is not None:
        words.extend(contents)
        words.append(";")
    return words


def ordered_contents(initial: Sequence[Sequence[str]], operations: Sequence[Operation]) -> list[list[str]]:
    """Contents of every box after ``operations``, in *list order*.

    A box's initial objects come first (alphabetically, as described), and objects that arrive later are
    appended in the order they arrive (a put or a move appends its objects in the order it lists them) --
    the order a Python list would have. Training answers use this order; scoring is order-insensitive.

    Args:
        initial: Initial contents.
        operations: Operations, in order.

    Returns:
        One list per box.
    """
    boxes = [sorted(b) for b in initial]
    for op in operations:
        if op.kind in ("remove", "move", "move_contents"):
            boxes[op.box] = [o for o in boxes[op.box] if o not in op.objects]
        if op.kind == "put":
            boxes[op.box].extend(op.objects)
        elif op.dest is not None:
            boxes[op.dest].extend(op.objects)
    return boxes


def compact_prompt(state: State, box: int) -> str:
    """The compact-protocol prompt asking for ``box``: ``"<context> | B3"``."""
    if not 0 <= box < state.num_boxes:
        raise EntitylensError(f"box {box} is out of range 0-{state.num_boxes - 1}; query a box the state has")
    return " ".join([*context_words(state.initial, state.operations), "|", *query_words(box)])


def is_compact_prompt(text: str) -> bool:
    """Whether ``text`` is a compact-protocol prompt (``"B0 ... | Bk"``)."""
    return bool(_COMPACT_RE.match(text))


@dataclass(frozen=True)
class CompactProtocol:
    """The compact query protocol's prompts and answers (see the module docstring).

    Attributes:
        name: Recorded with results (``"compact"``).
        max_objects: Most objects an answer may list (the box capacity).
    """

    name: str = "compact"
    max_objects: int = MAX_PER_BOX

    def __post_init__(self) -> None:
        if self.max_objects < 1:
            raise EntitylensError(f"max_objects={self.max_objects} must be >= 1; pass a positive value")

    @property
    def max_new_tokens(self) -> int:
        """Tokens a model may write for one answer: the objects and the closing ``;``."""
        return self.max_objects + 1

    def prompt(self, state: State, box: int) -> str:
        """The prompt asking for ``box`` of ``state`` (``"<compact context> | B3"``)."""
        return compact_prompt(state, box)

    @staticmethod
    def answer_text(contents: Sequence[str]) -> str:
        """A continuation naming ``contents`` in order: ``" car map ;"`` (``" ;"`` for an empty box)."""
        return "".join(f" {o}" for o in contents) + " ;"

    def parse_answer(self, text: str) -> tuple[str, ...] | None:
        """The objects of a generated continuation, or ``None`` if it is not a valid answer.

        Args:
            text: Generated text (``" car map ; B0"``); only what comes before the first ``;`` counts.

        Returns:
            The objects in generation order, or ``None`` (no ``;``, a non-object word, a repeated object,
            or more than :attr:`max_objects` objects).
        """
        words = text.split()
        if ";" not in words:
            return None
        answer = words[: words.index(";")]
        if len(answer) > self.max_objects or len(set(answer)) != len(answer):
            return None
        if any(w not in _OBJECT_SET for w in answer):
            return None
        return tuple(answer)


COMPACT = CompactProtocol()
"""The default compact protocol."""


def statement_from_answers(answers: Sequence[Sequence[str] | None]) -> str:
    """Assemble per-box answers into a K&S statement; ``None`` (invalid) boxes are left out.

    Args:
        answers: Per box, the objects (in the order written) or ``None``.

    Returns:
        ``"Box 0 contains the car, Box 2 contains nothing."`` (``""`` when every box is invalid).
    """
    parts = [f"Box {b} contains {box_phrase(tuple(a))}" for b, a in enumerate(answers) if a is not None]
    return ", ".join(parts) + "." if parts else ""


__all__ = [
    "BOX_LABELS",
    "COMPACT",
    "OBJECTS",
    "CompactProtocol",
    "compact_context",
    "compact_prompt",
    "context_words",
    "describe_compact",
    "is_compact_prompt",
    "operation_compact",
    "ordered_contents",
    "query_words",
    "statement_from_answers",
]
