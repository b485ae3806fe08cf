"""GGUF loading: the float copy is cached by the file's SHA-256 and the second load reads only the cache.

The dequantization step itself (transformers + gguf on the real SmolLM2 file) is exercised by the
``smollm2`` fixture; here it is replaced by a tiny Llama so the cache logic is tested in milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from pathlib import Path

import pytest
import torch

import entitylens.models.gguf as gguf_mod
from entitylens.errors import EntitylensError
from entitylens.models import gguf_cache_dir, gguf_sha256, load_model, model_info
from entitylens.models.tiny import build_tiny_hf, parse_tiny_spec


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("ENTITYLENS_CACHE", str(root))
    return root


def gguf_header(kv: dict[str, object], tensors: int = 0, pad: bytes = b"") -> bytes:
    """A GGUF v3 header with string / bool / string-array values, written by hand from the format spec."""

    def string(x: str) -> bytes:
        b = x.encode()
        return struct.pack("<Q", len(b)) + b

    out = b"GGUF" + struct.pack("<IQQ", 3, tensors, len(kv))
    for key, value in kv.items():
        out += string(key)
        if isinstance(value, bool):
            out += struct.pack("<I?", 7, value)
        elif isinstance(value, list):
            out += struct.pack("<IIQ", 9, 8, len(value)) + b"".join(string(v) for v in value)
        else:
            out += struct.pack("<I", 8) + string(str(value))
    return out + pad


@pytest.fixture
def fake_gguf(tmp_path: Path) -> Path:
    path = tmp_path / "model.gguf"
    path.write_bytes(gguf_header({"general.name": "Fake 1M", "tokenizer.ggml.tokens": ["a", "b"]}, pad=b"x" * 1000))
    return path


@pytest.fixture
def fake_dequantize(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    calls: list[Path] = []

    def dequantize(path: Path):
        calls.append(path)
        return build_tiny_hf(parse_tiny_spec("tiny:llama?seed=7"))

    monkeypatch.setattr(gguf_mod, "_dequantize_gguf", dequantize)
    return calls


def test_hash_is_sha256_and_memoised(cache: Path, fake_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = hashlib.sha256(fake_gguf.read_bytes()).hexdigest()
    assert gguf_sha256(fake_gguf) == expected
    index = json.loads((cache / "gguf" / "hashes.json").read_text())
    assert index[str(fake_gguf.resolve())]["sha256"] == expected

    def no_read(*a, **k):
        raise AssertionError("re-hashed an unchanged file")

    monkeypatch.setattr(gguf_mod, "sha256_file", no_read)
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
    monkeypatch.setattr(gguf_mod, "sha256_file", lambda *a, **k: pytest.fail("GGUF file was read again"))
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

    monkeypatch.setattr(gguf_mod, "_dequantize_gguf", broken)
    with pytest.raises(OSError, match="disk full"):
        load_model(str(fake_gguf))
    gguf_dir = cache / "gguf"
    assert sorted(p.name for p in gguf_dir.iterdir()) == ["hashes.json", "metadata.json"]


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


@pytest.mark.parametrize(
    ("name", "kv", "chat"),
    [
        ("coder.gguf", {"general.name": "Qwen2.5 Coder 0.5B Instruct", "tokenizer.chat_template": "{{ x }}"}, True),
        ("SmolLM2-135M-Instruct.gguf", {"general.name": "Smollm2 135M", "tokenizer.chat_template": "{{ x }}"}, True),
        ("base.gguf", {"general.name": "Qwen2.5 Coder 0.5B", "tokenizer.chat_template": "{{ x }}"}, False),
        ("x-instruct.gguf", {"general.name": "Gemma 3 270m it"}, False),  # no template: cannot chat
        ("it.gguf", {"general.name": "Gemma 3 270m", "general.finetune": "it", "tokenizer.chat_template": "t"}, True),
    ],
)
def test_chat_mode_comes_from_the_model_metadata(
    cache: Path, tmp_path: Path, name: str, kv: dict[str, object], chat: bool
) -> None:
    from entitylens.models import resolve_spec

    real = tmp_path / "files" / name
    real.parent.mkdir()
    real.write_bytes(gguf_header({**kv, "tokenizer.ggml.tokens": ["a"] * 50}))
    link = tmp_path / "link.gguf"  # a name that says nothing: the decision must come from the file
    link.symlink_to(real)
    assert resolve_spec(str(real)).chat is chat
    assert resolve_spec(str(link)).chat is chat


@pytest.mark.parametrize(
    "content",
    [b"not a gguf file at all", b"GGUF" + struct.pack("<I", 3) + b"\x01", b"GGUF" + struct.pack("<IQQ", 9, 0, 0)],
)
def test_damaged_gguf_is_refused_in_one_line(cache: Path, tmp_path: Path, content: bytes) -> None:
    from entitylens.cli import main

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    with pytest.raises(EntitylensError, match="GGUF file") as err:
        load_model(str(bad))
    assert "\n" not in str(err.value)
    assert main(["models", "resolve", str(bad)]) == 2
