"""Progress bars: tqdm, silent when stderr is not a TTY or when the user asked for ``--quiet``."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

_QUIET = False


def set_quiet(quiet: bool) -> None:
    """Globally silence (or re-enable) progress bars; the CLI's ``--quiet`` calls this."""
    global _QUIET
    _QUIET = quiet


def bars_enabled() -> bool:
    """Whether progress bars are shown: not ``--quiet`` and stderr is a terminal."""
    return not _QUIET and sys.stderr.isatty()


def progress(iterable: Iterable[T] | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar that is disabled when quiet or when stderr is not a terminal.

    Args:
        iterable: What to iterate over (optional; use ``total=`` and ``update()`` otherwise).
        **kwargs: Passed to :class:`tqdm.tqdm` (``desc``, ``total``, ``unit``...).

    Returns:
        The tqdm object.
    """
    return tqdm(iterable, disable=not bars_enabled(), dynamic_ncols=True, **kwargs)
