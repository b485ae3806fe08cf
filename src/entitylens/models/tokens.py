"""Token-id helpers that work the same for every model family.

Objects can tokenize to several tokens (``" eggnog"`` is 3 tokens for SmolLM2), so downstream code
asks for each object's full id sequence with :func:`object_token_ids` rather than assuming one token.

Tokenize prompts with :func:`encode` (or ``bridge.to_tokens``, which :func:`~entitylens.models.load_model`
configures the same way): it adds BOS exactly when the model family's own tokenizer does.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from entitylens.errors import EntitylensError
from entitylens.models.hf import tokenizer_prepends_bos

_ANCHOR = "the"
"""Objects always follow "the" in boxes-task prompts, so ids are taken in that context."""


def get_tokenizer(model_or_tokenizer: Any) -> Any:
    """The tokenizer of a bridge (``.tokenizer``) or the tokenizer itself."""
    from transformers import PreTrainedTokenizerBase

    if isinstance(model_or_tokenizer, PreTrainedTokenizerBase):
        return model_or_tokenizer
    tok = getattr(model_or_tokenizer, "tokenizer", None)
    if isinstance(tok, PreTrainedTokenizerBase):
        return tok
    raise EntitylensError(
        f"{type(model_or_tokenizer).__name__} has no tokenizer; pass a loaded model or a Hugging Face tokenizer"
    )


def _ids(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def text_token_ids(model_or_tokenizer: Any, text: str, leading_space: bool = True) -> tuple[int, ...]:
    """Ids of ``text`` as it appears inside a prompt, after a word (``leading_space``) or at the start.

    With ``leading_space=True`` the ids are those of ``" " + text`` in the context ``"the " + text``
    (the ids of ``"the"`` removed), which is how an object appears in a boxes prompt. This also gives
    the right answer for SentencePiece tokenizers that insert a word-start marker on their own.

    Raises:
        EntitylensError: Empty text, or a tokenizer whose tokens for ``"the"`` are not a prefix of the
            tokens of ``"the " + text`` (the context method does not apply).
    """
    if not text:
        raise EntitylensError("cannot tokenize an empty object name; remove it from the object list")
    tok = get_tokenizer(model_or_tokenizer)
    if not leading_space:
        return tuple(_ids(tok, text))
    anchor = _ids(tok, _ANCHOR)
    full = _ids(tok, f"{_ANCHOR} {text}")
    if full[: len(anchor)] != anchor or len(full) == len(anchor):
        raise EntitylensError(
            f"tokenizer merges 'the' with ' {text}', so the object's own ids are ambiguous; use "
            "leading_space=False or a different object name"
        )
    return tuple(full[len(anchor) :])


def object_token_ids(
    model_or_tokenizer: Any, objects: Iterable[str], leading_space: bool = True
) -> dict[str, tuple[int, ...]]:
    """Each object's token ids for a model (multi-token objects give several ids).

    Args:
        model_or_tokenizer: A bridge from :func:`~entitylens.models.load_model` or a HF tokenizer.
        objects: Object names (``"bottle"``, ``"eggnog"``...).
        leading_space: Ids of ``" obj"`` as it follows a word in a prompt (default), or of ``"obj"``
            at the start of a text.

    Returns:
        ``{object: ids}`` in the order given; ``tokenizer.decode(ids)`` gives back ``" obj"`` (or ``"obj"``).
    """
    return {obj: text_token_ids(model_or_tokenizer, obj, leading_space) for obj in objects}


def first_token_ids(model_or_tokenizer: Any, objects: Iterable[str], leading_space: bool = True) -> dict[str, int]:
    """Each object's first token id (what a next-token probe of ``"... contains the"`` reads off).

    Several objects can share a first token; :func:`shared_first_tokens` lists such clashes.
    """
    return {obj: ids[0] for obj, ids in object_token_ids(model_or_tokenizer, objects, leading_space).items()}


def shared_first_tokens(
    model_or_tokenizer: Any, objects: Iterable[str], leading_space: bool = True
) -> dict[int, tuple[str, ...]]:
    """First-token ids shared by two or more objects: ``{token_id: (objects...)}`` (empty when none)."""
    groups: dict[int, list[str]] = {}
    for obj, tid in first_token_ids(model_or_tokenizer, objects, leading_space).items():
        groups.setdefault(tid, []).append(obj)
    return {tid: tuple(objs) for tid, objs in groups.items() if len(objs) > 1}


def model_prepends_bos(model_or_tokenizer: Any) -> bool:
    """Whether prompts for this model start with BOS: the one BOS rule of every entitylens stage.

    BOS is prepended exactly when the model's *own* tokenizer does it: Llama/Gemma/Mistral/DeepSeek
    tokenizers add one, GPT-2-style ones (SmolLM2, Qwen2/2.5, OLMo, Phi) do not. TransformerLens
    rebuilds a bridge's tokenizer so that it *always* adds BOS, so the bridge's tokenizer cannot be
    asked; the answer comes from, in order:

    1. ``ModelInfo.prepends_bos`` of a model loaded by :func:`~entitylens.models.load_model` (read off the
       original tokenizer before TransformerLens touched it);
    2. ``cfg.default_prepend_bos`` of another ``TransformerBridge``;
    3. the tokenizer itself, for a plain Hugging Face tokenizer.

    Args:
        model_or_tokenizer: A bridge from :func:`~entitylens.models.load_model`, another bridge, or a
            Hugging Face tokenizer.

    Returns:
        True when prompts get a BOS token.
    """
    info = getattr(model_or_tokenizer, "entitylens_info", None)
    if info is not None:
        return bool(info.prepends_bos)
    cfg = getattr(model_or_tokenizer, "cfg", None)
    if cfg is not None and hasattr(cfg, "default_prepend_bos"):
        return bool(cfg.default_prepend_bos)

    return tokenizer_prepends_bos(get_tokenizer(model_or_tokenizer))


def prompt_ids(tokenizer: Any, text: str, bos: bool) -> list[int]:
    """Token ids of a prompt: the tokenizer's ids without special tokens, with the BOS id first if ``bos``.

    The low-level half of the BOS rule (:func:`model_prepends_bos` decides ``bos``); the decoder, the
    activation cache and the patching pairs all tokenize prompts through it (or through
    :func:`~entitylens.activations.roles.tokenize_with_offsets`, which gives the same ids), so a prompt
    gets the same tokens in every stage.

    Args:
        tokenizer: A Hugging Face tokenizer.
        text: The prompt (plain text or rendered chat template).
        bos: Prepend ``tokenizer.bos_token_id``.

    Returns:
        The ids.

    Raises:
        EntitylensError: ``bos`` is requested but the tokenizer has no BOS token.
    """
    ids = [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
    if bos:
        if tokenizer.bos_token_id is None:
            raise EntitylensError("the model wants a BOS token but its tokenizer has none; load it with its tokenizer")
        ids = [int(tokenizer.bos_token_id), *ids]
    return ids


def encode(model_or_tokenizer: Any, text: str, bos: bool | None = None) -> Int[Tensor, " pos"]:
    """Token ids of ``text`` for a model, with BOS handled the way the model family does it.

    Args:
        model_or_tokenizer: A bridge from :func:`~entitylens.models.load_model` or a HF tokenizer.
        text: The text (a whole prompt, or chat-template output).
        bos: Prepend the BOS token? ``None`` (default) follows the family: BOS for Llama/Gemma/Mistral/
            DeepSeek, none for GPT-2-style tokenizers (SmolLM2, OLMo, Phi); a text that already starts
            with the BOS token string (chat-template output) never gets a second one.

    Returns:
        1-D int64 tensor of ids (on CPU).
    """
    tok = get_tokenizer(model_or_tokenizer)
    ids = _ids(tok, text)
    bos_token = tok.bos_token
    if bos is None:
        bos = model_prepends_bos(model_or_tokenizer) and not (bos_token and text.startswith(bos_token))
    if bos:
        if tok.bos_token_id is None:
            raise EntitylensError("this tokenizer has no BOS token; call encode(..., bos=False)")
        ids = [tok.bos_token_id, *ids]
    return torch.tensor(ids, dtype=torch.long)
