"""Parse a model's statement (``"Statement: Box 0 contains the car, Box 1 contains nothing, ..."``) per box.

Rules (also in ``docs/protocol.md``):

1. **Start.** If the text contains ``Statement:``, parsing starts after its first occurrence (repeated
   ``Statement:`` labels right after it are skipped); otherwise at the start of the text.
2. **End.** The statement ends at the first of: a ``Description:``/``Statement:`` label, a blank line, or
   a period or newline that is *not* followed by ``Box <n>`` (so ``". Box 3 ..."`` and a line break
   before ``Box 3`` are separators, not ends). A statement that reaches the end of the text without such
   an end is *unterminated* -- a generation cut short, e.g. by a token limit.
3. **Boxes.** The statement is split at every ``Box <n>`` marker; the text up to the next marker is box
   ``n``'s part, with inner whitespace collapsed and the separator before the next box removed (a final
   ``and`` word, then trailing ``,`` ``;`` ``.`` and spaces: ``", and Box 3"``, ``". Box 3"``). A part
   ``contains X`` gives the raw string ``X``; a part ``is empty`` gives the raw string ``"is empty"``; any
   other part makes that box :data:`INVALID`.
4. **Objects.** ``X`` is split on commas, on the word ``and`` and on ``, and`` (the Oxford comma); leading
   ``the`` words are dropped from each item (``the the magazine`` is the magazine) and empty items are
   skipped. ``"nothing"`` and ``"is empty"`` are the empty box. A bare
   ``Box 4 contains`` with no words makes no claim about the box: it is :data:`INVALID` (KST24's scorer
   also counts it wrong; the grammar ``( [a-zA-Z]+)*`` allows it, so a model can emit it).
   Objects are returned as an alphabetically sorted tuple (duplicates kept).
5. **Missing, duplicate, extra boxes.** A box never mentioned is :data:`INVALID`. When a box is mentioned
   more than once, the *first* mention wins (later ones are listed in ``duplicates``). Box numbers
   ``>= num_boxes`` are ignored (listed in ``out_of_range``).
6. **Truncation.** In an unterminated statement the last mentioned box's part may be cut mid-object, so
   (with ``require_end=True``, the default) that box is :data:`INVALID` too; boxes after it were never
   mentioned and are :data:`INVALID` by rule 5.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from entitylens.errors import EntitylensError
from entitylens.task.types import NUM_BOXES, Contents

INVALID: Final = None
"""Prediction for a box the statement does not (validly) describe. Distinct from every contents tuple,
including the empty box ``()``."""

BoxPrediction = Contents | None
"""A parsed box: a sorted tuple of object names, or :data:`INVALID` (``None``)."""

_LABEL = "Statement:"
_BOX_AHEAD = r"[ \t]*(?:\n[ \t]*)?[Bb]ox\s+\d"
_END = re.compile(r"\.|\n|Description:|Statement:")
_BOX_AHEAD_RE = re.compile(_BOX_AHEAD)
_BLANK_LINE = re.compile(r"\n[ \t]*\n")
_MARKER = re.compile(r"\b[Bb]ox\s+(\d+)\b")
_ITEM_SPLIT = re.compile(r"\s*,\s*(?:and\s+)?|\s+and\s+|^and\s+|\s+and$")
_LEADING_THE = re.compile(r"^(?:the\s+)+", re.IGNORECASE)
_CONTAINS = re.compile(r"^contains\b\s*", re.IGNORECASE)
_IS_EMPTY = re.compile(r"^is\s+empty$", re.IGNORECASE)


@dataclass(frozen=True)
class ParsedStatement:
    """Per-box predictions parsed from one statement.

    Attributes:
        boxes: One entry per box: a sorted tuple of objects (``()`` for an empty box) or :data:`INVALID`.
        raw: One entry per box: the text after ``contains`` (e.g. ``"the car and the map"``, ``"nothing"``),
            ``"is empty"``, the unparseable part of an invalid box, or ``None`` when the box is missing.
            Strict scoring compares these with the gold phrase.
        terminated: Whether the statement ended properly (period, line break or label) rather than at the
            end of the text.
        duplicates: Box numbers mentioned again after their first mention (ignored), in order.
        out_of_range: Box numbers ``>= num_boxes`` that were mentioned (ignored), in order.

    """

    boxes: tuple[BoxPrediction, ...]
    raw: tuple[str | None, ...]
    terminated: bool
    duplicates: tuple[int, ...] = ()
    out_of_range: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if len(self.boxes) != len(self.raw):
            raise EntitylensError(
                f"ParsedStatement has {len(self.boxes)} boxes but {len(self.raw)} raw strings; pass one each"
            )

    @property
    def invalid_boxes(self) -> tuple[int, ...]:
        """Indices of boxes whose prediction is :data:`INVALID`."""
        return tuple(i for i, b in enumerate(self.boxes) if b is INVALID)

    @property
    def is_valid(self) -> bool:
        """True when every box has a prediction."""
        return not self.invalid_boxes


def parse_objects(phrase: str) -> Contents:
    """Parse the text after ``contains`` into a sorted tuple of objects.

    ``"the map and the car"`` -> ``("car", "map")``; ``"nothing"``, ``"is empty"`` and ``""`` -> ``()``.

    Args:
        phrase: Object list as written by the model.

    Returns:
        The objects, alphabetically sorted (duplicates kept, so they can be counted as errors).

    """
    phrase = _clean_part(phrase)
    if phrase.lower() in ("", "nothing", "is empty"):
        return ()
    items = (_LEADING_THE.sub("", item.strip()) for item in _ITEM_SPLIT.split(phrase))
    return tuple(sorted(item for item in items if item))


def _statement_span(text: str) -> tuple[str, bool]:
    """Cut ``text`` to the statement (rules 1-2); returns (span, terminated)."""
    start = text.find(_LABEL)
    if start >= 0:
        text = text[start + len(_LABEL) :]
        while text.lstrip().startswith(_LABEL):
            text = text.lstrip()[len(_LABEL) :]
    for m in _END.finditer(text):
        tok = m.group()
        if tok in (".", "\n"):
            if tok == "\n" and _BLANK_LINE.match(text, m.start()):
                return text[: m.start()], True
            if _BOX_AHEAD_RE.match(text, m.end()):
                continue
        return text[: m.start()], True
    return text, False


def _clean_part(part: str, before_box: bool = False) -> str:
    """Collapse whitespace; strip the separator before the next box (``" and"``, then ``,`` ``;`` ``.``)."""
    part = " ".join(part.split())
    if before_box and (part == "and" or part.endswith(" and")):
        part = part[:-3]
    return part.rstrip(" ,;.")


def parse_statement(text: str, num_boxes: int = NUM_BOXES, *, require_end: bool = True) -> ParsedStatement:
    """Parse a generated statement into ``num_boxes`` per-box predictions (rules in the module docstring).

    Args:
        text: The model's output: the text after ``Statement:`` or including it (anything before the
            first ``Statement:`` is ignored).
        num_boxes: Number of boxes in the task.
        require_end: Treat the last mentioned box of an unterminated statement as :data:`INVALID`
            (its object list may be cut short). Set False for text that legitimately stops without
            a period.

    Returns:
        The parsed statement.

    """
    if not isinstance(text, str):
        raise EntitylensError(f"statement must be a string, got {type(text).__name__}; decode the tokens first")
    if isinstance(num_boxes, bool) or not isinstance(num_boxes, int) or num_boxes < 1:
        raise EntitylensError(f"num_boxes must be a positive integer, got {num_boxes!r}; use e.g. 7")
    span, terminated = _statement_span(text)
    markers = list(_MARKER.finditer(span))
    boxes: list[BoxPrediction] = [INVALID] * num_boxes
    raw: list[str | None] = [None] * num_boxes
    seen: set[int] = set()
    duplicates: list[int] = []
    out_of_range: list[int] = []
    for j, m in enumerate(markers):
        box = int(m.group(1))
        last = j + 1 == len(markers)
        part = _clean_part(span[m.end() : len(span) if last else markers[j + 1].start()], before_box=not last)
        if box >= num_boxes:
            out_of_range.append(box)
            continue
        if box in seen:
            duplicates.append(box)
            continue
        seen.add(box)
        contains = _CONTAINS.match(part)
        if contains:
            listed = part[contains.end() :]
            raw[box] = listed
            boxes[box] = parse_objects(listed) if listed else INVALID
        elif _IS_EMPTY.match(part):
            raw[box] = "is empty"
            boxes[box] = ()
        else:
            raw[box] = part
        if last and not terminated and require_end:
            boxes[box] = INVALID
    return ParsedStatement(
        boxes=tuple(boxes),
        raw=tuple(raw),
        terminated=terminated,
        duplicates=tuple(duplicates),
        out_of_range=tuple(out_of_range),
    )
