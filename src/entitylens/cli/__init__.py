"""The ``entitylens`` command line.

Each area registers its own subcommands from a module in this package (``data``, ``models``, ...),
so the areas stay independent. Bad input raised as :class:`~entitylens.errors.EntitylensError`
is printed as one line ``error: ...`` with exit status 2, and so are argparse's usage errors.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NoReturn

from entitylens.errors import guarded
from entitylens.progress import set_quiet

__all__ = ["OneLineParser", "build_parser", "guarded", "main"]

# Modules under entitylens.cli that define ``register(subparsers)``; order = order in --help.
_COMMAND_MODULES = (
    "demo", "data", "models", "eval", "experiment", "cache", "probe", "intervene", "patch", "study", "testbed",
)  # fmt: skip


class OneLineParser(argparse.ArgumentParser):
    """``argparse`` with its usage errors on one line (``error: ...``, exit status 2), as every other error.

    Sub-command parsers inherit the class (``add_subparsers`` builds them with the parent's type).
    """

    def error(self, message: str) -> NoReturn:
        """Print ``error: <prog>: <message>; see `<prog> --help``` on one line and exit with status 2."""
        self.exit(2, f"error: {self.prog}: {' '.join(message.split())}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every registered subcommand."""
    from entitylens import __version__

    parser = OneLineParser(
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
