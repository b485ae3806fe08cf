"""``entitylens testbed``: train and evaluate the controlled base/code testbed pair.

* ``entitylens testbed train --stage stem|base|code [--out ROOT] [--parent DIR|testbed:stem] [--steps N]``
  writes ``ROOT/<stage>/`` (default ROOT: ``testbed-checkpoints``); an arm continues from ``--parent``
  (default ``ROOT/stem``).
* ``entitylens testbed eval --out DIR [--models ...] [--protocol compact|kst24] [--states N]`` scores
  the baselines and the testbed checkpoints on the targeted evaluation set.
* ``entitylens testbed info`` lists the shipped checkpoints (recipe hash, tokens, accuracy).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from entitylens.errors import EntitylensError


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``testbed`` command and its ``train`` / ``eval`` / ``info`` subcommands."""
    p = sub.add_parser(
        "testbed",
        help="train / evaluate the controlled tiny base-vs-code model pair",
        description="The testbed: a small Llama stem trained from scratch on boxes-world text, and two arms "
        "(base: + prose, code: + Python container programs) continued from it with identical budgets.",
    )
    tsub = p.add_subparsers(dest="testbed_command", metavar="SUBCOMMAND")
    tsub.required = True

    t = tsub.add_parser("train", help="train one stage from scratch (deterministic)")
    t.add_argument("--stage", required=True, choices=("stem", "base", "code"))
    t.add_argument(
        "--out", type=Path, default=Path("testbed-checkpoints"), help="checkpoint root (writes ROOT/STAGE)"
    )
    t.add_argument(
        "--parent", help="parent checkpoint of an arm: a directory or testbed:stem (default: ROOT/stem)"
    )
    t.add_argument("--steps", type=int, help="override the recipe's number of steps (smoke tests)")
    t.add_argument("--no-eval", action="store_true", help="skip the final evaluation on the standard set")
    t.add_argument("--eval-states", type=int, help="states in the final evaluation (default 720)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=run_train_cmd)

    e = tsub.add_parser(
        "eval", help="evaluate baselines and testbed checkpoints (same outputs as `entitylens eval`)"
    )
    e.add_argument("--out", type=Path, required=True, help="run directory")
    e.add_argument(
        "--models", nargs="+", metavar="SPEC",
        help="baselines (random nothing initial) and testbed:stem|base|code|DIR (default: all of them)",
    )  # fmt: skip
    e.add_argument("--protocol", choices=("compact", "kst24"), default="compact")
    e.add_argument("--states", type=int, help="states in the evaluation set (default 720)")
    e.add_argument("--seed", type=int, help="evaluation-set seed (default: the standard set)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=run_eval_cmd)

    i = tsub.add_parser("info", help="show the shipped checkpoints")
    i.add_argument("--json", action="store_true", help="print the metadata as JSON")
    i.set_defaults(func=run_info_cmd)


def _quiet(args: argparse.Namespace) -> None:
    if getattr(args, "quiet", False):
        from entitylens.progress import set_quiet

        set_quiet(True)


def run_train_cmd(args: argparse.Namespace) -> int:
    """``entitylens testbed train``."""
    from entitylens.models.testbed.checkpoints import SPEC_PREFIX, resolve_testbed_spec
    from entitylens.testbed.recipe import get_recipe
    from entitylens.testbed.train import train_stage

    _quiet(args)
    if args.steps is not None and args.steps < 1:
        raise EntitylensError(f"--steps {args.steps} must be >= 1")
    recipe = get_recipe(args.stage)
    parent = None
    if recipe.parent is not None:
        if args.parent is None:
            parent = args.out / recipe.parent
            if not (parent / "meta.json").is_file():
                raise EntitylensError(
                    f"{parent} holds no {recipe.parent} checkpoint; train "
                    f"`--stage {recipe.parent} --out {args.out}` "
                    f"first or pass --parent testbed:{recipe.parent}"
                )
        elif args.parent.startswith(SPEC_PREFIX):
            parent = resolve_testbed_spec(args.parent)
        else:
            parent = Path(args.parent)

    def report(row: dict) -> None:
        if not args.quiet:
            print(
                f"step {row['step']:>6}  loss {row['loss']:.4f}  boxes {row['boxes_loss']:.4f}  "
                f"val acc numops 0/1/2/3+ {row['val_acc_numops0']:.3f}/{row['val_acc_numops1']:.3f}/"
                f"{row['val_acc_numops2']:.3f}/{row['val_acc_numops3plus']:.3f}  "
                f"{row['elapsed_s']:.0f}s",
                flush=True,
            )

    res = train_stage(
        args.stage,
        args.out / args.stage,
        steps=args.steps,
        parent_dir=parent,
        evaluate_final=not args.no_eval,
        eval_num_states=args.eval_states,
        callback=report,
    )
    m = res.meta
    acc = m["eval"]["overall"] if m.get("eval") else None
    print(
        f"{args.stage}: {res.recipe.steps} steps, final loss {res.final_loss:.4f}, "
        f"val acc numops0 {m['final']['val_acc_numops0']:.3f}"
        + (f", eval overall {acc:.3f}" if acc is not None else "")
        + f", {_train_seconds(res.out):.0f}s -> {res.out}"
    )
    return 0


def run_eval_cmd(args: argparse.Namespace) -> int:
    """``entitylens testbed eval``."""
    from entitylens.task.targeted import DEFAULT_EVAL_STATES, EVAL_SEED
    from entitylens.testbed.run import DEFAULT_MODELS, run_testbed_eval

    _quiet(args)
    results = run_testbed_eval(
        args.out,
        args.models or DEFAULT_MODELS,
        protocol=args.protocol,
        num_states=args.states or DEFAULT_EVAL_STATES,
        seed=EVAL_SEED if args.seed is None else args.seed,
    )
    for r in results:
        rep = r.report()
        curve = " ".join(f"{rep.numops_label(k)}:{a.accuracy:.2f}" for k, a in rep.by_numops.items() if a.n)
        print(f"{r.model:>8}  overall {rep.overall.accuracy:.3f}  {curve}")
    print(f"wrote {args.out}/summary.csv, comparison.csv, accuracy_by_numops.png")
    return 0


def run_info_cmd(args: argparse.Namespace) -> int:
    """``entitylens testbed info``."""
    from entitylens.models.testbed.checkpoints import checkpoint_dir, read_meta
    from entitylens.testbed.recipe import RECIPES

    rows: dict[str, dict[str, Any] | None] = {}
    for stage, recipe in RECIPES.items():
        d = checkpoint_dir(stage)
        if not (d / "meta.json").is_file():
            rows[stage] = None
            print(f"{stage}: not shipped ({d})")
            continue
        meta = read_meta(d)
        rows[stage] = meta
        match = "matches" if meta.get("recipe_hash") == recipe.recipe_hash else "DIFFERS FROM"
        ev = meta.get("eval") or {}
        print(
            f"{stage}: recipe {meta['recipe_hash'][:12]} ({match} the code), "
            f"{meta['recipe']['steps']} steps, "
            f"{meta['tokens']['total']:,} tokens, {_train_seconds(d):.0f}s, eval overall "
            f"{ev.get('overall', float('nan')):.3f}"
        )
    if args.json:
        json.dump(rows, sys.stdout, indent=2, sort_keys=True)
        print()
    return 0


def _train_seconds(directory: Path) -> float:
    """A checkpoint's training time from its ``timing.json`` (NaN when it has none)."""
    import json
    import math

    try:
        return float(json.loads((Path(directory) / "timing.json").read_text(encoding="utf-8"))["train_seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return math.nan
