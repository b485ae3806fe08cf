"""``entitylens patch path`` and ``entitylens patch sites``: path-patching grids and multi-site circuit tests."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from entitylens.cli.models import add_model_args
from entitylens.errors import EntitylensError

__all__ = ["add_das", "add_path", "add_sites"]

_SITE_HELP = ("comma-separated sites component:layer[.head][@role], '*' for every layer or head, e.g. "
              "head:3.*@last,mlp_out:2@query_box; components: resid_pre, resid_post, attn_out, mlp_out, head, q, k, v")


def _common(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--pairs", type=Path, required=True, help="pairs file (from `entitylens patch pairs`)")
    p.add_argument("--batch", type=int, default=16, help="most rows per forward (default 16)")
    p.add_argument("--out", type=Path, required=True, help="run directory")
    p.add_argument("--overwrite", action="store_true", help="replace another run's results in --out")
    p.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")


def add_path(psub: argparse._SubParsersAction) -> None:
    """Register ``patch path``."""
    p = psub.add_parser(
        "path", help="path patching: sender x receiver grids (through one receiver only)",
        description="Path patching on clean/corrupted pairs: each sender (a head, attention or MLP output at a "
        "role) set to its clean value with every later head frozen (and MLPs with --freeze-mlps), its effect "
        "passed on only through each receiver (the residual stream, or a head's q/k/v input); writes path.csv, "
        "path_summary.csv, path.png and meta.json.")
    _common(p)
    p.add_argument("--senders", required=True, help="sites the paths start at (head, attn_out, mlp_out). " + _SITE_HELP)
    p.add_argument("--receivers", required=True,
                   help="sites the paths end at (resid_pre, resid_post, q, k, v; no @role = every position)")
    p.add_argument("--freeze-mlps", action="store_true", help="also freeze MLPs in the sender's run")
    p.set_defaults(func=run_path_cmd)


def add_sites(psub: argparse._SubParsersAction) -> None:
    """Register ``patch sites``."""
    p = psub.add_parser(
        "sites", help="multi-site patching: test a proposed circuit (sets of sites patched jointly)",
        description="Patch each --circuit's sites jointly (clean values into the corrupted run), optionally "
        "holding --freeze sites at their corrupted values; writes sites.csv, sites_summary.csv (the circuit "
        "summary: effect and 95%% interval over pairs) and meta.json.")
    _common(p)
    p.add_argument("--circuit", action="append", required=True,
                   help="one circuit (repeat for several). " + _SITE_HELP)
    p.add_argument("--freeze", default="", help="sites held at their corrupted values in every run (same syntax)")
    p.set_defaults(func=run_sites_cmd)


def _load(args: argparse.Namespace, sites: list[Any]) -> tuple[Any, list[Any], str]:
    from entitylens._io import sha256_file
    from entitylens.cli.models import load_model_from_args
    from entitylens.patching.pair_io import read_any_pairs
    from entitylens.patching.run import prepare_pairs

    if not args.pairs.is_file():
        raise EntitylensError(f"pairs file {args.pairs} does not exist; build one with `entitylens patch pairs`")
    model = load_model_from_args(args)
    roles = sorted({s.role for s in sites if s.role is not None}) or ["last"]
    pairs, _ = prepare_pairs(model, read_any_pairs(args.pairs, model.tokenizer), "layer_role", roles)
    return model, pairs, sha256_file(args.pairs)


def _syntax(texts: list[str]) -> list[Any]:
    """Parse before the model loads, so a typo fails in one line first ('*' stands in as index 0 here)."""
    from entitylens.patching.sites import parse_sites

    return [s for t in texts if t for s in parse_sites(t.replace("*", "0"), 10**6, 10**6)]


def _parse(model_cfg: Any, text: str) -> tuple[Any, ...]:
    from entitylens.patching.sites import parse_sites

    kv = getattr(model_cfg, "n_key_value_heads", None)
    return parse_sites(text, int(model_cfg.n_layers), int(model_cfg.n_heads), int(kv) if kv else None)


def run_path_cmd(args: argparse.Namespace) -> int:
    """Path-patch the pairs file; print the strongest paths."""
    from entitylens.models import model_label
    from entitylens.patching.paths import check_path_sites
    from entitylens.pipelines.circuits import run_path_job

    check_path_sites(_syntax([args.senders]), _syntax([args.receivers]))
    model, pairs, sha = _load(args, _syntax([args.senders, args.receivers]))
    senders, receivers = _parse(model.cfg, args.senders), _parse(model.cfg, args.receivers)
    res, files = run_path_job(model, pairs, senders, receivers, args.out, pairs_sha256=sha,
                              freeze_mlps=args.freeze_mlps, batch=args.batch, label=model_label(args.model),
                              overwrite=args.overwrite)
    mean = res.mean()
    flat = [(float(mean[i, j]), str(s), str(r)) for i, s in enumerate(senders) for j, r in enumerate(receivers)
            if mean[i, j] == mean[i, j]]
    print(f"path-patched {len(pairs)} pairs x {len(senders)} senders x {len(receivers)} receivers")
    print("strongest paths (mean normalised, 1 = the clean behaviour through this path alone):")
    for v, s, r in sorted(flat, key=lambda t: -abs(t[0]))[:8]:
        print(f"  {s} -> {r}: {v:+.3f}")
    print("wrote " + ", ".join(str(p) for p in files))
    return 0


def run_sites_cmd(args: argparse.Namespace) -> int:
    """Patch each circuit jointly; print the circuit summary table."""
    from entitylens.frames import markdown_table
    from entitylens.pipelines.circuits import run_sites_job

    model, pairs, sha = _load(args, _syntax([*args.circuit, args.freeze]))
    circuits = [_parse(model.cfg, t) for t in args.circuit]
    freeze = _parse(model.cfg, args.freeze) if args.freeze else ()
    _, table, files = run_sites_job(model, pairs, circuits, args.out, pairs_sha256=sha, freeze=freeze,
                                    batch=args.batch, overwrite=args.overwrite)
    print(f"patched {len(circuits)} circuit(s) on {len(pairs)} pairs (mean normalised, 1 = clean behaviour):")
    print(markdown_table(table, ["circuit", "effect", "ci_low", "ci_high", "n_pairs"]))
    print("wrote " + ", ".join(str(p) for p in files))
    return 0


def add_das(psub: argparse._SubParsersAction) -> None:
    """Register ``patch das``."""
    from entitylens.cli._args import int_list, layer_list

    p = psub.add_parser(
        "das", help="distributed alignment search: a learned subspace per layer, held-out interchange accuracy",
        description="Learn a k-dimensional subspace of resid_pre at --role for every layer (DAS: an orthogonal "
        "basis trained so that swapping the clean run's coordinates into the corrupted run gives the causal "
        "model's counterfactual answer), on a training split of the pairs; report the held-out "
        "interchange-intervention accuracy. --basis pca/full/probe scores a basis that is not learned (PCA of "
        "the differences, the whole site, a probe run's directions) on the same split; --subspaces scores given "
        "subspaces (e.g. learned on the pair model). --compare draws two runs on one figure. Writes das.csv, "
        "das_subspaces.safetensors, das.png, meta.json, timing.json.")
    add_model_args(p, required=False)
    p.add_argument("--pairs", type=Path, default=None, help="pairs file (from `entitylens patch pairs`)")
    p.add_argument("--role", default="last", help="the site's role (default last)")
    p.add_argument("--layers", type=layer_list, default=None, help="comma-separated layers or 'all' (default all)")
    p.add_argument("--k", type=int_list, default=(1,),
                   help="subspace dimension, or several to sweep (e.g. 1,2,4,8: one row per layer and k; default 1)")
    p.add_argument("--steps", type=int, default=100, help="optimisation steps per layer (default 100)")
    p.add_argument("--lr", type=float, default=0.05, help="Adam learning rate (default 0.05)")
    p.add_argument("--batch", type=int, default=16, help="training pairs per step (default 16)")
    p.add_argument("--test-fraction", type=float, default=0.3, help="held-out fraction of the pairs (default 0.3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--criterion", choices=("pairwise", "top1"), default="pairwise",
                   help="pairwise (default): the intervened run prefers the counterfactual answer over the "
                   "corrupted one; top1: the counterfactual answer is the top-1 token")
    p.add_argument("--all-pairs", action="store_true",
                   help="train on every pair, not only those the model gets right both ways")
    p.add_argument("--subspaces", type=Path, default=None, help="score these subspaces (a `patch das` run dir)")
    p.add_argument("--basis", choices=("das", "pca", "full", "probe"), default="das",  # circuits.DAS_BASES
                   help="das (learn; default); pca: the top-k principal directions of the clean - corrupted "
                   "differences (training pairs); full: the whole site (activation patching); probe: the span of "
                   "--probe's directions")
    p.add_argument("--probe", type=Path, default=None,
                   help="an `entitylens probe` run on resid_pre or resid_post (with --basis probe)")
    p.add_argument("--probe-columns", default=None,
                   help="comma-separated probe columns to span (default all; see the probe's target names)")
    p.add_argument("--probe-role", default=None, help="the probe's role (default its first)")
    p.add_argument("--compare", type=Path, nargs=2, metavar=("BASE", "VARIANT"), default=None,
                   help="draw two `patch das` runs on one figure (das_compare.png)")
    p.add_argument("--labels", default=None, help="labels of --compare (comma-separated)")
    p.add_argument("--out", type=Path, required=True, help="run directory")
    p.add_argument("--overwrite", action="store_true", help="replace another run's results in --out")
    p.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    p.set_defaults(func=run_das_cmd)


def run_das_cmd(args: argparse.Namespace) -> int:
    """DAS per layer (or the IIA of given subspaces, or a comparison figure)."""
    from entitylens.patching.das import DASConfig

    if args.compare is not None:
        return _das_compare(args)
    if args.model is None or args.pairs is None:
        raise EntitylensError("--model and --pairs are required (or --compare BASE VARIANT)")
    from entitylens.frames import markdown_table
    from entitylens.models import model_label
    from entitylens.pipelines.circuits import run_das_job

    cfg = DASConfig(k=args.k[0], steps=args.steps, lr=args.lr, batch=args.batch, test_fraction=args.test_fraction,
                    seed=args.seed, criterion=args.criterion, behaving_only=not args.all_pairs)
    if (args.basis == "probe") != (args.probe is not None):
        raise EntitylensError("--basis probe goes with --probe DIR (an `entitylens probe` run), and --probe with "
                              "--basis probe")
    if args.probe is not None:
        from entitylens.probing.outputs import read_probe_weights

        read_probe_weights(args.probe)  # a missing or old probe run fails before the model loads
    model, pairs, sha = _load(args, _syntax([f"resid_pre:0@{args.role}"]))
    layers = args.layers if args.layers is not None else list(range(int(model.cfg.n_layers)))
    table, files = run_das_job(model, pairs, layers, args.role, args.out, pairs_sha256=sha, config=cfg,
                               subspaces=args.subspaces, basis=args.basis, label=model_label(args.model),
                               overwrite=args.overwrite, probe=args.probe, probe_role=args.probe_role, ks=args.k,
                               probe_columns=args.probe_columns.split(",") if args.probe_columns else None)
    print(markdown_table(table, ["layer", "k", "source", "train_iia", "test_iia", "n_test"]))
    print("wrote " + ", ".join(str(p) for p in files))
    return 0


def _das_compare(args: argparse.Namespace) -> int:
    from entitylens._io import prepare_output_dir
    from entitylens.frames import read_csv
    from entitylens.plots import plot_iia

    labels = args.labels.split(",") if args.labels else [p.name for p in args.compare]
    if len(labels) != 2:
        raise EntitylensError(f"--labels needs two names, got {args.labels!r}")
    runs = {}
    for label, d in zip(labels, args.compare, strict=True):
        if not (d / "das.csv").is_file():
            raise EntitylensError(f"{d} has no das.csv; pass two `entitylens patch das` run directories")
        runs[label] = read_csv(d / "das.csv")
    out = prepare_output_dir(args.out)
    files = plot_iia(runs, out / "das_compare", title=" vs ".join(labels))
    print("wrote " + ", ".join(str(p) for p in files))
    return 0
