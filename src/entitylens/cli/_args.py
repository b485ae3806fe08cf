"""Argument parsers shared by the CLI subcommands (comma-separated lists, the few-shot prefix options)."""

from __future__ import annotations

import argparse
from typing import Any

from entitylens.errors import EntitylensError


def csv_list(value: str) -> tuple[str, ...]:
    """``"a, b,c"`` → ``("a", "b", "c")`` (empty items dropped)."""
    return tuple(v.strip() for v in value.split(",") if v.strip())


def layer_list(value: str) -> tuple[int, ...] | None:
    """``"0,3,5"`` → ``(0, 3, 5)``; ``"all"`` → ``None`` (every layer)."""
    if value.strip() == "all":
        return None
    try:
        return tuple(int(v) for v in csv_list(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers {value!r} must be 'all' or comma-separated integers") from None


def float_list(value: str) -> tuple[float, ...]:
    """``"0.1,1,10"`` → ``(0.1, 1.0, 10.0)``."""
    try:
        return tuple(float(v) for v in csv_list(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} must be comma-separated numbers") from None


def kst24_prefix() -> str:
    """Return the KST24 2-shot prompt up to (and including) the test's ``Description: ``."""
    from entitylens.task.prompts import kst24_prompt

    marker = "Box 0 contains nothing."
    full = kst24_prompt(marker)
    if not full.endswith(marker):  # pragma: no cover - guards a change in the prompt layout
        raise EntitylensError("the KST24 prompt no longer ends with the test description; use --prefix-file")
    return full[: -len(marker)]


def read_prefix(args: Any) -> str:
    """The few-shot prefix selected by ``--prefix-file FILE`` or ``--kst24-prefix`` (empty if neither)."""
    if args.prefix_file is not None:
        if not args.prefix_file.is_file():
            raise EntitylensError(f"prefix file {args.prefix_file} does not exist; pass an existing --prefix-file")
        return args.prefix_file.read_text(encoding="utf-8")
    if args.kst24_prefix:
        return kst24_prefix()
    return ""
