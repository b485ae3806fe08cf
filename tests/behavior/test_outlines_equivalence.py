"""Equivalence with the paper's stack: outlines regex generation over transformers, greedy.

Same model (the Hugging Face model inside the bridge, SDPA), same prompt, same regex (the grammar's
``.regex``). ``forced="step"`` must give outlines' statements exactly; the agreement of the default
``forced="jump"`` is measured and recorded (``record_property``), not required: jump-forward appends the
canonical tokens of forced text, outlines lets the model pick its own token path through it.

outlines >= 1.0 renders a plain-string prompt through the tokenizer's chat template when the tokenizer
has one; KST24 (outlines 0.x) used the raw prompt, so the test switches that off to give both stacks the
same text.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from entitylens.behavior.decode import DecodeConfig, Generation, generate_statements, unwrapped_hf_model

outlines = pytest.importorskip("outlines")


def outlines_statements(model: Any, prompts: list[str], regex: str, max_new_tokens: int) -> list[str]:
    """Greedy outlines generation, one prompt at a time (as KST24 ran it).

    outlines gets the model's *own* tokenizer (as loaded by transformers from the model's files), not
    the bridge's, which TransformerLens rebuilt to always add BOS: SmolLM2's own adds none.
    """
    from outlines.types import Regex

    from entitylens.models import load_tokenizer, model_info

    tok = load_tokenizer(model_info(model).spec)
    side, pad = tok.padding_side, tok.pad_token_id
    try:
        with unwrapped_hf_model(model) as hf:
            om = outlines.from_transformers(hf, tok)
            om.type_adapter.has_chat_template = False
            gen = outlines.Generator(om, Regex(regex))
            return [gen(p, max_new_tokens=max_new_tokens, do_sample=False) for p in prompts]
    finally:
        tok.padding_side, tok.pad_token_id = side, pad


def _compare(
    model: Any, prompts: list[str], shared: str, budget: int, record: Callable[[str, object], None]
) -> tuple[list[str], list[Generation], list[Generation]]:
    cfg = DecodeConfig(forced="step", batch_size=8)
    ref = outlines_statements(model, prompts, cfg.grammar.regex, budget)
    step = generate_statements(model, prompts, cfg, shared, max_new_tokens=budget)
    jump = generate_statements(model, prompts, DecodeConfig(forced="jump", batch_size=8), shared, max_new_tokens=budget)
    agree = sum(j.text == r for j, r in zip(jump, ref, strict=True))
    record("jump_agreement", f"{agree}/{len(prompts)}")
    print(f"forced='jump' agrees with outlines on {agree}/{len(prompts)} prompts")
    return ref, step, jump


def test_step_mode_equals_outlines_tiny_completing(
    separator_biased_tiny: Any, kst24_prompts: list[str], kst24_shared_prefix: str, record_property: Any
) -> None:
    ref, step, _ = _compare(separator_biased_tiny, kst24_prompts[:4], kst24_shared_prefix, 150, record_property)
    assert [g.text for g in step] == ref
    assert not any(g.truncated for g in step)


def test_step_mode_equals_outlines_tiny_truncated(
    tiny_model: Any, kst24_prompts: list[str], kst24_shared_prefix: str, record_property: Any
) -> None:
    """The random tiny model never finishes: both stacks stop at the budget with the same text."""
    ref, step, _ = _compare(tiny_model, kst24_prompts[:3], kst24_shared_prefix, 40, record_property)
    assert [g.text for g in step] == ref
    assert all(g.truncated and len(g.token_ids) == 40 for g in step)


def test_default_protocol_on_fresh_states_equals_outlines_smollm2(smollm2: Any, record_property: Any) -> None:
    """The paper's stack on fresh states, default protocol: step mode, jump mode and ``evaluate`` agree 100%."""
    from entitylens.behavior import EvalConfig, evaluate
    from entitylens.behavior.evaluate import token_budget
    from entitylens.task import GeneratorConfig, generate_states, get_protocol

    states = generate_states(GeneratorConfig(seed=90417, num_states=5))
    protocol = get_protocol("kst24")
    prompts = [protocol.prompt(s.context) for s in states]
    shared = protocol.prompt("x")[: -len("x")]
    budget = max(token_budget(smollm2.tokenizer, s, protocol.generation_prefix, 16) for s in states)
    ref, step, jump = _compare(smollm2, prompts, shared, budget, record_property)
    assert [g.text for g in step] == ref
    assert [g.text for g in jump] == ref
    result = evaluate(smollm2, states, EvalConfig(batch_size=8, chat="never"))  # the plain (non-chat) form
    by_state = {p.state_id: p.statement for p in result.predictions}
    assert [by_state[s.state_id] for s in states] == ref


def test_step_mode_equals_outlines_smollm2(
    smollm2: Any, kst24_prompts: list[str], kst24_shared_prefix: str, record_property: Any
) -> None:
    prompts = kst24_prompts[:2]  # two short states (0 and 1 operations); outlines takes ~20 s per state
    ref, step, jump = _compare(smollm2, prompts, kst24_shared_prefix, 120, record_property)
    assert [g.text for g in step] == ref
    assert not any(g.truncated for g in step + jump)
