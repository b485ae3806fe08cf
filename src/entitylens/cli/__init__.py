"""The ``entitylens`` command line.

Each area registers its own subcommands from a module in this package (``data``, ``models``, ...),
so the areas stay independent. Bad input raised as :class:`~entitylens.errors.EntitylensError`
is printed as one line ``error: ...`` with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from entitylens.errors import guarded
from entitylens.progress import set_quiet

__all__ = ["build_parser", "guarded", "main"]

# Modules under entitylens.cli that define ``register(subparsers)``; order = order in --help.
_COMMAND_MODULES = (
    "demo", "data", "models", "eval", "experiment", "cache", "probe", "intervene", "patch", "study", "testbed",
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every registered subcommand."""
    from entitylens import __version__

    parser = argparse.ArgumentParser(
        prog="entitylens",
        description="Entity tracking (boxes task) in base vs code/math/aligned language models.",
    )
    parser.add_argument("--version", action="version", version=f"entitylens {__version__}")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _COMMAND_MODULES:
        importlib.import_module(f"entitylens.cli.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    set_quiet(bool(getattr(args, "quiet", False)))
    return guarded(lambda: args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
