"""What a model's own files say about it, read without loading weights: GGUF headers and HF directories.

Used to decide whether a model is a chat/instruct model (:func:`detect_chat`) from the model's own
metadata rather than from the name of the path it was given under (a symlink ``coder.gguf`` to an
instruct GGUF is still an instruct model), and to refuse a damaged GGUF file with a one-line error
before transformers fails on it.

The GGUF reader parses only the key/value header (magic, version, counts, then typed key/value pairs)
and skips array payloads it is not asked for, so it reads a few hundred kilobytes of a multi-gigabyte
file (``gguf.GGUFReader`` also indexes every tensor, which takes seconds to a minute).
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from entitylens.errors import EntitylensError

GGUF_MAGIC = b"GGUF"

# GGUF value types -> struct format of a scalar (8: string, 9: array are handled apart).
_SCALARS: dict[int, str] = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
                            11: "<q", 12: "<d"}  # fmt: skip
_STRING, _ARRAY = 8, 9

GGUF_KEYS: tuple[str, ...] = (
    "general.name",
    "general.basename",
    "general.finetune",
    "general.architecture",
    "tokenizer.chat_template",
    "tokenizer.ggml.add_bos_token",
)
"""The header keys :func:`read_gguf_metadata` returns by default."""

_CHAT_MARKER = re.compile(r"(chat|instruct|(^|[-_. ])it($|[-_. ])|sft|dpo|rlhf)", re.IGNORECASE)


class _Truncated(Exception):
    pass


def _read(f: BinaryIO, n: int) -> bytes:
    b = f.read(n)
    if len(b) != n:
        raise _Truncated
    return b


def _unpack(f: BinaryIO, fmt: str) -> Any:
    return struct.unpack(fmt, _read(f, struct.calcsize(fmt)))[0]


def _string(f: BinaryIO, skip: bool = False) -> str | None:
    n = _unpack(f, "<Q")
    if n > 1 << 32:
        raise ValueError(f"a string of {n} bytes")
    if skip:
        f.seek(n, io.SEEK_CUR)
        return None
    return _read(f, n).decode("utf-8", errors="replace")


def _value(f: BinaryIO, vtype: int, keep: bool) -> Any:
    if vtype in _SCALARS:
        return _unpack(f, _SCALARS[vtype])
    if vtype == _STRING:
        return _string(f, skip=not keep)
    if vtype == _ARRAY:
        etype, count = _unpack(f, "<I"), _unpack(f, "<Q")
        if etype in _SCALARS:
            f.seek(count * struct.calcsize(_SCALARS[etype]), io.SEEK_CUR)
            return None
        for _ in range(count):
            _value(f, etype, keep=False)
        return None
    raise ValueError(f"unknown value type {vtype}")


def read_gguf_metadata(path: str | os.PathLike[str], keys: Iterable[str] = GGUF_KEYS) -> dict[str, Any]:
    """Read selected key/value pairs of a GGUF file's header (array values are skipped).

    Args:
        path: The ``.gguf`` file.
        keys: Keys to return (others are skipped).

    Returns:
        ``{key: value}`` for the requested keys present in the header.

    Raises:
        EntitylensError: The file is not a GGUF file, or its header is truncated or damaged.
    """
    wanted = set(keys)
    p = Path(path)
    out: dict[str, Any] = {}
    try:
        with open(p, "rb") as raw:
            f = io.BufferedReader(raw, buffer_size=1 << 20)  # type: ignore[arg-type]
            if _read(f, 4) != GGUF_MAGIC:
                raise ValueError("it does not start with the GGUF magic bytes")
            version = _unpack(f, "<I")
            if version not in (2, 3):
                raise ValueError(f"GGUF version {version} is not supported (2 or 3)")
            _unpack(f, "<Q")  # tensor count
            n_kv = _unpack(f, "<Q")
            if n_kv > 1 << 20:
                raise ValueError(f"{n_kv} metadata entries")
            for _ in range(n_kv):
                key = _string(f)
                vtype = _unpack(f, "<I")
                value = _value(f, vtype, keep=key in wanted)
                if key in wanted:
                    out[str(key)] = value
    except _Truncated:
        raise EntitylensError(
            f"{p} is not a complete GGUF file (its header ends early); download or copy it again"
        ) from None
    except (ValueError, struct.error, UnicodeDecodeError) as e:
        raise EntitylensError(f"{p} is not a valid GGUF file ({e}); download or copy it again") from None
    except OSError as e:
        raise EntitylensError(f"cannot read {p} ({e.strerror}); check the path and its permissions") from None
    return out


def _json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def hf_dir_metadata(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """What a Hugging Face model directory says about itself: names and whether it has a chat template.

    Args:
        directory: A directory with ``config.json`` (and usually tokenizer files).

    Returns:
        ``{"names": [...], "chat_template": bool}``.
    """
    d = Path(directory)
    tok_cfg = _json(d / "tokenizer_config.json")
    cfg = _json(d / "config.json")
    template = bool(tok_cfg.get("chat_template")) or any(
        (d / name).is_file() for name in ("chat_template.jinja", "chat_template.json")
    )
    names = [d.name, d.resolve().name, str(cfg.get("_name_or_path") or ""), str(tok_cfg.get("name_or_path") or "")]
    return {"names": [n for n in names if n], "chat_template": template}


def chat_from_metadata(names: Iterable[str], has_chat_template: bool) -> bool:
    """The chat rule: a chat template, and an instruct/chat marker in one of the model's own names.

    A base model that ships a chat template (many do) has no marker; a model without a template cannot be
    prompted as a chat model at all.

    Args:
        names: The model's names: metadata (GGUF ``general.name`` / ``general.finetune``, HF
            ``_name_or_path``) and file names (as given and after resolving links).
        has_chat_template: Whether the tokenizer carries a chat template.

    Returns:
        Whether to treat the model as a chat model.
    """
    return bool(has_chat_template) and any(_CHAT_MARKER.search(str(n)) for n in names if n)


def gguf_chat(path: str | os.PathLike[str], metadata: Mapping[str, Any] | None = None) -> bool:
    """Whether a GGUF file is a chat model, from its header and its file names (as given and resolved)."""
    p = Path(path)
    meta = read_gguf_metadata(p) if metadata is None else metadata
    names = [str(meta.get(k) or "") for k in ("general.name", "general.finetune", "general.basename")]
    names += [p.name, p.resolve().name]
    return chat_from_metadata(names, bool(meta.get("tokenizer.chat_template")))


__all__ = [
    "GGUF_KEYS",
    "chat_from_metadata",
    "gguf_chat",
    "hf_dir_metadata",
    "read_gguf_metadata",
]
