"""`entitylens study probe|patch` (experiments/probe_base_vs_code.py, patch_base_vs_code.py) end to end.

The scripts run as subprocesses on the shipped testbed pair with small sizes; their outputs are checked
against the per-model files they were derived from (read back independently with the standard library's csv module),
reruns must reuse every finished step, and one run substitutes tiny:llama for the base model. The
GPU-time estimate and the compact rendering of pairs are checked by hand.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from entitylens.errors import EntitylensError

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "experiments" / "probe_base_vs_code.py"
PATCH = ROOT / "experiments" / "patch_base_vs_code.py"
PAIR = ["--base", "testbed:base", "--variant", "testbed:code"]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _run(script: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _cli(script: Path, args: list[str]) -> int:
    """The script's command (``entitylens study probe|patch ARGS``) in this process (imports already paid for)."""
    from entitylens.cli import main

    return main(["study", "probe" if script == PROBE else "patch", *args])


def _main(script: Path, *args: str) -> str:
    """Run a script's command in this process; returns its stdout."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = _cli(script, list(args))
    assert rc == 0, out.getvalue()[-2000:] + err.getvalue()[-4000:]
    return out.getvalue()


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------------
# Probe study
# --------------------------------------------------------------------------------------------------

PROBE_ARGS = [*PAIR, "--states", "30", "--bootstrap", "20", "--folds", "3", "--estimate-above", "0"]


@pytest.fixture(scope="module")
def probe_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("probe_study")
    return out, _run(PROBE, *PROBE_ARGS, "--out", str(out))


@pytest.fixture(scope="module")
def probe_rerun(probe_study):
    """The same command again (in this process): ``(stdout, mtimes before, mtimes after)``."""
    out = probe_study[0]
    before = _mtimes(out)
    stdout = _main(PROBE, *PROBE_ARGS, "--out", str(out), "--quiet")
    return stdout, before, _mtimes(out)


def test_probe_study_writes_every_output(probe_study):
    out, first = probe_study
    for rel in ("cache/base/meta.json", "cache/variant/meta.json", "probe/base/probe.csv", "probe/variant/probe.csv",
                "probe/base/probe_by_layer.png", "compare/probe_compare.png", "compare/probe_diff.csv",
                "summary.csv", "study.json"):
        assert (out / rel).is_file(), rel
    study = json.loads((out / "study.json").read_text())
    assert study["protocol"] == "compact"  # both testbed: models -> the prompts they were trained on
    assert "best exact-set accuracy" in first.stdout


def test_probe_diff_is_variant_minus_base_of_the_two_probe_csvs(probe_study):
    out = probe_study[0]
    base = {(r["layer"], r["role"], r["metric"]): float(r["value"]) for r in read_csv(out / "probe/base/probe.csv")}
    var = {(r["layer"], r["role"], r["metric"]): float(r["value"]) for r in read_csv(out / "probe/variant/probe.csv")}
    diff = read_csv(out / "compare/probe_diff.csv")
    assert {(r["layer"], r["role"], r["metric"]) for r in diff} == set(base) & set(var)
    assert {r["role"] for r in diff} == {"query_box", "query_box_desc"}  # the compact default roles
    for r in diff:
        key = (r["layer"], r["role"], r["metric"])
        assert float(r["base"]) == pytest.approx(base[key], abs=1e-6)
        assert float(r["variant"]) == pytest.approx(var[key], abs=1e-6)
        assert float(r["variant_minus_base"]) == pytest.approx(var[key] - base[key], abs=2e-6)


def test_probe_summary_is_the_best_layer_of_each_probe_csv(probe_study):
    out = probe_study[0]
    summary = read_csv(out / "summary.csv")
    assert len(summary) == 4
    for s in summary:
        rows = [r for r in read_csv(out / "probe" / s["arm"] / "probe.csv")
                if r["role"] == s["role"] and r["metric"] == "exact_match"]
        best = max(float(r["value"]) for r in rows)
        first_best = min(int(r["layer"]) for r in rows if float(r["value"]) == best)
        assert (int(s["best_layer"]), float(s["exact_match"])) == (first_best, pytest.approx(best, abs=1e-6))


def test_probe_estimate_by_hand(probe_study):
    """Tokens: compact prompts are one token per word plus BOS; params: the checkpoint's tensors."""
    from safetensors import safe_open

    from entitylens.activations import compact_cache_prompts
    from entitylens.models.testbed.checkpoints import checkpoint_dir
    from entitylens.pipelines.estimate import estimate_gpu_seconds
    from entitylens.task.targeted import eval_states

    out, first = probe_study
    est = json.loads((out / "study.json").read_text())["estimate"]
    with safe_open(str(checkpoint_dir("base") / "model.safetensors"), framework="pt") as f:
        params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118
    tokens = sum(len(p.text.split()) + 1 for p in compact_cache_prompts(eval_states(seed=0, num_states=30)))
    base = next(a for a in est["arms"] if a["label"] == "base")
    assert (base["params"], base["tokens"]) == (params, tokens)
    assert base["seconds"] == pytest.approx(2 * params * tokens / (0.4 * 989e12), rel=1e-12)
    assert est["seconds"] == pytest.approx(2 * base["seconds"], rel=1e-12)  # same size, same prompts
    assert estimate_gpu_seconds(7e9, 1000, 3) == pytest.approx(2 * 7e9 * 1000 * 3 / (0.4 * 989e12))
    assert "40% of an H100's 989 TFLOP/s bf16 dense peak" in first.stdout


def test_probe_rerun_reuses_everything(probe_study, probe_rerun):
    out = probe_study[0]
    stdout, before, after = probe_rerun
    # meta.json of a cache is rewritten (same bytes) when it is resumed; shards and probe outputs are untouched
    computed = {k for k in before if k.startswith(("cache/", "probe/")) and not k.endswith("/meta.json")}
    assert any(k.endswith(".safetensors") for k in computed) and any(k.endswith("probe.csv") for k in computed)
    assert {k: after[k] for k in computed} == {k: before[k] for k in computed}
    assert stdout.count("0 shards computed, 1 reused") == 2
    assert stdout.count("probes: reusing") == 2
    assert (out / "compare/probe_diff.csv").is_file()


def test_probe_study_with_tiny_llama_as_base(tmp_path):
    out = tmp_path / "tiny"
    stdout = _main(PROBE, "--base", "tiny:llama", "--variant", "testbed:code", "--states", "12", "--bootstrap", "0",
                   "--folds", "2", "--random-control", "--quiet", "--out", str(out))
    study = json.loads((out / "study.json").read_text())
    assert study["protocol"] == "ks" and not study["estimate"]["large"]  # mixed pair: K&S prompts; small models
    assert "no GPU-time estimate needed" in stdout
    meta = json.loads((out / "cache/base/meta.json").read_text())
    assert meta["model"]["spec"] == "tiny:llama"
    assert (out / "cache/base-random/meta.json").is_file()
    metrics = {r["metric"] for r in read_csv(out / "probe/base/probe.csv")}
    assert {"random_model_balanced_accuracy", "over_random"} <= metrics
    assert "tiny:llama" in stdout
    assert (out / "compare/probe_compare.png").is_file()  # 2 layers vs 4: drawn by relative depth, not refused


# --------------------------------------------------------------------------------------------------
# Patch study
# --------------------------------------------------------------------------------------------------

PATCH_ARGS = [*PAIR, "--pairs", "6", "--attribution"]


@pytest.fixture(scope="module")
def patch_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("patch_study")
    return out, _run(PATCH, *PATCH_ARGS, "--out", str(out), "--quiet")


@pytest.fixture(scope="module")
def patch_rerun(patch_study):
    """The same command again (in this process): ``(stdout, mtimes before, mtimes after)``."""
    out = patch_study[0]
    before = _mtimes(out)
    stdout = _main(PATCH, *PATCH_ARGS, "--out", str(out), "--quiet")
    return stdout, before, _mtimes(out)


def _mean_grid(run_dir: Path, kind: str = "activation") -> dict[tuple[str, str], float]:
    return {(r["layer"], r["cell"]): float(r["normalised"]) for r in read_csv(run_dir / "patch.csv")
            if r["kind"] == kind and r["pair"] == "mean" and r["normalised"] != ""}


def test_patch_study_writes_every_output(patch_study):
    out = patch_study[0]
    for rel in ("pairs.jsonl", "patch/base/patch.csv", "patch/variant/patch.csv", "patch/base/patch_resid_pre.png",
                "patch/base/result_resid_pre.safetensors", "patch/variant/agreement.json",
                "compare/compare_resid_pre.png", "compare/compare.csv", "compare-attribution/compare_resid_pre.png",
                "study.json"):
        assert (out / rel).is_file(), rel
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 6 and all(p["clean_prompt"].startswith("B0 ") for p in pairs)  # compact prompts


def test_side_by_side_numbers_equal_each_runs_patch_csv(patch_study):
    out = patch_study[0]
    for kind, d in (("activation", "compare"), ("attribution", "compare-attribution")):
        a, b = _mean_grid(out / "patch/base", kind), _mean_grid(out / "patch/variant", kind)
        rows = read_csv(out / d / "compare.csv")
        assert {(r["layer"], r["cell"]) for r in rows} >= set(a)
        assert {r["cell"] for r in rows} >= {"changed_object", "query_box"}
        for r in rows:
            key = (r["layer"], r["cell"])
            if key in a:
                assert float(r["a"]) == pytest.approx(a[key], abs=2e-6)
            if key in b:
                assert float(r["b"]) == pytest.approx(b[key], abs=2e-6)
            if key in a and key in b:
                assert float(r["b_minus_a"]) == pytest.approx(b[key] - a[key], abs=4e-6)


def test_patch_cells_before_the_change_are_exact_noops(patch_study):
    """The queried box's description token precedes the changed operation: patching it changes nothing."""
    out = patch_study[0]
    for arm in ("base", "variant"):
        grid = _mean_grid(out / "patch" / arm)
        assert all(v == 0 for (_, cell), v in grid.items() if cell == "query_box_desc")
        assert max(v for (_, cell), v in grid.items() if cell == "changed_object") > 0.5
        agreement = json.loads((out / "patch" / arm / "agreement.json").read_text())["resid_pre"]["pair_mean"]
        assert -1 <= agreement["pearson"] <= 1


def test_patch_rerun_reuses_everything(patch_rerun):
    stdout, before, after = patch_rerun
    computed = {k for k in before if k.startswith(("patch/", "pairs.jsonl"))}
    assert any(k.endswith("result_resid_pre.safetensors") for k in computed)
    assert {k: after[k] for k in computed} == {k: before[k] for k in computed}
    assert stdout.count("patching: reusing") == 2
    assert stdout.splitlines()[1].startswith("reusing ")  # the pairs file


def test_patch_study_refuses_other_pairs_in_the_same_dir_and_loses_nothing(patch_study, patch_rerun, capsys):
    out = patch_study[0]
    before = _mtimes(out)
    rc = _cli(PATCH, [*PAIR, "--pairs", "5", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert _mtimes(out) == before


def test_patch_study_with_tiny_llama_as_base(tmp_path):
    out = tmp_path / "tiny"
    # a tiny model as deep as the testbed (4 layers), so the comparison is layer by layer
    _main(PATCH, "--base", "tiny:llama?layers=4", "--variant", "testbed:code", "--pairs", "3", "--states", "6",
          "--quiet", "--kst24-prefix", "--out", str(out))
    runs = {arm: json.loads((out / "patch" / arm / "run.json").read_text()) for arm in ("base", "variant")}
    assert runs["base"]["results"]["patch/resid_pre"]["model"] == "tiny:llama?layers=4"
    first = json.loads((out / "pairs.jsonl").read_text().splitlines()[0])  # K&S prompts behind the 2-shot prefix
    assert first["clean_prompt"].startswith("Given the description") and first["clean_prompt"].endswith(" contains")
    a, b = _mean_grid(out / "patch/base"), _mean_grid(out / "patch/variant")
    rows = {(r["layer"], r["cell"]): r for r in read_csv(out / "compare/compare.csv")}
    for key, v in a.items():
        assert float(rows[key]["a"]) == pytest.approx(v, abs=2e-6)
    for key, v in b.items():
        assert float(rows[key]["b"]) == pytest.approx(v, abs=2e-6)


# --------------------------------------------------------------------------------------------------
# Pieces, by hand
# --------------------------------------------------------------------------------------------------


def test_compact_pairs_render_the_same_worlds():
    from entitylens.activations.roles import find_roles, tokenize_with_offsets
    from entitylens.models.testbed.tokenizer import testbed_tokenizer
    from entitylens.patching.pairs import build_pairs, compact_pairs
    from entitylens.task.compact import compact_prompt, context_words, ordered_contents
    from entitylens.task.targeted import eval_states
    from entitylens.task.text import parse_context

    states = eval_states(seed=3, num_states=12)
    by_id = {s.state_id: s for s in states}
    for kind in ("op_object", "drop_op"):
        ks = build_pairs(states, kind, seed=1, max_pairs=5)
        compact = compact_pairs(ks)
        assert compact and len(compact) <= len(ks)
        for cp in compact:
            s = by_id[cp.state_id]
            box = int(cp.query_box)
            assert cp.clean_prompt == compact_prompt(s, box)  # the testbed's own renderer, on the dataset state
            assert cp.clean_answer == " " + " ".join(ordered_contents(s.initial, s.operations)[box]) + " ;" \
                or (cp.clean_answer == " ;" and not s.contents[box])
            tp = next(p for p in ks if p.state_id == cp.state_id)
            corr = parse_context(tp.corrupted_prompt.rsplit(" Box ", 1)[0])
            assert cp.corrupted_prompt.split(" | ")[0] == " ".join(context_words(corr.initial, corr.operations))
            assert set(cp.corrupted_answer.split()[:-1]) == set(corr.boxes[box])
            if kind == "op_object":  # changed_object: a word of the changed operation, differing between sides
                (cs, ce), (xs, xe) = cp.role_spans["changed_object"]
                clean_word, corr_word = cp.clean_prompt[cs:ce], cp.corrupted_prompt[xs:xe]
                assert clean_word != corr_word
                assert clean_word in s.operations[cp.changed_op].objects
                assert corr_word in corr.operations[cp.changed_op].objects
                ids, offsets = tokenize_with_offsets(testbed_tokenizer(), cp.clean_prompt, prepend_bos=True)
                assert find_roles(cp.clean_prompt, offsets, ["query_box"])["query_box"] == len(ids) - 1


def test_estimate_rejects_bad_numbers():
    from entitylens.pipelines.estimate import estimate_gpu_seconds

    assert estimate_gpu_seconds(1e9, 1e6, utilization=1.0, peak_flops=2e15) == pytest.approx(1.0)
    for bad in ({"params": -1, "tokens": 1}, {"params": 1, "tokens": float("nan")}):
        with pytest.raises(EntitylensError):
            estimate_gpu_seconds(**bad)
    with pytest.raises(EntitylensError):
        estimate_gpu_seconds(1, 1, utilization=0)


def test_declining_at_the_estimate_computes_nothing(tmp_path):
    from entitylens.pipelines.probe_study import ProbeStudyConfig, run_probe_study

    asked = []
    cfg = ProbeStudyConfig(base="testbed:base", variant="testbed:code", out=tmp_path / "o", states=3,
                           estimate_above=0)
    with pytest.raises(EntitylensError, match="--yes"):
        run_probe_study(cfg, confirm=lambda q: asked.append(q) or False, say=lambda _: None)
    assert len(asked) == 1 and "GPU time" in asked[0]
    assert not (tmp_path / "o" / "cache").exists()


@pytest.mark.parametrize(
    ("script", "args", "needle"),
    [
        (PROBE, ["--base", "no-such-model", "--variant", "testbed:code"], "--base"),
        (PROBE, [*PAIR, "--data", "missing.jsonl"], "missing.jsonl"),
        (PROBE, [*PAIR, "--limit", "0"], "--limit"),
        (PATCH, [*PAIR, "--kind", "p24"], "--kind"),
        (PATCH, [*PAIR, "--kst24-prefix"], "--protocol ks"),
        (PATCH, [*PAIR, "--component", "nope"], "--component"),
    ],
)
def test_bad_input_is_one_line_error(script, args, needle, tmp_path, capsys):
    rc = _cli(script, [*args, "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_device_and_dtype_defaults_follow_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """A study on the default (7B) pair runs on the GPU in bf16 when one is visible, else on the CPU in fp32."""
    import argparse

    import entitylens.cli.study as st

    for gpu, device, dtype in ((True, "cuda", "bfloat16"), (False, "cpu", "float32")):
        monkeypatch.setattr(st, "_cuda_available", lambda gpu=gpu: gpu)
        args = argparse.Namespace(device=None, dtype=None)
        st._device_defaults(args)
        assert (args.device, args.dtype) == (device, dtype)
        args = argparse.Namespace(device="cpu", dtype="float16")  # given: kept
        st._device_defaults(args)
        assert (args.device, args.dtype) == ("cpu", "float16")
