"""Small I/O helpers shared by every module: atomic writes, stable hashing and the run-directory contract."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from entitylens.errors import EntitylensError, os_error_message


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
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=".tmp", dir=parent)
    except OSError as e:
        raise EntitylensError(f"cannot write {path}: {e.strerror}; choose a writable output path") from e
    try:
        kwargs: dict[str, Any] = {} if "b" in mode else {"encoding": encoding, "newline": "\n"}
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise EntitylensError(os_error_message(e, path)) from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


_TEMP = re.compile(r"^\..+\.pid(\d+)\.[^.]*\.tmp$")


def temp_prefix(name: str) -> str:
    """Prefix of a temporary file or directory beside ``name``, recording the writing process's id.

    A later run can so tell a temporary left by a killed process (:func:`clean_stale_temps`) from a live one.
    """
    return f".{name}.pid{os.getpid()}."


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def clean_stale_temps(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files and directories that killed processes left in ``directory``.

    Every entitylens temporary is named ``.<name>.pid<PID>.<random>.tmp`` (:func:`temp_prefix`) and renamed
    into place only when complete, so one whose process no longer runs is garbage: a ``kill -9`` mid-write
    leaves such files (a testbed stage leaves a whole model copy). Live processes' temporaries are kept.

    Args:
        directory: Where to look (not recursive); a missing directory is fine.

    Returns:
        What was deleted.
    """
    d = Path(directory)
    removed: list[Path] = []
    if not d.is_dir():
        return removed
    for p in d.iterdir():
        m = _TEMP.match(p.name)
        if m is None or _alive(int(m.group(1))):
            continue
        with contextlib.suppress(OSError):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
    return removed


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
    clean_stale_temps(p)
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise EntitylensError(f"cannot write to {option} {p} ({e.strerror}); choose a writable directory") from None
    return p


TIMING_FILE = "timing.json"
"""Wall-clock times of a run live here, apart from its artifacts, so a rerun gives byte-identical artifacts."""


def write_timing(directory: str | os.PathLike[str], key: str, seconds: Any) -> None:
    """Record wall-clock times of one step of a run in ``<directory>/timing.json`` (merged by ``key``).

    Args:
        directory: The run directory.
        key: What was timed (e.g. ``"patch resid_pre"``).
        seconds: A number or a JSON-ready mapping of numbers.
    """
    path = Path(directory) / TIMING_FILE
    doc: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        loaded = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(loaded, dict):
            doc = loaded
    doc[key] = seconds
    write_json(path, doc)


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


class RunDir:
    """The one run-directory contract of entitylens (eval, cache, probe, patch and study directories).

    A run directory holds a *record* file (``run.json``, ``meta.json`` or ``study.json``) whose ``identity`` key
    is a JSON object naming what its results belong to: model and tokenizer fingerprints, dataset or pairs
    hashes, the settings that change the numbers. Before any work, :meth:`check` compares the identity of the
    run about to start with the recorded one: equal -- resume or reuse; another identity -- refused with one
    line naming the keys that differ, unless ``overwrite`` (then ``on_replace`` removes the old results); a
    record that is not this kind's -- always refused, so ``--overwrite`` never clobbers another kind of
    directory.

    Args:
        path: The directory.
        record: Name of the record file.
        what: What the directory holds, with its article, for messages (``"an evaluation run"``, ``"a cache"`` ...).
        is_mine: Whether a record is this kind's (default: it is a JSON object with an ``identity``).
        identity_of: The identity a record holds (default: its ``identity``; a kind whose older records
            predate the key computes it from their fields).
        fix: What the refusal of another identity tells the user to do.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        record: str = "run.json",
        what: str = "a run",
        is_mine: Callable[[Mapping[str, Any]], bool] | None = None,
        identity_of: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None,
        fix: str = "use another --out or pass --overwrite",
    ) -> None:
        self.path = Path(path)
        self.record_file = self.path / record
        self.what = what
        self._is_mine = is_mine or (lambda rec: isinstance(rec.get("identity"), dict))
        self._identity_of = identity_of or (lambda rec: rec.get("identity") or {})
        self.fix = fix

    def read(self) -> dict[str, Any] | None:
        """The record, ``None`` when there is none; ``{}`` when it is unreadable."""
        if not self.record_file.is_file():
            return None
        try:
            data = json.loads(self.record_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def check(
        self,
        identity: Mapping[str, Any],
        *,
        overwrite: bool = False,
        on_replace: Callable[[Mapping[str, Any]], None] | None = None,
    ) -> bool:
        """Check the directory before any work; True when it holds results of this very identity.

        Args:
            identity: The identity of the run about to start (JSON-ready).
            overwrite: Replace results of another identity instead of refusing.
            on_replace: Called with the old record when it is to be replaced (removes the old results; the
                record itself is replaced, atomically, when the new run writes its own).

        Returns:
            Whether an earlier run of the same identity is there (resume or reuse it).

        Raises:
            EntitylensError: ``path`` is a file, the record is another kind's, or another identity (no overwrite).
        """
        if self.path.exists() and not self.path.is_dir():
            raise EntitylensError(f"--out {self.path} is a file; give a directory path (nothing was changed)")
        clean_stale_temps(self.path)
        old = self.read()
        if old is None:
            return False
        if not self._is_mine(old):
            raise EntitylensError(
                f"{self.path} holds a {self.record_file.name} that is not {self.what}'s; write to another --out "
                "(nothing was changed)"
            )
        new = json.loads(json.dumps(dict(identity)))
        recorded = json.loads(json.dumps(dict(self._identity_of(old))))
        if recorded == new:
            return True
        if not overwrite:
            diff = sorted(k for k in set(recorded) | set(new) if recorded.get(k) != new.get(k))
            raise EntitylensError(
                f"{self.path} holds {self.what} of other inputs (different {', '.join(diff) or 'identity'}); "
                f"{self.fix} (nothing was changed)"
            )
        if on_replace is not None:
            on_replace(old)
        return False
