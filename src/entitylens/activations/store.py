"""The on-disk layout of an activation cache: file names, storage dtypes, shard writing, ``meta.json``.

A cache directory holds ``meta.json`` (:data:`META_FILE`), ``rows.json`` (:data:`ROWS_FILE`) and shards
named by :func:`shard_name`; see :mod:`entitylens.activations.cache` for what each holds.
:func:`write_shard` writes one shard atomically and deterministically; :func:`read_cache_meta` reads
``meta.json`` back (refusing anything that is not an entitylens cache) and :func:`meta_identity` is the
part of it that must match for a run to resume.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from entitylens._io import atomic_write
from entitylens.errors import EntitylensError

CACHE_FORMAT = "entitylens.activation_cache"
"""The ``format`` field of every cache's ``meta.json``."""
CACHE_FORMAT_VERSION = 1
"""Layout version this entitylens writes and reads."""
META_FILE = "meta.json"
"""The cache's identity, per-shard checksums and progress."""
ROWS_FILE = "rows.json"
"""One metadata record per row."""
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
"""Storage dtypes a cache may use."""


def shard_name(index: int) -> str:
    """File name of shard ``index``."""
    return f"shard_{index:05d}.safetensors"


def write_shard(path: Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, Any]) -> str:
    """Atomically write one shard; returns the sha256 of its bytes.

    The metadata goes into the safetensors header as ONE key holding canonical JSON: safetensors
    writes a header dict with several keys in a random order, which would make equal shards differ.
    """
    from safetensors.torch import save

    header = {"entitylens": json.dumps(dict(metadata), sort_keys=True, separators=(",", ":"))}
    data = save(dict(tensors), metadata=header)
    with atomic_write(path, "wb") as f:
        f.write(data)
    return hashlib.sha256(data).hexdigest()


def meta_identity(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a cache's ``meta.json`` that must match for a run to reuse its shards.

    Model fingerprint, dataset and token hashes, configuration identity and the resolved hooks; its
    :func:`~entitylens._io.sha256_json` is the cache's ``fingerprint``.
    """
    return {
        "model": meta["model"]["fingerprint"],
        "dataset": meta["dataset_sha256"],
        "tokens": meta["tokens_sha256"],
        "config": meta["config"],
        "hooks": meta["hooks"],
    }


def read_cache_meta(out: Path) -> dict[str, Any] | None:
    """The parsed ``meta.json`` of cache directory ``out``, or None when it has none.

    Raises:
        EntitylensError: The file is not valid JSON or not an entitylens activation cache's.
    """
    path = out / META_FILE
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EntitylensError(
            f"{path} is not valid JSON ({e}); delete the cache directory or pass --overwrite to rebuild it"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
        raise EntitylensError(f"{path} is not an entitylens activation cache; choose another --out or pass --overwrite")
    return meta


def clear_cache_dir(out: Path) -> None:
    """Remove exactly the files a cache consists of (nothing else in the directory)."""
    for path in sorted(out.glob("shard_*.safetensors")) + [out / META_FILE, out / ROWS_FILE]:
        if path.exists():
            path.unlink()
