"""``CacheConfig(engine="vllm")`` without vLLM: the capture logic on a stand-in driver, identity, one-line errors.

The real driver (TransformerLens's ``RemoteBridge.boot_vllm``) is tested in the vLLM environment
(``tests/behavior/test_vllm_engine.py``). Here a stand-in with the driver's contract -- ragged token-id lists
in, every hook replayed once with right-padded ``[batch, max_seq, d]`` captures -- runs the tiny bridge one
prompt at a time, so the cache's position bookkeeping (right padding, missing roles) is checked against the
native cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from activations_helpers import sample_states

from entitylens.activations.cache import CacheConfig, cache_activations, load_cache
from entitylens.cli import main
from entitylens.errors import EntitylensError
from entitylens.task.io import write_ks_jsonl
from entitylens.task.types import BoxRow


class StandInRemote:
    """The driver's contract on the local bridge: per-prompt forwards, right-padded captures, hooks replayed."""

    def __init__(self, bridge: Any) -> None:
        self.bridge = bridge
        self.batches: list[list[int]] = []

    def run_with_hooks(self, ids: list[list[int]], fwd_hooks: list[tuple[str, Any]], return_type: Any = None) -> None:
        assert all(isinstance(x, list) for x in ids)  # ragged lists: no padding reaches the engine
        self.batches.append([len(x) for x in ids])
        names = sorted({name for name, _ in fwd_hooks})
        width = max(len(x) for x in ids)
        caps = {n: [] for n in names}
        for row in ids:
            _, cache = self.bridge.run_with_cache(torch.tensor([row]), names_filter=names)
            for n in names:
                t = cache[n][0]
                caps[n].append(torch.cat([t, torch.zeros(width - len(row), *t.shape[1:])]))  # right padding
        for name, fn in fwd_hooks:
            fn(torch.stack(caps[name]), hook=None)


@pytest.fixture(scope="module")
def rows() -> list[Any]:
    return [BoxRow(s, b) for s in sample_states() for b in range(s.num_boxes)]


def test_vllm_engine_path_equals_the_native_cache(tiny_model: Any, rows: list[Any], tmp_path: Path) -> None:
    roles = ("query_box", "last", "op0_object", "op1_dest")
    native = CacheConfig(hooks=("resid_post", "attn_out", "mlp_out"), roles=roles, allow_missing_roles=True,
                         batch_size=5, shard_size=9)
    remote = StandInRemote(tiny_model)
    cache_activations(tiny_model, rows, native, tmp_path / "n")
    cache_activations(tiny_model, rows, CacheConfig(**{**native.__dict__, "engine": "vllm"}), tmp_path / "v",
                      remote=remote)
    a, b = load_cache(tmp_path / "n"), load_cache(tmp_path / "v")
    assert len({n for batch in remote.batches for n in batch}) > 1  # batches of different prompt lengths
    assert a.meta["model"]["fingerprint"] == b.meta["model"]["fingerprint"]
    assert a.meta["fingerprint"] != b.meta["fingerprint"]  # another engine's floats are another cache
    for role in roles:
        assert torch.equal(a.present(role), b.present(role))
        assert not bool(a.present("op1_dest").all())  # a role some prompts lack is masked on both
        for hook in ("resid_post", "attn_out", "mlp_out"):
            torch.testing.assert_close(b.features(hook, role), a.features(hook, role), atol=1e-5, rtol=1e-5,
                                       equal_nan=True)


def test_native_identity_is_unchanged_and_engines_are_checked() -> None:
    assert "engine" not in CacheConfig().identity()  # caches from before engines keep their fingerprint
    assert CacheConfig(engine="vllm").identity()["engine"] == "vllm"
    with pytest.raises(EntitylensError, match="unknown engine 'gpu'; use native or vllm"):
        CacheConfig(engine="gpu")


@pytest.mark.usefixtures("no_shape_checks")
def test_unsupported_hooks_fail_before_vllm_starts(tiny_model: Any, rows: list[Any], tmp_path: Path) -> None:
    with pytest.raises(EntitylensError, match="--engine vllm captures resid_post, attn_out, mlp_out, not 'resid_pre'"):
        cache_activations(tiny_model, rows, CacheConfig(hooks=("resid_pre",), engine="vllm"), tmp_path / "x",
                          remote=object())
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(("extra", "needle"), [
    (["--hooks", "resid_mid"], "--engine vllm captures resid_post, attn_out, mlp_out, not 'resid_mid'"),
    (["--random-init", "3"], "--random-init re-initialises the bridge's weights"),
    ([], "--engine vllm needs vLLM, which is not installed"),
])
def test_cli_errors_are_one_line_and_write_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch, extra: list[str],
                                                   needle: str) -> None:
    import importlib

    import entitylens.cli

    monkeypatch.setattr(entitylens.cli, "_COMMAND_MODULES", ("cache",))
    real = importlib.import_module

    def no_vllm(name: str, *a: Any, **k: Any) -> Any:
        if name == "vllm":
            raise ImportError("No module named 'vllm'", name="vllm")
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", no_vllm)  # as on a machine without vLLM
    data = tmp_path / "d.jsonl"
    write_ks_jsonl(data, sample_states())
    rc = main(["--quiet", "cache", "--engine", "vllm", "--model", "tiny:llama", "--data", str(data), "--out",
               str(tmp_path / "c"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "c" / "meta.json").exists()


def test_engine_bars_are_silenced_once_and_foreign_bridges_left_alone() -> None:
    """vLLM's per-batch "Processed prompts" bar: ``generate`` gets ``use_tqdm=False``; other arguments pass."""
    from types import SimpleNamespace

    from entitylens.activations.remote import silence_engine_bars

    calls: list[dict[str, Any]] = []

    def generate(prompts: Any = None, sampling_params: Any = None, use_tqdm: bool = True) -> str:
        calls.append({"prompts": prompts, "sampling_params": sampling_params, "use_tqdm": use_tqdm})
        return "out"

    bridge = SimpleNamespace(_driver=SimpleNamespace(_llm=SimpleNamespace(generate=generate)))
    silence_engine_bars(bridge)
    silence_engine_bars(bridge)  # idempotent: not wrapped twice
    assert bridge._driver._llm.generate(prompts=[1], sampling_params="p") == "out"
    assert calls == [{"prompts": [1], "sampling_params": "p", "use_tqdm": False}]
    other = SimpleNamespace(forward=lambda: None)
    silence_engine_bars(other)  # no driver: nothing to do, no error
    assert not hasattr(other, "_driver")
