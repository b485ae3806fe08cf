"""The world behind a prompt: its description and operations replayed, the state after every operation.

Every label of the probe family (:mod:`entitylens.probing.family`) is computed here from the prompt text
alone: :func:`prompt_world` parses the prompt (:func:`entitylens.activations.structure.parse_prompt`: K&S
sentences, AltForms, the compact form), builds the initial boxes from the description and the operations
from their sentences, and replays them with the task's world simulator
(:func:`entitylens.task.world.replay`), so a label never depends on metadata a cache may or may not carry.
A ``Move the contents of Box 2 ...`` sentence names no object; it moves what the replay has in the box then.

:func:`tag_history` gives the ternary tags of Tang et al. (2026): for a box and an object, *present* (in the
box now), *removed* (was in the box earlier in the text, is not now) or *never* (never was).
"""

from __future__ import annotations

from dataclasses import dataclass

from entitylens.activations.structure import OperationSpans, PromptStructure, parse_prompt
from entitylens.errors import EntitylensError
from entitylens.task.types import Operation, sorted_contents
from entitylens.task.world import Boxes, apply_operation, validate_boxes

__all__ = ["TAG_CLASSES", "PromptWorld", "box_index", "prompt_world", "tag_of"]

TAG_CLASSES = ("never", "present", "removed")
"""The ternary tag classes, in class-index order."""

_NO_CAPACITY = 1 << 30  # labels follow the text; the generator's box capacity is not the labeller's business


def box_index(label: str) -> int:
    """Box number of a label as written: ``"3"`` -> 3, ``"D"`` -> 3 (AltForms), ``"B3"`` -> 3 (compact)."""
    if label.isdigit():
        return int(label)
    if len(label) > 1 and label[0] == "B" and label[1:].isdigit():
        return int(label[1:])
    if len(label) == 1 and "A" <= label <= "Z":
        return ord(label) - ord("A")
    raise EntitylensError(f"cannot read box label {label!r}; label boxes 0, 1, ... / A, B, ... / B0, B1, ...")


@dataclass(frozen=True)
class PromptWorld:
    """One prompt's world, replayed.

    Attributes:
        structure: The parsed prompt (character spans).
        initial: The boxes as the description leaves them.
        operations: The operations in text order (``move_contents`` with the objects the replay moved).
        states: ``states[i]`` = the boxes after the first ``i`` operations (``states[0] = initial``).
        query_box: The queried box, or ``None`` for a prompt without a query.
    """

    structure: PromptStructure
    initial: Boxes
    operations: tuple[Operation, ...]
    states: tuple[Boxes, ...]
    query_box: int | None

    @property
    def num_boxes(self) -> int:
        """Number of boxes the description names."""
        return len(self.initial)

    @property
    def final(self) -> Boxes:
        """The boxes after every operation."""
        return self.states[-1]

    def numops(self, box: int, upto: int | None = None) -> int:
        """Operations among the first ``upto`` (default all) that changed ``box``."""
        ops = self.operations if upto is None else self.operations[:upto]
        return sum(box in op.boxes for op in ops)

    def prior(self, box: int) -> Boxes | None:
        """The boxes before the last operation that changed ``box`` (``None`` when none did)."""
        touched = [i for i, op in enumerate(self.operations) if box in op.boxes]
        return self.states[touched[-1]] if touched else None

    def tags(self, upto: int) -> dict[tuple[int, str], int]:
        """Ternary tag of every (box, object) after ``upto`` operations, for the objects mentioned so far.

        Args:
            upto: Number of operations read (0 = the description only).

        Returns:
            ``(box, object) -> class index`` into :data:`TAG_CLASSES` for every box and every object the
            text has named up to there (the description's objects and those of the first ``upto``
            operations).
        """
        seen_in: set[tuple[int, str]] = set()
        for state in self.states[: upto + 1]:
            seen_in |= {(b, o) for b, contents in enumerate(state) for o in contents}
        mentioned = {o for contents in self.initial for o in contents}
        mentioned |= {o for op in self.operations[:upto] for o in op.objects}
        now = self.states[upto]
        return {(b, o): tag_of(o in now[b], (b, o) in seen_in)
                for b in range(self.num_boxes) for o in sorted(mentioned)}


def tag_of(present: bool, ever: bool) -> int:
    """Class index of a tag: present now, removed (there earlier, not now) or never there."""
    return 1 if present else (2 if ever else 0)


def _operation(text: str, op: OperationSpans, state: Boxes) -> Operation:
    """The :class:`Operation` an operation's spans describe, given the state before it."""
    box = box_index(text[op.box[0]: op.box[1]])
    dest = None if op.dest is None else box_index(text[op.dest[0]: op.dest[1]])
    if not 0 <= box < len(state) or (dest is not None and not 0 <= dest < len(state)):
        raise EntitylensError(f"an operation names a box outside the {len(state)} described boxes; "
                              "describe every box the operations use")
    objects = state[box] if op.kind == "move_contents" else sorted_contents(op.object_names)
    return Operation(kind=op.kind, objects=objects, box=box, dest=dest)  # type: ignore[arg-type]


def prompt_world(text: str) -> PromptWorld:
    """Parse a boxes prompt and replay its operations.

    Args:
        text: A prompt (K&S base, AltForms, P24 description or compact form), with or without its query.

    Returns:
        The :class:`PromptWorld`.

    Raises:
        EntitylensError: The text has no description of numbered boxes, its box labels are not 0..n-1
            (A..), or an operation is impossible in the described world (the text contradicts itself).
    """
    s = parse_prompt(text)
    if not s.desc_boxes:
        raise EntitylensError(f"no box description found in the prompt (it ends {text[-60:]!r}); "
                              "probe boxes-task prompts (K&S, AltForms or compact form)")
    indices = sorted(box_index(label) for label in s.desc_boxes)
    if indices != list(range(len(indices))):
        raise EntitylensError(f"the description names boxes {sorted(s.desc_boxes)}; it must describe boxes "
                              "0..n-1 (or A.. for Container labels)")
    initial: list[tuple[str, ...]] = [()] * len(indices)
    for label, named in s.desc_contents.items():
        initial[box_index(label)] = sorted_contents(name for name, _ in named)
    states = [validate_boxes(initial, _NO_CAPACITY)]
    operations = []
    for op in s.operations:
        operation = _operation(text, op, states[-1])
        operations.append(operation)
        states.append(apply_operation(states[-1], operation, _NO_CAPACITY))
    query = None if s.query_label is None else box_index(s.query_label)
    return PromptWorld(structure=s, initial=states[0], operations=tuple(operations), states=tuple(states),
                       query_box=query)
