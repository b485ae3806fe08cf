"""The shipped checkpoints: recipes in code, equal arm budgets, size, loading, and a stem that copies."""

from __future__ import annotations

import csv
import json
from typing import Any

import pytest
from testbed_helpers import shipped

from entitylens.behavior.compact import compact_predictor
from entitylens.behavior.evaluate import EvalConfig, evaluate
from entitylens.errors import EntitylensError
from entitylens.models.testbed.checkpoints import CHECKPOINT_FILES, CHECKPOINTS_DIR, STAGES, checkpoint_dir, read_meta
from entitylens.models.testbed.tokenizer import tokenizer_json
from entitylens.task.targeted import eval_states
from entitylens.testbed.recipe import RECIPES

pytestmark = pytest.mark.skipif(not all(shipped(s) for s in STAGES), reason="testbed checkpoints not shipped")


@pytest.mark.parametrize("stage", STAGES)
def test_shipped_recipe_is_the_recipe_in_code(stage: str) -> None:
    d = checkpoint_dir(stage)
    meta = read_meta(d)
    assert sorted(p.name for p in d.iterdir()) == sorted(CHECKPOINT_FILES)
    assert meta["stage"] == stage and meta["steps_override"] is None
    assert meta["recipe"] == RECIPES[stage].to_dict()
    assert meta["recipe_hash"] == RECIPES[stage].recipe_hash, (
        f"the shipped {stage} checkpoint was trained with another recipe; retrain it with "
        f"`entitylens testbed train --stage {stage} --out src/entitylens/models/testbed/shipped`"
    )
    assert json.loads((d / "tokenizer.json").read_text()) == json.loads(tokenizer_json())
    with open(d / "train_log.csv") as f:
        rows = list(csv.DictReader(f))
    assert int(rows[-1]["step"]) == RECIPES[stage].steps
    assert float(rows[-1]["loss"]) == pytest.approx(meta["final"]["loss"], rel=1e-5)


def test_shipped_arms_have_equal_budgets_and_the_same_parent() -> None:
    stem, base, code = (read_meta(checkpoint_dir(s)) for s in STAGES)
    assert base["parent"] == code["parent"] == {"stage": "stem", "recipe_hash": stem["recipe_hash"]}
    assert base["tokens"]["total"] == code["tokens"]["total"]
    assert base["tokens"]["boxes"] == code["tokens"]["boxes"]
    assert base["tokens"]["prose"] == code["tokens"]["code"] > 0
    assert base["tokens"]["code"] == code["tokens"]["prose"] == 0
    assert stem["tokens"]["total"] == stem["tokens"]["boxes"]


def test_shipped_checkpoints_are_small() -> None:
    total = sum(p.stat().st_size for p in CHECKPOINTS_DIR.rglob("*") if p.is_file())
    assert total <= 25 * 1024 * 1024  # the three checkpoints with their logs (issue #16's limit)


def test_stem_copies_on_fresh_states(shipped_stem: Any) -> None:
    # fresh scenarios (a seed no training or evaluation stream uses), all at numops 0
    states = eval_states(seed=4242, num_states=30, max_numops=0)
    res = evaluate(None, states, EvalConfig(), label="stem", predictor=compact_predictor(shipped_stem))
    rows = [p for p in res.predictions if p.numops == 0]
    assert len(rows) == 210
    accuracy = sum(p.correct for p in rows) / len(rows)
    assert accuracy >= 0.90, f"stem accuracy at numops 0 is {accuracy:.3f}"


def test_stem_applies_operations_on_fresh_states(shipped_stem: Any) -> None:
    # fresh scenarios cut where a target box has had 0, 1 or 2 operations (the training range)
    states = eval_states(seed=4243, num_states=90, max_numops=2)
    res = evaluate(None, states, EvalConfig(), label="stem", predictor=compact_predictor(shipped_stem))
    nothing = evaluate("nothing", states, EvalConfig())
    for k, floor in ((1, 0.70), (2, 0.50)):
        rows = [p.correct for p in res.predictions if p.numops == k]
        base = [p.correct for p in nothing.predictions if p.numops == k]
        assert len(rows) >= 30
        acc = sum(rows) / len(rows)
        assert acc >= floor, f"stem accuracy at numops {k} is {acc:.3f} (< {floor})"
        assert acc >= sum(base) / len(base) + 0.2  # well above always answering "nothing"


def test_load_model_knows_testbed_specs() -> None:
    from entitylens.models import load_model, resolve_spec

    try:
        resolve_spec("testbed:stem")
    except EntitylensError:
        pytest.skip(
            "entitylens.models.load_model has no testbed: branch yet (see entitylens.models.testbed.checkpoints)"
        )
    model = load_model("testbed:stem")
    info = model.entitylens_info
    assert (info.kind, info.chat, info.source_hash) == ("testbed", False, RECIPES["stem"].recipe_hash)
    assert model.tokenizer("B0 car ;")["input_ids"][0] == model.tokenizer.bos_token_id


def test_load_tokenizer_of_a_testbed_spec_is_the_checkpoint_tokenizer():
    from entitylens.models import load_model, load_tokenizer

    tok = load_tokenizer("testbed:base")
    model = load_model("testbed:base")
    text = "B0 car map ; B1 ; put coat B1 . | B1"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == model.tokenizer(text, add_special_tokens=False)["input_ids"]
