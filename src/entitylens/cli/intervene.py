"""``entitylens intervene``: edit the residual stream along a probe's direction and measure the answer.

Example::

    entitylens probe --cache runs/cache/M --target tags_box --out runs/probe/M-tags
    entitylens intervene --probe runs/probe/M-tags --cache runs/cache/M --column apple=removed
        --role @last_touch --mode null --random 8 --out runs/intervene/M-apple

Writes ``intervene.csv`` (layer x direction x metric: clean, edited, effect with its interval; the random
directions' band), ``intervene.png``/``.pdf`` and ``meta.json``. See ``docs/probing.md`` ("Interventions
along probe directions").
"""

from __future__ import annotations

import argparse
from pathlib import Path

from entitylens.cli._args import layer_list


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``intervene`` subcommand."""
    p = sub.add_parser(
        "intervene",
        help="null/set/add the residual stream along a probe direction at every layer; effect on the answer",
        description="Edit the cached model's residual stream along one probe column's direction (from `entitylens "
        "probe --out`) at one role of each selected cached prompt, layer by layer, against random directions, and "
        "measure the answer's probability, logit difference and top-1. Writes intervene.csv, intervene.png, "
        "meta.json.",
    )
    p.add_argument("--probe", type=Path, required=True, help="probe run directory (entitylens probe --out)")
    p.add_argument("--cache", type=Path, required=True, help="the cache that probe was fitted on")
    p.add_argument("--column", required=True, help="the probe's label column (e.g. apple=removed, apple, box3:apple)")
    p.add_argument("--probe-role", default=None, help="which of the probe run's roles' probes (default: the first)")
    p.add_argument("--role", default="query_box",
                   help="token edited in each prompt: a role (query_box, last, ...) or @last_touch (the queried "
                   "box's mention in the last operation that changed it)")
    p.add_argument("--layers", type=layer_list, default=None, help="probed layers to edit at (default: all)")
    p.add_argument("--mode", choices=("null", "set", "add"), default="null",
                   help="null: project the direction out (default); set: set its component to --value; add: shift")
    p.add_argument("--value", type=float, default=0.0, help="the set value / add shift along the unit direction")
    p.add_argument("--random", type=int, default=8, help="random directions per layer (the control; default 8)")
    p.add_argument("--rows", choices=("auto", "never", "present", "removed", "all"), default="auto",
                   help="prompts whose queried box has the object as the column says (auto), with this tag, or all")
    p.add_argument("--max-rows", type=int, default=64, help="at most this many prompts (default 64)")
    p.add_argument("--model", default=None, help="model spec (default: the cache's model)")
    p.add_argument("--allow-other-model", action="store_true",
                   help="edit a model other than the cached one (apply one model's probe to its pair)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward")
    p.add_argument("--seed", type=int, default=0, help="seed of the random directions")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier intervention run in --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the intervention described by ``args`` and write its outputs."""
    from entitylens._io import check_output_apart
    from entitylens.activations import load_cache
    from entitylens.activations.identity import model_fingerprint
    from entitylens.errors import EntitylensError
    from entitylens.models import load_model
    from entitylens.pipelines.probe_intervene import (
        InterveneConfig,
        check_intervention_dir,
        intervention_identity,
        run_probe_intervention,
        write_intervention_outputs,
    )
    from entitylens.probing.outputs import read_probe_weights

    check_output_apart(args.out, [("--probe", args.probe), ("--cache", args.cache)])
    cfg = InterveneConfig(column=args.column, probe_role=args.probe_role, role=args.role, layers=args.layers,
                          mode=args.mode, value=args.value, random=args.random, rows=args.rows,
                          max_rows=args.max_rows, seed=args.seed, batch_size=args.batch_size,
                          allow_other_model=args.allow_other_model)
    read_probe_weights(args.probe)  # a missing or old probe run fails before the model loads
    cache = load_cache(args.cache)
    spec = args.model or cache.meta["model"].get("spec")
    if not spec:
        raise EntitylensError("the cache does not record its model; pass --model")
    model = load_model(spec, device=args.device)
    check_intervention_dir(args.out, intervention_identity(args.probe, cache.meta["fingerprint"],
                                                           model_fingerprint(model), cfg), args.overwrite)
    result = run_probe_intervention(args.probe, args.cache, model, cfg)
    paths = write_intervention_outputs(args.out, result, overwrite=args.overwrite)
    probe = result.table[result.table["direction"] == "probe"]
    for metric in ("top1_object", "logit_diff"):
        rows = probe[probe["metric"] == metric]
        best = rows.loc[rows["effect"].abs().idxmax()]
        print(f"{metric}: largest effect {best['effect']:+.3f} [{best['ci_low']:+.3f}, {best['ci_high']:+.3f}] at "
              f"layer {int(best['layer'])} (clean {best['clean']:.3f}, {len(result.rows)} prompts)")
    if result.skipped:
        print(f"skipped {len(result.skipped)} prompts without {cfg.role}")
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0
