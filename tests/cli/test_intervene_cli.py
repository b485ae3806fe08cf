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
    cache_activations(tiny_model, states, CacheConfig(roles=("query_box", "last", "@mentions", "@objects")),
                      root / "cache", model_spec="tiny:llama")
    for target, name in (("tags_box", "probe"), ("tags_object", "probe_obj")):
        assert main(["probe", "--cache", str(root / "cache"), "--target", target, "--Cs", "1", "--bootstrap", "0",
                     "--no-control", "--out", str(root / name)]) == 0
    return root / "cache", root / "probe"


def test_focus_of_a_tags_object_column() -> None:
    """A box-k tag column scores the object the last operation on box k removed, at its token there."""
    from entitylens.pipelines.probe_intervene import _focus
    from entitylens.probing.world import prompt_world

    w = prompt_world("B0 apple bill ; B1 ; B2 cup ; put map B1 . remove bill B0 . move map B1 B2 . | B0")
    assert _focus(w, None, "removed", "@last_touch") == ("bill", "op1_object0")
    assert _focus(w, None, "present", "@last_touch") is None  # the last operation on B0 took something out
    w2 = prompt_world("B0 apple bill ; B1 ; B2 cup ; put map B1 . move map B1 B2 . | B2")
    assert _focus(w2, None, "present", "@last_touch") == ("map", "op1_object0")
    assert _focus(w2, "cup", "present", "@last_touch") == ("cup", "op1_dest")
    assert _focus(w2, "cup", "present", "query_box") == ("cup", "query_box")


def test_intervene_tags_object_column(probed: tuple[Path, Path], tmp_path: Path) -> None:
    cache, probe = probed
    names = json.loads((probe.parent / "probe_obj" / "meta.json").read_text())["target_names"]
    col = next(n for n in names if n.endswith("=present"))
    assert main(["intervene", "--probe", str(probe.parent / "probe_obj"), "--cache", str(cache), "--column", col,
                 "--role", "@last_touch", "--random", "2", "--out", str(tmp_path / "o")]) == 0
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert meta["rows"] and len(meta["objects"]) == len(meta["rows"])


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
