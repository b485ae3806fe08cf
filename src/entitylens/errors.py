"""The one exception type entitylens raises for bad input.

Every message is a single line that names the problem and the fix, e.g.
``data.jsonl line 7: missing field 'numops'; regenerate with `entitylens data generate` or add the field``.
The CLI prints it as ``error: <message>`` and exits with status 2 (no traceback).
"""

from __future__ import annotations


class EntitylensError(ValueError):
    """Bad input or a refused operation, with a one-line message saying how to fix it."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))
