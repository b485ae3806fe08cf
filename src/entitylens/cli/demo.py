"""``entitylens demo``: the README's main job — the whole pipeline on the embedded testbed pair."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``demo`` subcommand."""
    p = sub.add_parser(
        "demo",
        help="run eval, probes and patching on the shipped testbed base/code pair and write report.md",
        description="Evaluate the shipped testbed stem, base and code arms by numops, probe both arms' residual "
        "streams layer by layer, patch every layer x role on pairs both arms solve, write OUT/report.md and print "
        "what it found.",
    )
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory (default runs/demo)")
    p.add_argument("--eval-states", type=int, default=720, help="states in the behavioural evaluation (default 720)")
    p.add_argument("--probe-states", type=int, default=240, help="states cached for the probes (default 240)")
    p.add_argument("--patch-pairs", type=int, default=24, help="clean/corrupted pairs for patching (default 24)")
    p.add_argument("--where-states", type=int, default=120,
                   help="states (one prompt each) the probe family reads for 'where is the state' (default 120)")
    p.add_argument("--stages", default="eval,probe,patch", help="comma-separated subset of eval,probe,patch")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo, then print its findings and where the report is."""
    from entitylens.pipelines.demo import DemoConfig, run_demo
    from entitylens.pipelines.demo_report import summary_lines
    from entitylens.progress import is_quiet

    config = DemoConfig(eval_states=args.eval_states, probe_states=args.probe_states, patch_pairs=args.patch_pairs,
                        where_states=args.where_states)
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    report, findings = run_demo(args.out, config, stages=stages, say=None if is_quiet() else print)
    print("\n".join(["", "what the demo found:", *summary_lines(findings), f"report: {report}"]))
    return 0
