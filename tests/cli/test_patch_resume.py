"""`patch run` resumes at the grain it keeps on disk (chunks of pairs), and the result equals an uninterrupted run."""

from __future__ import annotations

from pathlib import Path

import pytest

import entitylens.patching.run as run_mod
from entitylens.cli import main
from entitylens.patching import PatchResult
from entitylens.task import GeneratorConfig, generate_dataset


def test_killed_patch_run_resumes_from_finished_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "d.jsonl"
    generate_dataset(GeneratorConfig(seed=6, num_states=40, num_operations=4), data)
    pairs = tmp_path / "pairs.jsonl"
    assert main(["--quiet", "patch", "pairs", "--data", str(data), "--kind", "drop_op", "--max-pairs", "12",
                 "--out", str(pairs)]) == 0  # fmt: skip
    cmd = ["--quiet", "patch", "run", "--model", "tiny:llama", "--pairs", str(pairs), "--component", "resid_pre"]
    monkeypatch.setattr(run_mod, "CHUNK_PAIRS", 4)
    ref = tmp_path / "ref"
    assert main([*cmd, "--out", str(ref)]) == 0

    real = run_mod.patch_grid
    calls: list[int] = []

    def crash_on_second(model, pairs, *a, **k):  # noqa: ANN001, ANN202
        calls.append(len(pairs))
        if len(calls) == 2:
            raise KeyboardInterrupt  # what a kill between two chunks leaves behind
        return real(model, pairs, *a, **k)

    monkeypatch.setattr(run_mod, "patch_grid", crash_on_second)
    out = tmp_path / "out"
    assert main([*cmd, "--out", str(out)]) == 130
    assert len(list((out / ".partial").rglob("chunk_*.safetensors"))) == 1
    calls.clear()
    monkeypatch.setattr(
        run_mod, "patch_grid", lambda model, pairs, *a, **k: (calls.append(len(pairs)), real(model, pairs, *a, **k))[1]
    )
    assert main([*cmd, "--out", str(out)]) == 0
    assert calls == [4, 4]  # the first chunk was reused, not recomputed
    assert not (out / ".partial").exists()
    a, b = (
        PatchResult.load(ref / "result_resid_pre.safetensors"),
        PatchResult.load(out / "result_resid_pre.safetensors"),
    )
    assert a.pair_names == b.pair_names and a.normalised.equal(b.normalised) and a.n_noop_cells == b.n_noop_cells
    for name in ("patch.csv", "run.json", "result_resid_pre.safetensors", "pairs_tokens.jsonl"):
        assert (ref / name).read_bytes() == (out / name).read_bytes(), name
