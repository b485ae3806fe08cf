"""``entitylens patch``: clean/corrupted pairs from a dataset, patching grids, heatmaps, comparisons.

Examples::

    entitylens patch pairs --data data/test.jsonl --kind op_object --max-pairs 50 --out pairs.jsonl
    entitylens patch pairs --kind p24 --max-pairs 50 --out p24.jsonl          # generated P24 pairs
    entitylens patch run --model tiny:llama --pairs pairs.jsonl --component resid_pre --out runs/tiny --attribution
    entitylens patch run --model tiny:llama --pairs pairs.jsonl --component head_z --out runs/tiny
    entitylens patch compare runs/base runs/code --out runs/base-vs-code
    entitylens patch cross --source testbed:code --target testbed:base --pairs pairs.jsonl --component resid_post
        --out runs/code-into-base

See ``docs/patching.md`` ("From datasets and the CLI").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from entitylens.cli._args import csv_list, layer_list, read_prefix
from entitylens.errors import EntitylensError


def _vmax(value: str) -> float | None:
    if value.strip() == "auto":
        return None
    try:
        v = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--vmax {value!r} must be a positive number or 'auto'") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"--vmax {value!r} must be positive")
    return v


_VMAX_HELP = "heatmap colour limit: the scale is [-V, V] (default 1); 'auto' = the largest absolute value"


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``patch pairs``, ``patch run``, ``patch compare``, ``patch cross``, ``patch path`` and ``patch sites``."""
    p = sub.add_parser("patch", help="activation / attribution / cross-model patching from boxes datasets")
    psub = p.add_subparsers(dest="patch_command", metavar="SUBCOMMAND")
    psub.required = True
    _add_pairs(psub)
    _add_run(psub)
    _add_compare(psub)
    _add_cross(psub)
    from entitylens.cli.patch_circuits import add_das, add_path, add_sites

    add_path(psub)
    add_sites(psub)
    add_das(psub)


def _add_pairs(psub: argparse._SubParsersAction) -> None:
    from entitylens.patching.pairs import PAIR_KINDS

    g = psub.add_parser(
        "pairs",
        help="build clean/corrupted prompt pairs from a dataset",
        description="Build clean/corrupted prompt pairs (JSONL, model independent) from a K&S dataset "
        "(kinds op_object, op_box, init_object, drop_op) or a P24 file / generated P24 contexts (kind "
        "p24). Each pair records the causal model's counterfactual answer (the clean context's answer to the "
        "corrupted side's query), which interchange accuracy (`patch das`) is scored against.",
    )
    g.add_argument("--data", type=Path, default=None, help="K&S JSONL (P24 JSONL for --kind p24; omit to generate)")
    g.add_argument("--kind", required=True, help=f"corruption kind: {' | '.join(PAIR_KINDS)}")
    g.add_argument("--out", type=Path, required=True, help="output .jsonl file")
    g.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    g.add_argument("--max-pairs", type=int, default=None, help="keep at most N pairs (required to generate p24)")
    g.add_argument("--cross-query", action="store_true",
                   help="the clean side queries another box than the corrupted side, so the counterfactual answer "
                   "differs from the clean one (separates a site carrying the changed variable from one carrying "
                   "the source's answer)")
    g.add_argument("--compact", action="store_true",
                   help="write the pairs in the testbed's compact protocol (B0 car ; ... | B3), for testbed:* models")
    prefix = g.add_mutually_exclusive_group()
    prefix.add_argument("--prefix-file", type=Path, help="text file put verbatim before both prompts of every pair")
    prefix.add_argument(
        "--kst24-prefix", action="store_true", help="put KST24's instruction and two demonstrations before each prompt"
    )
    _quiet_arg(g)
    g.set_defaults(func=run_pairs)


def _add_run(psub: argparse._SubParsersAction) -> None:
    from entitylens.cli.models import add_model_args
    from entitylens.patching.exact import COMPONENTS

    r = psub.add_parser(
        "run",
        help="exact (and attribution) patching of every layer x role / layer x head cell",
        description="Patch every (layer x role) cell -- (layer x head) for head_z -- from the clean into the "
        "corrupted run; write patch.csv, patch_<component>.png and result_<component>.safetensors to --out.",
    )
    add_model_args(r)
    r.add_argument("--pairs", type=Path, required=True, help="pairs file (text pairs, or a run's pairs_tokens.jsonl)")
    r.add_argument("--component", required=True, help=f"activation to patch: {' | '.join(COMPONENTS)}")
    _grid_args(r)
    r.add_argument("--method", default="fast", help="fast (causal reuse, default) or hooks (bridge reference)")
    r.add_argument("--batch-cells", type=int, default=32, help="most cells per forward (default 32)")
    r.add_argument("--attribution", action="store_true", help="also run attribution patching and report agreement")
    r.add_argument("--k", type=int, default=10, help="top-k size of the attribution agreement (default 10)")
    r.add_argument("--label", default=None, help="model label in titles and comparisons (default: the model's label, "
                   "as in `entitylens eval`)")
    r.add_argument("--vmax", type=_vmax, default=1.0, help=_VMAX_HELP)
    r.add_argument("--out", type=Path, required=True, help="run directory, e.g. runs/patch/MODEL")
    r.add_argument("--overwrite", action="store_true", help="replace another model's / pairs file's results in --out")
    r.set_defaults(func=run_run)


def _add_compare(psub: argparse._SubParsersAction) -> None:
    c = psub.add_parser(
        "compare",
        help="draw two runs' heatmaps side by side on one colour scale (e.g. base vs code model)",
        description="Read result files of two run directories (same component) and draw them side by side on "
        "one colour scale, with their difference when the grids match; writes compare_<component>.png and "
        "compare.csv.",
    )
    c.add_argument("a", type=Path, help="first run directory (e.g. the base model)")
    c.add_argument("b", type=Path, help="second run directory (e.g. the variant)")
    c.add_argument("--out", type=Path, required=True, help="output directory")
    c.add_argument("--component", type=csv_list, default=None, help="components to compare (default: all in both)")
    c.add_argument("--kind", default="activation", help="a kind of patch.csv: activation (exact patching, default; "
                   "alias patch), attribution or cross_model (alias cross)")
    c.add_argument(
        "--labels", type=csv_list, default=None, help="two labels, e.g. base,code (default: the run's models)"
    )
    c.add_argument("--vmax", type=_vmax, default=1.0, help=_VMAX_HELP)
    c.add_argument("--depth", choices=("layer", "relative"), default="layer",
                   help="rows by layer (default; refused for models of different depth) or by relative depth "
                   "layer / (layers - 1), the deeper model interpolated")
    _quiet_arg(c)
    c.set_defaults(func=run_compare)


def _add_cross(psub: argparse._SubParsersAction) -> None:
    from entitylens.cli.models import SPEC_HELP
    from entitylens.patching.exact import COMPONENTS

    x = psub.add_parser(
        "cross",
        help="cross-model patching: patch model A's activations into model B on the same prompts",
        description="Copy model A's (--source) activations into model B (--target) cell by cell on the same "
        "prompts and report the fraction of A's behaviour that transfers; writes cross.csv, "
        "cross_<component>.png and cross_<component>.safetensors.",
    )
    x.add_argument("--source", required=True, metavar="SPEC", help="model A (activations come from it). " + SPEC_HELP)
    x.add_argument("--target", required=True, metavar="SPEC", help="model B (patched), e.g. the base model")
    x.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default: cpu)")
    x.add_argument("--dtype", default="float32", help="model dtype (default float32)")
    x.add_argument("--pairs", type=Path, required=True, help="pairs file (text pairs or tokenised pairs)")
    x.add_argument("--component", required=True, help=f"activation to patch: {' | '.join(COMPONENTS)}")
    x.add_argument("--side", default="clean", help="which prompt of each pair to run: clean (default) or corrupted")
    _grid_args(x)
    x.add_argument("--method", default="fast", help="fast (default) or hooks")
    x.add_argument("--batch-cells", type=int, default=32, help="most cells per forward (default 32)")
    x.add_argument("--vmax", type=_vmax, default=1.0, help=_VMAX_HELP)
    x.add_argument("--out", type=Path, required=True, help="run directory, e.g. runs/cross/A-into-B")
    x.add_argument("--overwrite", action="store_true", help="replace another model pair's results in --out")
    x.set_defaults(func=run_cross_cmd)


def _quiet_arg(p: argparse.ArgumentParser) -> None:
    # Also accepted after the subcommand; SUPPRESS keeps a top-level `entitylens --quiet patch ...` intact.
    p.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")


def _grid_args(p: argparse.ArgumentParser) -> None:
    _quiet_arg(p)
    p.add_argument("--grid", default=None, help="layer_role (default) or layer_head (default for head_z)")
    p.add_argument(
        "--roles",
        type=csv_list,
        default=None,
        help="comma-separated roles (columns of layer_role / positions patched by layer_head), or 'all' for every "
        "role all pairs share; default: query_box_desc, changed_*, query_box, query_contains, last as present",
    )
    p.add_argument("--layers", type=layer_list, default=None, help="comma-separated layers or 'all' (default all)")


# --------------------------------------------------------------------------------------------------
# patch pairs
# --------------------------------------------------------------------------------------------------


def run_pairs(args: argparse.Namespace) -> int:
    """Build pairs from ``args.data`` and write them to ``args.out``."""
    from entitylens.patching.pairs import PAIR_KINDS, build_pairs, write_pairs

    if args.kind not in PAIR_KINDS:
        raise EntitylensError(f"unknown pair kind {args.kind!r}; use one of {', '.join(PAIR_KINDS)}")
    from entitylens._io import check_output_apart

    if args.out.is_dir():
        raise EntitylensError(f"--out {args.out} is a directory; give a file path such as {args.out}/pairs.jsonl")
    check_output_apart(args.out, [("--data", args.data)])
    prefix = read_prefix(args)
    data: Any = None
    if args.data is not None:
        if not args.data.is_file():
            raise EntitylensError(f"dataset {args.data} does not exist; pass an existing file with --data")
        if args.kind == "p24":
            from entitylens.task.io import read_p24_jsonl

            data = read_p24_jsonl(args.data)
        else:
            from entitylens.task.io import read_ks_jsonl

            try:
                data = read_ks_jsonl(args.data)
            except EntitylensError as e:
                if "P24 file" not in str(e):
                    raise
                raise EntitylensError(
                    f"{args.data} is a P24 file (no operations); use --kind p24 with it, or a K&S dataset for "
                    f"--kind {args.kind}"
                ) from None
    elif args.kind != "p24":
        raise EntitylensError(f"--kind {args.kind} needs --data (a K&S JSONL file); only p24 pairs can be generated")
    if args.compact and (prefix or args.kind == "p24"):
        raise EntitylensError("--compact renders K&S pairs without a prefix; drop --prefix-file / --kst24-prefix "
                              "(p24 pairs have no compact form)")
    pairs = build_pairs(data, args.kind, seed=args.seed, max_pairs=args.max_pairs, prefix=prefix,
                        cross_query=args.cross_query)
    if args.compact:
        from entitylens.patching.pairs import compact_pairs

        pairs = compact_pairs(pairs)
        if not pairs:
            raise EntitylensError(f"no {args.kind} pair has distinguishable compact answers; use more states "
                                  "(--data) or another --kind")
    n = write_pairs(args.out, pairs)
    src = f"from {args.data}" if args.data is not None else "(generated)"
    print(f"wrote {n} {args.kind} pairs {src} to {args.out}")
    return 0


# --------------------------------------------------------------------------------------------------
# patch run / cross
# --------------------------------------------------------------------------------------------------


def _patch_config(args: argparse.Namespace, **extra: Any) -> Any:
    from entitylens.patching.job import PatchConfig

    if args.grid is not None and args.grid not in ("layer_role", "layer_head"):
        raise EntitylensError(f"unknown grid {args.grid!r} for the CLI; use layer_role or layer_head")
    return PatchConfig(
        component=args.component, grid=args.grid, roles=args.roles, layers=args.layers, method=args.method,
        batch_cells=args.batch_cells, vmax=args.vmax, **extra,
    )  # fmt: skip


def _say(msg: str) -> None:
    print(msg, file=sys.stderr)


def run_run(args: argparse.Namespace) -> int:
    """Exact (and optionally attribution) patching of a pairs file; writes the run directory."""
    from entitylens._io import sha256_file
    from entitylens.cli.models import load_model_from_args
    from entitylens.models import model_label
    from entitylens.patching.attribution import agreement_line
    from entitylens.patching.job import run_patch_job
    from entitylens.patching.outputs import top_cells_summary
    from entitylens.patching.pair_io import read_any_pairs

    config = _patch_config(args, attribution=args.attribution, k=args.k)
    if not args.pairs.is_file():
        raise EntitylensError(f"pairs file {args.pairs} does not exist; build one with `entitylens patch pairs`")
    model = load_model_from_args(args)
    label = args.label or model_label(args.model)
    job = run_patch_job(
        model, read_any_pairs(args.pairs, model.tokenizer), args.out, config, pairs_sha256=sha256_file(args.pairs),
        label=label, info={"model": args.model, "pairs": str(args.pairs)}, overwrite=args.overwrite, say=_say,
    )  # fmt: skip
    r = job.result
    print(
        f"patched {len(r.pair_names)} pairs x {len(r.layers)} layers x {len(r.cells)} cells "
        f"({config.component}, {config.resolved_grid}) with {r.path} in {job.seconds:.1f} s "
        f"({r.n_forward_cells} cells ran, {r.n_noop_cells} exact no-ops)"
    )
    print("strongest cells (mean normalised, 1 = clean behaviour restored):")
    print(top_cells_summary(r))
    if job.attribution is not None:
        agree = json.loads((args.out / "agreement.json").read_text(encoding="utf-8"))[config.component]["pair_mean"]
        print(agreement_line(agree))
    print("wrote " + ", ".join(str(p) for p in job.files.values()))
    return 0


def run_cross_cmd(args: argparse.Namespace) -> int:
    """Cross-model patching of a pairs file (model A into model B); writes the run directory."""
    from entitylens._io import sha256_file
    from entitylens.models import load_model, model_label
    from entitylens.patching.cross_model import check_compatible
    from entitylens.patching.job import run_patch_job
    from entitylens.patching.outputs import top_cells_summary
    from entitylens.patching.pair_io import read_any_pairs

    config = _patch_config(args, side=args.side)
    if not args.pairs.is_file():
        raise EntitylensError(f"pairs file {args.pairs} does not exist; build one with `entitylens patch pairs`")
    source = load_model(args.source, device=args.device, dtype=args.dtype)
    target = load_model(args.target, device=args.device, dtype=args.dtype)
    check_compatible(source, target, args.component)
    label = f"{model_label(args.source)} -> {model_label(args.target)}"
    job = run_patch_job(
        target, read_any_pairs(args.pairs, target.tokenizer), args.out, config, pairs_sha256=sha256_file(args.pairs),
        label=label, info={"source": args.source, "target": args.target, "pairs": str(args.pairs)},
        source=source, overwrite=args.overwrite, say=_say,
    )  # fmt: skip
    r = job.result
    print(
        f"cross-model patched {len(r.pair_names)} {args.side} prompts x {len(r.layers)} layers x "
        f"{len(r.cells)} cells ({args.component}) with {r.path} in {job.seconds:.1f} s"
    )
    print("cells transferring most of A's behaviour (1 = B behaves like A):")
    print(top_cells_summary(r))
    print("wrote " + ", ".join(str(p) for p in job.files.values()))
    return 0


# --------------------------------------------------------------------------------------------------
# patch compare
# --------------------------------------------------------------------------------------------------


def run_compare(args: argparse.Namespace) -> int:
    """Draw the heatmaps of two run directories side by side on one colour scale."""
    from entitylens.patching.run import compare_patch_runs

    written, _ = compare_patch_runs(args.a, args.b, args.out, kind=args.kind, components=args.component,
                                    labels=args.labels, vmax=args.vmax, say=print, depth=args.depth)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
