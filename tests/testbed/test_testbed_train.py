"""Training: recipes and budgets, a short run end to end through the CLI, determinism, atomic outputs."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from testbed_helpers import SMOKE_ARM_STEPS, SMOKE_STEM_STEPS

from entitylens.behavior.compact import compact_answers
from entitylens.cli import main
from entitylens.errors import EntitylensError
from entitylens.models.testbed.checkpoints import CHECKPOINT_FILES, load_hf_checkpoint, load_testbed, read_meta
from entitylens.task.targeted import eval_states
from entitylens.testbed.recipe import BASE, CODE, STEM, Recipe
from entitylens.testbed.train import make_batch, token_budget, train_stage


def test_arms_differ_only_in_what_fills_the_filler_share() -> None:
    base, code = BASE.to_dict(), CODE.to_dict()
    assert {k for k in base if base[k] != code[k]} == {"stage", "filler"}
    assert (base["filler"], code["filler"]) == ("prose", "code")
    assert BASE.dims == CODE.dims == STEM.dims and BASE.parent == CODE.parent == "stem"
    assert len({STEM.recipe_hash, BASE.recipe_hash, CODE.recipe_hash}) == 3


def test_arm_token_budgets_match() -> None:
    # counted from the data streams (the first 150 steps; the shipped checkpoints' meta.json holds the counts
    # of the full runs, compared in test_testbed_shipped.py)
    b, c = token_budget(BASE, steps=150), token_budget(CODE, steps=150)
    assert b["total"] == c["total"] and b["boxes"] == c["boxes"]
    filler = 150 * BASE.filler_rows * BASE.filler_tokens
    assert (b["prose"], b["code"]) == (filler, 0) and (c["code"], c["prose"]) == (filler, 0)
    assert 0.3 < b["boxes"] / b["total"] < 0.5  # the boxes share of the budget is the same fixed share


def test_the_arms_see_identical_boxes_rows() -> None:
    for step in (0, 7):
        xb, xc = make_batch(BASE, step), make_batch(CODE, step)
        n = BASE.boxes_rows
        assert torch.equal(xb.boxes_target[:n], xc.boxes_target[:n])
        width = min(xb.ids.shape[1], xc.ids.shape[1])
        assert torch.equal(xb.ids[:n, :width], xc.ids[:n, :width])
        assert not torch.equal(xb.ids[n:, :width], xc.ids[n:, :width])


def test_recipe_validation_and_schedule() -> None:
    with pytest.raises(EntitylensError, match="unknown stage"):
        Recipe(stage="math", parent=None)
    with pytest.raises(EntitylensError, match="filler and filler_rows go together"):
        Recipe(stage="base", parent="stem", filler="prose")
    with pytest.raises(EntitylensError, match="d_model % heads"):
        dataclasses.replace(STEM, dims=dataclasses.replace(STEM.dims, heads=3))
    r = Recipe(stage="stem", parent=None, steps=110, lr=1.0, warmup_steps=10, final_lr_frac=0.1)
    assert r.lr_at(0) == pytest.approx(0.1) and r.lr_at(9) == pytest.approx(1.0)
    assert (
        r.lr_at(10) == pytest.approx(1.0)
        and r.lr_at(60) == pytest.approx(0.55)
        and r.lr_at(110) == pytest.approx(0.1)
    )
    assert Recipe.from_dict(json.loads(json.dumps(CODE.to_dict()))) == CODE


def test_short_training_through_the_cli_writes_loadable_checkpoints(smoke_root: Path) -> None:
    stem, code = smoke_root / "stem", smoke_root / "code"
    for d in (stem, code):
        assert sorted(p.name for p in d.iterdir()) == sorted(CHECKPOINT_FILES)
    sm, cm = read_meta(stem), read_meta(code)
    assert (
        sm["recipe_hash"] == STEM.with_steps(SMOKE_STEM_STEPS).recipe_hash
        and sm["steps_override"] == SMOKE_STEM_STEPS
    )
    assert sm["code_recipe_hash"] == STEM.recipe_hash
    assert cm["parent"] == {"stage": "stem", "recipe_hash": sm["recipe_hash"]}
    assert cm["tokens"] == {**token_budget(CODE.with_steps(SMOKE_ARM_STEPS)), "total": cm["tokens"]["total"]}
    assert cm["tokens"]["code"] == SMOKE_ARM_STEPS * CODE.filler_rows * CODE.filler_tokens
    with open(stem / "train_log.csv") as f:
        rows = list(csv.DictReader(f))
    assert int(rows[-1]["step"]) == SMOKE_STEM_STEPS
    assert float(rows[-1]["loss"]) == pytest.approx(sm["final"]["loss"], rel=1e-5)
    assert (stem / "train_log.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # loadable as a bridge; the bridge's HF model is the saved one
    bridge = load_testbed(f"testbed:{code}")
    hf = load_hf_checkpoint(code)
    assert (
        bridge.entitylens_info.kind == "testbed" and bridge.entitylens_info.source_hash == cm["recipe_hash"]
    )
    ids = torch.tensor([bridge.tokenizer("B0 car ; B1 ; B2 map ; | B2")["input_ids"]])
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        assert torch.allclose(bridge(ids, return_type="logits"), ref, atol=1e-4)
        assert torch.allclose(bridge.original_model(input_ids=ids).logits, ref, atol=1e-5)
    states = eval_states(seed=3, num_states=3)
    assert compact_answers(bridge, states) == compact_answers(hf, states, tokenizer=bridge.tokenizer)


def test_same_seed_gives_the_same_final_loss(tmp_path: Path) -> None:
    a = train_stage("stem", tmp_path / "a", steps=12, evaluate_final=False)
    b = train_stage("stem", tmp_path / "b", steps=12, evaluate_final=False)
    assert math.isfinite(a.last_step_loss)
    assert abs(a.last_step_loss - b.last_step_loss) <= 1e-6
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (
        tmp_path / "b" / "model.safetensors"
    ).read_bytes()
    c = train_stage(
        "stem", tmp_path / "c", recipe=dataclasses.replace(STEM, seed=5), steps=12, evaluate_final=False
    )
    assert c.last_step_loss != a.last_step_loss


def test_cli_errors_leave_existing_outputs_untouched(tmp_path: Path, smoke_root: Path, capsys) -> None:
    rc = main(["testbed", "train", "--stage", "base", "--out", str(tmp_path), "--steps", "2", "--quiet"])
    assert rc == 2 and "train `--stage stem" in capsys.readouterr().err
    # a parent that is not a stem: refused before anything is written
    rc = main(["testbed", "train", "--stage", "base", "--out", str(tmp_path / "other"),
               "--parent", str(smoke_root / "code"), "--steps", "2", "--quiet"])  # fmt: skip
    assert rc == 2 and "not 'stem'" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
    assert (
        main(["testbed", "train", "--stage", "stem", "--out", str(tmp_path), "--steps", "0", "--quiet"]) == 2
    )
    # an output directory with foreign files is never replaced
    (tmp_path / "stem").mkdir()
    (tmp_path / "stem" / "notes.txt").write_text("mine")
    rc = main(["testbed", "train", "--stage", "stem", "--out", str(tmp_path), "--steps", "2", "--quiet"])
    assert rc == 2 and "not a testbed checkpoint" in capsys.readouterr().err
    assert (tmp_path / "stem" / "notes.txt").read_text() == "mine"
