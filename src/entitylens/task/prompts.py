r"""Prompts for the boxes task: the KST24 2-shot statement prompt (plain and chat) and P24 next-token form.

The KST24 protocol (Kim, Schuster & Toshniwal 2024; DESIGN §2) shows an instruction, two
demonstrations (``Description: ...`` / ``Statement: ...``) and the test ``Description: ...``; the model
then writes one statement about all seven boxes. :class:`StatementProtocol` captures that as three
pieces of text:

* :meth:`StatementProtocol.prompt` -- the conditioning text; for the default layout it ends exactly at
  the test description (no trailing newline), character for character as in DESIGN §2.
* :attr:`StatementProtocol.generation_prefix` -- text *forced* before the model chooses anything:
  ``"\nStatement:"`` for the default layout. KST24's decoding regex starts at ``Statement:`` while the
  prompt ends at the description, so the separator and the label are not the model's choice.
* :meth:`StatementProtocol.gold_text` -- the statement a perfect model writes after the prefix,
  ``"Box 0 contains the car, Box 1 contains nothing, ..., Box 6 contains the map."`` (joined to the
  prefix by one space: :meth:`StatementProtocol.target_text`).

The chat form (:meth:`StatementProtocol.chat_prompt`) renders the same content through a tokenizer's
chat template. See ``docs/protocol.md`` for the exact strings and how they differ from KST24's code.

This module does not import torch or transformers: chat rendering only needs an object with
``apply_chat_template`` and ``chat_template`` (any Hugging Face tokenizer).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from entitylens.errors import EntitylensError

KST24_INSTRUCTION = (
    'Given the description after "Description:", write a true statement about all boxes and their contents '
    'to the description after "Statement:".'
)
"""The instruction of DESIGN §2 and of KST24's outlines pipeline (``src/prompt/prompt_structure.py``)."""

KST24_CODE_INSTRUCTION = (
    'Given the description after "Description:", write a true statement about all boxes and their contents '
    'according to the description after "Statement:".'
)
"""The wording of KST24's later ``src/prompt/base_prompt.py`` ("... contents *according* to ...")."""

INSTRUCTIONS: Mapping[str, str] = {"kst24": KST24_INSTRUCTION, "kst24-code": KST24_CODE_INSTRUCTION}
"""Named instructions accepted by :class:`StatementProtocol` (``instruction="kst24-code"``)."""

_DEMO_INITIAL = (
    "Box 0 contains the car, Box 1 contains the cross, Box 2 contains the bag and the machine, "
    "Box 3 contains the paper and the string, Box 4 contains the bill, "
    "Box 5 contains the apple and the cash and the glass, Box 6 contains the bottle and the map."
)

KST24_DEMONSTRATIONS: tuple[tuple[str, str], ...] = (
    (_DEMO_INITIAL, _DEMO_INITIAL),
    (
        _DEMO_INITIAL + " Remove the car from Box 0. Remove the paper and the string from Box 3. "
        "Put the plane into Box 0. Move the map from Box 6 to Box 2. Remove the bill from Box 4. "
        "Put the coat into Box 3.",
        "Box 0 contains the plane, Box 1 contains the cross, "
        "Box 2 contains the bag and the machine and the map, Box 3 contains the coat, "
        "Box 4 contains nothing, Box 5 contains the apple and the cash and the glass, "
        "Box 6 contains the bottle.",
    ),
)
"""KST24's two demonstrations as (description, statement) pairs; the statement excludes ``Statement: ``."""

CHAT_ACK = "Okay."
"""Assistant reply to the instruction turn when a chat template has no system role (as in KST24)."""

_SYSTEM_PROBE = "entitylens-system-role-probe-5b1e"


def box_phrase(contents: Sequence[str]) -> str:
    """Render one box's contents the K&S way: ``"the a and the b"``, or ``"nothing"`` when empty.

    Objects are written in the given order (gold contents are alphabetical tuples).

    Args:
        contents: Object names in the box.

    Returns:
        The phrase that follows ``"Box k contains "``.

    """
    if isinstance(contents, str):
        raise EntitylensError(
            f"box contents must be a sequence of object names, got the string {contents!r}; pass a tuple"
        )
    if not contents:
        return "nothing"
    return " and ".join(f"the {obj}" for obj in contents)


def statement_text(contents: Sequence[Sequence[str]]) -> str:
    """Render a full statement, e.g. ``"Box 0 contains the car, Box 1 contains nothing, ..."``.

    Args:
        contents: Contents of every box, in box order.

    Returns:
        The statement, with its closing period and without a ``Statement:`` label.

    """
    if len(contents) == 0:
        raise EntitylensError("cannot write a statement about zero boxes; pass the contents of every box")
    return ", ".join(f"Box {i} contains {box_phrase(c)}" for i, c in enumerate(contents)) + "."


@dataclass(frozen=True)
class StatementProtocol:
    r"""How a state becomes a prompt and what text the model must produce (KST24 layout by default).

    The plain prompt is ``instruction + instruction_separator``, then for each demonstration
    ``description_label + " " + description + io_separator + statement_label + " " + statement +
    example_separator``, then ``description_label + " " + context``. The model is expected to
    continue with :attr:`generation_prefix` (forced) and then ``" " + gold_text(contents)``.

    Attributes:
        name: Short identifier recorded with results (e.g. ``"kst24"``).
        instruction: Instruction text, or a key of :data:`INSTRUCTIONS` (``"kst24"``, ``"kst24-code"``),
            resolved to its text at construction. Empty string: no instruction (and no separator).
        demonstrations: (description, statement) pairs shown before the test description.
        description_label: Label before each description.
        statement_label: Label before each statement.
        instruction_separator: Text between the instruction and the first demonstration.
        io_separator: Text between a description and its statement.
        example_separator: Text after each demonstration's statement.
        forced_prefix: Text forced after the prompt before the model writes; ``None`` means
            ``io_separator + statement_label`` (``"\nStatement:"`` here).

    """

    name: str = "kst24"
    instruction: str = KST24_INSTRUCTION
    demonstrations: tuple[tuple[str, str], ...] = KST24_DEMONSTRATIONS
    description_label: str = "Description:"
    statement_label: str = "Statement:"
    instruction_separator: str = "\n\n"
    io_separator: str = "\n"
    example_separator: str = "\n\n"
    forced_prefix: str | None = None

    def __post_init__(self) -> None:
        if self.instruction in INSTRUCTIONS:
            object.__setattr__(self, "instruction", INSTRUCTIONS[self.instruction])
        if not isinstance(self.name, str) or not self.name:
            raise EntitylensError("StatementProtocol needs a non-empty name; pass name='...'")
        if not self.statement_label.strip():
            raise EntitylensError("StatementProtocol.statement_label is empty; use e.g. 'Statement:'")
        if not self.description_label.strip():
            raise EntitylensError("StatementProtocol.description_label is empty; use e.g. 'Description:'")
        demos = tuple(tuple(d) for d in self.demonstrations)
        for i, demo in enumerate(demos):
            if len(demo) != 2 or not all(isinstance(s, str) and s.strip() for s in demo):
                raise EntitylensError(
                    f"demonstration {i} must be a (description, statement) pair of non-empty strings; fix it"
                )
        object.__setattr__(self, "demonstrations", demos)

    @property
    def generation_prefix(self) -> str:
        r"""Text forced after :meth:`prompt` before the model's first free choice (``"\nStatement:"``)."""
        return self.io_separator + self.statement_label if self.forced_prefix is None else self.forced_prefix

    @property
    def chat_generation_prefix(self) -> str:
        """Text forced at the start of the assistant turn in the chat form (``"Statement:"``)."""
        return self.statement_label

    def _check_context(self, context: str) -> None:
        if not isinstance(context, str) or not context.strip():
            raise EntitylensError("empty test description; pass the state's context (description + operations)")
        if context != context.strip():
            raise EntitylensError(
                f"test description {context[:40]!r}... has leading or trailing whitespace; strip it first"
            )

    def prompt(self, context: str) -> str:
        """Render the plain prompt for one state, ending at the test description (no trailing newline).

        Args:
            context: The state's description + operations (``State.context``).

        Returns:
            The prompt text.

        """
        self._check_context(context)
        parts = [self.instruction + self.instruction_separator] if self.instruction else []
        for description, statement in self.demonstrations:
            parts.append(
                f"{self.description_label} {description}{self.io_separator}"
                f"{self.statement_label} {statement}{self.example_separator}"
            )
        parts.append(f"{self.description_label} {context}")
        return "".join(parts)

    def gold_text(self, contents: Sequence[Sequence[str]]) -> str:
        """Return the statement a perfect model writes after the forced prefix (:func:`statement_text`)."""
        return statement_text(contents)

    def target_text(self, contents: Sequence[Sequence[str]]) -> str:
        """Return a perfect continuation of :meth:`prompt`: ``generation_prefix + " " + gold_text``."""
        return f"{self.generation_prefix} {self.gold_text(contents)}"

    def chat_messages(self, context: str, *, system_role: bool = True) -> list[dict[str, str]]:
        """Build the chat form's messages (before templating).

        Args:
            context: The state's description + operations.
            system_role: Put the instruction in a system turn; when False, use a user turn answered by
                an assistant :data:`CHAT_ACK` turn (KST24's form for templates without a system role).

        Returns:
            A list of ``{"role": ..., "content": ...}`` dicts ending with the test user turn.

        """
        self._check_context(context)
        messages: list[dict[str, str]] = []
        if self.instruction:
            if system_role:
                messages.append({"role": "system", "content": self.instruction})
            else:
                messages.append({"role": "user", "content": self.instruction})
                messages.append({"role": "assistant", "content": CHAT_ACK})
        for description, statement in self.demonstrations:
            messages.append({"role": "user", "content": f"{self.description_label} {description}"})
            messages.append({"role": "assistant", "content": f"{self.statement_label} {statement}"})
        messages.append({"role": "user", "content": f"{self.description_label} {context}"})
        return messages

    def chat_prompt(self, tokenizer: Any, context: str, *, system_role: bool | None = None) -> str:
        """Render the chat form through ``tokenizer``'s chat template, with the generation prompt added.

        Args:
            tokenizer: A Hugging Face tokenizer with a chat template.
            context: The state's description + operations.
            system_role: Force the instruction into a system turn (True) or a user/"Okay." pair (False);
                ``None`` detects it with :func:`supports_system_role`.

        Returns:
            ``tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)``.

        """
        if system_role is None:
            system_role = supports_system_role(tokenizer)
        messages = self.chat_messages(context, system_role=system_role)
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # jinja2 TemplateError, ValueError from transformers, ...
            raise EntitylensError(
                f"the tokenizer's chat template rejected the KST24 messages ({type(e).__name__}: {e}); "
                "use the plain prompt or pass system_role explicitly"
            ) from e
        if not isinstance(text, str):
            raise EntitylensError("apply_chat_template did not return text; use a tokenizer with a chat template")
        return text


def supports_system_role(tokenizer: Any) -> bool:
    """Whether ``tokenizer``'s chat template keeps a system turn.

    Renders a system message holding a probe string; the template lacks a system role when that raises
    (e.g. Gemma's ``raise_exception('System role not supported')``) or silently drops the probe.

    Args:
        tokenizer: A Hugging Face tokenizer.

    Returns:
        True when a system message's content reaches the rendered text.

    """
    if not getattr(tokenizer, "chat_template", None):
        raise EntitylensError(
            "the tokenizer has no chat template; use StatementProtocol.prompt (plain form) or set "
            "tokenizer.chat_template"
        )
    probe = [{"role": "system", "content": _SYSTEM_PROBE}, {"role": "user", "content": "Description: x"}]
    try:
        text = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    except Exception:
        return False
    return isinstance(text, str) and _SYSTEM_PROBE in text


KST24 = StatementProtocol()
r"""DESIGN §2 / KST24's outlines pipeline: the prompt ends at the description; forced ``"\nStatement:"``."""

KST24_CODE = StatementProtocol(name="kst24-code", instruction="kst24-code", io_separator="\n\n")
"""KST24's later ``base_prompt.py`` layout: "according to" wording, a blank line between description and
statement, forced prefix ``"\\n\\nStatement:"`` (their HF-endpoint script also appended ``" Box 0 contains"``,
which the statement grammar forces anyway)."""

KST24_OUTLINES = StatementProtocol(name="kst24-outlines", forced_prefix="Statement:")
"""DESIGN's prompt with KST24's literal outlines behaviour: their regex starts with ``Statement:`` and allows
no newline, so the generated text is glued to the description (``"...into Box 3.Statement: Box 0 ..."``)."""

PROTOCOLS: Mapping[str, StatementProtocol] = {p.name: p for p in (KST24, KST24_CODE, KST24_OUTLINES)}
"""Named statement protocols."""


def get_protocol(name: str | StatementProtocol) -> StatementProtocol:
    """Look up a named protocol (``"kst24"``, ``"kst24-code"``, ``"kst24-outlines"``); protocols pass."""
    if isinstance(name, StatementProtocol):
        return name
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise EntitylensError(f"unknown statement protocol {name!r}; use one of {', '.join(PROTOCOLS)}") from None


def kst24_prompt(context: str, *, instruction: str = "kst24") -> str:
    """Render the KST24 2-shot prompt for one state in DESIGN §2's layout (ends at the description).

    Args:
        context: The state's description + operations.
        instruction: ``"kst24"`` (DESIGN's wording), ``"kst24-code"`` (``base_prompt.py``'s "according to"
            wording) or any literal instruction text.

    Returns:
        The prompt text.

    """
    return StatementProtocol(instruction=instruction).prompt(context)


@dataclass(frozen=True)
class P24Prompt:
    """A P24 next-token prompt and its answer.

    Attributes:
        prompt: ``"The X is in Box L, the Y is in Box M, ... Box L contains the"``.
        answer: The continuation a perfect model writes, ``" X"`` (leading space; the sentence then ends
            with ``"."``).

    """

    prompt: str
    answer: str


def p24_prompt(objects: Sequence[str], query_box: int, labels: Sequence[str] | None = None) -> P24Prompt:
    """Render the P24 (Prakash et al. 2024) next-token form: one object per box, no operations.

    ``The X is in Box L, the Y is in Box M, the Z is in Box N. Box M contains the`` -> answer ``" Y"``.

    Args:
        objects: The object in each box, in mention order.
        query_box: Index (into ``objects``/``labels``) of the box the prompt asks about.
        labels: Box labels in mention order (P24 uses random capital letters); default ``"0"``, ``"1"``, ...

    Returns:
        The prompt and its answer.

    """
    objects = [str(o) for o in objects]
    labels = [str(i) for i in range(len(objects))] if labels is None else [str(x) for x in labels]
    if not objects:
        raise EntitylensError("P24 prompt needs at least one box; pass one object per box")
    if len(labels) != len(objects):
        raise EntitylensError(f"{len(objects)} objects but {len(labels)} box labels; pass one label per object")
    if len(set(objects)) != len(objects) or len(set(labels)) != len(labels):
        raise EntitylensError("P24 objects and box labels must be distinct; drop the duplicates")
    if any(not o.strip() or o != o.strip() for o in objects) or any(not b.strip() or b != b.strip() for b in labels):
        raise EntitylensError("P24 objects and labels must be non-empty without surrounding spaces; strip them")
    if not 0 <= query_box < len(objects):
        raise EntitylensError(f"query_box {query_box} is out of range; use 0..{len(objects) - 1}")
    clauses = [f"the {o} is in Box {b}" for o, b in zip(objects, labels, strict=True)]
    clauses[0] = "T" + clauses[0][1:]
    prompt = ", ".join(clauses) + f". Box {labels[query_box]} contains the"
    return P24Prompt(prompt=prompt, answer=f" {objects[query_box]}")
