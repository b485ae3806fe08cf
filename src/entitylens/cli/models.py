"""``entitylens models``: list the model registry and resolve specs; shared ``--model`` options.

Other commands add the same model options with :func:`add_model_args` and load with
:func:`load_model_from_args`, so ``--model SPEC --device D --dtype T`` means the same everywhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from entitylens.models._constants import DTYPE_CHOICES
from entitylens.models.registry import EXPERIMENTS, REGISTRY, RegistryEntry, experiment_pairs

SPEC_HELP = (
    "model spec: registry key (see `entitylens models list`), hub id org/name (local HF cache), local HF "
    "directory, .gguf file, tiny:<llama|gpt2|native>[?seed=N], or testbed:<stem|base|code|dir>"
)


def add_model_args(parser: argparse.ArgumentParser, required: bool = True, default: str | None = None) -> None:
    """Add ``--model``, ``--device``, ``--dtype`` and ``--device-map`` to a subcommand's parser."""
    parser.add_argument("--model", required=required and default is None, default=default, metavar="SPEC",
                        help=SPEC_HELP)  # fmt: skip
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default: cpu)")
    parser.add_argument("--dtype", default="float32", help=f"one of {', '.join(DTYPE_CHOICES)} (default: float32)")
    parser.add_argument(
        "--device-map",
        default=None,
        metavar="MAP",
        help="Hugging Face device_map for multi-GPU / offloaded models, e.g. auto (overrides --device)",
    )


def load_model_from_args(args: argparse.Namespace) -> Any:
    """Load the model named by the options :func:`add_model_args` added."""
    from entitylens.models.loading import load_model

    return load_model(args.model, device=args.device, dtype=args.dtype, device_map=args.device_map)


def _fmt_pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _entry_row(e: RegistryEntry) -> list[str]:
    return [e.key, e.hub_id, "yes" if e.chat else "no", f"{e.params_b:g}", _fmt_pct(e.paper_overall)]


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cmd_list(args: argparse.Namespace) -> int:
    if args.experiment is not None:
        pairs = experiment_pairs(args.experiment)
        if args.json:
            out: Any = [{"base": b.key, "variant": v.key} for b, v in pairs]
            print(json.dumps(out, indent=2))
            return 0
        rows = [
            [b.key, v.key, _fmt_pct(b.paper_overall), _fmt_pct(v.paper_overall),
             f"{(v.paper_overall or 0) - (b.paper_overall or 0):+.2f}"]
            for b, v in pairs
        ]  # fmt: skip
        print(f"experiment {args.experiment}: {len(pairs)} (base, variant) pairs; paper overall accuracy %")
        print(_table(rows, ["base", "variant", "base %", "variant %", "delta"]))
        return 0
    entries = list(REGISTRY.values())
    if args.json:
        print(json.dumps([dataclasses.asdict(e) for e in entries], indent=2))
        return 0
    print(_table([_entry_row(e) for e in entries], ["key", "hub id", "chat", "params (B)", "paper overall %"]))
    return 0


def _cmd_resolve(args: argparse.Namespace) -> int:
    from entitylens.models.loading import resolve_spec

    r = resolve_spec(args.spec)
    out = {
        "spec": r.spec,
        "kind": r.kind,
        "source": r.source,
        "hub_id": r.hub_id,
        "path": r.path,
        "registry_key": r.entry.key if r.entry else None,
        "chat": r.chat,
        "tiny": r.tiny.canonical if r.tiny else None,
    }
    json.dump(out, sys.stdout, indent=2)
    print()
    return 0


def register(subparsers: Any) -> None:
    """Add ``models list`` and ``models resolve``."""
    p = subparsers.add_parser("models", help="list the model registry and resolve model specs")
    sub = p.add_subparsers(dest="models_command", metavar="SUBCOMMAND")
    sub.required = True
    p_list = sub.add_parser("list", help="print the registry (key, hub id, chat, size, paper accuracy)")
    p_list.add_argument("--experiment", choices=sorted(EXPERIMENTS), help="print this experiment's model pairs")
    p_list.add_argument("--json", action="store_true", help="machine-readable output")
    p_list.set_defaults(func=_cmd_list)
    p_res = sub.add_parser("resolve", help="show what a model spec refers to (no loading)")
    p_res.add_argument("spec", help=SPEC_HELP)
    p_res.set_defaults(func=_cmd_resolve)
