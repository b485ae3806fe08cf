"""Token-level automaton of the statement grammar over a Hugging Face tokenizer's vocabulary.

For every DFA state reached at a token boundary, the allowed tokens are those whose text (the tokenizer's
own decoding of the id *in context*) walks the character DFA without dying; special tokens are never
allowed. Per-state next-state arrays and boolean masks are computed lazily, once per state, by walking the
whole vocabulary at once through the vectorised transition table of :class:`StatementGrammar`.

Jump-forward: at a state whose continuation is forced (``", Box 3 contains"``), :meth:`TokenAutomaton.jump`
gives the tokenizer's canonical tokens for that text, keeping only the part whose tokenization is stable
whatever text precedes and follows it.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool
from torch import Tensor

from entitylens.behavior.grammar import DEAD, StatementGrammar, is_word_char
from entitylens.errors import EntitylensError

REPRESENTATIVE_LEFT_CONTEXT = "Box 5 contains the car"
"""Text assumed before a box separator when computing canonical jump tokens (a word, then ``,``)."""


def special_token_ids(tokenizer: Any) -> set[int]:
    """Ids of the tokenizer's special tokens (BOS/EOS/PAD/UNK and added tokens flagged special)."""
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", []) if i is not None}
    for i, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            ids.add(int(i))
    return ids


def _anchor_id(tokenizer: Any, special: set[int]) -> int:
    for probe in ("x", "a", "Box", "The"):
        ids = tokenizer.encode(probe, add_special_tokens=False)
        if ids and ids[-1] not in special:
            return int(ids[-1])
    raise EntitylensError("cannot find a plain-text anchor token in the tokenizer; use a text tokenizer")


_DECODE_KW = {"skip_special_tokens": False, "clean_up_tokenization_spaces": False}


def token_texts(tokenizer: Any) -> list[str | None]:
    """The text every token id contributes when it follows other text (``None`` for special tokens).

    Decoding a lone id can lose information (SentencePiece drops the leading space of the first piece), so
    each id is decoded after an anchor token and the anchor's own text is removed:
    ``decode([anchor, id])[len(decode([anchor])):]``.

    Args:
        tokenizer: A Hugging Face tokenizer.

    Returns:
        One entry per id in ``range(len(tokenizer))``.
    """
    special = special_token_ids(tokenizer)
    anchor = _anchor_id(tokenizer, special)
    kw = _DECODE_KW
    anchor_text = tokenizer.decode([anchor], **kw)
    n = len(tokenizer)
    decoded = tokenizer.batch_decode([[anchor, i] for i in range(n)], **kw)
    out: list[str | None] = []
    for i, d in enumerate(decoded):
        if i in special:
            out.append(None)
        elif d.startswith(anchor_text):
            out.append(d[len(anchor_text) :])
        else:  # pragma: no cover - decoders that rewrite the anchor; fall back to a lone decode
            out.append(tokenizer.decode([i], **kw))
    return out


@dataclass(frozen=True)
class Jump:
    """Forced tokens appended without a model step.

    Attributes:
        token_ids: The canonical tokens (empty when no stable jump exists).
        text: Their text (a prefix of the forced continuation).
        state: The DFA state after the jump.
    """

    token_ids: tuple[int, ...]
    text: str
    state: int


class TokenAutomaton:
    """The statement grammar lifted to a tokenizer's vocabulary.

    Args:
        grammar: The character DFA.
        tokenizer: The model's Hugging Face tokenizer.
        vocab_size: Width of the model's logits (may exceed ``len(tokenizer)``; extra ids are never allowed).
        device: Where the boolean masks live (the model's device).
    """

    def __init__(
        self,
        grammar: StatementGrammar,
        tokenizer: Any,
        vocab_size: int | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.grammar = grammar
        self.tokenizer = tokenizer
        self.texts = token_texts(tokenizer)
        self.vocab_size = int(vocab_size) if vocab_size is not None else len(self.texts)
        if self.vocab_size < len(self.texts):
            # Model logits narrower than the tokenizer: ids beyond the logits can never be produced.
            self.texts = self.texts[: self.vocab_size]
        self.device = torch.device(device)
        self.special_ids = special_token_ids(tokenizer)
        self._anchor = _anchor_id(tokenizer, self.special_ids)
        self._anchor_text = tokenizer.decode([self._anchor], **_DECODE_KW)
        table, char_class = grammar.table
        self._table = table
        self._dead = grammar.num_states
        cand: list[int] = []
        rows: list[list[int]] = []
        for i, t in enumerate(self.texts):
            if not t:
                continue
            row = []
            for ch in t:
                c = char_class.get(ch)
                if c is None:
                    c = 1 if is_word_char(ch) else 2
                if c == 2:
                    break
                row.append(c)
            else:
                cand.append(i)
                rows.append(row)
        # Candidates sorted by decreasing length: at character j the still-running tokens are a prefix.
        order = sorted(range(len(rows)), key=lambda j: -len(rows[j]))
        width = max((len(r) for r in rows), default=1)
        cls = np.zeros((len(rows), width), dtype=np.int32)
        for new, old in enumerate(order):
            cls[new, : len(rows[old])] = rows[old]
        self._cand = np.asarray([cand[old] for old in order], dtype=np.int64)
        self._lens = np.asarray([len(rows[old]) for old in order], dtype=np.int64)
        self._cls_t = np.ascontiguousarray(cls.T)  # [width, candidates]: column j is contiguous
        self._num_classes = table.shape[1]
        self._table_flat = table.reshape(-1)
        self._next: dict[int, np.ndarray] = {}
        self._mask: dict[int, Tensor] = {}
        self._jump: dict[tuple[int, str | None], Jump] = {}

    # ------------------------------------------------------------------ per-state tables
    def next_states(self, state: int) -> np.ndarray:
        """``int32`` array ``[vocab]``: the DFA state after each token from ``state`` (``DEAD`` if not allowed)."""
        got = self._next.get(state)
        if got is not None:
            return got
        if not 0 <= state < self.grammar.num_states:
            raise EntitylensError(f"DFA state {state} does not exist; pass a state of the automaton's grammar")
        # Walk all candidate tokens at once, dropping dead ones as soon as they die.
        idx = np.arange(len(self._cand))
        cur = np.full(len(self._cand), state, dtype=np.int64)
        final = np.full(len(self._cand), self._dead, dtype=np.int64)
        for j in range(self._cls_t.shape[0]):
            if len(idx) == 0:
                break
            cur = self._table_flat[cur * self._num_classes + self._cls_t[j, idx]]
            ended = self._lens[idx] == j + 1
            final[idx[ended]] = cur[ended]
            keep = ~ended & (cur != self._dead)
            idx, cur = idx[keep], cur[keep]
        s = final
        out = np.full(self.vocab_size, DEAD, dtype=np.int32)
        alive = s != self._dead
        out[self._cand[alive]] = s[alive]
        self._next[state] = out
        return out

    def allowed(self, state: int) -> Bool[Tensor, " vocab"]:
        """Boolean mask of the tokens allowed in ``state``, on the automaton's device (memoised)."""
        got = self._mask.get(state)
        if got is None:
            nxt = self.next_states(state)
            if self.grammar.accepts(state):
                got = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
            else:
                got = torch.from_numpy(nxt != DEAD).to(self.device)
                if not bool(got.any()):
                    raise EntitylensError(
                        f"no token of this tokenizer can continue the statement after {self._describe(state)}; "
                        "the tokenizer lacks the grammar's characters, use a model with a text tokenizer"
                    )
            self._mask[state] = got
        return got

    def allowed_ids(self, state: int) -> np.ndarray:
        """Sorted ids of the tokens allowed in ``state``."""
        return np.flatnonzero(self.next_states(state) != DEAD)

    def next_state(self, state: int, token_id: int) -> int:
        """The DFA state after ``token_id`` in ``state`` (``DEAD`` if the token is not allowed)."""
        if state == DEAD or not 0 <= token_id < self.vocab_size:
            return DEAD
        return int(self.next_states(state)[token_id])

    def text(self, token_ids: Sequence[int]) -> str:
        """Concatenated in-context text of ``token_ids`` (special tokens contribute nothing).

        For ASCII text (everything the grammar allows) this equals :meth:`decode`.
        """
        return "".join(self.texts[i] or "" for i in token_ids)

    def decode(self, token_ids: Sequence[int]) -> str:
        """The tokenizer's decoding of ``token_ids`` as a continuation of earlier text (multi-byte safe)."""
        full = self.tokenizer.decode([self._anchor, *token_ids], **_DECODE_KW)
        return full[len(self._anchor_text) :] if full.startswith(self._anchor_text) else full

    def walk(self, state: int, token_ids: Sequence[int]) -> int:
        """The DFA state after ``token_ids`` from ``state`` (``DEAD`` as soon as one is not allowed)."""
        for t in token_ids:
            state = self.next_state(state, int(t))
            if state == DEAD:
                return DEAD
        return state

    def _describe(self, state: int) -> str:
        si = self.grammar.info(state)
        return f"state {state} ({si.kind}, box {si.box})"

    # ------------------------------------------------------------------ jump-forward
    def jump(self, state: int, left_context: str | None = None) -> Jump:
        """Canonical tokens for the forced continuation of ``state``.

        The forced text is tokenized after ``left_context + segment_done`` (the current literal written so
        far) and before each text that may legally follow it. Only the leading tokens that are identical in
        all those tokenizations, that start exactly at the segment boundary and whose text is a prefix of the
        forced continuation are returned; the rest (if any) must be decoded token by token.

        Args:
            state: A DFA state.
            left_context: Text written before the current literal segment. ``None`` uses a representative
                context (``"... contains the car"``), which is what every box separator follows; pass the
                prompt for the first segment.

        Returns:
            The jump (possibly empty: no tokens, same state).
        """
        key = (state, left_context) if left_context is None else None
        if key is not None and key in self._jump:
            return self._jump[key]
        forced = self.grammar.forced(state)
        result = Jump((), "", state)
        if forced:
            si = self.grammar.info(state)
            ctx = (REPRESENTATIVE_LEFT_CONTEXT if left_context is None else left_context) + si.segment_done
            result = self._stable_jump(state, ctx, forced)
        if key is not None:
            self._jump[key] = result
        return result

    def _follows(self, state: int) -> list[str]:
        follows = []
        g = self.grammar
        if g.step(state, " ") != DEAD:
            follows += [" the", " nothing"]
        if g.step(state, ",") != DEAD:
            follows.append(", Box")
        if g.step(state, ".") != DEAD:
            follows.append(".")
        return follows or [""]

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _stable_jump(self, state: int, ctx: str, forced: str) -> Jump:
        base = self._encode(ctx)
        end_state = self.grammar.walk(state, forced)
        tails = []
        for follow in self._follows(end_state):
            full = self._encode(ctx + forced + follow)
            if full[: len(base)] != base:
                return Jump((), "", state)  # the boundary before the forced text is not a token boundary
            tails.append(full[len(base) :])
        common: list[int] = []
        for toks in zip(*tails, strict=False):
            if any(t != toks[0] for t in toks):
                break
            common.append(toks[0])
        best = 0
        text = ""
        for n in range(1, len(common) + 1):
            t = common[n - 1]
            piece = self.texts[t] if t < len(self.texts) else None
            if not piece:
                break
            text_n = text + piece
            if not forced.startswith(text_n):
                break
            text = text_n
            best = n
        text = self.text(common[:best])
        return Jump(tuple(common[:best]), text, self.grammar.walk(state, text))


_AUTOMATA: weakref.WeakKeyDictionary[Any, dict[tuple[Any, ...], TokenAutomaton]] = weakref.WeakKeyDictionary()


def get_automaton(
    tokenizer: Any, grammar: StatementGrammar, vocab_size: int | None = None, device: str | torch.device = "cpu"
) -> TokenAutomaton:
    """The (cached) token automaton of ``grammar`` over ``tokenizer`` with masks on ``device``."""
    per_tok = _AUTOMATA.setdefault(tokenizer, {})
    key = (grammar, vocab_size, str(torch.device(device)))
    aut = per_tok.get(key)
    if aut is None:
        aut = TokenAutomaton(grammar, tokenizer, vocab_size=vocab_size, device=device)
        per_tok[key] = aut
    return aut
