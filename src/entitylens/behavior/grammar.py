r"""The KST24 statement grammar as a small hand-built character DFA.

KST24 decodes the model's statement under the regex (outlines)::

    Statement: Box 0 contains( [a-zA-Z]+)*, Box 1 contains( [a-zA-Z]+)*, ..., Box 6 contains( [a-zA-Z]+)*\.

The prompt ends at the test description with no trailing newline, so the text the model writes is
``"\nStatement: Box 0 contains the car and the map, Box 1 contains nothing, ..., Box 6 contains the bottle."``:
the configurable ``prefix`` (``"\nStatement:"`` by default) is forced text, followed by the boxes.

The automaton is built directly from that structure rather than by a general regex engine. Its states are
integers:

* *literal* states, one per character position of the forced segments
  ``prefix + " Box 0 contains"``, ``", Box 1 contains"``, ..., ``", Box 6 contains"`` (and the final ``"."``);
* per box ``k`` three *word* states: ``AFTER_CONTAINS`` (just after ``contains``: a space, or the
  separator ``,``/``.`` may follow), ``AFTER_SPACE`` (a letter must follow) and ``IN_WORD`` (a letter,
  a space or the separator may follow);
* one accepting state after the final ``.``.

Every state except ``AFTER_CONTAINS``/``AFTER_SPACE``/``IN_WORD`` has exactly one outgoing character: its
*forced continuation* (:meth:`StatementGrammar.forced`) is the text up to the next branching point, which
jump-forward decoding appends without a model step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from entitylens.errors import EntitylensError

DEAD = -1
"""Returned by :meth:`StatementGrammar.step` when a character leaves the language."""

_REGEX_META = set("\\.^$*+?()[]{}|#&~-")
_WORD_KINDS = ("after_contains", "after_space", "in_word")


def is_word_char(ch: str) -> bool:
    """Whether ``ch`` is in the regex class ``[a-zA-Z]`` (ASCII letters only)."""
    return len(ch) == 1 and ch.isascii() and ch.isalpha()


def _escape(text: str) -> str:
    """Escape ``text`` as a regex literal understood by Python ``re`` and Rust ``regex`` alike."""
    out = []
    for ch in text:
        if ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ch in _REGEX_META:
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


@dataclass(frozen=True)
class StateInfo:
    """What a DFA state means.

    Attributes:
        kind: ``"literal"``, ``"after_contains"``, ``"after_space"``, ``"in_word"`` or ``"accept"``.
        box: The box whose segment the state belongs to (the literal ``", Box k contains"`` belongs to box
            ``k``; the final ``"."`` and the accepting state to ``num_boxes``).
        segment_done: For literal states, the part of the current literal segment already written.
        segment_left: For literal states, the rest of the segment (the forced continuation).
    """

    kind: str
    box: int
    segment_done: str = ""
    segment_left: str = ""


@dataclass(frozen=True)
class StatementGrammar:
    r"""Character-level DFA of the KST24 statement grammar.

    Args:
        num_boxes: Number of boxes the statement lists (7 in the paper).
        prefix: Forced text before ``" Box 0 contains"`` (default ``"\nStatement:"``: the prompt ends at the
            test description, without a trailing newline).

    Example:
        >>> g = StatementGrammar(num_boxes=2, prefix="Statement:")
        >>> g.matches("Statement: Box 0 contains the map, Box 1 contains nothing.")
        True
        >>> g.forced(g.initial_state)
        'Statement: Box 0 contains'
    """

    num_boxes: int = 7
    prefix: str = "\nStatement:"
    _trans: tuple[dict[str, int], ...] = field(init=False, repr=False, compare=False)
    _info: tuple[StateInfo, ...] = field(init=False, repr=False, compare=False)
    _word_states: tuple[tuple[int, int, int], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.num_boxes, bool) or not isinstance(self.num_boxes, int) or self.num_boxes < 1:
            raise EntitylensError(f"StatementGrammar num_boxes={self.num_boxes!r} is invalid; use an integer >= 1")
        if not isinstance(self.prefix, str):
            raise EntitylensError(
                f"StatementGrammar prefix={self.prefix!r} is not a string; pass text such as '\\nStatement:'"
            )
        trans: list[dict[str, int]] = []
        info: list[StateInfo] = []
        word_states: list[tuple[int, int, int]] = []

        def new_state(si: StateInfo) -> int:
            trans.append({})
            info.append(si)
            return len(trans) - 1

        def chain(start: int, text: str, box: int) -> int:
            """Add the literal ``text`` after ``start``; return the state after its last character."""
            cur = start
            for i, ch in enumerate(text):
                last = i == len(text) - 1
                done, left = text[: i + 1], text[i + 1 :]
                nxt = new_state(StateInfo("after_contains", box) if last else StateInfo("literal", box, done, left))
                trans[cur][ch] = nxt
                cur = nxt
            return cur

        # Segment of box 0: prefix + " Box 0 contains", starting at the initial state 0.
        seg0 = f"{self.prefix} Box 0 contains"
        end = chain(new_state(StateInfo("literal", 0, "", seg0)), seg0, 0)
        for k in range(self.num_boxes):
            after_contains = end
            after_space = new_state(StateInfo("after_space", k))
            in_word = new_state(StateInfo("in_word", k))
            word_states.append((after_contains, after_space, in_word))
            trans[after_contains][" "] = after_space
            trans[in_word][" "] = after_space
            # The letter class [a-zA-Z] is the pseudo-key "<letter>" (see step()).
            trans[after_space]["<letter>"] = in_word
            trans[in_word]["<letter>"] = in_word
            if k + 1 < self.num_boxes:
                end = chain(after_contains, f", Box {k + 1} contains", k + 1)
                trans[in_word][","] = trans[after_contains][","]
            else:
                accept = new_state(StateInfo("accept", self.num_boxes))
                trans[after_contains]["."] = accept
                trans[in_word]["."] = accept
        object.__setattr__(self, "_trans", tuple(trans))
        object.__setattr__(self, "_info", tuple(info))
        object.__setattr__(self, "_word_states", tuple(word_states))

    # ------------------------------------------------------------------ basic DFA interface
    @property
    def initial_state(self) -> int:
        """The start state (before the prefix)."""
        return 0

    @property
    def num_states(self) -> int:
        """Number of live DFA states (``DEAD`` excluded)."""
        return len(self._trans)

    @property
    def accept_state(self) -> int:
        """The only accepting state (after the final ``"."``)."""
        return self.num_states - 1

    def info(self, state: int) -> StateInfo:
        """Describe ``state`` (kind, box, literal progress)."""
        return self._info[state]

    def word_states(self, box: int) -> tuple[int, int, int]:
        """The ``(after_contains, after_space, in_word)`` states of ``box``."""
        return self._word_states[box]

    def step(self, state: int, char: str) -> int:
        """The state after reading ``char`` in ``state`` (``DEAD`` if the text leaves the language)."""
        if state == DEAD:
            return DEAD
        t = self._trans[state]
        nxt = t.get(char)
        if nxt is not None:
            return nxt
        if is_word_char(char):
            return t.get("<letter>", DEAD)
        return DEAD

    def walk(self, state: int, text: str) -> int:
        """The state after reading ``text`` from ``state`` (``DEAD`` if it leaves the language)."""
        for ch in text:
            state = self.step(state, ch)
            if state == DEAD:
                return DEAD
        return state

    def accepts(self, state: int) -> bool:
        """Whether ``state`` is accepting (the statement is complete)."""
        return state == self.accept_state

    def matches(self, text: str) -> bool:
        """Whether the whole ``text`` is a statement (same as ``re.fullmatch(self.regex, text)``)."""
        return self.accepts(self.walk(self.initial_state, text))

    def forced(self, state: int) -> str:
        """The unique text that must follow ``state`` up to the next branching point ('' if none)."""
        if state == DEAD:
            return ""
        return self._forced_table[state]

    @cached_property
    def _forced_table(self) -> tuple[str, ...]:
        return tuple(self._forced_walk(s) for s in range(self.num_states))

    def _forced_walk(self, state: int) -> str:
        out = []
        while not self.accepts(state):
            t = self._trans[state]
            if len(t) != 1 or "<letter>" in t:
                break
            (ch, state), = t.items()
            out.append(ch)
        return "".join(out)

    def completion(self, state: int) -> str:
        """A shortest text that completes ``state`` into a full statement (every box left empty)."""
        if state == DEAD:
            raise EntitylensError("cannot complete a dead DFA state; check the text with StatementGrammar.walk first")
        out = []
        while not self.accepts(state):
            forced = self.forced(state)
            if forced:
                out.append(forced)
                state = self.walk(state, forced)
                continue
            si = self.info(state)
            if si.kind == "after_space":
                out.append("a")
                state = self.step(state, "a")
            sep = "," if si.box + 1 < self.num_boxes else "."
            out.append(sep)
            state = self.step(state, sep)
        return "".join(out)

    # ------------------------------------------------------------------ regex and vectorised table
    @cached_property
    def regex(self) -> str:
        """The equivalent regex (for outlines / ``re.fullmatch``)."""
        word = "( [a-zA-Z]+)*"
        boxes = ", ".join(f"Box {k} contains{word}" for k in range(self.num_boxes))
        return f"{_escape(self.prefix)} {boxes}\\."

    @cached_property
    def literal_chars(self) -> str:
        """All characters with an explicit (non-letter-class) transition, sorted."""
        chars = {ch for t in self._trans for ch in t if ch != "<letter>"}
        return "".join(sorted(chars))

    @cached_property
    def table(self) -> tuple[np.ndarray, dict[str, int]]:
        """Vectorised transition table for walking many strings at once.

        Returns:
            ``(T, char_class)``: ``T`` is an ``int32`` array ``[num_states + 1, num_classes]`` where row
            ``num_states`` is the dead sink; ``char_class`` maps every character with its own column to it.
            Column 0 is the *padding* class (every state maps to itself), column 1 the class of ASCII
            letters not in :attr:`literal_chars`, column 2 the class of every other character (always dead).
        """
        chars = self.literal_chars
        char_class = {ch: 3 + i for i, ch in enumerate(chars)}
        n = self.num_states
        table = np.full((n + 1, 3 + len(chars)), n, dtype=np.int32)
        table[:, 0] = np.arange(n + 1, dtype=np.int32)
        for s in range(n):
            table[s, 1] = self._trans[s].get("<letter>", n)
            for ch, c in char_class.items():
                nxt = self.step(s, ch)
                table[s, c] = n if nxt == DEAD else nxt
        return table, char_class

