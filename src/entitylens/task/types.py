"""Core value types of the boxes task: operations, states (one prompt each) and box rows.

A *scenario* is an initial assignment of objects to the 7 boxes plus a sequence of operations. A
*state* is a scenario prefix (the initial description plus the first ``k`` operations): it is what one
prompt shows the model. A *row* is a (state, queried box) pair: the unit the K&S T5 JSONL stores and the
unit accuracy is computed over.

Box contents are always tuples of object names sorted alphabetically (the K&S convention), so equal
contents compare equal and serialise to identical bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

NUM_BOXES = 7
"""Boxes per scenario (``Box 0`` ... ``Box 6``)."""

MAX_PER_BOX = 3
"""Capacity of a box: no box ever holds more than this many objects."""

OP_KINDS: tuple[str, ...] = ("move", "remove", "put")
"""Operation types counted in ``numops_by_op`` (``move_contents`` counts as ``move``)."""

OpKind = Literal["move", "remove", "put", "move_contents"]
Contents = tuple[str, ...]
"""The objects in one box, sorted alphabetically."""


def sorted_contents(objects: Iterable[object]) -> Contents:
    """Return ``objects`` as an alphabetically sorted tuple of strings."""
    return tuple(sorted(str(o) for o in objects))


@dataclass(frozen=True)
class Operation:
    """One operation on the boxes.

    Attributes:
        kind: ``"move"``, ``"remove"``, ``"put"`` or ``"move_contents"``.
        objects: Objects the operation moves/removes/puts, alphabetical. For ``move_contents`` these are
            the source box's contents at the time of the operation.
        box: The box the sentence names first: source box of a move, the box of a remove or a put.
        dest: Destination box of a move / move_contents; ``None`` otherwise.
    """

    kind: OpKind
    objects: Contents
    box: int
    dest: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("move", "remove", "put", "move_contents"):
            raise ValueError(f"unknown operation kind {self.kind!r}; use move, remove, put or move_contents")
        if tuple(sorted(self.objects)) != tuple(self.objects):
            object.__setattr__(self, "objects", sorted_contents(self.objects))
        if (self.dest is None) == (self.kind in ("move", "move_contents")):
            raise ValueError(f"{self.kind} operation needs dest={'a box' if self.dest is None else 'None'}")

    @property
    def counted_kind(self) -> str:
        """The ``numops_by_op`` key this operation counts under."""
        return "move" if self.kind == "move_contents" else self.kind

    @property
    def boxes(self) -> tuple[int, ...]:
        """Boxes whose contents this operation changes (a move changes two)."""
        return (self.box,) if self.dest is None else (self.box, self.dest)


@dataclass(frozen=True)
class State:
    """One prompt's world: an initial assignment plus a prefix of operations, with gold answers.

    Attributes:
        sample_id: Scenario id (shared by all prefixes of one scenario).
        initial: Initial contents of the 7 boxes.
        operations: The operations shown in the prompt, in order.
        contents: Gold contents of every box after the operations.
        numops: Per box, how many of the operations changed that box.
        numops_by_op: Per box, the same count split by operation type (keys ``move``, ``remove``, ``put``).
        context: The prompt text of this state in its dataset's surface form (description + operations),
            exactly as in the K&S ``sentence`` field before the query.
        variant: Surface form of ``context``: ``"base"``, ``"altforms"`` or ``"move-contents"``.
        extra: Any further fields from the source file, kept so a read→write round trip is lossless.
    """

    sample_id: int
    initial: tuple[Contents, ...]
    operations: tuple[Operation, ...]
    contents: tuple[Contents, ...]
    numops: tuple[int, ...]
    numops_by_op: tuple[Mapping[str, int], ...]
    context: str
    variant: str = "base"
    extra: Mapping[str, object] = field(default_factory=dict, compare=False)

    @property
    def num_operations(self) -> int:
        """Number of operations in the prompt (the prefix length)."""
        return len(self.operations)

    @property
    def state_id(self) -> str:
        """Stable identifier: ``"<sample_id>:<number of operations>"``."""
        return f"{self.sample_id}:{self.num_operations}"

    @property
    def num_boxes(self) -> int:
        """Number of boxes (7 in the paper's task)."""
        return len(self.contents)


@dataclass(frozen=True)
class BoxRow:
    """One (state, queried box) row: the unit of the K&S JSONL and of accuracy.

    Attributes:
        state: The state the row belongs to.
        box: The queried box index.
    """

    state: State
    box: int

    @property
    def gold(self) -> Contents:
        """Gold contents of the queried box."""
        return self.state.contents[self.box]

    @property
    def numops(self) -> int:
        """Operations in the prompt that changed the queried box."""
        return self.state.numops[self.box]

    @property
    def numops_by_op(self) -> Mapping[str, int]:
        """``numops`` split by operation type."""
        return self.state.numops_by_op[self.box]
