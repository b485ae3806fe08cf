"""Exact resid_pre patching: TransformerLens 4.3's own patching vs entitylens's fast engine, in one process.

Both sides patch the same layer x position cells of the same boxes-like clean/corrupted pairs (they differ
in the last operation: "Put the X into Box k." vs "Put the Y into Box k.", then "Box k contains the") on
the same TransformerBridge:

- baseline: ``transformer_lens.patching.get_act_patch_resid_pre`` (one hooked forward per cell, under
  ``torch.no_grad``), restricted to the benchmark's cells with TL's own ``index_df`` argument;
- ours: ``entitylens.patching.patch_grid(..., "resid_pre", "layer_pos", method="fast")``.

TL needs about 27 minutes for the full 30-layer x 129-position SmolLM2 grid of ONE pair on a 2-core CPU,
so both sides run the same subset (``--layers``, ``--positions``); nothing is extrapolated. The script
checks max |ours - TL| <= 1e-4 on the normalised logit difference and prints both times and the ratio.

    python benchmarks/patch_vs_transformerlens.py                 # SmolLM2-135M, 2 pairs
    python benchmarks/patch_vs_transformerlens.py --model tiny    # seconds, for a smoke run
    python benchmarks/patch_vs_transformerlens.py --layers all --positions all --pairs 1   # full grid (slow)
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pandas as pd  # noqa: E402  (TransformerLens's patching depends on pandas)
import torch  # noqa: E402
from transformer_lens import patching as tlp  # noqa: E402

import entitylens.patching.engine_fast as engine_fast  # noqa: E402
from entitylens.models import encode, first_token_ids, load_model  # noqa: E402
from entitylens.patching import PatchPair, patch_grid  # noqa: E402

MODELS = {"smollm2": "smollm2-135m-instruct", "tiny": "tiny:llama?layers=4"}
OBJECTS = (
    "car",
    "cross",
    "bag",
    "machine",
    "paper",
    "string",
    "bill",
    "apple",
    "cash",
    "glass",
    "bottle",
    "map",
    "plane",
    "coat",
    "boat",
    "key",
    "ring",
    "shoe",
    "stone",
    "book",
    "letter",
    "milk",
    "leaf",
    "fan",
)


def boxes_pair(model: Any, rng: random.Random) -> PatchPair:
    """A KST24-style description + operations; clean/corrupted differ in the object of the last operation."""
    first = first_token_ids(model, OBJECTS)
    n_tok = {o: encode(model, f"the {o}", bos=False).numel() for o in OBJECTS}
    while True:  # the two candidate answers: same token count (equal lengths), different first token
        x, y = rng.sample(OBJECTS, 2)
        if n_tok[x] == n_tok[y] and first[x] != first[y]:
            break
    objs = rng.sample([o for o in OBJECTS if o not in (x, y)], 7) + [x, y]
    boxes = [[objs[i]] for i in range(7)]
    target = rng.randrange(7)
    ops = [f"Remove the {boxes[target][0]} from Box {target}."]
    boxes[target] = []
    for _ in range(3):
        src = rng.choice([b for b in range(7) if boxes[b] and b != target])
        dst = rng.choice([b for b in range(7) if b not in (src, target) and len(boxes[b]) < 3])
        obj = boxes[src].pop()
        boxes[dst].append(obj)
        ops.append(f"Move the {obj} from Box {src} to Box {dst}.")
    initial = ", ".join(f"Box {b} contains the {objs[b]}" for b in range(7)) + "."
    text = initial + " " + " ".join(ops) + " Put the {} into Box " + f"{target}. Box {target} contains the"
    clean, corr = encode(model, text.format(x)), encode(model, text.format(y))
    if len(clean) != len(corr):
        raise SystemExit(f"pair tokenizes to different lengths ({len(clean)} vs {len(corr)}); pick other objects")
    return PatchPair(clean, corr, first[x], first[y], name=f"{x}->{y}@box{target}")


@torch.no_grad()
def peaked(model: Any, pair: PatchPair) -> PatchPair:
    """The same prompts, scored on the clean run's and the corrupted run's top tokens."""
    good = int(model(pair.clean_tokens[None])[0, -1].argmax())
    top2 = model(pair.corrupted_tokens[None])[0, -1].topk(2).indices.tolist()
    bad = top2[0] if top2[0] != good else top2[1]
    return PatchPair(pair.clean_tokens, pair.corrupted_tokens, good, bad, name=pair.name)


def parse_layers(spec: str, n_layers: int) -> list[int]:
    if spec == "all":
        return list(range(n_layers))
    if spec.startswith("every:"):
        step = int(spec.split(":", 1)[1])
        return sorted(set(range(0, n_layers, step)) | {n_layers - 1})
    return [int(x) for x in spec.split(",")]


def parse_positions(spec: str, n_pos: int) -> list[int]:
    if spec == "all":
        return list(range(n_pos))
    if spec.startswith("last-"):
        k = int(spec.split("-", 1)[1])
        return list(range(-k, 0))
    return [int(x) for x in spec.split(",")]


@torch.no_grad()
def tl_grid(model: Any, pair: PatchPair, layers: list[int], positions: list[int]) -> torch.Tensor:
    """TL's get_act_patch_resid_pre on the (layer, position) cells, normalised with the bridge's baselines."""
    good, bad = pair.clean_answer, pair.corrupted_answer
    lc = model(pair.clean_tokens[None])[0, -1]
    lx = model(pair.corrupted_tokens[None])[0, -1]
    clean_ld, corr_ld = float(lc[good] - lc[bad]), float(lx[good] - lx[bad])

    def metric(logits: torch.Tensor) -> torch.Tensor:
        row = logits[0, -1]
        return ((row[good] - row[bad]) - corr_ld) / (clean_ld - corr_ld)

    _, cache = model.run_with_cache(pair.clean_tokens[None], names_filter=lambda n: n.endswith("hook_resid_pre"))
    n = len(pair.corrupted_tokens)
    df = pd.DataFrame([(layer, p % n) for layer in layers for p in positions], columns=["layer", "pos"])
    flat = tlp.get_act_patch_resid_pre(
        model, pair.corrupted_tokens[None], cache, metric, index_axis_names=None, index_df=df
    )
    return flat.reshape(len(layers), len(positions)).float().cpu()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    ap.add_argument("--pairs", type=int, default=2, help="number of clean/corrupted pairs")
    ap.add_argument("--layers", default="every:3", help="'all', 'every:K' or a comma list (default every:3)")
    ap.add_argument("--positions", default="last-12", help="'all', 'last-K' or a comma list (default last-12)")
    ap.add_argument("--batch-cells", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument(
        "--twin-attn",
        choices=["sdpa", "eager"],
        default=None,
        help="attention kernel of our fast engine (default: sdpa; eager for --model tiny, whose "
        "large random weights make SDPA/eager float differences visible at 1e-4)",
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    engine_fast.TWIN_ATTN_IMPLEMENTATION = args.twin_attn or ("eager" if args.model == "tiny" else "sdpa")

    model = load_model(MODELS[args.model])
    rng = random.Random(args.seed)
    pairs = [boxes_pair(model, rng) for _ in range(args.pairs)]
    if args.model == "tiny":
        # A random model barely separates the two objects (normalising by a ~0.05 gap magnifies float noise
        # 20x): score its own top predictions on the two prompts instead.
        pairs = [peaked(model, p) for p in pairs]
    n_pos = min(len(p.corrupted_tokens) for p in pairs)
    layers = parse_layers(args.layers, int(model.cfg.n_layers))
    positions = parse_positions(args.positions, n_pos)
    cells = len(layers) * len(positions)
    print(
        f"model={MODELS[args.model]} layers={model.cfg.n_layers} threads={torch.get_num_threads()} "
        f"pairs={len(pairs)} prompt_tokens={[len(p.corrupted_tokens) for p in pairs]} "
        f"first_difference={[p.first_difference for p in pairs]}"
    )
    print(
        f"grid per pair: {len(layers)} layers x {len(positions)} positions = {cells} cells "
        f"(layers={args.layers}, positions={args.positions})"
    )

    # warm-up (imports, allocator) on both sides, excluded from timing
    with torch.no_grad():
        model(pairs[0].corrupted_tokens[None])
    patch_grid(model, pairs[0], "resid_pre", "layer_pos", layers=layers[:1], positions=positions[-1:])

    t0 = time.perf_counter()
    ref = torch.stack([tl_grid(model, p, layers, positions) for p in pairs])
    t_tl = time.perf_counter() - t0

    t0 = time.perf_counter()
    ours = patch_grid(
        model, pairs, "resid_pre", "layer_pos", layers=layers, positions=positions, batch_cells=args.batch_cells
    )
    t_ours = time.perf_counter() - t0
    got = ours.normalised

    diff = float((got - ref).abs().max())
    gaps = (ours.source_logit_diff - ours.target_logit_diff).tolist()
    print("clean - corrupted logit difference per pair: " + ", ".join(f"{g:.3f}" for g in gaps))
    raw = float(((got - ref) * (ours.source_logit_diff - ours.target_logit_diff)[:, None, None]).abs().max())
    print(f"max |ours - TL| in raw logit-difference units: {raw:.2e}")
    print(
        f"transformer_lens.patching.get_act_patch_resid_pre: {t_tl:8.2f} s  ({t_tl / (cells * len(pairs)):.3f} "
        f"s/cell, path=bridge hooks, eager attention)"
    )
    print(
        f"entitylens patch_grid(method='fast'):              {t_ours:8.2f} s  (path={ours.path}; "
        f"{ours.n_noop_cells} no-op cells, {ours.n_forward_cells} cells recomputed)"
    )
    print(f"max |ours - TL| on the normalised metric: {diff:.2e} (tolerance {args.tol:.0e})")
    print(f"speed ratio TL / ours: {t_tl / t_ours:.1f}x")
    if not diff <= args.tol:
        print("FAIL: results differ beyond the tolerance", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
