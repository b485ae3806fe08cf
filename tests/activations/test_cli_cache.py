"""``entitylens cache``: end to end on a K&S JSONL file, resume, one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from activations_helpers import sample_states

from entitylens.activations.cache import CacheConfig, cache_activations, load_cache
from entitylens.cli import main
from entitylens.task.io import read_ks_jsonl, write_ks_jsonl
from entitylens.task.types import BoxRow


@pytest.fixture(autouse=True)
def _only_cache_command(monkeypatch: pytest.MonkeyPatch) -> None:
    """Build the CLI with just `cache`, so these tests do not depend on other areas' subcommands."""
    import entitylens.cli

    monkeypatch.setattr(entitylens.cli, "_COMMAND_MODULES", ("cache",))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "states.jsonl"
    write_ks_jsonl(path, sample_states())
    return path


def test_cli_builds_resumes_and_matches_library(
    dataset: Path, tmp_path: Path, tiny_model: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cache"
    argv = ["--quiet", "cache", "--model", "tiny:llama", "--data", str(dataset), "--out", str(out)]
    argv += ["--roles", "query_box,last,op0_object", "--allow-missing-roles", "--shard-size", "10"]
    assert main(argv) == 0
    assert "cached 28 rows in 3 shards" in capsys.readouterr().out
    cache = load_cache(out, model=tiny_model)
    assert cache.meta["dataset_source"]["path"] == str(dataset)
    assert cache.meta["model"]["spec"] == "tiny:llama"
    # Same values as the library on the same rows (every box of every state, in file order).
    rows = [BoxRow(s, b) for s in read_ks_jsonl(dataset) for b in range(s.num_boxes)]
    cfg = CacheConfig(roles=("query_box", "last", "op0_object"), allow_missing_roles=True, shard_size=10)
    cache_activations(tiny_model, rows, cfg, tmp_path / "lib")
    lib = load_cache(tmp_path / "lib")
    assert lib.row_ids == cache.row_ids
    for role in cfg.roles:
        torch.testing.assert_close(cache.features("resid_post", role), lib.features("resid_post", role), equal_nan=True)
    assert main(argv) == 0
    assert "(0 computed, 3 reused)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--roles", "query_bx"], "error: unknown role 'query_bx'; use one of"),
        (["--roles", "op0_object"], "error: role 'op0_object' is not present in row 7:0:0"),
        (["--hooks", "resid_psot"], "error: unknown hook 'resid_psot'"),
        (["--dtype", "int8"], "error: unknown cache dtype 'int8'"),
    ],
)
def test_cli_errors_are_one_line(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    argv = ["cache", "--model", "tiny:llama", "--data", str(dataset), "--out", str(tmp_path / "c"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and "\n" not in err


def test_cli_missing_arguments_and_list_roles(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["cache", "--data", str(tmp_path / "x.jsonl")]) == 2
    assert "error: missing --model, --out" in capsys.readouterr().err
    assert main(["cache", "--model", "tiny:llama", "--data", str(tmp_path / "x.jsonl"), "--out", "o"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["cache", "--list-roles"]) == 0
    listed = capsys.readouterr().out
    assert "query_box" in listed and "op{i}_object_first" in listed and "obj:<name>" in listed


def test_cli_text_prompts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "The car is in Box X, the map is in Box T. Box T contains the\nBox 0 contains the car. Box 0 contains\n"
    )
    out = tmp_path / "c"
    argv = ["--quiet", "cache", "--model", "tiny:llama", "--data", str(prompts), "--out", str(out)]
    assert main([*argv, "--roles", "query_box,query_box_desc", "--layers", "1"]) == 0
    cache = load_cache(out)
    assert cache.row_ids == ["0", "1"] and cache.layers("resid_post") == (1,)
    assert cache.features("resid_post", "query_box").shape == (1, 2, 64)
