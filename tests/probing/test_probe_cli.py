"""`entitylens probe` on real caches: agreement with scikit-learn, CLI end to end, controls, compare, errors."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from entitylens.activations import CacheConfig, cache_activations, load_cache
from entitylens.cli import main
from entitylens.errors import EntitylensError
from entitylens.probing import ProbeConfig, control_labels, fit_probes, split_by_group
from entitylens.probing.outputs import read_probe_table
from entitylens.probing.run import ProbeRunConfig, run_probes
from entitylens.probing.targets import build_target
from entitylens.stats import clustered_wilson
from entitylens.task import GeneratorConfig, generate_states

FAST = ProbeConfig(Cs=(0.1, 1.0), folds=3)


def where(df: Any, **equals: Any) -> list[dict[str, Any]]:
    """The rows of a probe table whose columns equal the given values (as plain dicts)."""
    return [r for r in df.to_dict("records") if all(r[k] == v for k, v in equals.items())]


@pytest.fixture(autouse=True)
def _only_probe_command(monkeypatch: pytest.MonkeyPatch) -> None:
    """Build the CLI with just `probe`, so these tests do not depend on other areas' subcommands."""
    import entitylens.cli

    monkeypatch.setattr(entitylens.cli, "_COMMAND_MODULES", ("probe",))


@pytest.fixture(scope="module")
def states() -> list[Any]:
    return list(generate_states(GeneratorConfig(seed=3, num_states=90, num_operations=3)))


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory, tiny_model: Any, states: list[Any]) -> tuple[Path, Path]:
    """A tiny:llama cache and the same rows through a tiny:llama with other random weights (random-model control)."""
    from entitylens.models import load_model

    root = tmp_path_factory.mktemp("probe_caches")
    cfg = CacheConfig(roles=("query_box", "last"), hooks=("resid_post",))
    cache_activations(tiny_model, states, cfg, root / "model", model_spec="tiny:llama")
    other = load_model("tiny:llama", seed=12345)
    cache_activations(other, states, cfg, root / "random", model_spec="tiny:llama?seed=12345")
    return root / "model", root / "random"


def _sk_predict(x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, C: float) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    sc = StandardScaler().fit(x_tr)
    a, b = sc.transform(x_tr), sc.transform(x_te)
    out = np.zeros((len(x_te), y_tr.shape[1]), dtype=bool)
    for j in range(y_tr.shape[1]):
        if y_tr[:, j].min() == y_tr[:, j].max():  # scikit-learn refuses one class; the probe predicts it
            out[:, j] = bool(y_tr[0, j])
            continue
        clf = LogisticRegression(C=C, max_iter=5000, tol=1e-6).fit(a, y_tr[:, j])
        out[:, j] = clf.predict(b).astype(bool)
    return out


def test_agrees_with_sklearn_per_layer(caches: tuple[Path, Path]) -> None:
    """Same features and split: exact-set and mean balanced accuracy within 1 point of LogisticRegression."""
    from sklearn.metrics import balanced_accuracy_score

    cache = load_cache(caches[0])
    run = run_probes(cache, ProbeRunConfig(roles=("query_box",), control=False, bootstrap=0,
                                           probe=ProbeConfig(Cs=(1.0,), seed=4)))
    t = run.target
    x = cache.features("resid_post", "query_box")[:, t.rows].double().numpy()
    y = t.labels.numpy()
    tr, te = run.split.train.numpy(), run.split.test.numpy()
    cols = (y[te].sum(0) > 0) & (y[te].sum(0) < len(te))
    table = run.table
    for li, layer in enumerate(run.layers):
        pred = _sk_predict(x[li, tr], y[tr], x[li, te], 1.0)
        sk_exact = float((pred == y[te]).all(1).mean())
        sk_bal = float(np.mean([balanced_accuracy_score(y[te][:, j], pred[:, j]) for j in np.flatnonzero(cols)]))
        ours = {r["metric"]: r["value"] for r in where(table, layer=layer, role="query_box")}
        assert abs(ours["exact_match"] - sk_exact) <= 0.01, (layer, ours["exact_match"], sk_exact)
        assert abs(ours["balanced_accuracy"] - sk_bal) <= 0.01, (layer, ours["balanced_accuracy"], sk_bal)
    # The split keeps whole scenarios apart (a random tiny model has nothing to find once sibling prefixes
    # cannot leak answers: its probes sit at chance, which is what an honest split shows).
    scen = [t.scenarios[i] for i in range(len(t.scenarios))]
    assert not ({scen[i] for i in tr} & {scen[i] for i in te})


def test_cli_end_to_end_matches_direct_fit(caches: tuple[Path, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "probe"
    argv = ["--quiet", "probe", "--cache", str(caches[0]), "--target", "box_contents", "--roles", "query_box,last",
            "--seed", "2", "--Cs", "0.1,1", "--folds", "3", "--out", str(out)]
    assert main(argv) == 0
    assert "probed 630 examples" in capsys.readouterr().out
    for name in ("probe.csv", "probe_by_layer.png", "meta.json"):
        assert (out / name).stat().st_size > 0
    table = read_probe_table(out)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["target"] == "box_contents" and meta["seed"] == 2 and meta["cache"]["model"]["spec"] == "tiny:llama"

    # Independent recomputation with the library pieces: the same split, probe and control task.
    cache = load_cache(caches[0])
    t = build_target(cache, "box_contents")
    groups = [str(r["sample_id"]) for r in cache.rows]  # the default split keeps whole scenarios apart
    cfg = ProbeConfig(Cs=(0.1, 1.0), folds=3, seed=2)
    split = split_by_group(groups, 0.2, 2)
    te = split.test
    assert not ({groups[i] for i in split.train.tolist()} & {groups[i] for i in te.tolist()})
    y_te = t.labels[te]
    cols = (y_te.sum(0) > 0) & (y_te.sum(0) < len(te))
    # Control type = the queried box's initial object set, recomputed from the rows (not from build_target).
    obj_types = ["+".join(sorted(r["initial"])) for r in cache.rows]
    assert len(set(obj_types)) > 7  # object types, not the 7 boxes
    for role in ("query_box", "last"):
        feats = cache.features("resid_post", role)
        res = fit_probes(feats, t.labels, groups, cfg, split=split)
        ctl = fit_probes(feats, control_labels(t.labels, obj_types, 2), groups, cfg, split=split)
        m, cm = res.metrics(), ctl.metrics()
        y_c = control_labels(t.labels, obj_types, 2)[te]
        ccols = (y_c.sum(0) > 0) & (y_c.sum(0) < len(te))
        numops = torch.tensor([r["numops"] for r in cache.rows])
        strat = res.stratified(numops)
        for li, layer in enumerate(cache.layers("resid_post")):
            got = {r["metric"]: r for r in where(table, layer=layer, role=role)}
            assert got["exact_match"]["value"] == pytest.approx(float(m["exact_match"][li]), abs=1e-6)
            assert got["exact_match"]["n"] == len(te)
            bal = float(m["balanced_accuracy_per_target"][li, cols].mean())
            cbal = float(cm["balanced_accuracy_per_target"][li, ccols].mean())
            assert got["balanced_accuracy"]["value"] == pytest.approx(bal, abs=1e-6)
            assert got["control_balanced_accuracy"]["value"] == pytest.approx(cbal, abs=1e-6)
            assert got["selectivity"]["value"] == pytest.approx(bal - cbal, abs=1e-6)
            lo, hi = got["balanced_accuracy"]["ci_low"], got["balanced_accuracy"]["ci_high"]
            assert lo <= got["balanced_accuracy"]["value"] <= hi
            for j, s in enumerate(strat.strata.tolist()):
                row = got[f"exact_match_numops={s}"]
                assert row["value"] == pytest.approx(float(strat.accuracy[li, j]), abs=1e-6)
                assert row["n"] == int(strat.count[j])
                rows_s = [i for i, n in enumerate(numops[te].tolist()) if n == s]
                ok = res.correct("test")[li, rows_s].tolist()
                lo_s, _ = clustered_wilson(ok, [groups[te[i]] for i in rows_s])
                assert row["ci_low"] == pytest.approx(lo_s, abs=1e-6)
            # rows an operation changed, pooled (the updated state), by hand from the probe's own verdicts
            changed = [i for i, n in enumerate(numops[te].tolist()) if n >= 1]
            assert changed and len(changed) < len(te)
            pooled = got["exact_match_numops>=1"]
            ok = res.correct("test")[li, changed].tolist()
            assert pooled["n"] == len(changed)
            assert pooled["value"] == pytest.approx(sum(ok) / len(ok), abs=1e-6)
            lo_c, _ = clustered_wilson(ok, [groups[te[i]] for i in changed])
            assert pooled["ci_low"] == pytest.approx(lo_c, abs=1e-6)
            assert "baseline_majority_numops>=1" in got

    # Same seed -> byte-identical outputs.
    again = tmp_path / "again"
    assert main(argv[:-1] + [str(again)]) == 0
    for name in ("probe.csv", "probe_by_layer.png"):
        assert (out / name).read_bytes() == (again / name).read_bytes()


def test_random_model_control_and_compare(caches: tuple[Path, Path], tmp_path: Path) -> None:
    base, rand = tmp_path / "base", tmp_path / "rand"
    common = ["--quiet", "probe", "--roles", "query_box", "--Cs", "1", "--bootstrap", "20"]
    assert main([*common, "--cache", str(caches[0]), "--random-cache", str(caches[1]), "--out", str(base)]) == 0
    assert main([*common, "--cache", str(caches[1]), "--no-control", "--out", str(rand)]) == 0
    tb, tr = read_probe_table(base), read_probe_table(rand)
    assert "control_balanced_accuracy" not in set(tr["metric"])
    # The random-model rows of the base run are the random cache probed with the same split and labels.
    for layer in (0, 1):
        b = {r["metric"]: r["value"] for r in where(tb, layer=layer)}
        r = {x["metric"]: x["value"] for x in where(tr, layer=layer)}
        # (probe.csv keeps 6 decimals)
        assert b["random_model_balanced_accuracy"] == pytest.approx(r["balanced_accuracy"], abs=2e-6)
        assert b["random_model_exact_match"] == pytest.approx(r["exact_match"], abs=2e-6)
        assert b["over_random"] == pytest.approx(b["balanced_accuracy"] - r["balanced_accuracy"], abs=2e-6)
    out = tmp_path / "cmp"
    assert main(["--quiet", "probe", "--compare", str(base), str(rand), "--out", str(out)]) == 0
    assert (out / "probe_compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_object_in_box_and_disjoint_objects(caches: tuple[Path, Path]) -> None:
    run = run_probes(caches[0], ProbeRunConfig(target="object_in_box", roles=("query_box",), bootstrap=0,
                                               heldout_object_fraction=0.03, probe=FAST))
    held = {run.target.vocabulary[i] for i in run.split.heldout_objects}
    assert held
    tr_objs = run.target.objects[run.split.train]
    assert not tr_objs[:, list(run.split.heldout_objects)].any()  # no held-out object in training
    metrics = set(run.table["metric"])
    assert {"exact_match_rows_with_heldout", "exact_match_rows_without_heldout"} <= metrics
    n_with = {r["n"] for r in where(run.table, metric="exact_match_rows_with_heldout")}
    assert n_with == {int(run.split.test_heldout.sum())}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--cache", "{missing}"], "has no meta.json; build the cache first with `entitylens cache`"),
        (["--cache", "{cache}", "--roles", "op0_object"], "role 'op0_object' is not in this cache"),
        (["--cache", "{cache}", "--layers", "7"], "layers [7] are not in the cache"),
        (["--compare", "{missing}", "{missing}"], "probe.csv does not exist"),
        ([], "--cache is required"),
        (["--cache", "{cache}", "--calibrate"], "calibrate applies to ridge probes"),
    ],
)
def test_errors_are_one_line_and_write_nothing(caches: tuple[Path, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str], extra: list[str],
                                               message: str) -> None:
    out = tmp_path / "out"
    argv = [a.format(missing=tmp_path / "nope", cache=caches[0]) for a in extra]
    assert main(["--quiet", "probe", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (out / "probe.csv").exists()


@pytest.mark.smollm2
def test_smollm2_smoke(smollm2: Any, tmp_path: Path, states: list[Any]) -> None:
    cfg = CacheConfig(roles=("query_box", "last"), layers=(3, 15))
    cache_activations(smollm2, states[:8], cfg, tmp_path / "cache", model_spec="smollm2-135m-instruct")
    out = tmp_path / "probe"
    assert main(["--quiet", "probe", "--cache", str(tmp_path / "cache"), "--Cs", "1", "--test-fraction", "0.25",
                 "--bootstrap", "10", "--out", str(out)]) == 0
    table = read_probe_table(out)
    assert sorted(set(table["layer"].tolist())) == [3, 15]
    assert set(table["role"]) == {"query_box", "last"}
    assert all(0.0 <= r["value"] <= 1.0 for r in where(table, metric="exact_match"))


def test_reinitialize_weights_is_a_seeded_random_model_of_the_same_architecture() -> None:
    from entitylens.activations import model_fingerprint
    from entitylens.models import load_model
    from entitylens.probing.run import reinitialize_weights

    trained = load_model("tiny:llama")
    a, b, c = load_model("tiny:llama"), load_model("tiny:llama"), load_model("tiny:llama")
    reinitialize_weights(a, seed=1)
    reinitialize_weights(b, seed=1)
    reinitialize_weights(c, seed=2)
    init_range = a.original_model.config.initializer_range
    named = dict(trained.original_model.named_parameters())
    for (name, pa), pb, pc in zip(a.original_model.named_parameters(), b.original_model.parameters(),
                                  c.original_model.parameters(), strict=True):
        assert pa.shape == named[name].shape
        assert torch.equal(pa, pb)  # same seed, same weights
        if pa.ndim == 2:  # linear layers and embeddings: fresh N(0, initializer_range) draws
            assert not torch.equal(pa, named[name]) and not torch.equal(pa, pc)
            assert float(pa.detach().std()) == pytest.approx(init_range, rel=0.15)
        else:  # RMSNorm scales reset to one
            assert torch.equal(pa, torch.ones_like(pa))
    assert model_fingerprint(a) != model_fingerprint(trained)
    with pytest.raises(EntitylensError, match="cannot re-initialise a str"):
        reinitialize_weights("not a model")


def test_control_needs_initial_contents_in_the_rows(caches: tuple[Path, Path]) -> None:
    """A cache whose rows lack 'initial' (older format) still probes without the control, and says how to fix it."""
    cache = load_cache(caches[0])
    cache.rows = [{k: v for k, v in r.items() if k != "initial"} for r in cache.rows]
    cfg = ProbeRunConfig(roles=("query_box",), bootstrap=0, probe=ProbeConfig(Cs=(1.0,), folds=2, seed=0))
    with pytest.raises(EntitylensError, match="rebuild the cache .* or pass --no-control") as err:
        run_probes(cache, cfg)
    assert "\n" not in str(err.value)
    run = run_probes(cache, replace(cfg, control=False))
    assert "selectivity" not in set(run.table["metric"])
