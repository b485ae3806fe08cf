"""``entitylens patch path`` and ``entitylens patch sites``: path-patching grids and multi-site circuit tests."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from entitylens.cli.models import add_model_args
from entitylens.errors import EntitylensError

__all__ = ["add_path", "add_sites"]

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
