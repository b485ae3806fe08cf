"""Probes cannot memorise the scenario: the split keeps scenarios apart, and baselines sit beside every metric."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from entitylens.activations import CacheConfig, cache_activations, load_cache
from entitylens.cli import main
from entitylens.probing import ProbeConfig
from entitylens.probing.outputs import read_probe_table
from entitylens.probing.rows import baseline_predictions
from entitylens.probing.run import ProbeRunConfig, run_probes
from entitylens.task import GeneratorConfig, generate_states


@pytest.fixture(scope="module")
def prefix_cache(tmp_path_factory: pytest.TempPathFactory, tiny_model: Any) -> Path:
    """K&S layout: every prefix of few scenarios (the setting where a state split leaks answers)."""
    states = generate_states(GeneratorConfig(seed=8, num_states=60, num_operations=5, sampling="prefixes"))
    assert len({s.sample_id for s in states}) == 10
    out = tmp_path_factory.mktemp("prefix") / "cache"
    cache_activations(tiny_model, states, CacheConfig(roles=("query_box",), hooks=("resid_post",)), out,
                      model_spec="tiny:llama")  # fmt: skip
    return out


CFG = ProbeConfig(Cs=(1.0,), folds=3, seed=1)


def _value(table: Any, metric: str) -> float:
    return float(next(r["value"] for r in table.to_dict("records") if r["metric"] == metric))


def test_scenario_split_keeps_siblings_out_and_the_lookup_falls_back_to_majority(prefix_cache: Path) -> None:
    run = run_probes(prefix_cache, ProbeRunConfig(roles=("query_box",), control=False, bootstrap=0, probe=CFG))
    t, sp = run.target, run.split
    assert not ({t.scenarios[i] for i in sp.train.tolist()} & {t.scenarios[i] for i in sp.test.tolist()})
    assert _value(run.table, "baseline_sibling_lookup") == _value(run.table, "baseline_majority")


def test_state_split_leaks_through_siblings_and_says_so(prefix_cache: Path, tmp_path: Path, capsys) -> None:
    run = run_probes(prefix_cache, ProbeRunConfig(roles=("query_box",), control=False, bootstrap=0, probe=CFG,
                                                  split="state"))  # fmt: skip
    t, sp = run.target, run.split
    assert {t.scenarios[i] for i in sp.train.tolist()} & {t.scenarios[i] for i in sp.test.tolist()}
    lookup, majority = _value(run.table, "baseline_sibling_lookup"), _value(run.table, "baseline_majority")
    assert lookup > majority + 0.1  # answers can be looked up from a test state's siblings, with no activations
    out = tmp_path / "p"
    assert main(["--quiet", "probe", "--cache", str(prefix_cache), "--roles", "query_box", "--split", "state",
                 "--no-control", "--bootstrap", "0", "--Cs", "1", "--folds", "3", "--out", str(out)]) == 0  # fmt: skip
    captured = capsys.readouterr()
    assert "warning: split by state" in captured.err
    assert "baselines: always empty" in captured.out


def test_baselines_by_hand(prefix_cache: Path) -> None:
    run = run_probes(prefix_cache, ProbeRunConfig(roles=("query_box",), control=False, bootstrap=0, probe=CFG,
                                                  split="state"))  # fmt: skip
    t, sp = run.target, run.split
    preds = baseline_predictions(t, sp)
    y = t.labels
    tr, te = sp.train.tolist(), sp.test.tolist()
    sets = [tuple(y[j].tolist()) for j in tr]
    majority = max(sorted(set(sets)), key=sets.count)
    assert all(tuple(r.tolist()) == majority for r in preds["baseline_majority"])
    assert not preds["baseline_empty"].any()
    for r, i in enumerate(te):  # the closest sibling state of the same scenario and queried box
        sib = [j for j in tr if t.scenarios[j] == t.scenarios[i] and t.boxes[j] == t.boxes[i]]
        if sib:
            best = min(sib, key=lambda j: (abs(t.prefix_ops[j] - t.prefix_ops[i]), t.prefix_ops[j], j))
            assert preds["baseline_sibling_lookup"][r].tolist() == y[best].tolist()
    exact = float((preds["baseline_sibling_lookup"] == y[sp.test]).all(-1).double().mean())
    assert _value(run.table, "baseline_sibling_lookup") == pytest.approx(exact, abs=1e-6)


def test_cli_says_when_the_best_layer_does_not_beat_the_baselines(prefix_cache: Path, tmp_path: Path,
                                                                   capsys) -> None:  # fmt: skip
    out = tmp_path / "p"
    assert main(["--quiet", "probe", "--cache", str(prefix_cache), "--roles", "query_box", "--no-control",
                 "--bootstrap", "0", "--Cs", "1", "--folds", "3", "--out", str(out)]) == 0  # fmt: skip
    said = capsys.readouterr().out
    table = read_probe_table(out)
    best = max((r for r in table.to_dict("records") if r["metric"] == "exact_match"), key=lambda r: float(r["value"]))
    top = max(_value(table, b) for b in ("baseline_empty", "baseline_majority", "baseline_sibling_lookup"))
    assert ("does NOT beat" in said) == (float(best["ci_low"]) <= top)
    cache = load_cache(prefix_cache)
    assert len(cache.rows) == 60 * 7
