"""The decoder's reserved-room KV cache against transformers' own ``DynamicCache`` (same tensors, bit for bit)."""

from __future__ import annotations

import torch

from entitylens.behavior.runners import CACHE_RESERVE, cpu_sdpa_gqa, growing_cache


def test_growing_cache_holds_what_a_dynamic_cache_holds() -> None:
    from transformers import DynamicCache

    gen = torch.Generator().manual_seed(0)
    ours, ref = growing_cache(), DynamicCache()
    steps = [(4, 37), (4, 1), (4, 5), ("select", [0, 2, 3]), (3, 1), (3, CACHE_RESERVE + 3), ("select", [2, 0]),
             (2, 1), (2, 4)]
    reallocs = 0
    for batch, arg in steps:
        if batch == "select":
            idx = torch.tensor(arg)
            ours.batch_select_indices(idx)
            ref.batch_select_indices(idx)
            continue
        k = torch.randn(batch, 3, arg, 8, generator=gen)
        v = torch.randn(batch, 3, arg, 8, generator=gen)
        for layer in range(2):
            before = ours.layers[layer].kbuf if len(ours.layers) > layer else None
            got = ours.update(k + layer, v - layer, layer)
            want = ref.update(k + layer, v - layer, layer)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
            reallocs += before is not None and ours.layers[layer].kbuf is not before
    assert ours.get_seq_length() == ref.get_seq_length() == 37 + 1 + 5 + 1 + CACHE_RESERVE + 3 + 1 + 4
    # appends write into the reserved room: only the step longer than the reserve re-reserves (per layer)
    assert reallocs == 2


def test_cpu_gqa_is_bit_identical_and_restored() -> None:
    from transformers.integrations import sdpa_attention as sa

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 5, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    mask = torch.zeros(2, 1, 5, 9)
    mask[0, :, :, :3] = torch.finfo(torch.float32).min

    class Attn(torch.nn.Module):
        num_key_value_groups = 3
        is_causal = True

    before = sa.use_gqa_in_sdpa
    ref = sa.sdpa_attention_forward(Attn(), q, k, v, mask)[0]
    with cpu_sdpa_gqa(torch.device("cpu")):
        assert sa.use_gqa_in_sdpa(mask, k, v)
        got = sa.sdpa_attention_forward(Attn(), q, k, v, mask)[0]
    assert sa.use_gqa_in_sdpa is before
    assert torch.equal(got, ref)
