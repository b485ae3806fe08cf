"""Path patching: the textbook two forwards per cell vs entitylens's ``path_patch``, in one process.

Both sides compute the same sender x receiver grid on the same boxes pairs (they differ in the object of the
last operation, as in ``patch_vs_transformerlens.py``) and the same TransformerBridge:

- reference: the textbook method as TransformerLens's demos write it -- for every (sender, receiver) cell,
  one ``run_with_hooks`` forward of the corrupted prompt with the sender's clean ``hook_z`` written in and
  every later layer's ``hook_z`` frozen to the corrupted run, recording the receiver's hook, then a second
  ``run_with_hooks`` forward with only the receiver's hook set to the recorded value;
- ours: ``entitylens.patching.paths.path_patch`` (``method="fast"``: one step-1 row per sender for every
  receiver, step 2 from the receiver's layer and first changed position; and ``method="hooks"``).

Senders: every head at ``--sender-layers`` at the changed object's position; receivers: the residual stream
and three heads' queries at the last position, and two key/value heads' keys and values at every position,
at ``--receiver-layer``. Checks max |ours - reference| <= 1e-4 on the normalised logit difference and prints
both times and the ratio.

    python benchmarks/path_patch_vs_reference.py                  # SmolLM2-135M, 2 pairs (a few minutes)
    python benchmarks/path_patch_vs_reference.py --model tiny     # seconds, a smoke run
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from patch_vs_transformerlens import boxes_pair, peaked  # noqa: E402

from entitylens.models import load_model  # noqa: E402
from entitylens.patching import PatchPair  # noqa: E402
from entitylens.patching.metric import normalise  # noqa: E402
from entitylens.patching.paths import path_patch  # noqa: E402
from entitylens.patching.sites import Site  # noqa: E402

MODELS = {"smollm2": ("smollm2-135m-instruct", "4,8,12", 20), "tiny": ("tiny:llama?layers=4", "0,1", 3)}
HOOK = {"head": "attn.hook_z", "q": "attn.hook_q", "k": "attn.hook_k", "v": "attn.hook_v",
        "resid_pre": "hook_resid_pre"}


def with_roles(p: PatchPair) -> PatchPair:
    """The pair with roles: the changed object's first token and the last position."""
    return PatchPair(p.clean_tokens, p.corrupted_tokens, p.clean_answer, p.corrupted_answer,
                     clean_roles={"object": p.first_difference}, corrupted_roles={"object": p.first_difference},
                     name=p.name)


def name(s: Site) -> str:
    return f"blocks.{s.layer}.{HOOK[s.component]}"


def positions(p: PatchPair, s: Site) -> list[int]:
    return list(range(len(p.corrupted_tokens))) if s.role is None else [p.corrupted_roles[s.role]]


@torch.no_grad()
def textbook(model: Any, p: PatchPair, senders: list[Site], receivers: list[Site]) -> torch.Tensor:
    """The reference: two hooked forwards per (sender, receiver) cell."""
    L = int(model.cfg.n_layers)
    clean_logits, clean = model.run_with_cache(p.clean_tokens[None])
    corr_logits, corr = model.run_with_cache(p.corrupted_tokens[None])
    ld_c = float(clean_logits[0, -1, p.clean_answer] - clean_logits[0, -1, p.corrupted_answer])
    ld_x = float(corr_logits[0, -1, p.clean_answer] - corr_logits[0, -1, p.corrupted_answer])
    grid = torch.zeros(len(senders), len(receivers))
    for si, s in enumerate(senders):
        sp = positions(p, s)
        for ri, r in enumerate(receivers):
            store: dict[str, torch.Tensor] = {}

            def set_sender(act: torch.Tensor, hook: Any, s: Site = s, sp: list[int] = sp) -> torch.Tensor:
                act[:, sp, s.head] = clean[name(s)][:, sp, s.head]
                return act

            def freeze(act: torch.Tensor, hook: Any) -> torch.Tensor:
                return corr[hook.name].clone()

            def keep(act: torch.Tensor, hook: Any, store: dict = store) -> torch.Tensor:
                store["x"] = act.clone()
                return act

            hooks = [(name(s), set_sender)] + [(f"blocks.{la}.attn.hook_z", freeze) for la in range(s.layer + 1, L)]
            model.run_with_hooks(p.corrupted_tokens[None], fwd_hooks=[*hooks, (name(r), keep)])
            rp = positions(p, r)

            def set_receiver(act: torch.Tensor, hook: Any, r: Site = r, rp: list[int] = rp, store: dict = store
                             ) -> torch.Tensor:
                if r.head is None:
                    act[:, rp] = store["x"][:, rp]
                else:
                    act[:, rp, r.head] = store["x"][:, rp, r.head]
                return act

            logits = model.run_with_hooks(p.corrupted_tokens[None], fwd_hooks=[(name(r), set_receiver)])
            ld = float(logits[0, -1, p.clean_answer] - logits[0, -1, p.corrupted_answer])
            grid[si, ri] = ld
    return normalise(grid, ld_c, ld_x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--sender-layers", default=None, help="comma-separated (default: 4,8,12 on SmolLM2)")
    ap.add_argument("--receiver-layer", type=int, default=None, help="default: 20 on SmolLM2")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec, layers, rl = MODELS[args.model]
    layers = args.sender_layers or layers
    rl = args.receiver_layer if args.receiver_layer is not None else rl
    model = load_model(spec)
    rng = random.Random(args.seed)
    pairs = [with_roles(peaked(model, boxes_pair(model, rng))) for _ in range(args.pairs)]
    H = int(model.cfg.n_heads)
    senders = [Site("head", int(la), h, "object") for la in layers.split(",") for h in range(H)]
    receivers = [Site("resid_pre", rl, None, "last"), *(Site("q", rl, h, "last") for h in (0, 1, 2)),
                 Site("k", rl, 0), Site("v", rl, 1)]
    lengths = [len(p.corrupted_tokens) for p in pairs]
    print(f"model={spec} pairs={len(pairs)} (lengths {lengths}) senders={len(senders)} "
          f"receivers={len(receivers)} cells={len(senders) * len(receivers)} per pair, threads={args.threads}")
    t0 = time.perf_counter()
    ref = torch.stack([textbook(model, p, senders, receivers) for p in pairs])
    t_ref = time.perf_counter() - t0
    times, results = {}, {}
    for method in ("fast", "hooks"):
        t0 = time.perf_counter()
        results[method] = path_patch(model, pairs, senders, receivers, method=method).normalised
        times[method] = time.perf_counter() - t0
    print(f"textbook (2 forwards per cell): {t_ref:.2f}s")
    for method in ("fast", "hooks"):
        diff = float((results[method] - ref).abs().max())
        ratio = t_ref / times[method]
        verdict = "met" if ratio >= 10 and diff <= 1e-4 else "missed"
        print(f"entitylens path_patch method={method}: {times[method]:.2f}s; speed ratio {ratio:.1f}x; "
              f"max |ours - textbook| = {diff:.2e}; >= 10x with identical results: {verdict}")
    print("mean normalised over pairs, strongest 5 cells (fast):")
    mean = results["fast"].nanmean(0)
    flat = sorted(((float(mean[i, j]), str(s), str(r)) for i, s in enumerate(senders)
                   for j, r in enumerate(receivers)), key=lambda t: -abs(t[0]))
    for v, s, r in flat[:5]:
        print(f"  {s} -> {r}: {v:+.3f}")


if __name__ == "__main__":
    main()
