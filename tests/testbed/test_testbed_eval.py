"""The targeted evaluation set and ``entitylens testbed eval`` (baselines + models, shared outputs)."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest
from testbed_helpers import shipped

from entitylens.behavior.evaluate import EvalConfig, evaluate
from entitylens.cli import main
from entitylens.task.targeted import DEFAULT_EVAL_STATES, EVAL_SEED, VALIDATION_SEED, eval_states
from entitylens.task.world import sample_scenario
from entitylens.testbed.data import TRAIN_OBJECTS
from entitylens.testbed.recipe import BASE, STEM


def _recount(state) -> list[int]:
    counts = [0] * 7
    for op in state.operations:
        counts[op.box] += 1
        if op.dest is not None:
            counts[op.dest] += 1
    return counts


def test_eval_set_is_deterministic_and_fills_high_buckets() -> None:
    states = eval_states()
    assert len(states) == DEFAULT_EVAL_STATES
    assert [s.context for s in states[:40]] == [s.context for s in eval_states(num_states=40)]
    buckets = Counter(min(n, 7) for s in states for n in s.numops)
    assert sum(buckets.values()) == 7 * DEFAULT_EVAL_STATES
    assert all(buckets[k] >= 70 for k in range(3, 8)), buckets
    for s in states:
        assert list(s.numops) == _recount(s)


def test_eval_states_are_fresh() -> None:
    evaluation = {s.initial for s in eval_states(EVAL_SEED)} | {
        s.initial for s in eval_states(VALIDATION_SEED)
    }
    training = {
        sample_scenario(
            recipe.boxes_seed, i, TRAIN_OBJECTS, num_operations=0
        ).initial  # what boxes_episode draws
        for recipe in (STEM, BASE)
        for i in range(3000)
    }
    assert len(training) == 6000 and not evaluation & training


@pytest.mark.skipif(not shipped("stem") or not shipped("code"), reason="testbed checkpoints not shipped")
def test_cli_eval_scores_baselines_and_models_into_a_run_directory(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    models = ["random", "nothing", "initial", "testbed:stem", "testbed:code"]
    assert main(["testbed", "eval", "--out", str(out), "--states", "9", "--models", *models, "--quiet"]) == 0
    assert {"run.json", "predictions.jsonl", "summary.csv", "comparison.csv"} <= {
        p.name for p in out.iterdir()
    }
    record = json.loads((out / "run.json").read_text())
    assert record["eval"]["protocol"] == "compact" and record["models"][3]["recipe_hash"]
    with open(out / "summary.csv") as f:
        summary = {(r["model"], r["bucket"]): r for r in csv.DictReader(f)}
    states = eval_states(num_states=9)
    for name in ("random", "nothing", "initial"):  # the baselines as `entitylens eval` scores them
        expected = evaluate(name, states, EvalConfig()).report().overall.accuracy
        assert float(summary[(name, "overall")]["accuracy"]) == pytest.approx(expected)
    with open(out / "comparison.csv") as f:
        pairs = {(r["base"], r["variant"]) for r in csv.DictReader(f)}
    assert pairs == {("stem", "code")}
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == len(models) * 9 * 7
    # resuming into the same directory with another protocol is refused, nothing is changed
    before = (out / "predictions.jsonl").read_bytes()
    assert (
        main(
            [
                "testbed",
                "eval",
                "--out",
                str(out),
                "--states",
                "9",
                "--models",
                *models,
                "--protocol",
                "kst24",
            ]
        )
        == 2
    )
    assert "of other inputs" in capsys.readouterr().err
    assert (out / "predictions.jsonl").read_bytes() == before
