"""``entitylens demo``: the README's main job — the whole pipeline on the embedded testbed pair."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``demo`` subcommand."""
    p = sub.add_parser(
        "demo",
        help="run eval, probes and patching on the shipped testbed base/code pair and write report.md",
    )
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory (default runs/demo)")
    p.add_argument("--eval-states", type=int, default=720, help="states in the behavioural evaluation")
    p.add_argument("--probe-states", type=int, default=240, help="states cached for the probes")
    p.add_argument("--patch-pairs", type=int, default=24, help="clean/corrupted pairs for patching")
    p.add_argument("--stages", default="eval,probe,patch", help="comma-separated subset of eval,probe,patch")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo and print where the report is."""
    from entitylens.demo import DemoConfig, run_demo

    config = DemoConfig(eval_states=args.eval_states, probe_states=args.probe_states, patch_pairs=args.patch_pairs)
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    report = run_demo(args.out, config, stages=stages)
    print(f"wrote {report}")
    return 0
