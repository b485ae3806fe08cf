"""GGUF loading: the float copy is cached by the file's SHA-256 and the second load reads only the cache.

The dequantization step itself (transformers + gguf on the real SmolLM2 file) is exercised by the
``smollm2`` fixture; here it is replaced by a tiny Llama so the cache logic is tested in milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

import entitylens.models.loading as loading
from entitylens.errors import EntitylensError
from entitylens.models import gguf_cache_dir, gguf_sha256, load_model, model_info
from entitylens.models.tiny import build_tiny_hf, parse_tiny_spec


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("ENTITYLENS_CACHE", str(root))
    return root


@pytest.fixture
def fake_gguf(tmp_path: Path) -> Path:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF fake file " * 100)
    return path


@pytest.fixture
def fake_dequantize(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    calls: list[Path] = []

    def dequantize(path: Path):
        calls.append(path)
        return build_tiny_hf(parse_tiny_spec("tiny:llama?seed=7"))

    monkeypatch.setattr(loading, "_dequantize_gguf", dequantize)
    return calls


def test_hash_is_sha256_and_memoised(cache: Path, fake_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = hashlib.sha256(fake_gguf.read_bytes()).hexdigest()
    assert gguf_sha256(fake_gguf) == expected
    index = json.loads((cache / "gguf" / "hashes.json").read_text())
    assert index[str(fake_gguf.resolve())]["sha256"] == expected

    def no_read(*a, **k):
        raise AssertionError("re-hashed an unchanged file")

    monkeypatch.setattr(loading, "sha256_file", no_read)
    assert gguf_sha256(fake_gguf) == expected
    # a changed file (size/mtime) is hashed again
    monkeypatch.undo()
    monkeypatch.setenv("ENTITYLENS_CACHE", str(cache))
    fake_gguf.write_bytes(b"other content")
    assert gguf_sha256(fake_gguf) == hashlib.sha256(b"other content").hexdigest()


def test_first_load_writes_cache_second_load_reads_only_cache(
    cache: Path, fake_gguf: Path, fake_dequantize: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    first = load_model(str(fake_gguf))
    assert fake_dequantize == [fake_gguf.resolve()]
    digest = hashlib.sha256(fake_gguf.read_bytes()).hexdigest()
    cached = gguf_cache_dir(digest)
    assert cached == cache / "gguf" / digest
    assert {"config.json", "entitylens-gguf.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in cached.iterdir()
    }
    marker = json.loads((cached / "entitylens-gguf.json").read_text())
    assert marker["source_sha256"] == digest and marker["dtype"] == "float32"
    assert not [p for p in cached.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left
    info = model_info(first)
    assert (info.kind, info.source, info.source_hash, info.path) == ("gguf", "gguf", digest, str(cached))

    # Second load: must not dequantize, and must not even read the GGUF file's bytes again.
    monkeypatch.setattr(loading, "sha256_file", lambda *a, **k: pytest.fail("GGUF file was read again"))
    second = load_model(str(fake_gguf))
    assert len(fake_dequantize) == 1
    toks = first.to_tokens("Box 1 contains the")
    assert torch.equal(first(toks), second(toks))
    ref, _ = build_tiny_hf(parse_tiny_spec("tiny:llama?seed=7"))
    with torch.no_grad():
        torch.testing.assert_close(second.original_model(toks).logits, ref(toks).logits, rtol=0, atol=1e-5)


def test_failed_dequantize_leaves_no_cache(cache: Path, fake_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(path: Path):
        model, tok = build_tiny_hf(parse_tiny_spec("tiny:llama"))

        def fail(*a, **k):
            raise OSError("disk full")

        model.save_pretrained = fail
        return model, tok

    monkeypatch.setattr(loading, "_dequantize_gguf", broken)
    with pytest.raises(OSError, match="disk full"):
        load_model(str(fake_gguf))
    gguf_dir = cache / "gguf"
    assert [p.name for p in gguf_dir.iterdir()] == ["hashes.json"]


def test_gguf_without_gguf_package(cache: Path, fake_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` raise ImportError
    with pytest.raises(EntitylensError, match=r"needs the 'gguf' package.*pip install 'entitylens\[gguf\]'"):
        load_model(str(fake_gguf))


def test_cached_gguf_loads_without_gguf_package(
    cache: Path, fake_gguf: Path, fake_dequantize: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    load_model(str(fake_gguf))
    monkeypatch.setitem(sys.modules, "gguf", None)
    load_model(str(fake_gguf))
    assert len(fake_dequantize) == 1
