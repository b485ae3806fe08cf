"""Batched constrained decoding on the tiny model (and SmolLM2): references, invariances, budgets."""

from __future__ import annotations

import re
from typing import Any

import pytest
import regex as regex_mod
import torch
from decode_helpers import separator_bias

from entitylens.behavior import decode as decode_mod
from entitylens.behavior.decode import DecodeConfig, Generation, generate_statements, unwrapped_hf_model
from entitylens.behavior.grammar import StatementGrammar
from entitylens.errors import EntitylensError
from entitylens.models import load_model

GRAMMAR = StatementGrammar()


def _key(gens: list[Generation]) -> list[tuple[Any, ...]]:
    return [(g.token_ids, g.text, g.truncated, g.steps, g.forced_tokens) for g in gens]


def _continuation_text(tok: Any, prompt: str, ids: tuple[int, ...]) -> str:
    """The tokenizer's own decoding of ``ids`` after the prompt's tokens."""
    p = tok(prompt)["input_ids"]
    kw = {"skip_special_tokens": False, "clean_up_tokenization_spaces": False}
    return tok.decode(p + list(ids), **kw)[len(tok.decode(p, **kw)) :]


def _naive_constrained_greedy(model: Any, prompt: str, budget: int) -> list[int]:
    """Reference: batch 1, full recompute through the bridge's forward, mask by regex partial matching.

    Independent of the token automaton and of the KV-cache / padding machinery. The text of the generated
    ids is the tokenizer's decoding of them alone (exact for the byte-level tiny tokenizer).
    """
    tok = model.tokenizer
    ids = list(tok(prompt)["input_ids"])
    special = set(tok.all_special_ids)
    gen: list[int] = []
    with torch.inference_mode():
        for _ in range(budget):
            text = tok.decode(gen)
            if re.fullmatch(GRAMMAR.regex, text):
                break
            logits = model(torch.tensor([ids + gen]), return_type="logits")[0, -1]
            for t in torch.argsort(logits, descending=True, stable=True).tolist():
                if t in special:
                    continue  # the best token whose text keeps the statement completable
                piece = tok.decode([*gen, t])
                if len(piece) > len(text) and regex_mod.fullmatch(GRAMMAR.regex, piece, partial=True):
                    gen.append(t)
                    break
    return gen


# ------------------------------------------------------------------------------------------ references
def test_step_mode_equals_naive_constrained_greedy(separator_biased_tiny: Any, short_prompts: list[str]) -> None:
    model = separator_biased_tiny
    prompts = short_prompts[:3]
    gens = generate_statements(model, prompts, DecodeConfig(forced="step", batch_size=8), max_new_tokens=120)
    for prompt, g in zip(prompts, gens, strict=True):
        assert not g.truncated
        assert list(g.token_ids) == _naive_constrained_greedy(model, prompt, 120)


@pytest.mark.parametrize("spec", ["tiny:llama", "tiny:gemma3?window=64"])
def test_unconstrained_equals_hf_generate(spec: str, kst24_prompts: list[str], kst24_shared_prefix: str) -> None:
    """Batched, shared-prefix decoding = HF ``generate`` one prompt at a time (Gemma-3: past its window)."""
    model = load_model(spec)
    tok = model.tokenizer
    prompts = kst24_prompts[:3]
    cfg = DecodeConfig(mode="unconstrained", batch_size=8, stop_strings=("<never>",))
    gens = generate_statements(model, prompts, cfg, kst24_shared_prefix, max_new_tokens=25)
    with unwrapped_hf_model(model) as hf, torch.inference_mode():
        for prompt, g in zip(prompts, gens, strict=True):
            ids = tok(prompt, return_tensors="pt")["input_ids"]
            out = hf.generate(ids, max_new_tokens=25, do_sample=False, pad_token_id=tok.pad_token_id)
            ref = out[0, ids.shape[1] :].tolist()
            if ref and ref[-1] == tok.eos_token_id:
                assert not g.truncated and list(g.token_ids) == ref[:-1]
            else:
                assert g.truncated and list(g.token_ids) == ref and len(ref) == 25
            assert g.text == _continuation_text(tok, prompt, g.token_ids)


def test_unconstrained_stop_string_cuts_text(tiny_model: Any, kst24_prompts: list[str]) -> None:
    prompt = kst24_prompts[0]
    full = generate_statements(
        tiny_model, [prompt], DecodeConfig(mode="unconstrained", stop_strings=("<never>",)), max_new_tokens=30
    )[0]
    stop = full.text[6:8]
    assert len(stop) == 2
    cut = generate_statements(
        tiny_model, [prompt], DecodeConfig(mode="unconstrained", stop_strings=(stop,)), max_new_tokens=30
    )[0]
    assert cut.text == full.text[: full.text.index(stop)]
    assert not cut.truncated
    assert cut.token_ids == full.token_ids[: len(cut.token_ids)] and len(cut.token_ids) < len(full.token_ids)
    # Several stop strings: the text is cut at the earliest one, whatever their order.
    later = full.text[12:14]
    both = generate_statements(
        tiny_model, [prompt], DecodeConfig(mode="unconstrained", stop_strings=(later, stop)), max_new_tokens=30
    )[0]
    assert both.text == full.text[: min(full.text.index(stop), full.text.index(later))]


# ------------------------------------------------------------------------------------------ grammar and budget
@pytest.mark.parametrize("forced", ["jump", "step"])
def test_completed_statements_fullmatch_the_regex(
    forced: str, separator_biased_tiny: Any, kst24_prompts: list[str], kst24_shared_prefix: str
) -> None:
    tok = separator_biased_tiny.tokenizer
    gens = generate_statements(
        separator_biased_tiny, kst24_prompts, DecodeConfig(forced=forced), kst24_shared_prefix, max_new_tokens=150
    )
    for prompt, g in zip(kst24_prompts, gens, strict=True):
        assert not g.truncated
        assert re.fullmatch(GRAMMAR.regex, g.text)
        assert g.text == _continuation_text(tok, prompt, g.token_ids)
    assert any(" " in g.text.split("contains", 2)[1].split(",")[0] or "contains " in g.text for g in gens)


def test_random_model_is_truncated_and_flagged(tiny_model: Any, short_prompts: list[str]) -> None:
    gens = generate_statements(tiny_model, short_prompts, DecodeConfig(), max_new_tokens=30)
    for g in gens:
        assert g.truncated and len(g.token_ids) == 30
        assert not re.fullmatch(GRAMMAR.regex, g.text)
        assert regex_mod.fullmatch(GRAMMAR.regex, g.text, partial=True)


@pytest.mark.parametrize("forced", ["jump", "step"])
def test_budget_boundary(forced: str, separator_biased_tiny: Any, short_prompts: list[str]) -> None:
    prompts = short_prompts[:3]
    cfg = DecodeConfig(forced=forced, batch_size=8)
    full = generate_statements(separator_biased_tiny, prompts, cfg, max_new_tokens=200)
    n = [len(g.token_ids) for g in full]
    exact = generate_statements(separator_biased_tiny, prompts, cfg, max_new_tokens=n)
    assert _key(exact) == _key(full) and not any(g.truncated for g in exact)
    short = generate_statements(separator_biased_tiny, prompts, cfg, max_new_tokens=[k - 1 for k in n])
    for s, f in zip(short, full, strict=True):
        assert s.truncated and s.token_ids == f.token_ids[:-1]
        assert regex_mod.fullmatch(GRAMMAR.regex, s.text, partial=True)
    tiny_budget = generate_statements(separator_biased_tiny, prompts, cfg, max_new_tokens=[1, 2, 3])
    assert [len(g.token_ids) for g in tiny_budget] == [1, 2, 3] and all(g.truncated for g in tiny_budget)


# ------------------------------------------------------------------------------------------ jump-forward
def test_forced_tokens_cost_no_model_step(
    separator_biased_tiny: Any, kst24_prompts: list[str], kst24_shared_prefix: str
) -> None:
    model = separator_biased_tiny
    prompts = kst24_prompts[:4]
    calls = []
    handle = model.original_model.register_forward_pre_hook(lambda mod, args: calls.append(1))
    try:
        jump = generate_statements(
            model, prompts, DecodeConfig(forced="jump", batch_size=1), kst24_shared_prefix, max_new_tokens=150
        )
        n_jump = len(calls)
        calls.clear()
        step = generate_statements(
            model, prompts, DecodeConfig(forced="step", batch_size=1), kst24_shared_prefix, max_new_tokens=150
        )
        n_step = len(calls)
    finally:
        handle.remove()
    # One forward for the shared prefix, then one per model decision (the last decision needs no forward
    # after it, the first one uses the prompt's forward).
    assert n_jump == 1 + sum(g.steps for g in jump)
    assert n_step == 1 + sum(g.steps for g in step)
    for g in jump:
        assert g.steps == len(g.token_ids) - g.forced_tokens
        assert g.forced_tokens >= 7  # the start segment and the six separators are all jumped
    for g in step:
        assert g.steps == len(g.token_ids) and g.forced_tokens == 0
    assert n_jump < n_step


# ------------------------------------------------------------------------------------------ invariances
@pytest.mark.parametrize("forced", ["jump", "step"])
def test_batch_size_invariance_tiny(
    forced: str, separator_biased_tiny: Any, kst24_prompts: list[str], kst24_shared_prefix: str
) -> None:
    runs = [
        generate_statements(
            separator_biased_tiny,
            kst24_prompts,
            DecodeConfig(forced=forced, batch_size=bs),
            kst24_shared_prefix,
            max_new_tokens=150,
        )
        for bs in (1, 3, 8)
    ]
    assert _key(runs[0]) == _key(runs[1]) == _key(runs[2])


@pytest.mark.parametrize("forced", ["jump", "step"])
@pytest.mark.parametrize(
    ("spec", "bias"), [("tiny:gemma3?window=64", 16.0), ("tiny:qwen2", 8.0), ("tiny:llama?layers=1", 8.0)]
)
def test_batch_size_invariance_every_family(
    spec: str, bias: float, forced: str, kst24_prompts: list[str], kst24_shared_prefix: str
) -> None:
    """Batch 1 = 3 = 8 on every architecture family of the registry, with prompts longer than Gemma-3's window.

    Padding sits between the shared prefix and each prompt's suffix, and jump-forward feeds rows different
    numbers of tokens, so cache *slots* and token *positions* differ inside a padded batch; sliding-window
    layers must window by position, as a batch of one does.
    """
    model = load_model(spec)
    lengths = [len(model.tokenizer(p)["input_ids"]) for p in kst24_prompts]
    if "gemma3" in spec:
        assert min(lengths) > 4 * 64  # every prompt runs far past the sliding window
    with separator_bias(model, bias):  # Gemma-3's scaled embeddings give larger logits
        runs = [
            generate_statements(
                model,
                kst24_prompts,
                DecodeConfig(forced=forced, batch_size=bs),
                kst24_shared_prefix,
                max_new_tokens=150,
            )  # fmt: skip
            for bs in (1, 3, 8)
        ]
    assert sum(not g.truncated for g in runs[0]) >= 4  # most statements complete: the comparison has content
    assert _key(runs[0]) == _key(runs[1]) == _key(runs[2])


def test_shared_prefix_reuse_equals_no_reuse(
    separator_biased_tiny: Any, kst24_prompts: list[str], kst24_shared_prefix: str
) -> None:
    cfg = DecodeConfig(batch_size=8)
    shared = generate_statements(separator_biased_tiny, kst24_prompts, cfg, kst24_shared_prefix, max_new_tokens=150)
    plain = generate_statements(separator_biased_tiny, kst24_prompts, cfg, None, max_new_tokens=150)
    # A prefix ending in a space does not end at a token boundary (" Box" is one token): sharing still exact.
    spaced = generate_statements(
        separator_biased_tiny, kst24_prompts, cfg, kst24_shared_prefix + " ", max_new_tokens=150
    )
    assert _key(shared) == _key(plain) == _key(spaced)


def test_backends_agree(separator_biased_tiny: Any, short_prompts: list[str]) -> None:
    prompts = short_prompts[:3]
    runs = {
        backend: generate_statements(separator_biased_tiny, prompts, DecodeConfig(backend=backend), max_new_tokens=150)
        for backend in ("hf", "hooked", "recompute")
    }
    assert _key(runs["hf"]) == _key(runs["hooked"]) == _key(runs["recompute"])


def test_tl_native_bridge_uses_recompute(short_prompts: list[str]) -> None:
    from entitylens.models import load_model

    native = load_model("tiny:native")
    prompts = short_prompts[:3]
    with pytest.raises(EntitylensError, match="recompute"):
        generate_statements(native, prompts, DecodeConfig(backend="hf"))
    one = generate_statements(native, prompts, DecodeConfig(batch_size=1), max_new_tokens=12)
    three = generate_statements(native, prompts, DecodeConfig(batch_size=3), max_new_tokens=12)
    assert _key(one) == _key(three)
    for g in one:
        assert regex_mod.fullmatch(GRAMMAR.regex, g.text, partial=True)


def test_bridge_is_left_intact(tiny_model: Any, kst24_prompts: list[str]) -> None:
    from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent

    hf = tiny_model.original_model
    before = [(n, type(m)) for n, m in hf.named_modules()]
    impl = hf.config._attn_implementation
    x = torch.tensor([tiny_model.tokenizer(kst24_prompts[0])["input_ids"][:20]])
    with torch.inference_mode():
        ref, _ = tiny_model.run_with_cache(x)
    generate_statements(tiny_model, kst24_prompts[:2], DecodeConfig(backend="hf"), max_new_tokens=10)
    with pytest.raises(RuntimeError, match="boom"), unwrapped_hf_model(tiny_model) as plain:
        assert not any(isinstance(m, GeneralizedComponent) for m in plain.modules())
        assert plain.config._attn_implementation == "sdpa"
        raise RuntimeError("boom")
    assert [(n, type(m)) for n, m in hf.named_modules()] == before
    assert hf.config._attn_implementation == impl
    with torch.inference_mode():
        again, cache = tiny_model.run_with_cache(x)
    assert torch.equal(ref, again) and len(cache) > 0


# ------------------------------------------------------------------------------------------ batch size
def test_out_of_memory_halves_the_batch(
    monkeypatch: pytest.MonkeyPatch, separator_biased_tiny: Any, short_prompts: list[str]
) -> None:
    prompts = short_prompts * 2
    reference = generate_statements(separator_biased_tiny, prompts, DecodeConfig(batch_size=1), max_new_tokens=150)
    real_forward = decode_mod.KVRunner.forward
    sizes = []

    def flaky_forward(self: Any, feeds: list[list[int]], positions: list[int]) -> torch.Tensor:
        sizes.append(len(feeds))
        if len(feeds) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(self, feeds, positions)

    monkeypatch.setattr(decode_mod.KVRunner, "forward", flaky_forward)
    monkeypatch.setattr(decode_mod, "_auto_batch_size", lambda *a, **k: 8)
    got = generate_statements(separator_biased_tiny, prompts, DecodeConfig(batch_size="auto"), max_new_tokens=150)
    assert _key(got) == _key(reference)
    assert sizes[:3] == [8, 4, 2]
    with pytest.raises(torch.OutOfMemoryError):
        generate_statements(separator_biased_tiny, prompts, DecodeConfig(batch_size=8), max_new_tokens=150)


def test_auto_batch_size_on_cpu_is_capped_by_free_memory(tiny_model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    hf = tiny_model.original_model
    assert decode_mod._auto_batch_size(hf, torch.device("cpu"), 1000) == decode_mod.CPU_BATCH_SIZE
    # tiny:llama fp32: KV 2 x 2 layers x 2 kv heads x 16 x 1000 x 4 B = 512 KB per row, plus the prefill estimate
    cfg = hf.config
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 1000 * 4
    act = 1000 * (cfg.hidden_size * 16 + cfg.num_attention_heads * 1000) * 4 + cfg.vocab_size * 16
    monkeypatch.setattr(decode_mod, "host_available_bytes", lambda: 4 * 5 * (kv + act))  # a quarter holds 5 rows
    assert decode_mod._auto_batch_size(hf, torch.device("cpu"), 1000) == 5


@pytest.mark.usefixtures("no_shape_checks")
# ------------------------------------------------------------------------------------------ bad input
def test_bad_input_raises_one_line_errors(tiny_model: Any, kst24_prompts: list[str], kst24_shared_prefix: str) -> None:
    cases = [
        (lambda: generate_statements(tiny_model, kst24_prompts[:2], shared_prefix="Nope"), "does not start with"),
        (lambda: generate_statements(tiny_model, kst24_prompts[:2], max_new_tokens=[5]), "one per prompt"),
        (lambda: generate_statements(tiny_model, kst24_prompts[:2], max_new_tokens=0), "integer >= 1"),
        (lambda: generate_statements(tiny_model, kst24_prompts[0]), "list of strings"),
        (lambda: generate_statements(tiny_model, [""]), "empty prompt"),
        (lambda: generate_statements(tiny_model.original_model, kst24_prompts[:1]), "tokenizer"),
        (lambda: DecodeConfig(mode="beam"), "mode"),
        (lambda: DecodeConfig(forced="skip"), "forced"),
        (lambda: DecodeConfig(batch_size=0), "batch_size"),
        (lambda: DecodeConfig(max_new_tokens=-1), "max_new_tokens"),
        (lambda: DecodeConfig(backend="vllm"), "backend"),
        (lambda: DecodeConfig(stop_strings=("",)), "stop_strings"),
        (lambda: DecodeConfig(num_boxes=0), "num_boxes"),
    ]
    for call, fragment in cases:
        with pytest.raises(EntitylensError, match=fragment) as err:
            call()
        assert "\n" not in str(err.value)
    assert generate_statements(tiny_model, []) == []


# ------------------------------------------------------------------------------------------ SmolLM2 (fp32)
def test_smollm2_batch_invariance_and_grammar(smollm2: Any, kst24_prompts: list[str], kst24_shared_prefix: str) -> None:
    prompts = kst24_prompts[:6]
    one = generate_statements(smollm2, prompts, DecodeConfig(batch_size=1), kst24_shared_prefix, max_new_tokens=120)
    eight = generate_statements(smollm2, prompts, DecodeConfig(batch_size=8), kst24_shared_prefix, max_new_tokens=120)
    assert _key(one) == _key(eight)
    for prompt, g in zip(prompts, one, strict=True):
        assert not g.truncated and re.fullmatch(GRAMMAR.regex, g.text)
        assert g.text == _continuation_text(smollm2.tokenizer, prompt, g.token_ids)
        assert g.forced_tokens >= 7 + 6 * 4  # "\nStatement: Box 0 contains" and ", Box k contains" are jumped
