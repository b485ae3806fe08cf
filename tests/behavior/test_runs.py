import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from entitylens.behavior.baselines import mentioned_objects, random_contents
from entitylens.behavior.combine import merge_runs
from entitylens.behavior.evaluate import EvalConfig, evaluate, load_finished
from entitylens.behavior.runs import ModelRun, run_eval
from entitylens.behavior.tables import compare, summary_table
from entitylens.errors import EntitylensError
from entitylens.models.registry import PAPER_RANDOM_BASELINE
from entitylens.stats import mcnemar_p
from entitylens.task import GeneratorConfig, generate_dataset, generate_states
from entitylens.task.types import BoxRow

BASELINE_MODELS = [ModelRun("random", "random"), ModelRun("nothing", "nothing"), ModelRun("initial", "initial")]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "test.jsonl"
    states = generate_dataset(GeneratorConfig(seed=3, num_states=60), path)
    return path, states


def _read(path):
    return Path(path).read_bytes()


def test_baselines_hand_checked(dataset):
    _, states = dataset
    nothing = evaluate("nothing", states)
    initial = evaluate("initial", states)
    checks = ((nothing, lambda s, b: s.contents[b] == ()), (initial, lambda s, b: s.contents[b] == s.initial[b]))
    for res, truth in checks:
        by_id = {s.state_id: s for s in states}
        for p in res.predictions:
            assert p.correct == truth(by_id[p.state_id], p.box)
    # "initial" is always right where no operation touched the box.
    assert all(p.correct for p in initial.predictions if p.numops == 0)


def _surjections(k, g):
    """Maps from k draws onto a g-set that hit every element (inclusion-exclusion)."""
    return sum((-1) ** j * math.comb(g, j) * (g - j) ** k for j in range(g + 1))


def _expected_random_accuracy(state, box):
    """Exact P(correct) of KST24's random baseline: k ~ U{0..3} draws with replacement from the m mentioned
    objects; correct iff the distinct draws are exactly the gold set (k draws onto g objects: surj(k, g) / m^k)."""
    cands = mentioned_objects(state)[box]
    gold = state.contents[box]
    m, g = len(cands), len(gold)
    if not set(gold) <= set(cands):
        return 0.0
    if m == 0:
        return 1.0  # no candidate: always "nothing", and the gold set is empty
    return sum(_surjections(k, g) / m**k for k in range(4)) / 4


def test_random_baseline_matches_its_analytic_expectation():
    # A paper-profile-sized draw (numops 0 rows are where drawing with or without replacement differ most).
    states = generate_states(GeneratorConfig(seed=3, profile="paper"))
    res = evaluate("random", states, EvalConfig(seed=11))
    by_id = {s.state_id: s for s in states}
    for subset in (res.predictions, [p for p in res.predictions if p.numops == 0]):
        q = [_expected_random_accuracy(by_id[p.state_id], p.box) for p in subset]
        observed = sum(p.correct for p in subset)
        # Sum of independent Bernoullis: observed within 4 standard deviations of the exact expectation.
        sd = math.sqrt(sum(x * (1 - x) for x in q))
        assert abs(observed - sum(q)) <= 4 * sd + 1, (observed, sum(q), len(subset))


def test_random_baseline_numops0_is_near_the_papers():
    """The paper's numops-0 random accuracy is 41.06 %; the analytic expectation on a paper-profile set is close.

    (Drawing min(k, m) objects without replacement would give ~54 % here.)"""
    states = generate_states(GeneratorConfig(seed=0, profile="paper"))
    rows = [(s, b) for s in states for b in range(s.num_boxes) if BoxRow(s, b).numops == 0]
    expected = 100 * sum(_expected_random_accuracy(s, b) for s, b in rows) / len(rows)
    assert expected == pytest.approx(PAPER_RANDOM_BASELINE[1][0], abs=3.0)


def test_random_baseline_draws_only_mentioned_objects_and_is_deterministic(dataset):
    _, states = dataset
    for s in states[:20]:
        pred = random_contents(s, seed=5)
        assert pred == random_contents(s, seed=5)
        for box, objs in enumerate(pred):
            assert set(objs) <= set(mentioned_objects(s)[box]) and len(objs) <= 3
            assert list(objs) == sorted(set(objs))  # duplicates of with-replacement draws are dropped


def test_run_writes_all_outputs_and_summary_matches_predictions(dataset, tmp_path):
    path, states = dataset
    results = run_eval(BASELINE_MODELS, path, tmp_path / "run")
    out = tmp_path / "run"
    for name in ("run.json", "predictions.jsonl", "summary.csv", "comparison.csv", "accuracy_by_numops.png",
                 "accuracy_by_numops.pdf"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * len(states) * 7
    with open(out / "summary.csv") as f:
        summary = list(csv.DictReader(f))
    for model in ("random", "nothing", "initial"):
        mine = [r for r in rows if r["model"] == model]
        overall = next(r for r in summary if r["model"] == model and r["bucket"] == "overall")
        assert int(overall["n"]) == len(mine)
        assert int(overall["correct"]) == sum(r["correct"] for r in mine)
        for k in range(7):
            bucket = next(r for r in summary if r["model"] == model and r["bucket"] == str(k))
            assert int(bucket["n"]) == sum(1 for r in mine if r["numops"] == k)
    # The paper's random-baseline row is shown beside ours.
    random_overall = next(r for r in summary if r["model"] == "random" and r["bucket"] == "overall")
    assert random_overall["paper_accuracy"] == "0.239300"
    assert results[0].model == "random"


def test_comparison_tests_with_the_state_as_unit_and_keeps_row_mcnemar(dataset):
    _, states = dataset
    a = evaluate("nothing", states)
    b = evaluate("initial", states)
    table = compare([a, b])
    overall = next(r for r in table.to_dict("records") if r["bucket"] == "overall")
    xs = [p.correct for p in a.predictions]
    ys = [p.correct for p in b.predictions]
    b_only = sum(x and not y for x, y in zip(xs, ys))
    c_only = sum(y and not x for x, y in zip(xs, ys))
    assert (overall["base_only"], overall["variant_only"]) == (b_only, c_only)
    assert overall["p_value_rows"] == pytest.approx(mcnemar_p(b_only, c_only))
    assert overall["test_rows"].startswith("exact McNemar over box rows")
    assert overall["difference"] == pytest.approx(sum(ys) / len(ys) - sum(xs) / len(xs))
    assert overall["ci_low"] <= overall["difference"] <= overall["ci_high"]
    assert sum(r["n"] for r in table.to_dict("records") if r["bucket"] != "overall") == len(xs)
    # p_value: sign-flip test over states, written here as a Monte Carlo over whole states
    per_state: dict[str, int] = {}
    for pa, pb in zip(a.predictions, b.predictions):
        per_state[pa.state_id] = per_state.get(pa.state_id, 0) + int(pb.correct) - int(pa.correct)
    assert overall["n_states"] == len(per_state) == len(states)
    d = np.array(list(per_state.values()))
    flips = np.random.default_rng(0).choice([-1, 1], size=(20000, len(d)))
    mc = float(np.mean(np.abs(flips @ d) >= abs(d.sum())))
    assert overall["p_value"] == pytest.approx(mc, abs=0.01)
    assert overall["test"] == "paired randomization test over states (exact, two-sided)"


def test_resume_after_torn_write_equals_uninterrupted_run(dataset, tmp_path):
    path, _ = dataset
    full = tmp_path / "full"
    run_eval(BASELINE_MODELS, path, full)
    part = tmp_path / "part"
    run_eval(BASELINE_MODELS[:1], path, tmp_path / "scratch")
    # Simulate a kill in the middle of an append: keep 100 complete lines and half of the next one.
    lines = (full / "predictions.jsonl").read_bytes().splitlines(keepends=True)
    part.mkdir()
    (part / "predictions.jsonl").write_bytes(b"".join(lines[:100]) + lines[100][:37])
    (part / "run.json").write_bytes((full / "run.json").read_bytes())
    run_eval(BASELINE_MODELS, path, part)
    for name in ("predictions.jsonl", "summary.csv", "comparison.csv"):
        assert _read(part / name) == _read(full / name), name


def test_load_finished_skips_incomplete_states(dataset, tmp_path):
    path, states = dataset
    run_eval(BASELINE_MODELS[:1], path, tmp_path / "r")
    log = tmp_path / "r" / "predictions.jsonl"
    lines = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(b"".join(lines[:10]))  # one full state (7 rows) + 3 rows of the next
    done = load_finished(log, "random", {s.state_id: s for s in states})
    assert list(done) == [states[0].state_id]


def test_rerun_with_different_config_is_refused_and_nothing_changes(dataset, tmp_path):
    path, _ = dataset
    out = tmp_path / "run"
    run_eval(BASELINE_MODELS[:1], path, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(EntitylensError, match="other inputs.*different .*eval"):
        run_eval(BASELINE_MODELS[:1], path, out, EvalConfig(score_mode="strict"))
    with pytest.raises(EntitylensError, match="models"):
        run_eval(BASELINE_MODELS[:2], path, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_shards_merge_to_the_unsharded_run(dataset, tmp_path):
    path, _ = dataset
    run_eval(BASELINE_MODELS, path, tmp_path / "full")
    shards = [tmp_path / f"s{i}" for i in range(3)]
    for i, d in enumerate(shards):
        run_eval(BASELINE_MODELS, path, d, shard=f"{i}/3")
    merge_runs(shards, tmp_path / "merged")
    for name in ("predictions.jsonl", "summary.csv", "comparison.csv"):
        assert _read(tmp_path / "merged" / name) == _read(tmp_path / "full" / name), name
    with pytest.raises(EntitylensError, match="missing shard"):
        merge_runs(shards[:2], tmp_path / "m2")
    with pytest.raises(EntitylensError, match="given twice"):
        merge_runs([shards[0], shards[0], shards[1], shards[2]], tmp_path / "m3")


def test_bad_input_errors(dataset, tmp_path):
    path, states = dataset
    with pytest.raises(EntitylensError, match="does not exist"):
        run_eval(BASELINE_MODELS, tmp_path / "nope.jsonl", tmp_path / "o")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(EntitylensError, match="no rows"):
        run_eval(BASELINE_MODELS, empty, tmp_path / "o")
    with pytest.raises(EntitylensError, match="no states"):
        evaluate("random", [])
    with pytest.raises(EntitylensError, match="shard"):
        run_eval(BASELINE_MODELS, path, tmp_path / "o", shard="3/3")
    # An output "directory" under a regular file cannot be created (root ignores chmod, so use a file).
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(EntitylensError, match="not writable"):
        run_eval(BASELINE_MODELS, path, blocker / "run")
    assert blocker.read_text() == "x"


def test_summary_intervals_cluster_rows_by_state(dataset):
    from entitylens.stats import clustered_wilson, wilson_interval

    _, states = dataset
    res = evaluate("initial", states)
    t = summary_table([res])
    by_bucket: dict[str, tuple[list[bool], list[str]]] = {}
    for p in res.predictions:
        key = str(min(p.numops, 7)) if p.numops < 7 else "7+"
        for k in (key, "overall"):
            ys, cs = by_bucket.setdefault(k, ([], []))
            ys.append(p.correct)
            cs.append(p.state_id)
    for r in t.to_dict("records"):
        if r["bucket"] == "state" or r["n"] == 0:
            continue
        ys, cs = by_bucket[r["bucket"]]
        assert (r["ci_low"], r["ci_high"]) == pytest.approx(clustered_wilson(ys, cs))
        plain = wilson_interval(sum(ys), len(ys))
        assert r["ci_low"] <= plain[0] + 1e-12 and r["ci_high"] >= plain[1] - 1e-12  # never narrower


def test_prompt_longer_than_context_is_refused_with_the_overshoot(dataset, tiny_model, monkeypatch):
    _, states = dataset
    monkeypatch.setattr(tiny_model.cfg, "n_ctx", 64)
    with pytest.raises(EntitylensError, match=r"more than the model's context of 64"):
        evaluate(tiny_model, states[:1])


def test_tiny_model_run_is_scored_from_its_own_statements(dataset, tiny_model):
    # The random tiny model writes grammatical nonsense; every row must be scored from the parsed text.
    _, states = dataset
    res = evaluate(tiny_model, states[:2], EvalConfig(batch_size=2))
    from entitylens.task import parse_statement

    for p in res.predictions:
        parsed = parse_statement(p.statement)
        expected = parsed.boxes[p.box]
        assert p.prediction == (None if expected is None else tuple(expected))
        assert p.correct == (expected is not None and set(expected) == set(p.gold))
        assert p.statement.startswith("\nStatement: Box 0 contains")
