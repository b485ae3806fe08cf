"""`entitylens intervene` end to end on a tiny-model cache and probe run; its one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from entitylens.activations import CacheConfig, cache_activations
from entitylens.cli import main
from entitylens.frames import read_csv
from entitylens.task import GeneratorConfig, generate_states


@pytest.fixture(scope="module")
def probed(tmp_path_factory: pytest.TempPathFactory, tiny_model: Any) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("intervene")
    states = list(generate_states(GeneratorConfig(seed=9, num_states=24, num_operations=3)))
    cache_activations(tiny_model, states, CacheConfig(roles=("query_box", "last", "@mentions")), root / "cache",
                      model_spec="tiny:llama")
    assert main(["probe", "--cache", str(root / "cache"), "--target", "tags_box", "--Cs", "1", "--bootstrap", "0",
                 "--no-control", "--out", str(root / "probe")]) == 0
    return root / "cache", root / "probe"


def _column(probe: Path, suffix: str) -> str:
    names = json.loads((probe / "meta.json").read_text())["target_names"]
    return next(n for n in names if n.endswith(suffix))


def test_intervene_end_to_end(probed: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache, probe = probed
    col = _column(probe, "=present")
    out = tmp_path / "run"
    args = ["intervene", "--probe", str(probe), "--cache", str(cache), "--column", col, "--rows", "all",
            "--random", "3", "--max-rows", "6", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "top1_object" in printed and "intervene.csv" in printed
    rows = read_csv(out / "intervene.csv").to_dict("records")
    assert {r["direction"] for r in rows} == {"probe", "random"}
    assert {r["metric"] for r in rows} == {"p_object", "logit_diff", "top1_object"}
    last = max(int(r["layer"]) for r in rows)
    # an edit at the query token in the last block cannot reach the last position's logits
    assert all(float(r["effect"]) == 0.0 for r in rows if int(r["layer"]) == last)
    first = (out / "intervene.csv").read_bytes()
    assert main(args) == 0  # same identity: rerun allowed, same bytes
    assert (out / "intervene.csv").read_bytes() == first
    other = [*args[:-2], "--mode", "add", "--value", "2", "--out", str(out)]
    assert main(other) != 0  # another run's results are never overwritten silently
    assert "--overwrite" in capsys.readouterr().err


def test_intervene_errors(probed: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache, probe = probed
    base = ["intervene", "--probe", str(probe), "--cache", str(cache), "--out", str(tmp_path / "x")]
    assert main([*base, "--column", "no-such-object=removed"]) != 0
    assert "target_names" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["intervene", "--probe", str(tmp_path / "empty"), "--cache", str(cache), "--column", "a",
                 "--out", str(tmp_path / "y")]) != 0
    err = capsys.readouterr().err
    assert "probe_weights.safetensors" in err and "Traceback" not in err
    col = _column(probe, "=present")
    assert main([*base, "--column", col, "--model", "tiny:llama?seed=3"]) != 0
    assert "--allow-other-model" in capsys.readouterr().err
