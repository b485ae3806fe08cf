"""Reading an activation cache back: :func:`load_cache` checks it and opens it as :class:`CachedActivations`.

Opening verifies that the cache is finished, of this format version, and (optionally) built from a given
model and dataset; with ``verify`` every shard's and ``rows.json``'s SHA-256 is checked against
``meta.json``. Tensors are read lazily, one hook/role at a time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from entitylens._io import sha256_file
from entitylens.activations.identity import model_fingerprint
from entitylens.activations.prompts import build_prompts, prompts_sha256
from entitylens.activations.store import CACHE_FORMAT_VERSION, DTYPES, META_FILE, ROWS_FILE, read_cache_meta, shard_name
from entitylens.errors import EntitylensError


class CachedActivations:
    """A cache directory opened by :func:`load_cache`; reads tensors lazily, one hook/role at a time.

    Attributes:
        directory: The cache directory.
        meta: The parsed ``meta.json``.
        rows: One metadata dict per row (``row_id``, ``state_id``, ``box``, ``numops``, ``gold``, ``objects``,
            ...), in row order.
        row_ids: The row ids, in row order.
        object_vocabulary: Every object mentioned in any row, sorted.

    """

    def __init__(self, directory: Path, meta: dict[str, Any], rows_doc: dict[str, Any]) -> None:
        self.directory = directory
        self.meta = meta
        self.rows: list[dict[str, Any]] = rows_doc["rows"]
        self.row_ids: list[str] = rows_doc["row_ids"]
        self.object_vocabulary: list[str] = rows_doc["object_vocabulary"]

    def __len__(self) -> int:
        return int(self.meta["n_rows"])

    def __repr__(self) -> str:
        return (
            f"CachedActivations({str(self.directory)!r}, rows={len(self)}, hooks={list(self.hooks)}, "
            f"roles={list(self.roles)}, dtype={self.meta['dtype']})"
        )

    @property
    def hooks(self) -> tuple[str, ...]:
        """Hook keys in the cache, in the order they were requested."""
        return tuple(self.meta["config"]["hooks"])

    @property
    def roles(self) -> tuple[str, ...]:
        """Roles in the cache."""
        return tuple(self.meta["roles"])

    @property
    def dtype(self) -> torch.dtype:
        """Storage dtype."""
        return DTYPES[self.meta["dtype"]]

    @property
    def model_info(self) -> dict[str, Any]:
        """The ``model`` record of ``meta.json`` (spec, fingerprint, info)."""
        return dict(self.meta["model"])

    def layers(self, hook: str) -> tuple[int, ...]:
        """Layer of each entry along the first dimension of :meth:`features` for ``hook``."""
        self._check(hook, None)
        return tuple(self.meta["hooks"][hook]["layers"])

    def _check(self, hook: str, role: str | None) -> None:
        if hook not in self.meta["hooks"]:
            raise EntitylensError(f"hook {hook!r} is not in this cache; use one of {', '.join(self.hooks)}")
        if role is not None and role not in self.roles:
            raise EntitylensError(f"role {role!r} is not in this cache; use one of {', '.join(self.roles)}")

    def _shard_paths(self) -> list[Path]:
        return [self.directory / shard_name(k) for k in range(int(self.meta["n_shards"]))]

    def _read(self, key: str) -> list[Tensor]:
        from safetensors import safe_open

        out = []
        for path in self._shard_paths():
            with safe_open(str(path), framework="pt") as f:
                out.append(f.get_tensor(key))
        return out

    def features(self, hook: str, role: str) -> Float[Tensor, "layer n *feature"]:
        """All cached layers of one hook at one role.

        Args:
            hook: A hook key of the cache (``"resid_post"``).
            role: A role of the cache (``"query_box"``).

        Returns:
            ``[layer, rows, *feature]`` (``[layer, n, d_model]`` for residual hooks); NaN where the role
            is absent from a row (see :meth:`present`).

        Raises:
            EntitylensError: A present row holds NaN or infinite values (a cache written by other code, or
                edited after its checksums were taken); the message names the shard and the rows.

        """
        self._check(hook, role)
        parts = self._read(f"{hook}/{role}")
        present = self._read(f"present/{role}")
        start = 0
        for k, (t, here) in enumerate(zip(parts, present, strict=True)):
            finite = torch.isfinite(t.float()).reshape(t.shape[0], t.shape[1], -1).all(dim=-1).all(dim=0)
            bad = (~finite & here.bool()).nonzero().flatten().tolist()
            if bad:
                rows = [self.row_ids[start + i] for i in bad[:3]]
                raise EntitylensError(
                    f"{self.directory}/{shard_name(k)} holds NaN or infinite {hook} values at role {role!r} for "
                    f"{len(bad)} row(s) ({', '.join(rows)}{', ...' if len(bad) > 3 else ''}); rebuild the cache "
                    "with `entitylens cache --overwrite`"
                )
            start += t.shape[1]
        return torch.cat(parts, dim=1)

    def present(self, role: str) -> Bool[Tensor, " n"]:
        """Which rows have ``role`` (all true unless the cache was built with ``allow_missing_roles``)."""
        self._check(self.hooks[0], role)
        return torch.cat(self._read(f"present/{role}"))


def load_cache(
    directory: str | os.PathLike[str],
    *,
    verify: bool = True,
    model: Any | None = None,
    data: Sequence[Any] | None = None,
    prefix: str | None = None,
) -> CachedActivations:
    """Open a cache directory written by :func:`cache_activations`.

    Args:
        directory: The cache directory.
        verify: Check every shard's sha256 (and ``rows.json``'s) against ``meta.json``.
        model: If given, refuse the cache unless it was built from this model (same fingerprint).
        data: If given, refuse the cache unless it was built from these rows.
        prefix: Prefix used to build prompts from ``data`` (default: the one recorded in the cache).

    Returns:
        The opened cache.

    Raises:
        EntitylensError: Missing or unfinished cache, corrupted shard, or model/dataset mismatch.

    """
    out = Path(directory)
    meta = read_cache_meta(out)
    if meta is None:
        raise EntitylensError(f"{out} has no {META_FILE}; build the cache first with `entitylens cache`")
    if meta.get("format_version") != CACHE_FORMAT_VERSION:
        raise EntitylensError(
            f"{out} uses cache format {meta.get('format_version')}, this entitylens reads "
            f"{CACHE_FORMAT_VERSION}; rebuild it with --overwrite"
        )
    n_shards = int(meta["n_shards"])
    missing = [shard_name(k) for k in range(n_shards) if shard_name(k) not in meta["shards"]]
    if missing or not meta.get("complete"):
        raise EntitylensError(
            f"cache {out} is unfinished ({n_shards - len(missing)}/{n_shards} shards); rerun the same "
            "`entitylens cache` command to finish it"
        )
    if model is not None and model_fingerprint(model) != meta["model"]["fingerprint"]:
        raise EntitylensError(
            f"cache {out} was built from another model ({meta['model'].get('spec')}); load the matching "
            "model or rebuild the cache for this one"
        )
    if data is not None:
        used_prefix = meta["config"]["prefix"] if prefix is None else prefix
        if prompts_sha256(build_prompts(data, prefix=used_prefix)) != meta["dataset_sha256"]:
            raise EntitylensError(
                f"cache {out} was built from another dataset; pass the dataset it was built from or rebuild it"
            )
    rows_path = out / meta.get("rows_file", ROWS_FILE)
    if not rows_path.exists():
        raise EntitylensError(f"{rows_path} is missing; rerun the same `entitylens cache` command to rewrite it")
    if verify:
        if sha256_file(rows_path) != meta["rows_sha256"]:
            raise EntitylensError(
                f"{rows_path} is corrupted (sha256 mismatch); delete it and rerun the same command to rewrite it"
            )
        for k in range(n_shards):
            path = out / shard_name(k)
            if not path.exists():
                raise EntitylensError(
                    f"shard {path} is missing; rerun the same `entitylens cache` command to recompute it"
                )
            if sha256_file(path) != meta["shards"][shard_name(k)]["sha256"]:
                raise EntitylensError(
                    f"shard {path} is corrupted (sha256 mismatch); delete it and rerun the same command to "
                    "recompute just that shard"
                )
    rows_doc = json.loads(rows_path.read_text(encoding="utf-8"))
    return CachedActivations(out, meta, rows_doc)
