"""Role-selected activation caching: values vs TransformerLens run_with_cache, resume, checksums, refusals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

import entitylens.activations.cache as cache_mod
import entitylens.activations.runner as runner_mod
from entitylens.activations.cache import CacheConfig, build_prompts, cache_activations, load_cache
from entitylens.activations.roles import find_roles, tokenize_with_offsets
from entitylens.errors import EntitylensError
from entitylens.task.types import BoxRow

HOOKS = ("resid_post", "attn_out", "mlp_out", "resid_pre", "blocks.{layer}.attn.hook_z")
ROLES = ("query_box", "last", "op0_object", "box0_desc", "op1_object_first")
CFG = CacheConfig(hooks=HOOKS, roles=ROLES, batch_size=5, shard_size=5, allow_missing_roles=True)
SMALL = CacheConfig(hooks=("resid_post",), roles=("query_box", "last"), batch_size=2, shard_size=4)


def files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def run(model: Any, rows: list[BoxRow], cfg: CacheConfig, out: Path, **kwargs: Any) -> Any:
    """cache_activations with the model spec recorded (meta.json is part of the byte comparisons)."""
    return cache_activations(model, rows, cfg, out, model_spec="tiny:llama", **kwargs)


@pytest.fixture(scope="module")
def clean_small(tiny_model: Any, rows: list[BoxRow], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted SMALL cache of the sample rows (3 shards)."""
    out = tmp_path_factory.mktemp("clean") / "cache"
    index = run(tiny_model, rows, SMALL, out)
    assert index.computed == 3 and index.reused == 0 and index.n_rows == len(rows) == 12
    return out


# ----------------------------------------------------------------------------------- correctness


def test_values_equal_run_with_cache(tiny_model: Any, rows: list[BoxRow], tmp_path: Path) -> None:
    """Every cached value (left-padded batches) equals TransformerLens's run_with_cache on the lone prompt."""
    cfg = replace(CFG, batch_size=4)  # shards of 5 rows: batches of 4 and 1, prompts of 4 lengths
    cache_activations(tiny_model, rows, cfg, tmp_path / "c")
    cache = load_cache(tmp_path / "c", model=tiny_model, data=rows)
    assert cache.hooks == HOOKS and cache.roles == ROLES and len(cache) == len(rows)
    prompts = build_prompts(rows)
    feats = {(h, r): cache.features(h, r) for h in HOOKS for r in ROLES}
    names = [n for h in HOOKS for n in cache.meta["hooks"][h]["names"]]
    n_layers = tiny_model.cfg.n_layers
    assert feats[("resid_post", "last")].shape == (n_layers, len(rows), tiny_model.cfg.d_model)
    assert feats[("blocks.{layer}.attn.hook_z", "last")].shape[2:] == (tiny_model.cfg.n_heads, tiny_model.cfg.d_head)
    for i, prompt in enumerate(prompts):
        ids, offsets = tokenize_with_offsets(tiny_model.tokenizer, prompt.text, True)
        tokens = tiny_model.to_tokens(prompt.text)
        assert tokens[0].tolist() == ids
        _, ref = tiny_model.run_with_cache(tokens, names_filter=names)
        pos = find_roles(prompt.text, offsets, ROLES, allow_missing=True)
        for role in ROLES:
            assert bool(cache.present(role)[i]) == (pos[role] is not None)
            for hook in HOOKS:
                got = feats[(hook, role)][:, i]
                if pos[role] is None:
                    assert torch.isnan(got).all()
                    continue
                for layer, name in enumerate(cache.meta["hooks"][hook]["names"]):
                    want = ref[name][0, pos[role]]
                    torch.testing.assert_close(got[layer], want, atol=1e-5, rtol=1e-5)
    # rows without operations lack op0_object; rows with fewer than 2 lack op1_object_first
    assert cache.present("op0_object").tolist() == [r.state.num_operations > 0 for r in rows]
    assert cache.present("op1_object_first").tolist() == [r.state.num_operations > 1 for r in rows]


def test_batched_equals_unbatched(tiny_model: Any, rows: list[BoxRow], clean_small: Path, tmp_path: Path) -> None:
    """Batch size 1 (no padding) and one batch of all 12 rows (heavy left padding) agree."""
    run(tiny_model, rows, replace(SMALL, batch_size=1), tmp_path / "one")
    run(tiny_model, rows, replace(SMALL, batch_size=12, shard_size=12), tmp_path / "all")
    for role in SMALL.roles:
        ref = load_cache(clean_small).features("resid_post", role)
        for d in ("one", "all"):
            torch.testing.assert_close(load_cache(tmp_path / d).features("resid_post", role), ref, atol=1e-5, rtol=1e-5)


def test_gpt2_no_bos_model(tiny_gpt2: Any, rows: list[BoxRow], tmp_path: Path) -> None:
    """A model without BOS (and LayerNorm/learned positions) caches the same values as run_with_cache."""
    cache_activations(tiny_gpt2, rows[:6], replace(SMALL, batch_size=3), tmp_path)
    cache = load_cache(tmp_path)
    for i, prompt in enumerate(build_prompts(rows[:6])):
        _, offsets = tokenize_with_offsets(tiny_gpt2.tokenizer, prompt.text, False)
        pos = find_roles(prompt.text, offsets, SMALL.roles)
        _, ref = tiny_gpt2.run_with_cache(tiny_gpt2.to_tokens(prompt.text), names_filter=lambda n: "resid_post" in n)
        for role in SMALL.roles:
            for layer in range(tiny_gpt2.cfg.n_layers):
                want = ref[f"blocks.{layer}.hook_resid_post"][0, pos[role]]
                torch.testing.assert_close(cache.features("resid_post", role)[layer, i], want, atol=1e-5, rtol=1e-5)


def test_rows_metadata(clean_small: Path, rows: list[BoxRow]) -> None:
    cache = load_cache(clean_small)
    assert cache.row_ids == [f"{r.state.state_id}:{r.box}" for r in rows]
    for meta, row in zip(cache.rows, rows, strict=True):
        assert meta["box"] == row.box and meta["numops"] == row.numops and meta["gold"] == list(row.gold)
        assert meta["state_id"] == row.state.state_id and meta["num_operations"] == row.state.num_operations
        assert meta["numops_by_op"] == dict(row.numops_by_op)
    assert cache.object_vocabulary == sorted({o for r in rows for b in r.state.initial for o in b} | {"umbrella"})
    meta = json.loads((clean_small / "meta.json").read_text())
    assert meta["model"]["spec"] == "tiny:llama" and meta["model"]["info"]["kind"] == "tiny"
    assert meta["complete"] and sorted(meta["shards"]) == [f"shard_0000{k}.safetensors" for k in range(3)]
    assert meta["dtype"] == "float32" and meta["roles"] == ["query_box", "last"]


def test_storage_dtype_and_stop_early(tiny_model: Any, rows: list[BoxRow], clean_small: Path, tmp_path: Path) -> None:
    full = load_cache(clean_small).features("resid_post", "last")
    run(tiny_model, rows, replace(SMALL, dtype="float16"), tmp_path / "h")
    half = load_cache(tmp_path / "h").features("resid_post", "last")
    assert half.dtype == torch.float16 and torch.equal(half, full.half())
    # Running every block to the end (no early stop) gives byte-identical shards.
    run(tiny_model, rows, replace(SMALL, stop_early=False), tmp_path / "s")
    assert files(tmp_path / "s") == files(clean_small)


def test_release_memory_trims_inside_the_forward_and_keeps_bytes(
    tiny_model: Any, rows: list[BoxRow], clean_small: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Heap trimming runs between layers (4 points per block) and leaves the shards byte-identical."""
    calls: list[int] = []
    monkeypatch.setattr(runner_mod, "release_free_memory", lambda: calls.append(1) or False)
    run(tiny_model, rows, SMALL, tmp_path / "trim")  # release_memory=True is the default
    n_layers, n_batches = tiny_model.cfg.n_layers, len(rows) // SMALL.batch_size
    # Every block's 4 trim points fire except the last block's resid_post (the forward stops there);
    # one more trim after each forward.
    assert len(calls) == n_batches * (4 * n_layers - 1 + 1)
    assert files(tmp_path / "trim") == files(clean_small)
    calls.clear()
    run(tiny_model, rows, replace(SMALL, release_memory=False), tmp_path / "keep")
    assert calls == [] and files(tmp_path / "keep") == files(clean_small)


@pytest.mark.skipif(runner_mod._MALLOC_TRIM is None, reason="needs glibc malloc_trim")
@pytest.mark.skipif(any(k.startswith("MALLOC_") for k in os.environ), reason="glibc tuned by MALLOC_* variables")
def test_release_free_memory_returns_freed_heap_to_the_os() -> None:
    """Freed heap blocks stay resident under glibc's dynamic mmap threshold until release_free_memory()."""

    def rss_mib() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    big = torch.ones(30 << 18)  # 30 MiB: mmapped, and freeing it raises glibc's mmap threshold to 30 MiB
    del big
    blocks = [torch.ones(1 << 18) for _ in range(120)]  # 120 x 1 MiB, now carved from the heap
    keep = blocks.pop()  # the topmost block stays alive, so free() cannot shrink the heap from its top
    del blocks
    before = rss_mib()
    assert runner_mod.release_free_memory() is True
    assert before - rss_mib() > 60, "the freed 119 MiB should leave the resident set"
    del keep


# ---------------------------------------------------------------------------------------- resume


def test_resume_after_exception_is_byte_identical(
    tiny_model: Any, rows: list[BoxRow], clean_small: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = cache_mod.write_shard
    calls = {"n": 0}

    def failing(path: Path, tensors: Any, metadata: Any) -> str:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash while writing shard 1")
        return real(path, tensors, metadata)

    monkeypatch.setattr(cache_mod, "write_shard", failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tiny_model, rows, SMALL, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json", "rows.json", "shard_00000.safetensors"]
    with pytest.raises(EntitylensError, match=r"unfinished \(1/3 shards\); rerun the same"):
        load_cache(tmp_path)
    monkeypatch.setattr(cache_mod, "write_shard", real)
    index = run(tiny_model, rows, SMALL, tmp_path)
    assert (index.computed, index.reused) == (2, 1)
    assert files(tmp_path) == files(clean_small)
    again = run(tiny_model, rows, SMALL, tmp_path)
    assert (again.computed, again.reused) == (0, 3) and files(tmp_path) == files(clean_small)


def test_resume_after_sigkill_is_byte_identical(
    tiny_model: Any, rows: list[BoxRow], clean_small: Path, tmp_path: Path
) -> None:
    """A process killed with SIGKILL between writing shard 1 and recording it resumes to identical bytes."""
    out = tmp_path / "cache"
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        import torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from activations_helpers import sample_rows
        import entitylens.activations.cache as C
        from entitylens.models import load_model

        real, n = C.write_shard, [0]
        def killing(path, tensors, metadata):
            digest = real(path, tensors, metadata)
            n[0] += 1
            if n[0] == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return digest
        C.write_shard = killing
        cfg = C.CacheConfig(hooks=("resid_post",), roles=("query_box", "last"), batch_size=2, shard_size=4)
        torch.set_num_threads({torch.get_num_threads()})  # same kernels as the parent: same bytes
        C.cache_activations(load_model("tiny:llama"), sample_rows(), cfg, {str(out)!r}, model_spec="tiny:llama")
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    meta = json.loads((out / "meta.json").read_text())
    assert list(meta["shards"]) == ["shard_00000.safetensors"] and not meta["complete"]
    assert (out / "shard_00001.safetensors").exists()  # written, but not yet recorded when killed
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left behind
    index = run(tiny_model, rows, SMALL, out)
    assert (index.computed, index.reused) == (2, 1)
    assert files(out) == files(clean_small)


def test_corrupted_shard_detected_and_recomputed(
    tiny_model: Any, rows: list[BoxRow], clean_small: Path, tmp_path: Path
) -> None:
    out = tmp_path / "cache"
    shutil.copytree(clean_small, out)
    shard = out / "shard_00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x01
    shard.write_bytes(bytes(data))
    message = r"shard .*shard_00001\.safetensors is corrupted \(sha256 mismatch\); delete it and rerun"
    with pytest.raises(EntitylensError, match=message):
        load_cache(out)
    with pytest.raises(EntitylensError, match=message):
        run(tiny_model, rows, SMALL, out)
    assert (out / "shard_00000.safetensors").read_bytes() == (clean_small / "shard_00000.safetensors").read_bytes()
    shard.unlink()
    index = run(tiny_model, rows, SMALL, out)
    assert (index.computed, index.reused) == (1, 2)
    assert files(out) == files(clean_small)
    load_cache(out)  # verifies again


# -------------------------------------------------------------------------------------- refusals


def test_refuses_other_model_dataset_or_config(
    tiny_model: Any, rows: list[BoxRow], clean_small: Path, tmp_path: Path
) -> None:
    from entitylens.models import load_model

    out = tmp_path / "cache"
    shutil.copytree(clean_small, out)
    before = files(out)
    other = load_model("tiny:llama?seed=1")
    msg = r"holds a cache of other inputs \(different model\); use another --out or pass --overwrite"
    with pytest.raises(EntitylensError, match=msg):
        run(other, rows, SMALL, out)
    with pytest.raises(EntitylensError, match="built from another model"):
        load_cache(out, model=other)
    with pytest.raises(EntitylensError, match=r"holds a cache of other inputs \(different dataset, tokens\)"):
        run(tiny_model, rows[:-1], SMALL, out)
    with pytest.raises(EntitylensError, match="built from another dataset"):
        load_cache(out, data=rows[1:])
    with pytest.raises(EntitylensError, match=r"holds a cache of other inputs \(different config\)"):
        run(tiny_model, rows, replace(SMALL, roles=("last",)), out)
    assert files(out) == before  # nothing already cached is lost
    load_cache(out, model=tiny_model, data=rows)
    index = run(tiny_model, rows[:4], replace(SMALL, roles=("last",)), out, overwrite=True)
    assert index.computed == 1 and sorted(p.name for p in out.iterdir())[-1] == "shard_00000.safetensors"
    assert load_cache(out).roles == ("last",)


def test_nan_detected_names_row_and_hook(tiny_model: Any, rows: list[BoxRow], tmp_path: Path) -> None:
    calls = {"n": 0}

    def inject(act: torch.Tensor, hook: Any) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 3:  # third forward: rows 4 and 5 (shard 1)
            act = act.clone()
            act[-1, -1, 0] = float("nan")
        return act

    with tiny_model.hooks(fwd_hooks=[("blocks.1.hook_resid_post", inject)]):
        with pytest.raises(EntitylensError) as info:
            run(tiny_model, rows, SMALL, tmp_path)
    row_id = f"{rows[5].state.state_id}:{rows[5].box}"
    assert str(info.value).startswith(
        f"non-finite activation (NaN/inf) at row {row_id}, hook blocks.1.hook_resid_post, role last;"
    )
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert list(meta["shards"]) == ["shard_00000.safetensors"]  # the finished shard is kept
    index = run(tiny_model, rows, SMALL, tmp_path)
    assert (index.computed, index.reused) == (2, 1)


def test_bad_input_errors(tiny_model: Any, rows: list[BoxRow], tmp_path: Path) -> None:
    out = tmp_path / "never"
    with pytest.raises(EntitylensError, match="unknown hook 'resid_psot'"):
        cache_activations(tiny_model, rows, replace(SMALL, hooks=("resid_psot",)), out)
    with pytest.raises(EntitylensError, match="unknown role 'querybox'"):
        CacheConfig(roles=("querybox",))
    with pytest.raises(EntitylensError, match=r"role 'op0_object' is not present in row 7:0:0 .*--allow-missing-roles"):
        cache_activations(tiny_model, rows, replace(SMALL, roles=("last", "op0_object")), out)
    with pytest.raises(EntitylensError, match="unknown cache dtype"):
        CacheConfig(dtype="int8")
    with pytest.raises(EntitylensError, match="must be positive"):
        CacheConfig(batch_size=0)
    with pytest.raises(EntitylensError, match="gives activations of shape"):
        cache_activations(tiny_model, rows[:2], replace(SMALL, hooks=("blocks.{layer}.attn.hook_pattern",)), out)
    assert not (out / "meta.json").exists() or not json.loads((out / "meta.json").read_text())["shards"]
    with pytest.raises(EntitylensError, match="has no meta.json; build the cache first"):
        load_cache(tmp_path / "missing")
    with pytest.raises(EntitylensError, match="appears twice"):
        build_prompts([rows[0], rows[0]])
    with pytest.raises(EntitylensError, match="pass BoxRow, State, str or CachePrompt"):
        build_prompts([1.5])


def test_build_prompts_records_each_rows_initial_contents() -> None:
    """The probe control task types rows by the queried box's initial contents (K&S rows and P24 items)."""
    from entitylens.task import GeneratorConfig, generate_states
    from entitylens.task.io import P24Item

    state = generate_states(GeneratorConfig(seed=4, num_states=3, num_operations=2))[2]
    prompts = build_prompts([BoxRow(state, b) for b in range(state.num_boxes)])
    assert [p.meta["initial"] for p in prompts] == [list(state.initial[b]) for b in range(state.num_boxes)]
    # P24: a box can hold two objects (labels are drawn with replacement); the queried one is the answer.
    item = P24Item("The boot is in Box X, the hematite is in Box M, the bag is in Box M.", "M", "bag", 9,
                   (("boot", "X"), ("hematite", "M"), ("bag", "M")))
    (p24,) = build_prompts([item])
    assert p24.meta["initial"] == ["bag", "hematite"] and p24.meta["gold"] == ["bag"]


def test_role_lookup_does_not_import_the_figure_layer() -> None:
    """Caching pays for no matplotlib import (it used to come in through entitylens.testbed's run layer)."""
    code = (
        "import sys\n"
        "from entitylens.activations import find_roles\n"
        "import entitylens.task.compact\n"
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported by role lookup'\n"
        "from entitylens.testbed import run_testbed_eval\n"
        "assert callable(run_testbed_eval)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
