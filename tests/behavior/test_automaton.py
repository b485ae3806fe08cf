"""Allowed-token sets of the token automaton, checked by brute force and against outlines_core."""

from __future__ import annotations

import collections
from typing import Any

import pytest
import regex as regex_mod

from entitylens.behavior.automaton import TokenAutomaton, token_texts
from entitylens.behavior.grammar import DEAD, StatementGrammar
from entitylens.errors import EntitylensError

G2 = StatementGrammar(num_boxes=2)
G7 = StatementGrammar()
STATEMENT = (
    "\nStatement: Box 0 contains the car and the map, Box 1 contains nothing, Box 2 contains, Box 3 contains the "
    "umbrella, Box 4 contains the eggnog and the television, Box 5 contains the apple, Box 6 contains the bottle."
)
PROMPT_END = "Description: Box 0 contains the car. Put the map into Box 0."


def _training_text() -> list[str]:
    return [STATEMENT, PROMPT_END, "Box 1 contains the coat and the bottle, Box 2 contains nothing."] * 3


@pytest.fixture(scope="module")
def sentencepiece_tokenizer() -> Any:
    """A SentencePiece-style tokenizer: "▁" marks spaces, a lone decode drops the first piece's space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    alphabet = sorted(set("".join(_training_text()).replace(" ", "\u2581")) | set("abcdefghijklmnopqrstuvwxyz"))
    trainer = trainers.BpeTrainer(
        vocab_size=150, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(_training_text(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def merging_tokenizer() -> Any:
    """A BPE without pre-tokenization: merges run across spaces and punctuation (",▁Box▁1▁contains▁nothing").

    Forced text is then rarely a token boundary, the hard case for jump-forward.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    alphabet = sorted(set("".join(_training_text()).replace(" ", "\u2581")) | set("abcdefghijklmnopqrstuvwxyz"))
    trainer = trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(_training_text(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _shortest_strings(grammar: StatementGrammar) -> dict[int, str]:
    """A text reaching every DFA state (breadth-first over the characters the grammar uses)."""
    chars = sorted(set(grammar.literal_chars) | {"a"})
    seen = {grammar.initial_state: ""}
    queue = collections.deque([grammar.initial_state])
    while queue:
        s = queue.popleft()
        for c in chars:
            n = grammar.step(s, c)
            if n != DEAD and n not in seen:
                seen[n] = seen[s] + c
                queue.append(n)
    return seen


def _reference_texts(tok: Any) -> dict[int, str]:
    """Each token's text after a context, by decoding context+token (a different context than the code's)."""
    ctx = tok.encode("the map", add_special_tokens=False)
    kw = {"skip_special_tokens": False, "clean_up_tokenization_spaces": False}
    base = tok.decode(ctx, **kw)
    special = set(tok.all_special_ids)
    out = {}
    for i in range(len(tok)):
        if i in special:
            continue
        d = tok.decode([*ctx, i], **kw)
        assert d.startswith(base)
        out[i] = d[len(base) :]
    return out


def _brute_force_check(tok: Any, grammar: StatementGrammar) -> int:
    aut = TokenAutomaton(grammar, tok)
    texts = _reference_texts(tok)
    reach = _shortest_strings(grammar)
    assert len(reach) == grammar.num_states  # every state is reachable
    checked = 0
    for state, prefix in reach.items():
        if grammar.accepts(state):
            assert not aut.allowed(state).any()  # nothing after the final "."
            continue
        want = {
            i for i, t in texts.items() if t and regex_mod.fullmatch(grammar.regex, prefix + t, partial=True)
        }
        got = set(aut.allowed_ids(state).tolist())
        assert got == want, (state, prefix, sorted(got ^ want)[:10])
        assert set(aut.allowed(state).nonzero().flatten().tolist()) == want
        for i in want:
            assert aut.next_state(state, i) == grammar.walk(state, texts[i])
        checked += len(want)
    return checked


def test_brute_force_byte_level_tokenizer(tiny_tokenizer: Any) -> None:
    assert _brute_force_check(tiny_tokenizer, G2) > 500


def test_brute_force_sentencepiece_style_tokenizer(sentencepiece_tokenizer: Any) -> None:
    tok = sentencepiece_tokenizer
    box = tok.convert_tokens_to_ids("\u2581Box")
    assert box != tok.unk_token_id and tok.decode([box]) == "Box"  # the lone decode loses the space
    assert token_texts(tok)[box] == " Box"  # in context it is kept
    assert _brute_force_check(tok, G2) > 100


def test_brute_force_merging_tokenizer(merging_tokenizer: Any) -> None:
    tok = merging_tokenizer
    assert any(" Box 1 contains" in (t or "") for t in token_texts(tok))  # tokens span forced text and more
    assert _brute_force_check(tok, G2) > 100


def test_special_tokens_never_allowed(tiny_tokenizer: Any) -> None:
    aut = TokenAutomaton(G7, tiny_tokenizer)
    special = set(tiny_tokenizer.all_special_ids)
    assert special
    for state in range(G7.num_states):
        if not G7.accepts(state):
            assert not special & set(aut.allowed_ids(state).tolist())


def test_logits_wider_than_tokenizer(tiny_tokenizer: Any) -> None:
    aut = TokenAutomaton(G7, tiny_tokenizer, vocab_size=len(tiny_tokenizer) + 13)
    after = G7.word_states(0)[2]
    mask = aut.allowed(after)
    assert mask.shape == (len(tiny_tokenizer) + 13,)
    assert not mask[len(tiny_tokenizer) :].any()
    assert aut.next_state(after, len(tiny_tokenizer) + 5) == DEAD


def test_multi_token_objects_walk_in_word(tiny_tokenizer: Any) -> None:
    aut = TokenAutomaton(G7, tiny_tokenizer)
    split = 0
    for obj in ("umbrella", "eggnog", "television", "newspaper", "medicine", "car"):
        ids = tiny_tokenizer.encode(" " + obj, add_special_tokens=False)
        split += len(ids) > 1
        state = G7.walk(G7.initial_state, "\nStatement: Box 0 contains the")
        for i in ids:
            assert aut.allowed(state)[i]
            state = aut.next_state(state, i)
            assert G7.info(state).kind in ("after_space", "in_word")
        assert state == G7.word_states(0)[2]
    assert split >= 2  # the tiny vocabulary splits several objects into multiple tokens


def _canonical_tokens_after(tok: Any, text: str, start: int, end: int) -> list[int]:
    """Tokens of ``text`` covering characters [start, end), asserting they align with the boundaries."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = [i for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True) if a >= start and b <= end]
    covered = [(a, b) for a, b in enc["offset_mapping"] if a >= start and b <= end]
    assert covered and covered[0][0] == start and covered[-1][1] == end
    return ids


@pytest.mark.parametrize("which", ["tiny", "sentencepiece"])
def test_jump_tokens_are_the_canonical_tokens_inside_a_statement(
    which: str, tiny_tokenizer: Any, sentencepiece_tokenizer: Any
) -> None:
    tok = tiny_tokenizer if which == "tiny" else sentencepiece_tokenizer
    aut = TokenAutomaton(G7, tok)
    text = PROMPT_END + STATEMENT
    state = G7.walk(G7.initial_state, STATEMENT[: STATEMENT.index(", Box 1") + 1])
    if which == "sentencepiece":
        # "▁contains," is one token here, so the end of " Box k contains" is unstable where "," may follow.
        assert tok.convert_tokens_to_ids("\u2581contains,") != tok.unk_token_id
    for k in range(1, 7):
        jump = aut.jump(state)
        assert G7.forced(state) == f" Box {k} contains"
        # Box 6 is followed by " word" or "." only, never ",": there the whole segment is stable.
        full = which == "tiny" or k == 6
        assert jump.text == (f" Box {k} contains" if full else f" Box {k}")
        start = STATEMENT.index(f", Box {k}") + 1
        offset = len(PROMPT_END) + start
        assert list(jump.token_ids) == _canonical_tokens_after(tok, text, offset, offset + len(jump.text))
        assert jump.state == G7.walk(state, jump.text) == aut.walk(state, jump.token_ids)
        if k < 6:
            state = G7.walk(jump.state, STATEMENT[start + len(jump.text) : STATEMENT.index(f", Box {k + 1}") + 1])


def test_jump_with_merging_tokenizer_is_partial_and_consistent(merging_tokenizer: Any) -> None:
    """Where forced text is not a token boundary, the jump stops early; what it emits is still right."""
    aut = TokenAutomaton(G7, merging_tokenizer)
    partial = 0
    for state in range(G7.num_states):
        forced = G7.forced(state)
        if not forced:
            continue
        jump = aut.jump(state)
        assert forced.startswith(jump.text) and aut.text(jump.token_ids) == jump.text
        assert jump.state == G7.walk(state, jump.text) == aut.walk(state, jump.token_ids)
        partial += len(jump.text) < len(forced)
    assert partial > 0


def test_smollm2_jump_tokens_by_hand(smollm2_tokenizer: Any) -> None:
    tok = smollm2_tokenizer
    aut = TokenAutomaton(G7, tok)
    start = aut.jump(G7.initial_state, left_context="Put the coat into Box 3.")
    assert [tok.decode([i]) for i in start.token_ids] == ["\n", "Statement", ":", " Box", " ", "0", " contains"]
    assert start.state == G7.word_states(0)[0]
    sep = G7.step(G7.word_states(2)[2], ",")
    assert [tok.decode([i]) for i in aut.jump(sep).token_ids] == [" Box", " ", "3", " contains"]
    # " Bo" + "x" is not a token boundary in SmolLM2 (" Box" is one token): nothing stable to jump over.
    mid = G7.walk(sep, " Bo")
    assert aut.jump(mid).token_ids == () and aut.jump(mid).state == mid
    # In a word nothing is forced.
    assert aut.jump(G7.word_states(2)[2]).token_ids == ()


def test_missing_characters_raise_one_line_error() -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # A byte-level BPE without the byte alphabet, trained on text without digits: "Box 0" cannot be written.
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(
        ["\nStatement: Box contains the car, Box contains nothing."],
        trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>"], show_progress=False),
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    aut = TokenAutomaton(G7, tok)
    before_digit = G7.walk(G7.initial_state, "\nStatement: Box ")
    with pytest.raises(EntitylensError, match="no token of this tokenizer") as err:
        aut.allowed(before_digit)
    assert "\n" not in str(err.value)
    with pytest.raises(EntitylensError, match="does not exist"):
        aut.next_states(10_000)


# ------------------------------------------------------------------------------------ against outlines_core
def _outlines_index(tok: Any, grammar: StatementGrammar) -> Any:
    pytest.importorskip("outlines")
    from outlines.backends.outlines_core import OutlinesCoreBackend
    from outlines.models.transformers import TransformerTokenizer
    from outlines_core import Index

    ttok = TransformerTokenizer(tok)
    vocab = OutlinesCoreBackend.create_outlines_core_vocabulary(
        ttok.get_vocab(), ttok.eos_token_id, ttok.eos_token, ttok.convert_token_to_string
    )
    return Index(grammar.regex, vocab)


def _compare_with_outlines(tok: Any, grammar: StatementGrammar, text: str) -> int:
    aut = TokenAutomaton(grammar, tok)
    index = _outlines_index(tok, grammar)
    eos = tok.eos_token_id
    ids = tok.encode(text, add_special_tokens=False)
    assert aut.text(ids) == text
    o_state, state, compared = index.get_initial_state(), grammar.initial_state, 0
    for i in ids:
        want = set(index.get_allowed_tokens(o_state)) - {eos}
        assert set(aut.allowed_ids(state).tolist()) == want
        compared += 1
        o_state, state = index.get_next_state(o_state, i), aut.next_state(state, i)
        assert state != DEAD
    assert grammar.accepts(state) and index.is_final_state(o_state)
    return compared


def test_allowed_sets_equal_outlines_core_tiny(tiny_tokenizer: Any) -> None:
    assert _compare_with_outlines(tiny_tokenizer, G7, STATEMENT) > 40


def test_allowed_sets_equal_outlines_core_smollm2(smollm2_tokenizer: Any) -> None:
    assert _compare_with_outlines(smollm2_tokenizer, G7, STATEMENT) > 40
