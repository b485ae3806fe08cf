"""``entitylens data``: generate boxes-task datasets (K&S T5 JSONL) and summarise them.

Examples::

    entitylens data generate --seed 0 --out test.jsonl --profile paper
    entitylens data generate --seed 0 --out train.jsonl --split train --max-prefix-ops 2 --states 20000
    entitylens data generate --seed 1 --out alt.jsonl --variant altforms --vocab disjoint --form t5
    entitylens data stats test.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict
from pathlib import Path

from entitylens.errors import EntitylensError


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``data generate`` and ``data stats``."""
    from entitylens.task.generate import PROFILES
    from entitylens.task.splits import SPLIT_NAMES
    from entitylens.task.text import FORMS, VARIANTS
    from entitylens.task.vocab import VOCABULARIES

    p = sub.add_parser("data", help="generate and inspect boxes-task datasets (K&S T5 JSONL)")
    dsub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    dsub.required = True

    g = dsub.add_parser("generate", help="write a dataset in the K&S T5 JSONL format")
    g.add_argument("--seed", type=int, required=True, help="dataset seed (same arguments -> identical bytes)")
    g.add_argument("--out", type=Path, required=True, help="output .jsonl file")
    g.add_argument("--variant", default="base", help=f"surface variant: {' | '.join(VARIANTS)} (default base)")
    g.add_argument("--vocab", default="bnc", help=f"object vocabulary: {' | '.join(VOCABULARIES)} (default bnc)")
    g.add_argument(
        "--form", default="fewshot", help=f"{' | '.join(FORMS)}: 'contains nothing' (default) or T5 'is empty'"
    )
    g.add_argument("--ops", type=int, default=12, help="operations per scenario (default 12)")
    g.add_argument("--states", type=int, default=None, help="states to write (default 1000; 716 for --profile), "
                   "each from its own scenario at a random prefix")
    g.add_argument("--all-prefixes", action="store_true", help="write every prefix of each scenario, as K&S's "
                   "generator does (states of one scenario share almost all their text)")
    g.add_argument("--profile", default=None, help=f"{' | '.join(PROFILES)}: 716 states with KST24's numops profile")
    g.add_argument(
        "--max-prefix-ops",
        "--train-ops",
        dest="max_prefix_ops",
        type=int,
        default=None,
        help="train-on-N-ops: only prefixes with at most N operations",
    )
    g.add_argument("--split", default=None, help=f"keep one signature split: {' | '.join(SPLIT_NAMES)}")
    g.add_argument(
        "--split-fractions",
        default="0.8,0.1,0.1",
        help="train,dev,test fractions of the signature space used by --split (default 0.8,0.1,0.1)",
    )
    g.set_defaults(func=run_generate)

    s = dsub.add_parser("stats", help="print rows, states, scenarios and the numops histogram of a dataset")
    s.add_argument("file", type=Path, help="a K&S T5 JSONL file")
    s.add_argument("--json", action="store_true", help="print the statistics as JSON")
    s.set_defaults(func=run_stats)


def _fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise EntitylensError(
            f"--split-fractions {text!r} is not three comma-separated numbers; use e.g. 0.8,0.1,0.1"
        ) from None


def run_generate(args: argparse.Namespace) -> int:
    """Generate a dataset from the command-line arguments and write it."""
    from entitylens.task.generate import GeneratorConfig, generate_dataset
    from entitylens.task.io import dataset_stats

    config = GeneratorConfig(
        seed=args.seed,
        variant=args.variant,
        vocab=args.vocab,
        form=args.form,
        num_operations=args.ops,
        num_states=args.states,
        profile=args.profile,
        max_prefix_ops=args.max_prefix_ops,
        split=args.split,
        split_fractions=_fractions(args.split_fractions),  # type: ignore[arg-type]
        sampling="prefixes" if args.all_prefixes else "distinct",
    )
    if args.out.is_dir():
        raise EntitylensError(f"--out {args.out} is a directory; give a file path such as {args.out}/data.jsonl")
    states = generate_dataset(config, args.out)
    st = dataset_stats(states)
    print(f"wrote {st.rows} rows ({st.states} states, {st.scenarios} scenarios) to {args.out}")
    return 0


def print_stats(path: str | os.PathLike[str], as_json: bool = False) -> None:
    """Read a K&S T5 JSONL file and print its statistics.

    Args:
        path: The dataset file.
        as_json: Print JSON instead of the readable table.

    """
    from entitylens.behavior.runs import read_dataset
    from entitylens.task.io import dataset_stats, format_stats

    st = dataset_stats(read_dataset(path))
    if as_json:
        print(json.dumps(asdict(st), sort_keys=True))
    else:
        print(f"file       {path}")
        print(format_stats(st))


def run_stats(args: argparse.Namespace) -> int:
    """Print the statistics of ``args.file``."""
    print_stats(args.file, as_json=args.json)
    return 0
