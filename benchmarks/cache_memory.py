"""Peak memory of role-selected caching vs TransformerLens ``run_with_cache`` over full sequences.

Both methods run the same model over the same boxes-task prompts (``<context> Box N contains``) and
keep, for every prompt, the all-layer ``resid_post`` activations a probe needs:

- ours: ``entitylens.activations.cache_activations`` with roles ``query_box`` and ``last`` (the gather
  happens inside the hook; the forward stops after the last block, so no unembedding; free heap memory
  goes back to the OS between layers, ``CacheConfig.release_memory``; shards go to a temp dir), then
  ``load_cache(...).features(...)`` for both roles, held in memory as a user would;
- ours without trimming (``release_memory=False``), to show what the heap trimming contributes;
- baseline: ``bridge.run_with_cache(batch_of_prompts, names_filter=<all resid_post hooks>)`` per batch,
  keeping every batch's cache (full sequences) as a user would.

Method: each method runs in its own fresh subprocess (so one cannot inherit the other's heap). After
the model is loaded, the prompts are built, one plain forward has warmed the model up and one role
lookup has done its lazy imports, the worker resets the kernel's peak-RSS counter
(``echo 5 > /proc/self/clear_refs`` resets ``VmHWM``) and reads ``VmRSS``; after the method it reads
``VmHWM``. "Peak increase" = VmHWM - VmRSS-at-reset: the most extra resident memory the method needed
at any moment, torch allocations included (``tracemalloc`` cannot see those). "Retained" = exact bytes
of the result tensors kept at the end. Both are printed with their ratios. The workers also check that
the baseline's full-sequence caches, read at the role positions, equal ours (max abs difference).

Allocator: the headline rows use glibc's defaults (no ``MALLOC_*`` variables). glibc raises its mmap
threshold after large frees, so freed forward-pass intermediates stay resident; ``mmap-64k``
(``MALLOC_MMAP_THRESHOLD_=65536``) makes RSS track live memory instead and is shown as a second view.

Usage::

    python benchmarks/cache_memory.py                 # SmolLM2-135M-Instruct (GGUF in the venv)
    python benchmarks/cache_memory.py --model tiny    # tiny:llama, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = {"smollm2": "smollm2-135m-instruct", "tiny": "tiny:llama"}
METHODS = {
    "baseline": "run_with_cache (full sequences)",
    "ours": "entitylens cache (2 roles)",
    "ours-keep": "entitylens cache, release_memory=False",
}
ROLES = ("query_box", "last")


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> int:
    """Trim the heap, reset VmHWM to the current RSS, and return that RSS (bytes)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kb("VmRSS") * 1024


def _peak() -> int:
    return _status_kb("VmHWM") * 1024


def build_prompts(n: int, ops: int, seed: int) -> list:
    """``n`` boxes rows (state × queried box) with up to ``ops`` operations, deterministic for ``seed``."""
    from entitylens.task.text import render_context
    from entitylens.task.types import BoxRow, State
    from entitylens.task.vocab import BNC_OBJECTS
    from entitylens.task.world import count_numops, replay, sample_scenario

    rows = []
    index = 0
    while len(rows) < n:
        scen = sample_scenario(seed, index, BNC_OBJECTS, num_operations=ops)
        contents = replay(scen.initial, scen.operations)[-1]
        numops, by_op = count_numops(scen.operations, len(scen.initial))
        state = State(
            sample_id=index,
            initial=scen.initial,
            operations=scen.operations,
            contents=contents,
            numops=numops,
            numops_by_op=by_op,
            context=render_context(scen.initial, scen.operations),
        )
        rows.append(BoxRow(state, index % len(scen.initial)))
        index += 1
    return rows


def worker(args: argparse.Namespace) -> None:
    import torch

    from entitylens.activations.cache import CacheConfig, cache_activations, load_cache
    from entitylens.activations.cache import build_prompts as to_prompts
    from entitylens.activations.roles import find_roles, tokenize_with_offsets
    from entitylens.models import load_model

    torch.set_grad_enabled(False)
    model = load_model(MODELS[args.model])
    rows = build_prompts(args.n_prompts, args.ops, args.seed)
    prompts = to_prompts(rows)
    n_layers = model.cfg.n_layers
    names = [f"blocks.{layer}.hook_resid_post" for layer in range(n_layers)]
    lengths = [len(tokenize_with_offsets(model.tokenizer, p.text, model.cfg.default_prepend_bos)[0]) for p in prompts]
    out_dir = Path(args.tmp)
    # Warm up (one plain forward of the first batch, one role lookup) so one-time allocator/kernel set-up
    # and lazy imports are paid before measuring, identically for every method. (find_roles imports
    # entitylens.testbed on first use, which currently pulls in matplotlib: ~25 MiB once per process.)
    model([p.text for p in prompts[: args.batch_size]], return_type=None)
    find_roles(
        prompts[0].text,
        tokenize_with_offsets(model.tokenizer, prompts[0].text, model.cfg.default_prepend_bos)[1],
        ROLES,
    )
    base = _reset_peak()
    t0 = time.perf_counter()
    if args.worker in ("ours", "ours-keep"):
        cfg = CacheConfig(
            hooks=("resid_post",),
            roles=ROLES,
            batch_size=args.batch_size,
            shard_size=args.n_prompts,
            release_memory=args.worker == "ours",
        )
        cache_activations(model, rows, cfg, out_dir / args.worker)  # one directory per method: no resume
        cache = load_cache(out_dir / args.worker)
        kept = {role: cache.features("resid_post", role) for role in ROLES}
        seconds = time.perf_counter() - t0
        peak = _peak()
        retained = sum(t.numel() * t.element_size() for t in kept.values())
        from safetensors.torch import save_file

        save_file({r: t.contiguous() for r, t in kept.items()}, str(out_dir / f"{args.worker}.safetensors"))
    else:
        kept_batches = []
        for b0 in range(0, len(prompts), args.batch_size):
            texts = [p.text for p in prompts[b0 : b0 + args.batch_size]]
            _, cache = model.run_with_cache(texts, names_filter=names)
            kept_batches.append({name: cache[name] for name in names})
            del cache
        seconds = time.perf_counter() - t0
        peak = _peak()
        retained = sum(t.numel() * t.element_size() for batch in kept_batches for t in batch.values())
        # Read the full-sequence caches at the role positions (left padding shifts them).
        selected = {role: torch.empty(n_layers, len(prompts), model.cfg.d_model) for role in ROLES}
        for b, batch in enumerate(kept_batches):
            width = batch[names[0]].shape[1]
            for j in range(batch[names[0]].shape[0]):
                i = b * args.batch_size + j
                text = prompts[i].text
                _, offsets = tokenize_with_offsets(model.tokenizer, text, model.cfg.default_prepend_bos)
                pos = find_roles(text, offsets, ROLES)
                for role in ROLES:
                    for layer, name in enumerate(names):
                        selected[role][layer, i] = batch[name][j, width - len(offsets) + pos[role]]
        from safetensors.torch import save_file

        save_file(selected, str(out_dir / "baseline.safetensors"))
    print(
        "RESULT "
        + json.dumps(
            {
                "method": args.worker,
                "peak_increase": peak - base,
                "rss_at_start": base,
                "retained": retained,
                "seconds": seconds,
                "tokens": sum(lengths),
                "max_len": max(lengths),
                "n_layers": n_layers,
                "d_model": model.cfg.d_model,
            }
        ),
        flush=True,
    )


ALLOCATORS = {
    "glibc-default": {},
    # Every block >= 64 KiB is its own mmap, returned to the OS when freed: RSS then tracks live tensors
    # instead of glibc's retained free lists (whose size depends on allocation history and timing).
    "mmap-64k": {"MALLOC_MMAP_THRESHOLD_": "65536"},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    p.add_argument("--n-prompts", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--ops", type=int, default=12, help="operations per prompt (longer prompts: more tokens)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--allocators",
        default=",".join(ALLOCATORS),
        help=f"comma-separated malloc settings to measure under: {', '.join(ALLOCATORS)} (default both)",
    )
    p.add_argument("--worker", choices=list(METHODS), help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    allocators = [a for a in args.allocators.split(",") if a]
    unknown = [a for a in allocators if a not in ALLOCATORS]
    if unknown or not allocators:
        sys.exit(f"unknown allocator setting {unknown}; use {', '.join(ALLOCATORS)}")
    results: dict[tuple[str, str], dict] = {}
    max_diff = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for alloc in allocators:
            run_dir = Path(tmp) / alloc
            run_dir.mkdir()
            for method in METHODS:
                cmd = [sys.executable, __file__, "--worker", method, "--tmp", str(run_dir), "--model", args.model]
                cmd += ["--n-prompts", str(args.n_prompts), "--batch-size", str(args.batch_size)]
                cmd += ["--ops", str(args.ops), "--seed", str(args.seed)]
                env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **ALLOCATORS[alloc])
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                if proc.returncode != 0 or not line:
                    sys.exit(f"{method} worker failed:\n{proc.stderr[-3000:]}")
                results[(alloc, method)] = json.loads(line[0][len("RESULT ") :])
            from safetensors.torch import load_file

            base_vals = load_file(str(run_dir / "baseline.safetensors"))
            for method in list(METHODS)[1:]:
                ours_vals = load_file(str(run_dir / f"{method}.safetensors"))
                max_diff = max(max_diff, *(float((ours_vals[r] - base_vals[r]).abs().max()) for r in ROLES))
    o = results[(allocators[0], "ours")]
    mib = 1 << 20
    print(
        f"model={MODELS[args.model]} prompts={args.n_prompts} batch={args.batch_size} tokens={o['tokens']} "
        f"(max {o['max_len']}/prompt) hooks=resid_post x {o['n_layers']} layers, d_model={o['d_model']}, "
        f"roles={','.join(ROLES)}"
    )
    print("method: each run in a fresh subprocess; peak increase = VmHWM - VmRSS after loading and one warm-up")
    print("        forward (VmHWM reset via /proc/self/clear_refs), so torch allocations count; retained = bytes")
    print("        of the result tensors kept; mmap-64k = MALLOC_MMAP_THRESHOLD_=65536 (RSS tracks live memory)")
    print(f"{'allocator':<15}{'method':<40}{'peak increase':>16}{'retained':>14}{'time':>10}")
    for alloc in allocators:
        for method in METHODS:
            r = results[(alloc, method)]
            print(
                f"{alloc:<15}{METHODS[method]:<40}{r['peak_increase'] / mib:>12.1f} MiB"
                f"{r['retained'] / mib:>10.1f} MiB{r['seconds']:>9.1f}s"
            )
    for alloc in allocators:
        b = results[(alloc, "baseline")]
        for method in list(METHODS)[1:]:
            o = results[(alloc, method)]
            print(
                f"ratio baseline/{method} [{alloc}]: peak increase "
                f"{b['peak_increase'] / max(o['peak_increase'], 1):.1f}x, "
                f"retained {b['retained'] / max(o['retained'], 1):.1f}x"
            )
    print(f"values at the role positions: max |ours - baseline| = {max_diff:.2e}")


if __name__ == "__main__":
    main()
