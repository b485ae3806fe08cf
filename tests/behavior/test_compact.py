"""The compact protocol runs through the one decode loop, and equals a naive greedy loop written here."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from entitylens.behavior import EvalConfig, evaluate
from entitylens.behavior.compact import CompactDecoding, compact_answers, compact_predictor
from entitylens.models import load_model
from entitylens.task.compact import COMPACT, statement_from_answers
from entitylens.task.targeted import eval_states


@pytest.fixture(scope="module")
def stem() -> Any:
    return load_model("testbed:stem")


@pytest.fixture(scope="module")
def states() -> list[Any]:
    return eval_states(num_states=18)


def naive_answers(model: Any, states: list[Any]) -> list[list[tuple[str, ...] | None]]:
    """One prompt at a time, the whole sequence through the model at every step, no cache, no batching."""
    tok = model.tokenizer
    hf = model.original_model
    stop = tok(" ;", add_special_tokens=False)["input_ids"][0]
    out = []
    for s in states:
        row = []
        for b in range(s.num_boxes):
            ids = [tok.bos_token_id, *tok(COMPACT.prompt(s, b), add_special_tokens=False)["input_ids"]]
            new: list[int] = []
            with torch.inference_mode():
                for _ in range(COMPACT.max_new_tokens):
                    nxt = int(hf(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
                    new.append(nxt)
                    if nxt == stop:
                        break
            text = tok.decode(new, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            row.append(COMPACT.parse_answer(text))
        out.append(row)
    return out


def test_compact_answers_equal_a_naive_greedy_loop(stem: Any, states: list[Any]) -> None:
    got = compact_answers(stem, states)
    assert got == naive_answers(stem, states)
    assert sum(a is not None for row in got for a in row) > 0.8 * 7 * len(states)  # mostly valid answers


def test_batch_size_and_backend_do_not_change_answers(stem: Any, states: list[Any]) -> None:
    ref = compact_answers(stem, states)
    assert compact_answers(stem, states, decoding=CompactDecoding(batch_size=1)) == ref
    assert compact_answers(stem, states[:6], decoding=CompactDecoding(backend="bridge")) == ref[:6]


def test_eval_config_compact_protocol_is_the_compact_predictor(stem: Any, states: list[Any]) -> None:
    res = evaluate(stem, states, EvalConfig(protocol="compact"))
    statements = {p.state_id: p.statement for p in res.predictions}
    want = [statement_from_answers(a) for a in compact_answers(stem, states)]
    assert [statements[s.state_id] for s in states] == want
    assert [t for t, _ in compact_predictor(stem)(states)] == want
