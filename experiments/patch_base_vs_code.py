#!/usr/bin/env python
"""Patching study for a (base, code) model pair: activation patching grids of both models, side by side.

Builds clean/corrupted pairs (OUT/pairs.jsonl), patches every (layer x role) cell of both models
(OUT/patch/base, OUT/patch/variant: patch.csv, heatmap, safetensors, run.json; reused when unchanged),
and draws both heatmaps side by side on one colour scale (OUT/compare/compare_<component>.png, with the
numbers in OUT/compare/compare.csv). With --attribution, attribution patching runs too and its agreement
with exact patching is reported (agreement.json; OUT/compare-attribution). For large models a GPU-time
estimate is printed first.

Examples::

    python experiments/patch_base_vs_code.py --device cuda --dtype bfloat16 --pairs 50 --yes
    python experiments/patch_base_vs_code.py --base testbed:base --variant testbed:code --attribution

See src/entitylens/studies.py for the layout of OUT.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from entitylens.cli._args import csv_list, layer_list, read_prefix
from entitylens.studies import PatchStudyConfig, add_common_args, run_patch_study, script_main


def build_parser() -> argparse.ArgumentParser:
    """The script's options."""
    p = argparse.ArgumentParser(prog="patch_base_vs_code.py", description=__doc__.split("\n\n")[0])
    add_common_args(p, "runs/patch_base_vs_code")
    p.add_argument("--kind", default="op_object",
                   help="corruption: op_object (default), op_box, init_object or drop_op")
    p.add_argument("--pairs", type=int, default=24, help="most clean/corrupted pairs (default 24)")
    p.add_argument("--component", default="resid_pre",
                   help="resid_pre (default), resid_mid, resid_post, attn_out, mlp_out or head_z")
    p.add_argument("--grid", default=None, help="layer_role (default) or layer_head (default for head_z)")
    p.add_argument("--roles", type=csv_list, default=None, help="grid columns (default: the roles every pair has)")
    p.add_argument("--layers", type=layer_list, default=None, help="grid rows (default all)")
    p.add_argument("--method", default="fast", help="fast (causal reuse, default) or hooks (bridge reference)")
    p.add_argument("--batch-cells", type=int, default=32, help="most cells per forward (default 32)")
    p.add_argument("--attribution", action="store_true", help="also run attribution patching and its agreement")
    p.add_argument("--k", type=int, default=10, help="top-k size of the attribution agreement (default 10)")
    return p


def config_from_args(args: argparse.Namespace) -> PatchStudyConfig:
    """The study configuration the options describe."""
    return PatchStudyConfig(
        base=args.base, variant=args.variant, out=args.out, data=args.data, seed=args.seed, states=args.states,
        protocol=args.protocol, prefix=read_prefix(args), kind=args.kind, pairs=args.pairs,
        component=args.component, grid=args.grid,
        roles=None if args.roles is None else tuple(args.roles), layers=args.layers, method=args.method,
        batch_cells=args.batch_cells, attribution=args.attribution, k=args.k, device=args.device, dtype=args.dtype,
        estimate_above=args.estimate_above, overwrite=args.overwrite,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the study; returns the exit status."""
    return script_main(config_from_args, run_patch_study, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
