"""``entitylens probe``: linear probes on every cached layer, with controls, CSV and figures.

Examples::

    entitylens probe --cache runs/cache/M --target box_contents --roles query_box,last --out runs/probe/M
    entitylens probe --cache runs/cache/M --random-cache runs/cache/M-random --out runs/probe/M
    entitylens probe --compare runs/probe/base runs/probe/code --out runs/probe/compare

Writes ``probe.csv`` (layer x role x metric, with 95% intervals), ``probe_by_layer.png`` and
``meta.json``; ``--compare`` writes ``probe_compare.png``. See ``docs/probing.md``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from entitylens.cli._args import csv_list, float_list, layer_list
from entitylens.errors import EntitylensError

TARGET_CHOICES = ("box_contents", "object_in_box", "global", "prior", "mention", "incremental", "tags_box",
                  "tags_object")
"""``--target`` choices: :data:`entitylens.probing.targets.TARGETS` (a test keeps them equal; listed here so
building the CLI imports no torch)."""


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``probe`` subcommand."""
    p = sub.add_parser(
        "probe",
        help="train linear probes on every cached layer (box contents, object in box) with controls",
        description="Train one linear probe per layer and role on an activation cache (`entitylens cache`), "
        "split by state, with a control task (random labels per object type); write probe.csv, probe_by_layer.png and "
        "meta.json. With --compare A B, draw two probe runs on one figure.",
    )
    p.add_argument("--cache", type=Path, help="activation cache directory (from `entitylens cache --out`)")
    p.add_argument("--target", choices=TARGET_CHOICES, default="box_contents",
                   help="box_contents: the queried box's object set; object_in_box: every (box, object) pair; "
                   "global: every box's contents at the roles; prior: the queried box before its last operation; "
                   "mention / tags_box: at every box mention (cache --roles @mentions); incremental: the whole "
                   "state at every operation's end (@op_ends); tags_object: at every object mention (@objects). "
                   "See docs/probing.md")
    p.add_argument("--roles", type=csv_list, default=("query_box", "last"), help="comma-separated cached roles")
    p.add_argument("--hook", default="resid_post", help="cached hook key (default resid_post)")
    p.add_argument("--layers", type=layer_list, default=None, help="comma-separated cached layers (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, folds and control labels")
    p.add_argument("--split", choices=("scenario", "state"), default="scenario",
                   help="keep whole scenarios (default) or only whole states on one side of the split; by state, "
                   "a probe can look answers up from sibling prefixes of a test state's scenario")
    p.add_argument("--test-fraction", type=float, default=0.2, help="fraction of states in the test split")
    p.add_argument("--disjoint-objects", type=float, nargs="?", const=0.1, default=0.0, metavar="FRACTION",
                   help="hold this fraction of the objects out of training (default when given: 0.1)")
    p.add_argument("--min-count", type=int, default=1, help="keep labels true in at least this many rows")
    p.add_argument("--Cs", type=float_list, default=(0.01, 0.1, 1.0, 10.0), help="inverse L2 strengths to choose from")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds (by state)")
    p.add_argument("--bootstrap", type=int, default=200, help="state resamples for intervals (0: none)")
    p.add_argument("--no-control", action="store_true", help="skip the control task (random labels per object type)")
    p.add_argument("--random-cache", type=Path, default=None,
                   help="cache of the same rows from a randomly initialised model of the same architecture")
    p.add_argument("--class-weight", choices=("none", "balanced"), default="none",
                   help="balanced: weight each label column's classes inversely to their frequency (scikit-learn's "
                   "class_weight='balanced'; for sparse targets such as the family's, as Tang et al.'s weighted loss)")
    p.add_argument("--estimator", choices=("logistic", "ridge"), default="logistic",
                   help="logistic (default: L2 logistic regression) or ridge (closed-form least squares on coded "
                   "targets: one solve per C for every target; decision scores, probabilities with --calibrate; "
                   "pass smaller --Cs, e.g. 1e-5,1e-4,1e-3,1e-2)")
    p.add_argument("--calibrate", action="store_true",
                   help="ridge only: fit a scale and class biases of the scores per layer by the (--class-weight) "
                   "cross-entropy on the training split, so the logits are log-odds and the decisions those of a "
                   "softmax probe's loss (Tang et al.'s class-weighted loss for the tags); adds little time")
    p.add_argument("--device", default="cpu", help="device the probes are fitted on (cpu, cuda, ...)")
    p.add_argument("--compare", type=Path, nargs=2, metavar=("BASE", "VARIANT"), default=None,
                   help="draw two probe output directories on one figure (probe_compare.png)")
    p.add_argument("--metric", default="exact_match", help="metric drawn by --compare (default exact_match)")
    p.add_argument("--depth", choices=("layer", "relative"), default="layer",
                   help="--compare x axis: layer (default; refused for models of different depth) or relative depth "
                   "layer / (layers - 1)")
    p.add_argument("--label", default=None, help="model label in the figure and in --compare (default: the cached "
                   "model's label, as in `entitylens eval`)")
    p.add_argument("--out", type=Path, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace a probe run of another cache or configuration "
                   "in --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``entitylens probe``."""
    from entitylens._io import check_output_apart
    from entitylens.probing.linear import ProbeConfig
    from entitylens.probing.outputs import check_probe_dir, compare_probe_runs, probe_identity, write_probe_outputs
    from entitylens.probing.run import ProbeRunConfig, run_probes

    if args.out is None:
        raise EntitylensError("--out is required; pass the output directory, e.g. --out runs/probe/M")
    if args.compare is not None:
        if args.cache is not None:
            raise EntitylensError("--compare draws existing runs and takes no --cache; run them separately")
        check_output_apart(args.out, [("probe run", d) for d in args.compare])
        paths = compare_probe_runs(args.compare[0], args.compare[1], args.out, metric=args.metric,
                                   depth=args.depth)
        print(f"wrote {', '.join(str(p) for p in paths)}")
        return 0
    if args.cache is None:
        raise EntitylensError("--cache is required; pass a directory from `entitylens cache --out` (or --compare A B)")
    probe = ProbeConfig(Cs=args.Cs, folds=args.folds, test_fraction=args.test_fraction, seed=args.seed,
                        class_weight=None if args.class_weight == "none" else "balanced",
                        estimator=args.estimator, calibrate=args.calibrate, device=args.device)
    cfg = ProbeRunConfig(target=args.target, roles=args.roles, hook=args.hook, layers=args.layers,
                         min_count=args.min_count, heldout_object_fraction=args.disjoint_objects,
                         control=not args.no_control, bootstrap=args.bootstrap, probe=probe, split=args.split)
    check_output_apart(args.out, [("--cache", args.cache), ("--random-cache", args.random_cache)])
    check_probe_dir(args.out, probe_identity(args.cache, cfg, args.random_cache), args.overwrite)  # before any work
    result = run_probes(args.cache, cfg, random_cache=args.random_cache)
    paths = write_probe_outputs(args.out, result, label=args.label)
    if cfg.split == "state":
        import sys

        from entitylens.probing.outputs import STATE_SPLIT_WARNING

        print(f"warning: {STATE_SPLIT_WARNING}", file=sys.stderr)
    t = result.target
    unit = "scenarios" if cfg.split == "scenario" else "states"
    n_units = len({(t.scenarios if cfg.split == "scenario" else t.groups)[i] for i in result.split.test.tolist()})
    what = f"at {len(set(t.example_roles))} positions" if t.is_context else f"x {len(cfg.roles)} roles"
    print(f"probed {len(t.rows)} examples ({len(result.split.test)} test examples from {n_units} test {unit}), "
          f"{len(t.target_names)} {t.name} labels, {len(result.layers)} layers {what}")
    print(verdict(result.table))
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0


def verdict(table: object) -> str:
    """The summary line of a probe run: the best layer against the baselines, with its interval."""
    from entitylens.probing.outputs import best_against_baselines

    b = best_against_baselines(table)  # type: ignore[arg-type]
    line = (f"best exact-set accuracy {b['value']:.3f} [{b['ci_low']:.3f}, {b['ci_high']:.3f}] at layer "
            f"{b['layer']} ({b['role']}); baselines: always empty {b['baseline_empty']:.3f}, majority set "
            f"{b['baseline_majority']:.3f}, sibling lookup {b['baseline_sibling_lookup']:.3f}")  # fmt: skip
    if not b["beats_baselines"]:
        line += (f"\nthe best layer does NOT beat the best baseline ({b['best_baseline']:.3f}) with its interval: "
                 "these probes show no decodable state beyond what the baselines know")
    return line
