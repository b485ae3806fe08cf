"""No network: local specs load with sockets blocked, hub attempts fail fast; device/dtype errors."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

from entitylens.errors import EntitylensError
from entitylens.models import check_device_dtype, load_model, model_info, parse_dtype


def test_guard_blocks_connections(network_guard) -> None:
    with pytest.raises(OSError, match="network access is blocked"):
        socket.create_connection(("huggingface.co", 443), timeout=1)
    with pytest.raises(OSError, match="network access is blocked"):
        socket.create_connection(("203.0.113.1", 443), timeout=1)
    assert len(network_guard.attempts) == 2
    network_guard.attempts.clear()


def test_local_dir_loads_offline_with_sockets_blocked(tmp_path: Path, tiny_model, network_guard) -> None:
    # Save a tiny HF model + tokenizer as a plain local directory, then load it as a spec.
    from entitylens.models.tiny import build_tiny_hf, parse_tiny_spec

    model, tok = build_tiny_hf(parse_tiny_spec("tiny:llama?seed=2"))
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    bridge = load_model(str(tmp_path / "m"))
    assert network_guard.attempts == []
    info = model_info(bridge)
    assert (info.kind, info.source, info.path, info.prepends_bos) == ("local", "local", str(tmp_path / "m"), True)
    toks = bridge.to_tokens("Box 0 contains the")
    with torch.no_grad():
        torch.testing.assert_close(bridge(toks), model(toks).logits, rtol=0, atol=1e-5)


def test_hub_id_not_cached_offline_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, network_guard) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    with pytest.raises(EntitylensError, match=r"hf download meta-llama/Llama-2-7b-hf.*HF_HOME") as exc:
        load_model("llama2-7b")
    assert "\n" not in str(exc.value)
    with pytest.raises(EntitylensError, match="not in the local Hugging Face cache"):
        load_model("someorg/not-a-real-model")
    assert network_guard.attempts == []


def test_guard_records_attempts_a_library_swallows(network_guard) -> None:
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.URLError):  # urllib wraps the guard's error
        urllib.request.urlopen("http://198.51.100.7/config.json", timeout=1)
    assert len(network_guard.attempts) == 1 and "198.51.100.7" in network_guard.attempts[0]
    network_guard.attempts.clear()


@pytest.mark.parametrize(("name", "expected"), [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                                ("float16", torch.float16), ("half", torch.float16),
                                                (torch.bfloat16, torch.bfloat16)])  # fmt: skip
def test_parse_dtype(name, expected) -> None:
    assert parse_dtype(name) is expected


def test_bad_dtype_and_device() -> None:
    with pytest.raises(EntitylensError, match="unknown dtype 'int8'; use one of float32"):
        parse_dtype("int8")
    with pytest.raises(EntitylensError, match="unknown device"):
        check_device_dtype("gpu7", torch.float32)
    if not torch.cuda.is_available():
        with pytest.raises(EntitylensError, match="CUDA is not available here; use --device cpu"):
            load_model("tiny:llama", device="cuda")


def test_bf16_unsupported_on_cuda_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(EntitylensError, match="bfloat16 is not supported on cuda.*use --dtype float16"):
        load_model("tiny:llama", device="cuda", dtype="bf16")
    with pytest.raises(EntitylensError, match="does not exist"):
        check_device_dtype("cuda:3", torch.float32)
    assert check_device_dtype("cuda:0", torch.float16) == torch.device("cuda:0")


def test_device_map_rejected_for_tiny() -> None:
    with pytest.raises(EntitylensError, match="device_map / n_devices are not supported for tiny"):
        load_model("tiny:llama", device_map="auto")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_load_and_device_map(tmp_path: Path) -> None:
    from entitylens.models.tiny import build_tiny_hf, parse_tiny_spec

    model, tok = build_tiny_hf(parse_tiny_spec("tiny:llama?seed=2"))
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    cpu = load_model(str(tmp_path / "m"))
    for kwargs in ({"device": "cuda"}, {"device_map": "auto"}):
        dtype = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        gpu = load_model(str(tmp_path / "m"), dtype=dtype, **kwargs)
        assert model_info(gpu).device.startswith("cuda")
        toks = cpu.to_tokens("Box 0 contains the")
        assert (gpu(toks.cuda()).float().cpu().argmax(-1) == cpu(toks).argmax(-1)).float().mean() > 0.7


def test_cached_hub_id_loads_offline_from_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, network_guard
) -> None:
    # Build a Hugging Face cache layout by hand: models--org--name/{refs/main, snapshots/<rev>/...}.
    from entitylens.models.tiny import build_tiny_hf, parse_tiny_spec

    model, tok = build_tiny_hf(parse_tiny_spec("tiny:llama?seed=5"))
    repo = tmp_path / "hub" / "models--someorg--tiny-llama"
    snapshot = repo / "snapshots" / "0123456789abcdef"
    model.save_pretrained(snapshot)
    tok.save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123456789abcdef")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    bridge = load_model("someorg/tiny-llama")
    info = model_info(bridge)
    assert (info.kind, info.source, info.hub_id, info.path) == ("hub", "hub", "someorg/tiny-llama", str(snapshot))
    assert network_guard.attempts == []
    toks = bridge.to_tokens("Box 0 contains the")
    with torch.no_grad():
        torch.testing.assert_close(bridge(toks), model(toks).logits, rtol=0, atol=1e-5)
