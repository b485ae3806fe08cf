"""Small I/O helpers shared by every module: atomic writes and stable hashing."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from entitylens.errors import EntitylensError


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path`` and rename it onto ``path`` only on success.

    On any exception the temporary file is removed and ``path`` is left exactly as it was, so a failed
    write never leaves a partial file behind.

    Args:
        path: Destination file.
        mode: ``"w"`` (text) or ``"wb"`` (binary).
        encoding: Text encoding (ignored for binary mode).

    Yields:
        The open temporary file.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    except OSError as e:
        raise EntitylensError(f"cannot write {path}: {e.strerror}; choose a writable output path") from e
    try:
        kwargs: dict[str, Any] = {} if "b" in mode else {"encoding": encoding, "newline": "\n"}
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def check_output_apart(
    out: str | os.PathLike[str], inputs: Iterable[tuple[str, str | os.PathLike[str] | None]]
) -> None:
    """Refuse an output path that is an input, holds an input or lies inside one (nothing is written).

    Args:
        out: The output file or directory (``--out``).
        inputs: ``(what, path)`` pairs, e.g. ``("--cache", path)`` or ``("shard", path)``; ``None`` paths are
            skipped.

    Raises:
        EntitylensError: ``out`` and an input are the same path, or one contains the other.
    """
    o = Path(out).expanduser().resolve()
    for what, value in inputs:
        if value is None:
            continue
        i = Path(value).expanduser().resolve()
        if o == i or i.is_relative_to(o) or o.is_relative_to(i):
            how = "is" if o == i else ("contains" if i.is_relative_to(o) else "lies inside")
            raise EntitylensError(
                f"--out {out} {how} the input {what} {value}; writing there would destroy it, so choose "
                "another --out (nothing was changed)"
            )


def prepare_output_dir(out: str | os.PathLike[str], option: str = "--out") -> Path:
    """Create an output directory (or check an existing one) and check it is writable, before any work.

    Args:
        out: The directory.
        option: How the user named it, for the message.

    Returns:
        The directory.

    Raises:
        EntitylensError: ``out`` is a file, or it cannot be created or written to.
    """
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise EntitylensError(f"{option} {p} is a file; give a directory path (nothing was changed)")
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise EntitylensError(f"cannot write to {option} {p} ({e.strerror}); choose a writable directory") from None
    return p


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Atomically write ``obj`` as pretty, key-sorted JSON (byte-stable for equal objects)."""
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hex SHA-256 of the canonical JSON encoding of ``obj`` (sorted keys, no whitespace)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
