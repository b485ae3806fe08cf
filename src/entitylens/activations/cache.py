"""Position-selected activation caching to checksummed, resumable safetensors shards.

:func:`cache_activations` runs a ``TransformerBridge`` over one prompt per dataset row and keeps, for
each requested hook (all layers of an alias such as ``resid_post``) only the tokens at the requested
*roles* (:mod:`entitylens.activations.roles`). The gather ``act[batch_idx, pos_idx]`` happens inside
the forward hook, on the model's device, so the full ``[batch, pos, d]`` activation is never kept;
the gathered values of a batch move to the CPU in one transfer per hook. The forward stops as soon as
every requested hook has fired (no unembedding when only residuals are wanted).

On disk (``out_dir``)::

    meta.json              model / dataset / config identity, per-shard sha256, progress
    rows.json              one metadata record per row (row id, state id, box, numops, gold, initial, objects,
                           the prompt text)
    shard_00000.safetensors
    shard_00001.safetensors ...

Each shard holds rows ``[k * shard_size, (k + 1) * shard_size)``:

- ``"{hook}/{role}"``: ``[layer, rows, *feature]`` in the cache dtype (``[layer, rows, d_model]`` for
  residual hooks), so "all layers of one role" -- what a probe trains on -- is one contiguous tensor;
- ``"present/{role}"``: ``bool [rows]``, false where a role is absent from a prompt (only with
  ``allow_missing_roles``; those activations are NaN);
- ``"row_index"``: ``int64 [rows]``, the global row numbers.

Shards are written atomically (temp file + rename) and ``meta.json`` is rewritten after each one, so
a killed run leaves only whole shards; rerunning the same command skips the finished shards and
recomputes the rest, giving byte-identical files. A different model, dataset or configuration in an
existing cache directory is refused. :func:`load_cache` verifies every shard's checksum.

This module holds the configuration and the run; the parts live next to it and are re-exported here:
:mod:`~entitylens.activations.prompts` (rows to prompts), :mod:`~entitylens.activations.runner`
(tokenising and the hooked forward), :mod:`~entitylens.activations.store` (file layout, shard writing,
``meta.json``), :mod:`~entitylens.activations.identity` (model fingerprint) and
:mod:`~entitylens.activations.reader` (:func:`load_cache`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from entitylens import __version__
from entitylens._io import RunDir, atomic_write, prepare_output_dir, sha256_file, sha256_json, write_json
from entitylens.activations.hooks import HookSpec, resolve_model_hooks
from entitylens.activations.identity import model_fingerprint, model_record
from entitylens.activations.prompts import CachePrompt, build_prompts, prompts_sha256, query_text, row_meta
from entitylens.activations.reader import CachedActivations, load_cache
from entitylens.activations.roles import expand_roles, validate_roles
from entitylens.activations.runner import (
    EncodedPrompts,
    check_finite,
    encode_prompts,
    pad_token_id,
    release_free_memory,
    run_batch,
)
from entitylens.activations.store import (
    CACHE_FORMAT,
    CACHE_FORMAT_VERSION,
    DTYPES,
    META_FILE,
    ROWS_FILE,
    clear_cache_dir,
    meta_identity,
    read_cache_meta,
    shard_name,
    write_shard,
)
from entitylens.errors import EntitylensError
from entitylens.models.specs import model_label as spec_label
from entitylens.progress import progress

__all__ = [
    "CACHE_FORMAT",
    "CACHE_FORMAT_VERSION",
    "DTYPES",
    "META_FILE",
    "ROWS_FILE",
    "CacheConfig",
    "CacheIndex",
    "CachePrompt",
    "CachedActivations",
    "build_prompts",
    "cache_activations",
    "load_cache",
    "model_fingerprint",
    "prompts_sha256",
    "query_text",
    "release_free_memory",
    "row_meta",
    "shard_name",
]


@dataclass(frozen=True)
class CacheConfig:
    """What to cache and how.

    Attributes:
        hooks: Hook keys: aliases (``resid_pre``, ``resid_mid``, ``resid_post``, ``attn_out``, ``mlp_out``),
            ``{layer}`` patterns or raw TransformerLens hook names.
        roles: Token roles (see :data:`entitylens.activations.roles.ROLE_CATALOGUE`) and role groups
            (``@mentions``, ``@op_ends``, ``@objects``: every such role the dataset's prompts have, expanded
            when caching; roles a prompt lacks are then stored masked).
        layers: Layers for aliases / patterns; ``None`` = all layers.
        batch_size: Prompts per forward pass (left-padded).
        shard_size: Rows per shard file.
        dtype: Storage dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"``.
        prefix: Text put in front of every prompt built from dataset rows (e.g. a few-shot prefix).
        allow_missing_roles: Store a role absent from a prompt as NaN with ``present`` false instead of
            raising.
        prepend_bos: Put BOS first; ``None`` follows the model's own tokenizer, as the decoder and the
            patching pairs do (:func:`entitylens.models.model_prepends_bos`).
        stop_early: Stop each forward once every requested hook has fired.
        release_memory: After each cached hook on the CPU, hand the heap's free memory back to the OS
            (glibc ``malloc_trim``). glibc otherwise keeps a forward's freed intermediates resident,
            which roughly triples the peak RSS of a forward; the values are unchanged.
        engine: ``"native"`` (the bridge's forward, default) or ``"vllm"`` (TransformerLens's vLLM driver,
            :mod:`entitylens.activations.remote`: hooks ``resid_post`` / ``attn_out`` / ``mlp_out``). Part of
            the cache's identity when not native (another engine's floats are not resumed into this cache).

    """

    hooks: tuple[str, ...] = ("resid_post",)
    roles: tuple[str, ...] = ("query_box", "last")
    layers: tuple[int, ...] | None = None
    batch_size: int = 8
    shard_size: int = 256
    dtype: str = "float32"
    prefix: str = ""
    allow_missing_roles: bool = False
    prepend_bos: bool | None = None
    stop_early: bool = True
    release_memory: bool = True
    engine: str = "native"

    def __post_init__(self) -> None:
        for name in ("hooks", "roles"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = tuple(v.strip() for v in value.split(",") if v.strip())
            object.__setattr__(self, name, tuple(value))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        validate_roles(self.roles, allow_groups=True)
        if not self.hooks:
            raise EntitylensError("no hooks given; pass at least one, e.g. --hooks resid_post")
        if int(self.batch_size) < 1 or int(self.shard_size) < 1:
            raise EntitylensError(
                f"batch_size={self.batch_size} and shard_size={self.shard_size} must be positive; pass values >= 1"
            )
        if self.dtype not in DTYPES:
            raise EntitylensError(f"unknown cache dtype {self.dtype!r}; use one of {', '.join(DTYPES)}")
        if self.engine not in ("native", "vllm"):
            raise EntitylensError(f"unknown engine {self.engine!r}; use native or vllm")

    def identity(self) -> dict[str, Any]:
        """Return the fields that determine the cache's bytes (compared when resuming)."""
        d = asdict(self)
        d["layers"] = None if self.layers is None else list(self.layers)
        d["hooks"], d["roles"] = list(self.hooks), list(self.roles)
        d.pop("stop_early")  # stopping early does not change the values
        d.pop("release_memory")  # nor does returning free memory to the OS
        if self.engine == "native":
            d.pop("engine")  # caches from before engines existed keep their identity
        return d


@dataclass(frozen=True)
class CacheIndex:
    """Summary of a finished :func:`cache_activations` run.

    Attributes:
        directory: The cache directory.
        n_rows: Rows cached.
        shards: Shard file names, in row order.
        computed: Shards computed by this run.
        reused: Shards found finished from an earlier run and kept.
        fingerprint: SHA-256 of the cache identity (model, dataset, config).

    """

    directory: Path
    n_rows: int
    shards: tuple[str, ...]
    computed: int
    reused: int
    fingerprint: str


def cache_activations(
    model: Any,
    data: Sequence[Any],
    config: CacheConfig,
    out_dir: str | os.PathLike[str],
    *,
    model_spec: str | None = None,
    model_label: str | None = None,
    dataset_source: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    remote: Any = None,
    vllm_options: Any = None,
) -> CacheIndex:
    """Cache activations at token roles for every row of a dataset, as resumable safetensors shards.

    Args:
        model: A ``TransformerBridge`` (with its tokenizer).
        data: Rows to cache (see :func:`build_prompts`).
        config: Hooks, roles, batching, storage dtype.
        out_dir: Cache directory (created if needed).
        model_spec: How the model was specified (recorded in ``meta.json``).
        model_label: The model's label in probe figures (default: :func:`entitylens.models.model_label` of
            ``model_spec``).
        dataset_source: Extra description of the dataset (e.g. path and file sha256), recorded only.
        overwrite: Delete an existing cache in ``out_dir`` first (only its own files).
        remote: With ``config.engine == "vllm"``: a running ``RemoteBridge`` of this model (tests and
            scripts reuse one); booted from ``model_spec``'s weights otherwise.
        vllm_options: :class:`~entitylens.models.vllm_support.VLLMOptions` for that boot.

    Returns:
        A :class:`CacheIndex`; read the values with :func:`load_cache`.

    Raises:
        EntitylensError: Unknown hook/role, a role missing from a row, a non-finite activation, or an
            existing cache in ``out_dir`` built from another model, dataset or configuration.

    """
    out = Path(out_dir)
    prompts = build_prompts(data, prefix=config.prefix)
    roles, grouped = expand_roles(config.roles, [p.text for p in prompts])
    if grouped:
        config = dataclasses.replace(config, roles=roles, allow_missing_roles=True)
    specs = resolve_model_hooks(model, config.hooks, config.layers)
    capture = _capture(model, specs, config, model_spec, remote, vllm_options)
    encoded = encode_prompts(
        model,
        prompts,
        config.roles,
        prepend_bos=config.prepend_bos,
        allow_missing_roles=config.allow_missing_roles,
    )
    rows_bytes = _rows_bytes(prompts)
    meta = _new_meta(model, prompts, config, specs, encoded, rows_bytes, model_spec, model_label, dataset_source)

    if overwrite and out.exists():
        clear_cache_dir(out)
    existing = read_cache_meta(out)  # refuses a corrupt or foreign meta.json
    run_dir = RunDir(out, META_FILE, "a cache", is_mine=lambda rec: rec.get("format") == CACHE_FORMAT,
                     identity_of=meta_identity)  # fmt: skip
    same = run_dir.check(meta["identity"])  # another model, dataset, tokenization, configuration or hooks: refused
    done = _finished_shards(out, existing, meta) if same and existing is not None else {}
    meta["shards"] = dict(sorted(done.items()))
    prepare_output_dir(out)
    rows_path = out / ROWS_FILE
    if not rows_path.exists() or sha256_file(rows_path) != meta["rows_sha256"]:
        with atomic_write(rows_path, "wb") as f:
            f.write(rows_bytes)
    write_json(out / META_FILE, meta)

    computed = _compute_missing_shards(capture, specs, encoded, config, [p.row_id for p in prompts], out, meta)
    n_shards = meta["n_shards"]
    if not meta["complete"]:  # every shard was reused from an earlier run
        meta["complete"] = len(meta["shards"]) == n_shards
        write_json(out / META_FILE, meta)
    return CacheIndex(directory=out, n_rows=len(prompts), shards=tuple(shard_name(k) for k in range(n_shards)),
                      computed=computed, reused=n_shards - computed, fingerprint=meta["fingerprint"])


def _rows_bytes(prompts: Sequence[CachePrompt]) -> bytes:
    """The bytes of ``rows.json``: row ids, each row's metadata and the sorted object vocabulary."""
    vocabulary = sorted({o for p in prompts for o in p.meta.get("objects", ())})
    rows_doc = {
        "row_ids": [p.row_id for p in prompts],
        "rows": [{"row_id": p.row_id, **dict(p.meta), "text": p.text} for p in prompts],
        "object_vocabulary": vocabulary,
    }
    return (json.dumps(rows_doc, indent=1, sort_keys=True) + "\n").encode()


def _new_meta(
    model: Any,
    prompts: Sequence[CachePrompt],
    config: CacheConfig,
    specs: Sequence[HookSpec],
    encoded: EncodedPrompts,
    rows_bytes: bytes,
    model_spec: str | None,
    model_label: str | None,
    dataset_source: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The ``meta.json`` of a cache about to be (re)built: identity, layout, no shards yet, its fingerprint."""
    n_rows = len(prompts)
    meta: dict[str, Any] = {
        "format": CACHE_FORMAT,
        "format_version": CACHE_FORMAT_VERSION,
        "entitylens_version": __version__,
        "model": {
            "spec": model_spec,
            "label": model_label or (spec_label(model_spec) if model_spec else None),
            "fingerprint": model_fingerprint(model),
            "info": model_record(model),
            "n_layers": int(model.cfg.n_layers),
            "d_model": int(model.cfg.d_model),
        },
        "dataset_sha256": prompts_sha256(prompts),
        "dataset_source": dict(dataset_source or {}),
        "tokens_sha256": encoded.tokens_sha256,
        "config": config.identity(),
        "dtype": config.dtype,
        "hooks": {s.key: {"names": list(s.names), "layers": list(s.layers)} for s in specs},
        "roles": list(config.roles),
        "n_rows": n_rows,
        "shard_size": config.shard_size,
        "n_shards": (n_rows + config.shard_size - 1) // config.shard_size,
        "rows_file": ROWS_FILE,
        "rows_sha256": hashlib.sha256(rows_bytes).hexdigest(),
        "shards": {},
        "complete": False,
    }
    meta["identity"] = meta_identity(meta)
    meta["fingerprint"] = sha256_json(meta["identity"])
    return meta


def _finished_shards(out: Path, existing: Mapping[str, Any], meta: Mapping[str, Any]) -> dict[str, Any]:
    """The shards of an earlier run of the same identity in ``out`` to keep.

    A shard the user deleted is left out (recomputed); a shard whose bytes no longer match its checksum is
    refused.
    """
    done: dict[str, Any] = {}
    for name, entry in existing.get("shards", {}).items():
        path = out / name
        if not path.exists():
            continue  # deleted by the user: recompute it
        if sha256_file(path) != entry["sha256"]:
            raise EntitylensError(
                f"shard {path} is corrupted (sha256 mismatch); delete it and rerun the same command to "
                "recompute just that shard"
            )
        done[name] = entry
    return done


def _capture(model: Any, specs: Sequence[HookSpec], config: CacheConfig, model_spec: str | None, remote: Any,
             vllm_options: Any) -> Any:
    """The batch runner of ``config.engine``: ``(specs, ids, positions, storage dtype) -> key -> values``."""
    if config.engine == "native":
        pad_id = pad_token_id(model.tokenizer)
        return lambda sp, ids, pos, dt: run_batch(model, sp, ids, pos, dt, pad_id, config.stop_early,
                                                  config.release_memory)
    from entitylens.activations.remote import RemoteCapture, boot_remote

    RemoteCapture.check(specs)  # an unsupported hook fails before vLLM starts
    if remote is None:
        from entitylens.models import weights_location

        if model_spec is None:
            raise EntitylensError("engine vllm needs the model spec (model_spec=...) to find its weights")
        dtype = next(iter(model.parameters())).dtype
        remote = boot_remote(weights_location(model_spec), dtype, vllm_options)
    return RemoteCapture(remote)


def _compute_missing_shards(
    capture: Any,
    specs: Sequence[HookSpec],
    encoded: EncodedPrompts,
    config: CacheConfig,
    row_ids: Sequence[str],
    out: Path,
    meta: dict[str, Any],
) -> int:
    """Compute and write every shard not in ``meta["shards"]``, rewriting ``meta.json`` after each one.

    Returns:
        How many shards were computed.
    """
    n_rows, n_shards = meta["n_rows"], meta["n_shards"]
    computed = 0
    bar = progress(total=n_rows, desc="caching", unit="prompt")
    try:
        for k in range(n_shards):
            name = shard_name(k)
            start, stop = k * config.shard_size, min((k + 1) * config.shard_size, n_rows)
            if name in meta["shards"]:
                bar.update(stop - start)
                continue
            tensors = _shard_tensors(capture, specs, encoded, config, row_ids, start, stop, bar)
            digest = write_shard(out / name, tensors, {"fingerprint": meta["fingerprint"], "shard": k})
            meta["shards"][name] = {"rows": [start, stop], "sha256": digest}
            meta["shards"] = dict(sorted(meta["shards"].items()))
            meta["complete"] = len(meta["shards"]) == n_shards
            write_json(out / META_FILE, meta)
            computed += 1
    finally:
        bar.close()
    return computed


def _shard_tensors(
    capture: Any,
    specs: Sequence[HookSpec],
    encoded: EncodedPrompts,
    config: CacheConfig,
    row_ids: Sequence[str],
    start: int,
    stop: int,
    bar: Any,
) -> dict[str, Tensor]:
    """The tensors of the shard holding rows ``[start, stop)``, computed batch by batch."""
    storage_dtype = DTYPES[config.dtype]
    parts: dict[str, list[Tensor]] = {s.key: [] for s in specs}
    for b0 in range(start, stop, config.batch_size):
        b1 = min(b0 + config.batch_size, stop)
        values = capture(specs, encoded.ids[b0:b1], encoded.positions[b0:b1], storage_dtype)
        present = encoded.positions[b0:b1] >= 0
        check_finite(values, present, specs, config.roles, row_ids[b0:b1])
        for key, t in values.items():
            parts[key].append(t)
        bar.update(b1 - b0)
    present_all = torch.from_numpy(encoded.positions[start:stop] >= 0)
    tensors: dict[str, Tensor] = {"row_index": torch.arange(start, stop, dtype=torch.int64)}
    for s in specs:
        full = torch.cat(parts[s.key], dim=1)  # [layer, rows, role, *feature]
        for r, role in enumerate(config.roles):
            t = full[:, :, r].clone()
            if not bool(present_all[:, r].all()):
                t[:, ~present_all[:, r]] = float("nan")
            tensors[f"{s.key}/{role}"] = t.contiguous()
    for r, role in enumerate(config.roles):
        tensors[f"present/{role}"] = present_all[:, r].clone()
    return tensors
