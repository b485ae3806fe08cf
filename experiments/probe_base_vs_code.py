#!/usr/bin/env python
"""Probing study for a (base, code) model pair: linear probes by layer on both models, side by side.

Caches both models' residual streams on the same prompts (OUT/cache/base, OUT/cache/variant; resumable),
probes every layer of each (OUT/probe/base, OUT/probe/variant), and writes the comparison figure
OUT/compare/probe_compare.png, the per-layer differences OUT/compare/probe_diff.csv and the best layer
per model and role OUT/summary.csv. For large models a GPU-time estimate is printed first.

Examples::

    python experiments/probe_base_vs_code.py --device cuda --dtype bfloat16 --yes          # llama2-7b vs codellama-7b
    python experiments/probe_base_vs_code.py --base testbed:base --variant testbed:code --states 240
    python experiments/probe_base_vs_code.py --base testbed:base --variant testbed:code --random-control

See src/entitylens/studies.py for the layout of OUT.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from entitylens.cli._args import csv_list, read_prefix
from entitylens.studies import ProbeStudyConfig, add_common_args, run_probe_study, script_main


def build_parser() -> argparse.ArgumentParser:
    """The script's options."""
    p = argparse.ArgumentParser(prog="probe_base_vs_code.py", description=__doc__.split("\n\n")[0])
    add_common_args(p, "runs/probe_base_vs_code")
    p.add_argument("--hooks", type=csv_list, default=("resid_post",), help="cached hooks (default resid_post)")
    p.add_argument("--roles", type=csv_list, default=None,
                   help="roles (default query_box,last; query_box,query_box_desc for compact prompts)")
    p.add_argument("--target", choices=("box_contents", "object_in_box"), default="box_contents",
                   help="probe target (default box_contents: the queried box's object set)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per forward while caching (default 8)")
    p.add_argument("--limit", type=int, default=None, help="cache only the first N rows")
    p.add_argument("--random-control", action="store_true",
                   help="also probe a randomly re-initialised copy of each model (over_random rows)")
    p.add_argument("--probe-seed", type=int, default=0, help="seed of the probes' split and folds (default 0)")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds of the probes (default 5)")
    p.add_argument("--bootstrap", type=int, default=200, help="state resamples for intervals (default 200, 0 = none)")
    return p


def config_from_args(args: argparse.Namespace) -> ProbeStudyConfig:
    """The study configuration the options describe."""
    return ProbeStudyConfig(
        base=args.base, variant=args.variant, out=args.out, data=args.data, seed=args.seed, states=args.states,
        protocol=args.protocol, prefix=read_prefix(args), hooks=tuple(args.hooks), target=args.target,
        roles=None if args.roles is None else tuple(args.roles),
        limit=args.limit, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
        random_control=args.random_control, probe_seed=args.probe_seed, folds=args.folds, bootstrap=args.bootstrap,
        estimate_above=args.estimate_above, overwrite=args.overwrite,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the study; returns the exit status."""
    return script_main(config_from_args, run_probe_study, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
