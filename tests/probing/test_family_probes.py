"""Family targets probed from a real cache: per-layer accuracy against scikit-learn, the CLI, the rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from entitylens.activations import CacheConfig, cache_activations, load_cache
from entitylens.cli import main
from entitylens.errors import EntitylensError
from entitylens.probing import ProbeConfig, fit_probes, split_by_group
from entitylens.probing.family_rows import decided, example_correct
from entitylens.probing.outputs import read_probe_table
from entitylens.probing.run import ProbeRunConfig, run_probes
from entitylens.task import GeneratorConfig, generate_states

TARGETS = ("global", "prior", "mention", "incremental", "tags_box", "tags_object")


@pytest.fixture(autouse=True)
def _only_probe_command(monkeypatch: pytest.MonkeyPatch) -> None:
    import entitylens.cli

    monkeypatch.setattr(entitylens.cli, "_COMMAND_MODULES", ("probe",))


@pytest.fixture(scope="module")
def family_cache(tmp_path_factory: pytest.TempPathFactory, tiny_model: Any) -> Path:
    """A tiny:llama cache of 40 states x 7 boxes at the query roles and every mention / end / object role."""
    states = list(generate_states(GeneratorConfig(seed=5, num_states=40, num_operations=3)))
    out = tmp_path_factory.mktemp("family") / "cache"
    cfg = CacheConfig(roles=("last", "@mentions", "@op_ends", "@objects"), hooks=("resid_post",))
    cache_activations(tiny_model, states, cfg, out, model_spec="tiny:llama")
    return out


def _sk_decisions(x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, C: float) -> np.ndarray:
    """scikit-learn's LogisticRegression per label column on StandardScaler features: decision values."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    sc = StandardScaler().fit(x_tr)
    a, b = sc.transform(x_tr), sc.transform(x_te)
    out = np.zeros((len(x_te), y_tr.shape[1]))
    for j in range(y_tr.shape[1]):
        if y_tr[:, j].min() == y_tr[:, j].max():  # one class in training: scikit-learn refuses; predict it
            out[:, j] = 1e6 if y_tr[0, j] else -1e6
            continue
        out[:, j] = LogisticRegression(C=C, max_iter=5000, tol=1e-7).fit(a, y_tr[:, j]).decision_function(b)
    return out


@pytest.mark.parametrize("target", TARGETS)
def test_family_target_agrees_with_sklearn(family_cache: Path, target: str) -> None:
    """Same features and split: per-layer exact match (tags: every scored entry) within 1 point of scikit-learn."""
    cache = load_cache(family_cache)
    run = run_probes(cache, ProbeRunConfig(target=target, roles=("last",), control=False, bootstrap=0,
                                           probe=ProbeConfig(Cs=(1.0,), seed=2)))
    t, te, tr = run.target, run.split.test, run.split.train
    role = next(iter(run.results))
    task = run.results[role]
    # the features of every example, gathered here independently of the run
    feats = []
    for i in range(len(t.rows)):
        r = t.example_roles[i] if t.is_context else "last"
        feats.append(cache.features("resid_post", r)[:, int(t.rows[i])])
    X = torch.stack(feats, 1).double().numpy()
    y = t.labels.numpy()
    ours = example_correct(task, t, te).double().mean(-1)
    for layer in range(X.shape[0]):
        dec = _sk_decisions(X[layer, tr], y[tr.numpy()], X[layer, te], 1.0)
        if t.column_groups:
            n = len(te)
            cls = dec.reshape(n, -1, 3).argmax(-1)
            truth = y[te.numpy()].reshape(n, -1, 3).argmax(-1)
            scored = t.scored[te].numpy()  # type: ignore[index]
            ok = ((cls == truth) | ~scored).all(-1)
        else:
            ok = ((dec > 0) == y[te.numpy()]).all(-1)
        assert abs(float(ok.mean()) - float(ours[layer])) <= 0.01, (target, layer, float(ok.mean()), float(ours[layer]))


def test_synthetic_ternary_tags_match_sklearn() -> None:
    """A planted three-class signal per entry: one-vs-rest argmax, ours vs scikit-learn, within 1 point."""
    from entitylens.probing.targets import ProbeTarget

    gen = torch.Generator().manual_seed(0)
    n, d, entries = 400, 24, 4
    X = torch.randn(2, n, d, generator=gen, dtype=torch.float64)
    cls = torch.randint(0, 3, (n, entries), generator=gen)
    for e in range(entries):  # class c of entry e shifts feature 3e + c
        X[:, torch.arange(n), 3 * e + cls[:, e]] += 3.0
    labels = torch.nn.functional.one_hot(cls, 3).bool().reshape(n, entries * 3)
    groups = [str(i) for i in range(n)]
    split = split_by_group(groups, 0.25, 0)
    res = fit_probes(X.float(), labels, groups, ProbeConfig(Cs=(1.0,)), split=split)
    t = ProbeTarget(name="tags_box", rows=torch.arange(n), labels=labels, target_names=tuple(map(str, range(12))),
                    groups=tuple(groups), numops=torch.zeros(n, dtype=torch.int64),
                    types=torch.zeros(n, dtype=torch.int64), vocabulary=(), objects=torch.zeros(n, 0, dtype=torch.bool),
                    column_groups=tuple(e for e in range(entries) for _ in range(3)),
                    scored=torch.ones(n, entries, dtype=torch.bool))
    pred = decided(res, t).reshape(2, len(split.test), entries, 3).int().argmax(-1)
    ours = (pred == cls[split.test]).double().mean((1, 2))
    for layer in range(2):
        dec = _sk_decisions(X[layer, split.train].numpy(), labels[split.train].numpy(),
                            X[layer, split.test].numpy(), 1.0)
        sk = (dec.reshape(len(split.test), entries, 3).argmax(-1) == cls[split.test].numpy()).mean()
        assert sk > 0.8  # the signal is there
        assert abs(float(sk) - float(ours[layer])) <= 0.01


def test_cli_probe_family_targets(family_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "mention"
    assert main(["probe", "--cache", str(family_cache), "--target", "mention", "--Cs", "1", "--bootstrap", "10",
                 "--out", str(out)]) == 0
    assert "at " in capsys.readouterr().out
    df = read_probe_table(out)
    metrics = set(df.metric)
    assert {"exact_match", "exact_match_kind=desc", "exact_match_kind=put", "exact_match_ops=0",
            "control_balanced_accuracy"} <= metrics
    assert set(df.role) == {"@mentions"}
    out2 = tmp_path / "tags"
    assert main(["probe", "--cache", str(family_cache), "--target", "tags_object", "--Cs", "1", "--bootstrap", "0",
                 "--no-control", "--class-weight", "balanced", "--out", str(out2)]) == 0
    meta = json.loads((out2 / "meta.json").read_text())
    assert meta["config"]["probe"]["class_weight"] == "balanced"
    tags = read_probe_table(out2)
    assert {"tag_accuracy", "tag_recall_present", "tag_recall_never"} <= set(tags.metric)
    out3 = tmp_path / "global"
    assert main(["probe", "--cache", str(family_cache), "--target", "global", "--roles", "last", "--Cs", "1",
                 "--bootstrap", "0", "--out", str(out3)]) == 0
    g = read_probe_table(out3)
    assert {"exact_match_queried_box", "exact_match_other_boxes", "exact_match_box=6"} <= set(g.metric)
    out4 = tmp_path / "tags_ridge"
    assert main(["probe", "--cache", str(family_cache), "--target", "tags_object", "--Cs", "1e-4,1e-2",
                 "--folds", "2", "--bootstrap", "0", "--no-control", "--class-weight", "balanced",
                 "--estimator", "ridge", "--out", str(out4)]) == 0
    assert json.loads((out4 / "meta.json").read_text())["config"]["probe"]["estimator"] == "ridge"
    assert {"tag_accuracy", "tag_recall_never"} <= set(read_probe_table(out4).metric)
    assert "calibrate" not in json.loads((out4 / "meta.json").read_text())["config"]["probe"]  # identity kept
    out5 = tmp_path / "tags_ridge_calibrated"
    assert main(["probe", "--cache", str(family_cache), "--target", "tags_object", "--Cs", "1e-4,1e-2",
                 "--folds", "2", "--bootstrap", "0", "--no-control", "--class-weight", "balanced",
                 "--estimator", "ridge", "--calibrate", "--out", str(out5)]) == 0
    assert json.loads((out5 / "meta.json").read_text())["config"]["probe"]["calibrate"] is True
    assert {"tag_accuracy", "tag_recall_never"} <= set(read_probe_table(out5).metric)


def test_cli_target_choices_match_library() -> None:
    from entitylens.cli.probe import TARGET_CHOICES
    from entitylens.probing.targets import TARGETS as LIB

    assert TARGET_CHOICES == LIB


def test_context_target_on_cache_without_positions(tmp_path: Path, tiny_model: Any,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    states = list(generate_states(GeneratorConfig(seed=1, num_states=4, num_operations=2)))
    cache_activations(tiny_model, states, CacheConfig(roles=("last",)), tmp_path / "c", model_spec="tiny:llama")
    with pytest.raises(EntitylensError, match="cache --roles @op_ends"):
        run_probes(tmp_path / "c", ProbeRunConfig(target="incremental"))
    assert main(["probe", "--cache", str(tmp_path / "c"), "--target", "tags_box", "--out", str(tmp_path / "o")]) != 0
    err = capsys.readouterr().err
    assert "@mentions" in err and "Traceback" not in err
