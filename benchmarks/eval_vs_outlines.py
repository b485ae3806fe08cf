"""Constrained statement decoding: outlines + transformers (the paper's stack) vs entitylens, one process.

Both run greedy decoding of the KST24 statement on the same states, the same model (the Hugging Face
model inside the bridge, SDPA attention, fp32) and the same regex. outlines generates one state at a time,
as KST24 ran it; entitylens runs batched with the shared 2-shot prefix cached, in ``forced="jump"``
(default) and ``forced="step"`` (token-by-token through forced text: outlines' exact behaviour).

Prints states/s for each, the speed ratios, and agreement with outlines (``step`` must agree on every
state; ``jump`` may differ where the model's own token path through forced text matters).

Usage::

    python benchmarks/eval_vs_outlines.py --model smollm2 --states 16
    python benchmarks/eval_vs_outlines.py --model tiny --states 32
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from entitylens.behavior.decode import DecodeConfig, generate_statements, unwrapped_hf_model  # noqa: E402
from entitylens.behavior.evaluate import token_budget  # noqa: E402
from entitylens.models import load_model  # noqa: E402
from entitylens.task.generate import GeneratorConfig, generate_states  # noqa: E402
from entitylens.task.prompts import get_protocol  # noqa: E402

MODELS = {"smollm2": "smollm2-135m-instruct", "tiny": "tiny:llama"}


def run_outlines(model, prompts, regex, budgets):
    import outlines
    from outlines.types import Regex

    from entitylens.models import load_tokenizer, model_info

    # outlines gets the model's *own* tokenizer (as in tests/behavior/test_outlines_equivalence.py): the
    # bridge's was rebuilt by TransformerLens to always add BOS, which SmolLM2's own tokenizer never does, so
    # handing outlines the bridge's gives it another prompt (a BOS first) and other statements.
    tok = load_tokenizer(model_info(model).spec)
    with unwrapped_hf_model(model) as hf:
        om = outlines.from_transformers(hf, tok)
        om.type_adapter.has_chat_template = False  # the raw KST24 prompt, as outlines 0.x used it
        t0 = time.perf_counter()
        gen = outlines.Generator(om, Regex(regex))
        setup = time.perf_counter() - t0
        out = []
        t0 = time.perf_counter()
        for p, b in zip(prompts, budgets, strict=True):
            out.append(gen(p, max_new_tokens=b, do_sample=False))
        return out, time.perf_counter() - t0, setup


def run_ours(model, prompts, shared, budgets, forced, batch_size, prefix):
    cfg = DecodeConfig(forced=forced, batch_size=batch_size, prefix=prefix)
    t0 = time.perf_counter()
    gens = generate_statements(model, prompts, cfg, shared, max_new_tokens=budgets)
    return gens, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    ap.add_argument("--states", type=int, default=16, help="number of states (prompts)")
    ap.add_argument("--seed", type=int, default=0, help="dataset seed")
    ap.add_argument("--batch-size", type=int, default=8, help="entitylens batch size")
    ap.add_argument("--margin", type=int, default=8, help="token budget margin over the longest plausible statement")
    ap.add_argument("--outlines-states", type=int, default=None, help="run outlines on only the first N states")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model = load_model(MODELS[args.model])
    tok = model.tokenizer
    protocol = get_protocol("kst24")
    prefix = protocol.generation_prefix
    shared = protocol.prompt("x")[: -len("x")]
    states = generate_states(GeneratorConfig(seed=args.seed, num_states=args.states))
    prompts = [protocol.prompt(s.context) for s in states]
    budgets = [token_budget(tok, s, prefix, args.margin) for s in states]
    regex = DecodeConfig(prefix=prefix).grammar.regex
    n_out = min(args.outlines_states or len(prompts), len(prompts))
    ops = [s.num_operations for s in states]
    lens = [len(tok(p)["input_ids"]) for p in prompts]
    print(
        f"model={args.model} states={len(prompts)} (operations {min(ops)}..{max(ops)}) "
        f"threads={torch.get_num_threads()} prompt tokens={min(lens)}..{max(lens)} "
        f"budgets={min(budgets)}..{max(budgets)}"
    )

    with torch.inference_mode():
        # Warm up both stacks on one state (allocators, lazy automaton states, outlines' index), untimed.
        run_ours(model, prompts[:1], shared, budgets[:1], "jump", 1, prefix)
        ref, t_out, setup = run_outlines(model, prompts[:n_out], regex, budgets[:n_out])
        jump, t_jump = run_ours(model, prompts, shared, budgets, "jump", args.batch_size, prefix)
        step, t_step = run_ours(model, prompts, shared, budgets, "step", args.batch_size, prefix)

    rate_out = n_out / t_out
    rate_jump, rate_step = len(prompts) / t_jump, len(prompts) / t_step
    agree_step = sum(g.text == r for g, r in zip(step, ref, strict=False))
    agree_jump = sum(g.text == r for g, r in zip(jump, ref, strict=False))
    trunc = sum(g.truncated for g in jump)
    steps_jump = sum(g.steps for g in jump) / len(jump)
    steps_step = sum(g.steps for g in step) / len(step)
    print(f"outlines+transformers : {rate_out:8.3f} states/s  ({t_out / n_out:.2f} s/state, index build {setup:.2f} s)")
    print(f"entitylens jump (bs={args.batch_size}): {rate_jump:8.3f} states/s  ({steps_jump:.1f} model steps/state)")
    print(f"entitylens step (bs={args.batch_size}): {rate_step:8.3f} states/s  ({steps_step:.1f} model steps/state)")
    print(f"ratio jump/outlines = {rate_jump / rate_out:.1f}x   ratio step/outlines = {rate_step / rate_out:.1f}x")
    print(f"agreement with outlines: step {agree_step}/{n_out}   jump {agree_jump}/{n_out}   (jump truncated: {trunc})")
    for i, (r, g) in enumerate(zip(ref, jump, strict=False)):
        if r != g.text:
            print(f"  state {i} differs (jump):\n    outlines: {r!r}\n    jump:     {g.text!r}")
    if agree_step != n_out:
        print("ERROR: forced='step' disagrees with outlines", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
