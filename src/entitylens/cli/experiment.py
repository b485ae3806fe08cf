"""``entitylens experiment code|math|alignment``: one of KST24's comparisons with the paper's protocol.

Writes the run directory of ``entitylens eval`` plus ``paper_table.csv`` / ``paper_table.md`` (our numbers beside
the paper's), ``estimate.json`` and ``experiment.json``. The flags come from
:class:`~entitylens.pipelines.experiment.ExperimentConfig`. Examples::

    entitylens experiment code --device cuda --dtype bfloat16                      # all pairs, one GPU box
    entitylens experiment code --shard 0/4 --out runs/exp1_code-0                  # one of 4 machines
    entitylens experiment code --merge runs/exp1_code-0 runs/exp1_code-1 --out runs/exp1_code
    entitylens experiment math --models tiny:llama 'tiny:llama?seed=1' --device cpu --dtype float32 --limit 3
"""

from __future__ import annotations

import argparse
from pathlib import Path

from entitylens.cli._args import add_config_args, config_from_args


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``experiment code``, ``experiment math`` and ``experiment alignment``."""
    from entitylens.models.registry import EXPERIMENTS
    from entitylens.pipelines.experiment import EXPERIMENT_SCRIPTS, ExperimentConfig

    p = sub.add_parser("experiment", help="KST24's code / math / alignment comparison with the paper's protocol")
    esub = p.add_subparsers(dest="experiment", metavar="EXPERIMENT")
    esub.required = True
    for name, script in EXPERIMENT_SCRIPTS.items():
        pairs = ", ".join(f"{a}:{b}" for a, b in EXPERIMENTS[name])
        e = esub.add_parser(
            name, help=f"base vs {name} models ({script})",
            description=f"KST24's {name} comparison ({pairs}) with the paper's protocol: writes a run directory (as "
            "`entitylens eval`) plus paper_table.csv/.md with our numbers beside the paper's.",
        )  # fmt: skip
        add_config_args(e, ExperimentConfig, skip=("experiment",), defaults={"out": Path("runs") / script})
        e.add_argument("--merge", nargs="+", type=Path, metavar="SHARD_DIR",
                       help="merge these shard run directories into --out and write its paper table (loads no model)")
        e.add_argument("--estimate-only", action="store_true", help="print and write the estimate, then stop")
        e.add_argument("--yes", action="store_true", help="do not ask before a large run (the estimate is printed)")
        e.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars or notes")
        e.set_defaults(func=run_experiment_cmd)


def run_experiment_cmd(args: argparse.Namespace) -> int:
    """Run ``entitylens experiment NAME``."""
    import sys

    from entitylens.pipelines.estimate import ask_to_proceed
    from entitylens.pipelines.experiment import ExperimentConfig, experiment_title, merge_experiment, run_experiment
    from entitylens.pipelines.paper_table import paper_table_markdown

    quiet = bool(getattr(args, "quiet", False))
    if args.merge:
        table = merge_experiment(args.experiment, args.merge, args.out)
        print(f"merged {len(args.merge)} shards into {args.out}", file=sys.stderr)
        title = experiment_title(args.experiment)
    else:
        config = config_from_args(ExperimentConfig, args, experiment=args.experiment)
        result = run_experiment(config, estimate_only=args.estimate_only,
                                confirm=None if args.yes else ask_to_proceed, quiet=quiet)  # fmt: skip
        if args.estimate_only:
            print(f"wrote {config.run_dir / 'estimate.json'}")
            return 0
        table = result.table
        title = experiment_title(args.experiment, args.shard)
    print(paper_table_markdown(table, title))
    print(f"wrote {args.out}/paper_table.csv, paper_table.md, summary.csv, comparison.csv, predictions.jsonl")
    return 0
