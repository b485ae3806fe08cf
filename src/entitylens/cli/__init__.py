"""The ``entitylens`` command line.

Each area registers its own subcommands from a module in this package (``data``, ``models``, ...),
so the areas stay independent. Bad input raised as :class:`~entitylens.errors.EntitylensError`
is printed as one line ``error: ...`` with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from entitylens.errors import EntitylensError
from entitylens.progress import set_quiet

# Modules under entitylens.cli that define ``register(subparsers)``; order = order in --help.
_COMMAND_MODULES = ("demo", "data", "models", "eval", "cache", "testbed", "patch", "probe")


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


def _one_line_warning(message: Any, *args: Any, **kwargs: Any) -> None:
    print(f"warning: {' '.join(str(message).split())}", file=sys.stderr)


def guarded(run: Callable[[], int | None]) -> int:
    """Call ``run`` the way every entitylens command line does: bad input -> one line, exit status 2.

    Warnings are printed as one ``warning: ...`` line (no file name, no source line); operating-system
    errors (disk full, a read-only or missing path) as one ``error: ...`` line naming the file and the fix.

    Args:
        run: The command's body; returns its exit status (``None`` = 0).

    Returns:
        ``run()``'s status, 2 after an :class:`~entitylens.errors.EntitylensError` (printed as
        ``error: ...`` on stderr) or 130 when interrupted.
    """
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        try:
            return int(run() or 0)
        except EntitylensError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except OSError as e:  # disk full, read-only or missing paths the commands did not foresee
            from entitylens._io import os_error_message

            print(f"error: {' '.join(os_error_message(e).split())}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    set_quiet(bool(getattr(args, "quiet", False)))
    return guarded(lambda: args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
