"""Comparisons across models of different depth: refused layer by layer, offered on a relative-depth axis."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from entitylens.cli import main
from entitylens.patching.compare import interpolate_depth
from entitylens.task import GeneratorConfig, generate_dataset


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("depth")
    data, pairs = root / "d.jsonl", root / "pairs.jsonl"
    generate_dataset(GeneratorConfig(seed=1, num_states=20, num_operations=4), data)
    assert main(["--quiet", "patch", "pairs", "--data", str(data), "--kind", "drop_op", "--max-pairs", "3",
                 "--out", str(pairs)]) == 0  # fmt: skip
    out = {"data": data}
    for name, spec in (("two", "tiny:llama"), ("three", "tiny:llama?layers=3&seed=1")):
        out[name] = root / name
        assert main(["--quiet", "patch", "run", "--model", spec, "--pairs", str(pairs), "--component", "resid_pre",
                     "--out", str(out[name])]) == 0  # fmt: skip
        cache = root / f"cache-{name}"
        assert main(["--quiet", "cache", "--model", spec, "--data", str(data), "--hooks", "resid_post", "--roles",
                     "query_box", "--out", str(cache)]) == 0  # fmt: skip
        probe = out[f"probe-{name}"] = root / f"probe-{name}"
        assert main(["--quiet", "probe", "--cache", str(cache), "--roles", "query_box", "--no-control",
                     "--bootstrap", "0", "--Cs", "1", "--folds", "2", "--out", str(probe)]) == 0  # fmt: skip
    return out


def test_layer_by_layer_difference_across_depths_is_refused(runs: dict[str, Path], tmp_path: Path, capsys) -> None:
    capsys.readouterr()
    assert main(["patch", "compare", str(runs["two"]), str(runs["three"]), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "2 layers" in err and "3" in err and "--depth relative" in err
    assert main(["probe", "--compare", str(runs["probe-two"]), str(runs["probe-three"]), "--out",
                 str(tmp_path / "p")]) == 2  # fmt: skip
    assert "--depth relative" in capsys.readouterr().err


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_relative_depth_interpolates_the_deeper_model(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "c"
    assert main(["--quiet", "patch", "compare", str(runs["two"]), str(runs["three"]), "--out", str(out),
                 "--depth", "relative"]) == 0  # fmt: skip
    rows = [r for r in _rows(out / "compare.csv") if r["cell"] == "last"]
    rel = sorted({float(r["relative_depth"]) for r in rows})
    assert rel == [0.0, 1.0]  # the shallower model's layers 0 and 1 sit at relative depths 0 and 1
    # model B (3 layers: relative depths 0, .5, 1) is read at 0 and 1: its own layers 0 and 2
    b = [r for r in _rows(runs["three"] / "patch.csv") if r["pair"] == "mean" and r["cell"] == "last"]
    by_layer = {int(r["layer"]): float(r["normalised"]) for r in b}
    got = {float(r["relative_depth"]): float(r["b"]) for r in rows}
    assert got[0.0] == pytest.approx(by_layer[0], abs=1e-5) and got[1.0] == pytest.approx(by_layer[2], abs=1e-5)
    p = tmp_path / "p"
    assert main(["--quiet", "probe", "--compare", str(runs["probe-two"]), str(runs["probe-three"]), "--out", str(p),
                 "--depth", "relative"]) == 0  # fmt: skip


def test_interpolation_by_hand() -> None:
    import torch

    values = torch.tensor([[0.0], [1.0], [4.0], [9.0], [16.0]])  # a 5-layer model: relative depths 0,.25,.5,.75,1
    at = interpolate_depth(values, [0, 1, 2, 3, 4], 5, [0, 1, 2], 3)  # read at 0, .5, 1
    assert at.flatten().tolist() == [0.0, 4.0, 16.0]
    mid = interpolate_depth(values, [0, 1, 2, 3, 4], 5, [1], 4)  # relative 1/3: between .25 (1) and .5 (4)
    assert float(mid) == pytest.approx(1 + (1 / 3 - 0.25) / 0.25 * 3)
