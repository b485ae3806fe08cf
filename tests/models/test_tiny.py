"""tiny:<name> models: offline build, determinism per seed, shapes, dtypes, tokenizer."""

from __future__ import annotations

import pytest
import torch

from entitylens.models import load_model, model_info, object_token_ids, tiny_tokenizer
from entitylens.models.tiny import TINY_VOCAB_SIZE, _train_tokenizer_json, task_objects


def _weights(bridge) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in bridge.original_model.state_dict().items()}


def test_tiny_llama_is_an_hf_llama_with_info(tiny_model) -> None:
    from transformers import LlamaForCausalLM

    assert isinstance(tiny_model.original_model, LlamaForCausalLM)
    info = model_info(tiny_model)
    assert (info.kind, info.source, info.dtype, info.device, info.prepends_bos) == (
        "tiny",
        "tiny",
        "float32",
        "cpu",
        True,
    )
    assert info.has_hf_model and info.source_hash and len(info.source_hash) == 64
    assert not tiny_model.training
    assert tiny_model.tokenizer.padding_side == "left" and tiny_model.tokenizer.pad_token is not None


def test_forward_shape(tiny_model) -> None:
    tokens = tiny_model.to_tokens(["Box 0 contains the car", "Box 1 contains"])
    logits = tiny_model(tokens)
    assert logits.shape == (2, tokens.shape[1], tiny_model.cfg.d_vocab)
    assert tiny_model.cfg.n_layers == 2 and tiny_model.cfg.d_model == 64
    assert torch.isfinite(logits).all()


def test_same_seed_same_weights_and_logits_different_seed_differs(tiny_model) -> None:
    again = load_model("tiny:llama?seed=0")
    w0, w1 = _weights(tiny_model), _weights(again)
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    other = load_model("tiny:llama", seed=1)
    w2 = _weights(other)
    assert any(not torch.equal(w0[k], w2[k]) for k in w0 if w0[k].is_floating_point() and w0[k].numel() > 64)
    toks = tiny_model.to_tokens("Box 2 contains the")
    assert torch.equal(tiny_model(toks), again(toks))
    assert model_info(again).source_hash == model_info(tiny_model).source_hash != model_info(other).source_hash


def test_build_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_model("tiny:gpt2")
    assert torch.equal(torch.rand(3), expected)


def test_size_options() -> None:
    b = load_model("tiny:llama?layers=3&d_model=32&heads=4&kv_heads=1&d_mlp=48")
    assert (b.cfg.n_layers, b.cfg.d_model, b.cfg.n_heads, b.cfg.d_mlp) == (3, 32, 4, 48)
    assert b.original_model.config.num_key_value_heads == 1


def test_gpt2_family_has_no_bos() -> None:
    b = load_model("tiny:gpt2")
    assert not model_info(b).prepends_bos
    ids = b.to_tokens("Box 3")[0].tolist()
    assert ids[0] != b.tokenizer.bos_token_id
    assert b.tokenizer.decode(ids) == "Box 3"


def test_native_model_has_no_hf_model() -> None:
    b = load_model("tiny:native")
    info = model_info(b)
    assert not info.has_hf_model and info.prepends_bos
    toks = b.to_tokens("Box 3 contains the")
    assert toks[0, 0].item() == b.tokenizer.bos_token_id
    assert b(toks).shape == (1, toks.shape[1], len(b.tokenizer))
    again = load_model("tiny:native")
    assert torch.equal(b(toks), again(toks))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_dtypes_on_cpu(dtype: torch.dtype) -> None:
    b = load_model("tiny:llama", dtype=dtype)
    assert model_info(b).dtype == str(dtype).removeprefix("torch.")
    assert all(p.dtype == dtype for p in b.original_model.parameters())
    ref = load_model("tiny:llama")
    toks = ref.to_tokens("Box 0 contains the car and the")
    out = b(toks)
    assert out.dtype == dtype and torch.isfinite(out.float()).all()
    # Same weights, rounded: predictions agree with fp32 on most positions.
    agree = (out.float().argmax(-1) == ref(toks).argmax(-1)).float().mean().item()
    assert agree >= 0.75


def test_tokenizer_is_deterministic_and_splits_some_objects() -> None:
    # training itself (not just the in-memory cache) is deterministic
    train = _train_tokenizer_json.__wrapped__
    assert train(task_objects(), TINY_VOCAB_SIZE) == train(task_objects(), TINY_VOCAB_SIZE)
    a = tiny_tokenizer()
    objects = task_objects()
    ids = object_token_ids(a, objects)
    n_multi = sum(len(v) > 1 for v in ids.values())
    assert 0 < n_multi < len(objects)
    for obj, toks in ids.items():
        assert a.decode(list(toks)) == " " + obj
    # structural words are single tokens
    for word in (" Box", " contains", " the", " and", " nothing", " Move", " Remove", " Put", "Statement"):
        assert len(a(word, add_special_tokens=False)["input_ids"]) == 1


def test_tokenizer_chat_template_and_specials() -> None:
    tok = tiny_tokenizer()
    text = tok.apply_chat_template(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text == "<|system|>\nS</s>\n<|user|>\nU</s>\n<|assistant|>\n"
    assert tok.bos_token == "<s>" and tok.eos_token == "</s>" and tok.pad_token == "<pad>"
    assert tok("Box 0")["input_ids"][0] == tok.bos_token_id
    assert tiny_tokenizer(bos=False)("Box 0")["input_ids"][0] != tok.bos_token_id
