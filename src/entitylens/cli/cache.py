"""``entitylens cache``: store activations at token roles for every row of a dataset.

Example::

    entitylens cache --model tiny:llama --data data/test.jsonl --hooks resid_post
        --roles query_box,last --out runs/cache/tiny

The cache is resumable: rerunning the same command after an interruption computes only the missing
shards. See ``docs/activations.md``.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from entitylens.cli._args import (  # noqa: F401 (re-export)
    add_vllm_args,
    csv_list,
    kst24_prefix,
    layer_list,
    read_prefix,
    vllm_options,
)
from entitylens.errors import EntitylensError

_FORMATS = ("auto", "ks", "p24", "text")






def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``cache`` subcommand."""
    p = sub.add_parser(
        "cache",
        help="cache activations at token roles (query_box, last, op0_object, ...) to safetensors shards",
        description="Run a model over one prompt per dataset row ('<context> Box N contains') and store the "
        "activations of the chosen hooks at the chosen token roles as checksummed, resumable shards.",
    )
    p.add_argument("--model", help="model spec: registry key, hub id, local dir, .gguf file or tiny:llama")
    p.add_argument("--data", type=Path, help="dataset: K&S JSONL, P24 JSONL, or .txt with one prompt per line")
    p.add_argument("--format", choices=_FORMATS, default="auto", help="dataset format (default: auto)")
    p.add_argument("--out", type=Path, help="cache directory (e.g. runs/cache/M)")
    p.add_argument(
        "--hooks",
        type=csv_list,
        default=("resid_post",),
        help="comma-separated hook aliases (resid_pre, resid_mid, resid_post, attn_out, mlp_out), "
        "'{layer}' patterns or TransformerLens hook names (default resid_post)",
    )
    p.add_argument(
        "--roles",
        type=csv_list,
        default=("query_box", "last"),
        help="comma-separated token roles (see --list-roles)",
    )
    p.add_argument("--layers", type=layer_list, default=None, help="comma-separated layers (default: all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--shard-size", type=int, default=256, help="rows per shard file (default 256)")
    p.add_argument("--dtype", default="float32", help="storage dtype: float32, float16 or bfloat16")
    p.add_argument("--model-dtype", default="float32", help="dtype the model runs in (default float32)")
    p.add_argument(
        "--random-init", type=int, metavar="SEED", default=None,
        help="re-initialise the model's weights (seeded) before caching: the random-model control for "
        "`entitylens probe --random-cache`",
    )  # fmt: skip
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    add_vllm_args(p, "forward passes: the bridge's own (native) or vLLM through TransformerLens's vLLM driver (hooks "
                  "resid_post, attn_out, mlp_out; same cache format; the bridge still loads for the tokenizer, "
                  "roles and the model fingerprint)")
    prefix = p.add_mutually_exclusive_group()
    prefix.add_argument("--prefix-file", type=Path, help="text file put verbatim before every row's prompt")
    prefix.add_argument(
        "--kst24-prefix",
        action="store_true",
        help="put KST24's instruction and two demonstrations before every row ('Description: <context> Box N "
        "contains')",
    )
    p.add_argument("--limit", type=int, default=None, help="cache only the first N rows")
    p.add_argument(
        "--allow-missing-roles",
        action="store_true",
        help="store a role absent from a prompt as NaN with a mask instead of failing",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing cache in --out")
    p.add_argument("--list-roles", action="store_true", help="print the role catalogue and exit")
    p.set_defaults(func=run)


def _detect_format(path: Path) -> str:
    if path.suffix == ".txt":
        return "text"
    import json

    first = ""
    with open(path, encoding="utf-8-sig") as f:
        for line in f:
            if line.strip():
                first = line
                break
    if not first:
        raise EntitylensError(f"dataset {path} has no rows; generate one with `entitylens data generate`")
    try:
        rec = json.loads(first)
    except ValueError:
        raise EntitylensError(
            f"{path}: the first row is not JSON; pass a K&S/P24 JSONL file, or a .txt file with one prompt per line"
        ) from None
    masked = str(rec.get("sentence_masked", "")) if isinstance(rec, dict) else ""
    return "p24" if " is in Box " in masked and " contains " not in masked.split(". Box")[0] else "ks"


def load_rows(path: Path, fmt: str = "auto", limit: int | None = None) -> list[Any]:
    """Read a dataset file into items :func:`~entitylens.activations.cache.build_prompts` accepts.

    Args:
        path: K&S JSONL (one State per prefix; every box becomes a row), P24 JSONL, or ``.txt``.
        fmt: ``auto``, ``ks``, ``p24`` or ``text``.
        limit: Keep only the first ``limit`` rows.

    Returns:
        ``BoxRow`` s, ``P24Item`` s or strings.

    Raises:
        EntitylensError: Missing or malformed file.

    """
    if not path.is_file():
        raise EntitylensError(f"dataset {path} does not exist; pass an existing file with --data")
    if fmt == "auto":
        fmt = _detect_format(path)
    rows: list[Any]
    if fmt == "text":
        rows = [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif fmt == "p24":
        from entitylens.task.io import read_p24_jsonl

        rows = list(read_p24_jsonl(path))
    else:
        from entitylens.task.io import read_ks_jsonl
        from entitylens.task.types import BoxRow

        rows = []
        for state in read_ks_jsonl(path):
            boxes: Iterable[int] = state.extra.get("boxes", range(state.num_boxes))  # type: ignore[assignment]
            rows.extend(BoxRow(state, int(b)) for b in boxes)
    if limit is not None:
        if limit < 1:
            raise EntitylensError(f"--limit {limit} must be at least 1; pass a positive number of rows")
        rows = rows[:limit]
    return rows




def run(args: argparse.Namespace) -> int:
    """Build (or resume) the cache described by ``args``."""
    from entitylens._io import sha256_file
    from entitylens.activations.cache import CacheConfig, cache_activations
    from entitylens.activations.roles import ROLE_CATALOGUE

    if args.list_roles:
        width = max(len(k) for k in ROLE_CATALOGUE)
        for name, what in ROLE_CATALOGUE.items():
            print(f"{name:<{width}}  {what}")
        return 0
    missing = [
        flag for flag, value in (("--model", args.model), ("--data", args.data), ("--out", args.out)) if not value
    ]
    if missing:
        raise EntitylensError(f"missing {', '.join(missing)}; pass --model, --data and --out")
    from entitylens._io import check_output_apart, prepare_output_dir

    check_output_apart(args.out, [("--data", args.data)])
    prepare_output_dir(args.out)  # before loading the model: a read-only or file --out fails at once
    prefix = read_prefix(args)
    config = CacheConfig(
        hooks=tuple(args.hooks),
        roles=tuple(args.roles),
        layers=args.layers,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        dtype=args.dtype,
        prefix=prefix,
        allow_missing_roles=args.allow_missing_roles,
        engine=args.engine,
    )
    options = vllm_options(args)
    if args.engine == "vllm":
        from entitylens.activations.remote import check_hook_keys
        from entitylens.models.vllm_support import require_vllm

        check_hook_keys(config.hooks)
        if args.random_init is not None:
            raise EntitylensError("--random-init re-initialises the bridge's weights, which vLLM does not run; "
                                  "cache the random-model control with --engine native")
        require_vllm()  # before the model loads: a missing engine is a one-line error
    rows = load_rows(args.data, args.format, args.limit)
    from entitylens.models import load_model

    model = load_model(args.model, device=args.device, dtype=args.model_dtype)
    spec = args.model
    if args.random_init is not None:
        # Random-model control: same architecture and tokenizer, trained weights discarded. The spec
        # recorded in meta.json says so, so this cache can never be mistaken for the trained model's.
        from entitylens.probing.run import reinitialize_weights

        reinitialize_weights(model, seed=args.random_init)
        spec = f"{args.model}#random-init-{args.random_init}"
    source = {"path": str(args.data), "sha256": sha256_file(args.data), "limit": args.limit}
    index = cache_activations(
        model, rows, config, args.out, model_spec=spec, dataset_source=source, overwrite=args.overwrite,
        vllm_options=options,
    )
    print(
        f"cached {index.n_rows} rows in {len(index.shards)} shards to {index.directory} "
        f"({index.computed} computed, {index.reused} reused)"
    )
    return 0
