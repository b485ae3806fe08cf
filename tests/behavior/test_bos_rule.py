"""One BOS rule in every stage: BOS first exactly when the model's *own* tokenizer puts it there.

TransformerLens rebuilds a bridge's tokenizer so that it always adds BOS; SmolLM2's own tokenizer (the
GGUF's, ``add_bos_token=False``) adds none, and the paper's stack (outlines over transformers) feeds
the prompt as that tokenizer encodes it. The reference here is the model's own tokenizer loaded on its
own (:func:`entitylens.models.load_tokenizer`), never the bridge's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from entitylens.activations.roles import tokenize_with_offsets
from entitylens.behavior.decode import DecodeConfig, generate_statements
from entitylens.models import load_model, load_tokenizer, model_prepends_bos
from entitylens.patching.pairs import TextPair, to_patch_pairs


@contextmanager
def recorded_inputs(model: Any) -> Iterator[list[list[int]]]:
    """Record the ``input_ids`` of every decoding forward of the Hugging Face model inside ``model``."""
    # The decoder checks once per model that the unwrapped HF model agrees with the bridge; do that first.
    generate_statements(model, ["Box 0"], DecodeConfig(forced="step", batch_size=1), None, max_new_tokens=1)
    calls: list[list[int]] = []

    def pre(module: Any, args: Any, kwargs: Any) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        calls.append(ids[0].tolist())

    handle = model.original_model.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def own_ids(spec: str, text: str) -> list[int]:
    """Ids of ``text`` as the model's own tokenizer encodes a plain prompt (its default special tokens)."""
    return list(load_tokenizer(spec)(text)["input_ids"])


PROMPT = "Description: Box 0 contains the car, Box 1 contains nothing. Remove the car from Box 0."


@pytest.mark.parametrize(("spec", "bos"), [("tiny:llama", True), ("tiny:gpt2", False)])
def test_tiny_models_follow_their_own_tokenizer(spec: str, bos: bool) -> None:
    model = load_model(spec)
    assert model_prepends_bos(model) is bos
    expected = own_ids(spec, PROMPT)
    assert (expected[0] == model.tokenizer.bos_token_id) is bos
    with recorded_inputs(model) as calls:
        generate_statements(model, [PROMPT], DecodeConfig(forced="step", batch_size=1), None, max_new_tokens=3)
    assert calls[0] == expected
    ids, _ = tokenize_with_offsets(model.tokenizer, PROMPT, prepend_bos=model_prepends_bos(model))
    assert ids == expected


def test_smollm2_prompts_get_no_bos_in_eval_cache_and_patch(smollm2: Any) -> None:
    spec = "smollm2-135m-instruct"
    expected = own_ids(spec, PROMPT)
    assert expected[0] != smollm2.tokenizer.bos_token_id  # <|im_start|> is SmolLM2's BOS; its tokenizer adds none
    assert model_prepends_bos(smollm2) is False
    with recorded_inputs(smollm2) as calls:
        generate_statements(smollm2, [PROMPT], DecodeConfig(forced="step", batch_size=1), None, max_new_tokens=2)
    assert calls[0] == expected  # eval
    ids, _ = tokenize_with_offsets(smollm2.tokenizer, PROMPT, prepend_bos=model_prepends_bos(smollm2))
    assert ids == expected  # cache (and the probes, which read the cache)
    pair = TextPair(
        kind="init_object", state_id="0:1", query_box=0, clean_prompt=PROMPT + " Box 0 contains",
        corrupted_prompt=PROMPT.replace("car", "map") + " Box 0 contains", clean_answer=" the car",
        corrupted_answer=" the map",
    )
    (pp,) = to_patch_pairs(smollm2, [pair])
    assert pp.clean_tokens.tolist()[: len(expected) - 1] == expected[:-1]  # patch
    assert pp.clean_tokens.tolist() == own_ids(spec, PROMPT + " Box 0 contains the")


def test_explicit_bos_override(tiny_model: Any) -> None:
    with recorded_inputs(tiny_model) as calls:
        generate_statements(
            tiny_model, [PROMPT], DecodeConfig(forced="step", batch_size=1), None, max_new_tokens=1, bos=False
        )
    assert calls[0] == own_ids("tiny:llama", PROMPT)[1:]
    assert torch.tensor(calls[0]).ne(tiny_model.tokenizer.bos_token_id).all()
