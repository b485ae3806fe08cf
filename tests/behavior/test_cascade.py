"""Shared-prefix (cascade) attention against SDPA over the concatenated keys, and the runner's logits with it."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from entitylens.behavior.cascade import cascade_attention, shared_prefix


@pytest.mark.parametrize(("new", "hk", "g"), [(1, 3, 3), (4, 2, 1), (3, 1, 4)])
def test_cascade_attention_equals_sdpa_over_prefix_and_own_keys(new: int, hk: int, g: int) -> None:
    gen = torch.Generator().manual_seed(new * 10 + hk)
    B, P, own, D = 3, 11, 6 + new, 8
    q = torch.randn(B, hk * g, new, D, generator=gen)
    kp, vp = torch.randn(1, hk, P, D, generator=gen), torch.randn(1, hk, P, D, generator=gen)
    ko, vo = torch.randn(B, hk, own, D, generator=gen), torch.randn(B, hk, own, D, generator=gen)
    pad = [0, 2, 4]  # left padding of each row's own tokens
    allowed = torch.ones(B, 1, new, own, dtype=torch.bool)
    for b, n in enumerate(pad):
        allowed[b, :, :, :n] = False
    for t in range(new):  # causal within the new tokens (the last `new` of the own keys)
        allowed[:, :, t, own - new + t + 1:] = False
    full_k = torch.cat([kp.expand(B, -1, -1, -1), ko], 2).repeat_interleave(g, 1)
    full_v = torch.cat([vp.expand(B, -1, -1, -1), vo], 2).repeat_interleave(g, 1)
    full_mask = torch.cat([torch.ones(B, 1, new, P, dtype=torch.bool), allowed], -1)
    want = torch.nn.functional.scaled_dot_product_attention(q, full_k, full_v, attn_mask=full_mask).transpose(1, 2)
    module = SimpleNamespace(layer_idx=1)
    with shared_prefix(SimpleNamespace(config=SimpleNamespace(_attn_implementation="sdpa")),
                       [(kp * 0, vp * 0), (kp, vp)]):
        got, _ = cascade_attention(module, q, ko, vo, allowed)
        assert got.shape == (B, new, hk * g, D)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
        torch.testing.assert_close(cascade_attention(module, q, ko, vo, additive)[0], want, atol=1e-5, rtol=1e-5)
    with shared_prefix(SimpleNamespace(config=SimpleNamespace(_attn_implementation="sdpa")),
                       [(kp.bfloat16(), vp.bfloat16())] * 2):
        half, _ = cascade_attention(module, q.bfloat16(), ko.bfloat16(), vo.bfloat16(), allowed)
        assert half.dtype == torch.bfloat16
        torch.testing.assert_close(half.float(), want, atol=5e-2, rtol=5e-2)  # bf16 inputs, float32 softmax


def test_runner_logits_with_and_without_cascade(separator_biased_tiny: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """KVRunner over a shared prefix: prefill, one-token steps, a multi-token feed and a row selection agree."""
    import entitylens.behavior.runners as R

    tok = separator_biased_tiny.tokenizer
    prefix = tok("Box 0 contains the car, Box 1 contains the map. Move the car into Box 1.",
                 add_special_tokens=False)["input_ids"]
    rows = [tok(t, add_special_tokens=False)["input_ids"] for t in (" Box 1 contains", " Box 0", " Box 2 contains the")]
    steps = [[[5], [7], [9]], [[11, 12, 13], [14], [15, 16]]]
    logits, held = {}, {}
    for casc in (False, True):
        monkeypatch.setattr(R, "CASCADE_ATTENTION", casc)
        with R.unwrapped_hf_model(separator_biased_tiny) as hf, torch.no_grad():
            pc = R.prefix_cache(hf, prefix, torch.device("cpu"))
            runner = R.KVRunner(hf, 3, pc, len(prefix), 0)
            assert runner.cascade is casc
            pos = [len(prefix)] * 3
            out = [runner.forward(rows, pos)]
            pos = [p + len(r) for p, r in zip(pos, rows, strict=True)]
            for feed in steps:
                out.append(runner.forward(feed, pos))
                pos = [p + len(f) for p, f in zip(pos, feed, strict=True)]
            runner.select([2, 0])
            out.append(runner.forward([[17], [18]], [pos[2], pos[0]]))
            held[casc] = runner.cache.get_seq_length()
        logits[casc] = out
    for a, b in zip(logits[False], logits[True], strict=True):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    assert held[False] - held[True] == len(prefix)  # the cascade cache keeps the prefix out (held once)
