"""`entitylens models list|resolve` and the shared --model options."""

from __future__ import annotations

import argparse
import json

import pytest

from entitylens.cli import models as cli_models
from entitylens.errors import EntitylensError
from entitylens.models import EXPERIMENTS, REGISTRY


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="entitylens")
    sub = parser.add_subparsers(dest="command")
    cli_models.register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def test_list_prints_every_entry_with_paper_accuracy(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(["models", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["key", "hub", "id"]
    body = {line.split()[0]: line.split() for line in lines[2:]}
    assert set(body) == set(REGISTRY)
    assert body["llama2-7b"] == ["llama2-7b", "meta-llama/Llama-2-7b-hf", "no", "6.74", "21.31"]
    assert body["codellama-70b-instruct"][-1] == "73.66" and body["codellama-70b-instruct"][2] == "yes"
    assert body["smollm2-135m-instruct"][-1] == "-"


def test_list_experiment_pairs(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(["models", "list", "--experiment", "code"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in out[3:]]
    assert [(r[0], r[1]) for r in rows] == list(EXPERIMENTS["code"])
    first = rows[0]  # llama2-7b -> codellama-7b: 21.31 -> 31.94
    assert first[2:] == ["21.31", "31.94", "+10.63"]


def test_list_json(capsys: pytest.CaptureFixture[str]) -> None:
    _run(["models", "list", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert [d["key"] for d in data] == list(REGISTRY)
    _run(["models", "list", "--experiment", "math", "--json"])
    pairs = json.loads(capsys.readouterr().out)
    assert [(p["base"], p["variant"]) for p in pairs] == list(EXPERIMENTS["math"])


def test_resolve(capsys: pytest.CaptureFixture[str]) -> None:
    _run(["models", "resolve", "tiny:llama?seed=4"])
    out = json.loads(capsys.readouterr().out)
    assert out["kind"] == "tiny" and out["tiny"].startswith("tiny:llama?seed=4&")
    with pytest.raises(EntitylensError, match="did you mean codellama-13b"):
        _run(["models", "resolve", "codellama-13"])


def test_unknown_experiment_rejected_by_argparse() -> None:
    with pytest.raises(SystemExit):
        _run(["models", "list", "--experiment", "coding"])


def test_model_args_roundtrip() -> None:
    parser = argparse.ArgumentParser()
    cli_models.add_model_args(parser)
    args = parser.parse_args(["--model", "tiny:gpt2", "--dtype", "bf16"])
    bridge = cli_models.load_model_from_args(args)
    assert bridge.entitylens_info.spec == "tiny:gpt2" and bridge.entitylens_info.dtype == "bfloat16"
    with pytest.raises(SystemExit):
        _parse_required()


def _parse_required() -> None:
    parser = argparse.ArgumentParser()
    cli_models.add_model_args(parser)
    parser.parse_args([])
