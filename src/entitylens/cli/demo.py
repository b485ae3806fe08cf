"""``entitylens demo``: the README's main job.

Until the embedded base/code testbed pair exists (issue 7), the demo runs the most complete pipeline
that exists: it generates the paper-profile test set (716 states, 5,012 rows) and prints its statistics.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``demo`` subcommand."""
    p = sub.add_parser("demo", help="run the main pipeline end to end (see README)")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory (default runs/demo)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Generate the paper-profile dataset into ``args.out`` and print its statistics."""
    from entitylens.cli.data import print_stats
    from entitylens.task.generate import GeneratorConfig, generate_dataset

    out = Path(args.out) / "test-paper-profile.jsonl"
    config = GeneratorConfig(seed=args.seed, profile="paper")
    generate_dataset(config, out)
    print(f"wrote {out}")
    print_stats(out)
    return 0
