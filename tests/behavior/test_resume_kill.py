"""Kill -9 an `entitylens eval` mid-run, rerun the same command, and get an uninterrupted run's files."""

import os
import signal
import subprocess
import sys
import time

import pytest

from entitylens.task import GeneratorConfig, generate_dataset


def _cmd(data, out):
    return [
        sys.executable, "-m", "entitylens", "--quiet", "eval", "--models", "tiny:llama", "random",
        "--data", str(data), "--out", str(out), "--batch-size", "2",
    ]  # fmt: skip


def _env():
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", MPLBACKEND="Agg")
    return env


@pytest.mark.timeout(600)
def test_kill_9_mid_run_then_rerun_equals_uninterrupted(tmp_path):
    data = tmp_path / "d.jsonl"
    generate_dataset(GeneratorConfig(seed=5, num_states=8, num_operations=3), data)

    full = tmp_path / "full"
    subprocess.run(_cmd(data, full), check=True, env=_env(), capture_output=True, timeout=300)

    part = tmp_path / "part"
    proc = subprocess.Popen(_cmd(data, part), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = part / "predictions.jsonl"
    deadline = time.time() + 240
    # Wait until at least one batch (2 states = 14 rows) is on disk, then kill without warning.
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and log.read_bytes().count(b"\n") >= 14:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; " + proc.stderr.read().decode()[-500:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    lines_at_kill = log.read_bytes().count(b"\n")
    assert 14 <= lines_at_kill < 8 * 7  # killed mid-run, not before the first batch nor after the last

    subprocess.run(_cmd(data, part), check=True, env=_env(), capture_output=True, timeout=300)
    for name in ("predictions.jsonl", "summary.csv", "comparison.csv", "run.json"):
        assert (part / name).read_bytes() == (full / name).read_bytes(), name
