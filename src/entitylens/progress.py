"""Progress bars: tqdm on a terminal; a heartbeat line now and then in logs; nothing with ``--quiet``.

On a terminal a loop shows a live tqdm bar. When stderr is not a terminal (a batch job's log), a loop
that has run for :data:`HEARTBEAT_SECONDS` prints one plain line (``desc: n/total, elapsed<remaining``)
and another every :data:`HEARTBEAT_SECONDS`, so a long job in a log file shows that it is alive and when
it will end; short loops print nothing. ``--quiet`` (:func:`set_quiet`) silences both.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

_QUIET = False

HEARTBEAT_SECONDS = 60.0
"""Seconds between heartbeat lines (and before the first) when stderr is not a terminal."""


class _Lines:
    """A file for tqdm that turns its carriage-return redraws into whole lines on stderr."""

    def write(self, s: str) -> None:
        line = s.replace("\r", "").strip()
        if line:
            sys.stderr.write(line + "\n")

    def flush(self) -> None:
        sys.stderr.flush()


def set_quiet(quiet: bool) -> None:
    """Globally silence (or re-enable) progress bars; the CLI's ``--quiet`` calls this."""
    global _QUIET
    _QUIET = quiet


def is_quiet() -> bool:
    """Whether ``--quiet`` (:func:`set_quiet`) is in force: commands then print only their results."""
    return _QUIET


def bars_enabled() -> bool:
    """Whether progress bars are shown: not ``--quiet`` and stderr is a terminal."""
    return not _QUIET and sys.stderr.isatty()


def progress(iterable: Iterable[T] | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar on a terminal, heartbeat lines in a log, nothing when quiet (see the module docstring).

    Args:
        iterable: What to iterate over (optional; use ``total=`` and ``update()`` otherwise).
        **kwargs: Passed to :class:`tqdm.tqdm` (``desc``, ``total``, ``unit``...).

    Returns:
        The tqdm object.
    """
    if bars_enabled():
        return tqdm(iterable, dynamic_ncols=True, **kwargs)
    if _QUIET:
        return tqdm(iterable, disable=True, **kwargs)
    kwargs.pop("leave", None)
    return tqdm(
        iterable, file=_Lines(), delay=HEARTBEAT_SECONDS, mininterval=HEARTBEAT_SECONDS,
        maxinterval=HEARTBEAT_SECONDS, ncols=100, ascii=True, leave=False, **kwargs,
    )  # fmt: skip
