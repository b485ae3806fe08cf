"""The one exception type entitylens raises for bad input.

Every message is a single line that names the problem and the fix, e.g.
``data.jsonl line 7: missing field 'numops'; regenerate with `entitylens data generate` or add the field``.
The CLI prints it as ``error: <message>`` and exits with status 2 (no traceback).
"""

from __future__ import annotations

import errno
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any


class EntitylensError(ValueError):
    """Bad input or a refused operation, with a one-line message saying how to fix it."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def os_error_message(err: OSError, path: str | os.PathLike[str] | None = None) -> str:
    """One line for a failed read or write: what failed, why, and what to do (nothing written is lost).

    Args:
        err: The error.
        path: The file involved (default: the error's own file name).

    Returns:
        The message (without the ``error:`` prefix).
    """
    where = path if path is not None else (err.filename or "a file")
    why = err.strerror or str(err) or type(err).__name__
    if err.errno == errno.ENOSPC or err.errno == getattr(errno, "EDQUOT", -1):
        fix = "free disk space (or choose --out on another disk) and rerun: finished work is kept and resumed"
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "choose a writable location for --out (nothing already written was changed)"
    elif err.errno in (errno.ENOTDIR, errno.EISDIR, errno.EEXIST):
        fix = "a file stands where a directory is needed (or the reverse); choose another path"
    elif err.errno == errno.ENOENT:
        fix = "check the path"
    else:
        fix = "check the path and the disk, then rerun (finished work is kept)"
    return f"cannot write or read {where} ({why}); {fix}"


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

            print(f"error: {' '.join(os_error_message(e).split())}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
