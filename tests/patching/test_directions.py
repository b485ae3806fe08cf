"""Edits along directions: the edit's algebra, a hand-built model where the answer lives on one direction,
and batched == unbatched on a real model."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from entitylens.errors import EntitylensError
from entitylens.patching.directions import edit_along, run_direction_edits


def test_edit_algebra() -> None:
    u = torch.tensor([0.6, 0.8, 0.0])
    h = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 5.0]])
    nulled = edit_along(h, u, "null")
    assert torch.allclose(nulled @ u, torch.zeros(2), atol=1e-6)
    assert torch.allclose(nulled[:, 2], h[:, 2])  # the orthogonal part is untouched
    assert torch.allclose(edit_along(h, u, "set", 4.0) @ u, torch.full((2,), 4.0))
    assert torch.allclose(edit_along(h, u, "add", 1.5) - h, 1.5 * u.expand(2, 3))
    with pytest.raises(EntitylensError, match="unknown edit mode"):
        edit_along(h, u, "flip")


@pytest.fixture()
def hand_built() -> tuple[Any, list[int], int, int]:
    """tiny:llama with every block's output zeroed, so the residual stream is the token embedding at every layer.

    The last prompt token embeds as ``3 e0 + e1``; the unembedding reads token A from ``e0`` and token B from
    ``e1`` (every other token reads nothing). The answer is A; nulling ``e0`` leaves B on top.
    """
    from entitylens.models import load_model

    m = load_model("tiny:llama", seed=7)
    hf = m.original_model
    ids = m.tokenizer("Box 0 contains the apple. Box 0 contains", add_special_tokens=False)["input_ids"]
    last, tok_a, tok_b = int(ids[-1]), 100, 200
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        hf.model.norm.weight.fill_(1.0)
        hf.lm_head.weight.zero_()
        hf.lm_head.weight[tok_a, 0] = 1.0
        hf.lm_head.weight[tok_b, 1] = 1.0
        e = torch.zeros(hf.config.hidden_size)
        e[0], e[1] = 3.0, 1.0
        hf.model.embed_tokens.weight[last] = e
    return m, [int(i) for i in ids], tok_a, tok_b


def test_hand_built_orthogonal_changes_nothing_and_answer_direction_flips(hand_built: Any) -> None:
    m, ids, a, b = hand_built
    d = m.cfg.d_model
    answer = torch.zeros(d)
    answer[0] = 1.0
    unread = torch.zeros(d)
    unread[5] = 1.0  # orthogonal to the embedding and to every unembedding row
    directions = torch.stack([answer, unread])[None].expand(m.cfg.n_layers, -1, -1).clone()
    run = run_direction_edits(m, [ids], [len(ids) - 1], [f"blocks.{i}.hook_out" for i in range(m.cfg.n_layers)],
                              directions, torch.tensor([[a, b]]), mode="null")
    assert int(run.clean_top[0]) == a
    for layer in range(m.cfg.n_layers):
        assert int(run.edited_top[layer, 0, 0]) == b  # the answer's direction nulled: the answer flips
        assert torch.equal(run.edited[layer, 1], run.clean)  # an unread direction: exactly nothing changes
        assert torch.equal(run.edited_lse[layer, 1], run.clean_lse)


def test_edit_elsewhere_in_the_prompt_cannot_reach_the_answer(hand_built: Any) -> None:
    """Blocks are zeroed, so no information moves between positions: an edit at token 0 changes nothing."""
    m, ids, a, b = hand_built
    d = m.cfg.d_model
    u = torch.zeros(1, 1, d)
    u[..., 0] = 1.0
    run = run_direction_edits(m, [ids], [0], ["blocks.0.hook_out"], u, torch.tensor([[a, b]]), mode="null")
    assert torch.equal(run.edited[0, 0], run.clean)


def test_batched_equals_unbatched(tiny_model: Any) -> None:
    tok = tiny_model.tokenizer
    texts = ["Box 0 contains the apple, Box 1 contains nothing. Box 1 contains",
             "Box 0 contains the map. Move the map from Box 0 to Box 1. Box 0 contains",
             "Box 0 contains nothing. Put the cup into Box 0. Box 0 contains the"]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    gen = torch.Generator().manual_seed(0)
    directions = torch.randn(2, 3, tiny_model.cfg.d_model, generator=gen)
    cands = torch.tensor([[5, 6, 7]] * 3)
    hooks = ["blocks.0.hook_out", "blocks.1.hook_out"]
    positions = [3, 5, 2]
    one = run_direction_edits(tiny_model, ids, positions, hooks, directions, cands, mode="set", value=2.0,
                              batch_size=1)
    many = run_direction_edits(tiny_model, ids, positions, hooks, directions, cands, mode="set", value=2.0,
                               batch_size=5)
    assert torch.allclose(one.edited, many.edited, atol=1e-4)
    assert torch.allclose(one.clean, many.clean, atol=1e-4)
    assert torch.equal(one.edited_top, many.edited_top)
    assert not torch.allclose(one.edited[0, 0], one.clean, atol=1e-3)  # the edits do something


def test_bad_inputs_are_one_line_errors(tiny_model: Any) -> None:
    with pytest.raises(EntitylensError, match="outside its"):
        run_direction_edits(tiny_model, [[1, 2]], [5], ["blocks.0.hook_out"], torch.ones(1, 1, 64),
                            torch.tensor([[1]]))
    with pytest.raises(EntitylensError, match="all zeros"):
        run_direction_edits(tiny_model, [[1, 2]], [1], ["blocks.0.hook_out"], torch.zeros(1, 1, 64),
                            torch.tensor([[1]]))
