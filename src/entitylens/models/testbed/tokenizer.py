"""The testbed's word-level tokenizer: one token per word, punctuation mark and box label.

Every word of the testbed's corpora is one token: the 198 task objects (``BNC_OBJECTS`` +
``DISJOINT_OBJECTS``), the box labels ``B0`` ... ``B6`` of the compact format, the operation verbs, the
Python tokens of the code arm, the words of the prose arm, and the words of the K&S / KST24 prompt
(``Box``, ``contains``, ``Statement``, ...), so the paper's protocol also runs on the testbed models.

Design (a ``tokenizers`` ``WordLevel`` model):

* pre-tokenizer: a regex split into words (a letter followed by letters/digits/``-``/``_``), numbers,
  single punctuation marks and whitespace runs, each word keeping *its leading space* (GPT-2 style),
  followed by the byte-level character map (``" car"`` is stored as ``"Ġcar"``);
* decoder: byte-level, so decoding concatenates the pieces and gives back the text exactly
  (``"Box 0 contains the car, Box 1"`` round-trips, which the KST24 statement grammar needs: ``","``
  is a token without a space, ``" car"`` one with a space);
* a word that appears at the start of a text has a second, space-less token (``"B0"``, ``"Given"``);
  unknown words map to ``<unk>``;
* specials ``<pad>`` (0), ``<s>`` (1, prepended to every encoding, Llama-style), ``</s>`` (2),
  ``<unk>`` (3). Fast-tokenizer character offsets work, so the role finder maps spans to tokens.

The vocabulary is built from fixed word lists in a fixed order, so :func:`tokenizer_json` is the same
string in every process; the shipped checkpoints store it as ``tokenizer.json`` and a test checks that it
equals the one built here.
"""

from __future__ import annotations

import functools
from typing import Any

from entitylens.task.compact import BOX_LABELS, OBJECTS

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<s>", "</s>", "<unk>")
"""Special tokens, in id order (pad=0, bos=1, eos=2, unk=3)."""

PAD, BOS, EOS, UNK = SPECIAL_TOKENS

COMPACT_WORDS: tuple[str, ...] = (*BOX_LABELS, ";", ".", "|", "put", "move", "remove")
"""Structural tokens of the compact boxes format (see :mod:`entitylens.testbed.data`)."""

CODE_WORDS: tuple[str, ...] = (
    "=", "==", "[", "]", "{", "}", "(", ")", ",", ":", "assert", "append", "remove", "pop", "insert",
    "extend",
    "clear", "add", "discard", "update", "set", "sorted", "len", "x", "y", "0", "1", "2", "3",
)  # fmt: skip
"""Python tokens of the code arm (objects and box labels are shared with the boxes text)."""

PROSE_WORDS: tuple[str, ...] = (
    "the", "a", "is", "and", "not", "very", "quite", "box", "thing", "near", "like", "looks", "it",
    "red", "blue", "green", "yellow", "black", "white", "brown", "grey",
    "old", "new", "small", "big", "heavy", "light", "soft", "hard", "cheap", "dear", "clean", "dirty",
    "round", "flat", "long", "short", "warm", "cold", "dry", "wet", "plain", "bright", "dark",
)  # fmt: skip
"""Words of the prose arm: descriptions with no state changes."""

KST24_WORDS: tuple[str, ...] = (
    "Given", "the", "description", "after", '"', "Description", ":", "write", "a", "true", "statement",
    "about", "all", "boxes", "and", "their", "contents", "to", "according", "Statement", "Box", "contains",
    "nothing", "is", "empty", "Move", "from", "Remove", "Put", "into", "The", ",", ".",
    "0", "1", "2", "3", "4", "5", "6",
    # AltForms, move-contents and the P24 next-token form
    "in", "are", "there", "There", "Container", "A", "B", "C", "D", "E", "F", "G", "Pick", "up", "place",
    "it", "them", "Take", "out", "of", "Place", "inside",
)  # fmt: skip
"""Words of the K&S sentences (all variants), the KST24 prompt and the P24 form (so those protocols run)."""

START_WORDS: tuple[str, ...] = ("B0", "Given", "Box", "Description", "Statement", "The", "the", "a", "There")
"""Words that may start a text; they get a second, space-less token."""

NO_SPACE_MARKS: tuple[str, ...] = (",", ".", ":", '"', "\n")
"""Punctuation that K&S / KST24 text writes without a space in front."""

SPLIT_PATTERN = r" ?[A-Za-z][A-Za-z0-9_\-]*| ?[0-9]+| ?==| ?[^\sA-Za-z0-9]|\s+(?!\S)|\s+"
"""Pre-tokenizer regex: words / numbers / ``==`` / one punctuation mark, each with its leading space."""


def _unique(words: tuple[str, ...]) -> tuple[str, ...]:
    seen: set[str] = set()
    out = []
    for w in words:
        if w not in seen:
            seen.add(w)
            out.append(w)
    return tuple(out)


def vocabulary_words() -> tuple[str, ...]:
    """All words of the testbed vocabulary (without spaces), in id order after the specials."""
    return _unique(COMPACT_WORDS + OBJECTS + CODE_WORDS + PROSE_WORDS + KST24_WORDS)


def _pre_tokenizer() -> Any:
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


@functools.lru_cache(maxsize=1)
def tokenizer_json() -> str:
    """The serialized ``tokenizers`` tokenizer (deterministic: same string in every process)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    pre = _pre_tokenizer()

    def key(surface: str) -> str:
        pieces = pre.pre_tokenize_str(surface)
        assert len(pieces) == 1, (surface, pieces)
        return pieces[0][0]

    vocab: dict[str, int] = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    surfaces: list[str] = []
    for w in vocabulary_words():
        surfaces.append(" " + w if w != "\n" else w)
        if w in START_WORDS or w in NO_SPACE_MARKS:
            surfaces.append(w)
    surfaces.append("\n")
    for s in surfaces:
        k = key(s)
        if k not in vocab:
            vocab[k] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS}:1 $B:1", special_tokens=[(BOS, vocab[BOS])]
    )
    return tok.to_str()


TOKENIZER_NAME = "entitylens/testbed-wordlevel"


def build_tokenizer(json_text: str | None = None) -> Any:
    """The testbed tokenizer as a ``PreTrainedTokenizerFast`` (left padding, BOS prepended).

    Args:
        json_text: A serialized tokenizer (e.g. a checkpoint's ``tokenizer.json``); default: the one
            built by :func:`tokenizer_json`.

    Returns:
        The tokenizer.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(json_text if json_text is not None else tokenizer_json())
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
        name_or_path=TOKENIZER_NAME,
        add_bos_token=True,
        clean_up_tokenization_spaces=False,
    )
    # TransformerLens re-loads a tokenizer from ``name_or_path`` when it thinks BOS is not added; record it.
    tok.init_kwargs["name_or_path"] = TOKENIZER_NAME
    tok.init_kwargs["add_bos_token"] = True
    return tok


@functools.lru_cache(maxsize=1)
def _cached_tokenizer() -> Any:
    return build_tokenizer()


def testbed_tokenizer() -> Any:
    """A shared instance of :func:`build_tokenizer` (do not mutate it)."""
    return _cached_tokenizer()


def word_ids(words: tuple[str, ...] | list[str], tokenizer: Any | None = None) -> list[int]:
    """Token id of each word as it appears after a space (``" car"``).

    Raises:
        KeyError: If a word is not a single known token.
    """
    tok = tokenizer if tokenizer is not None else testbed_tokenizer()
    out = []
    for w in words:
        ids = tok(" " + w, add_special_tokens=False)["input_ids"]
        if len(ids) != 1 or ids[0] == tok.unk_token_id:
            raise KeyError(w)
        out.append(int(ids[0]))
    return out
