"""Position-selected activation caching to checksummed, resumable safetensors shards.

:func:`cache_activations` runs a ``TransformerBridge`` over one prompt per dataset row and keeps, for
each requested hook (all layers of an alias such as ``resid_post``) only the tokens at the requested
*roles* (:mod:`entitylens.activations.roles`). The gather ``act[batch_idx, pos_idx]`` happens inside
the forward hook, on the model's device, so the full ``[batch, pos, d]`` activation is never kept;
the gathered values of a batch move to the CPU in one transfer per hook. The forward stops as soon as
every requested hook has fired (no unembedding when only residuals are wanted).

On disk (``out_dir``)::

    meta.json              model / dataset / config identity, per-shard sha256, progress
    rows.json              one metadata record per row (row id, state id, box, numops, gold, initial, objects)
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
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from entitylens._io import atomic_write, prepare_output_dir, sha256_file, sha256_json, write_json
from entitylens.activations.hooks import HookSpec, resolve_model_hooks
from entitylens.activations.roles import find_roles, tokenize_with_offsets, validate_roles
from entitylens.errors import EntitylensError
from entitylens.models.loading import model_label as _model_label
from entitylens.models.tokens import model_prepends_bos
from entitylens.progress import progress

CACHE_FORMAT = "entitylens.activation_cache"
CACHE_FORMAT_VERSION = 1
META_FILE = "meta.json"
ROWS_FILE = "rows.json"
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
"""Storage dtypes a cache may use."""


def shard_name(index: int) -> str:
    """File name of shard ``index``."""
    return f"shard_{index:05d}.safetensors"


@dataclass(frozen=True)
class CachePrompt:
    """One prompt to cache.

    Attributes:
        row_id: Unique id of the row (stored in ``rows.json``).
        text: The full prompt text (prefix + context + query).
        meta: JSON-serialisable row metadata kept for building probe labels.

    """

    row_id: str
    text: str
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.text, str) or not self.text:
            raise EntitylensError(f"row {self.row_id}: empty prompt text; give every row a non-empty prompt")


@dataclass(frozen=True)
class CacheConfig:
    """What to cache and how.

    Attributes:
        hooks: Hook keys: aliases (``resid_pre``, ``resid_mid``, ``resid_post``, ``attn_out``, ``mlp_out``),
            ``{layer}`` patterns or raw TransformerLens hook names.
        roles: Token roles (see :data:`entitylens.activations.roles.ROLE_CATALOGUE`).
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

    def __post_init__(self) -> None:
        for name in ("hooks", "roles"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = tuple(v.strip() for v in value.split(",") if v.strip())
            object.__setattr__(self, name, tuple(value))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        validate_roles(self.roles)
        if not self.hooks:
            raise EntitylensError("no hooks given; pass at least one, e.g. --hooks resid_post")
        if int(self.batch_size) < 1 or int(self.shard_size) < 1:
            raise EntitylensError(
                f"batch_size={self.batch_size} and shard_size={self.shard_size} must be positive; pass values >= 1"
            )
        if self.dtype not in DTYPES:
            raise EntitylensError(f"unknown cache dtype {self.dtype!r}; use one of {', '.join(DTYPES)}")

    def identity(self) -> dict[str, Any]:
        """Return the fields that determine the cache's bytes (compared when resuming)."""
        d = asdict(self)
        d["layers"] = None if self.layers is None else list(self.layers)
        d["hooks"], d["roles"] = list(self.hooks), list(self.roles)
        d.pop("stop_early")  # stopping early does not change the values
        d.pop("release_memory")  # nor does returning free memory to the OS
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


# --------------------------------------------------------------------------------------------- prompts


def query_text(variant: str, box: int) -> str:
    """Return the query ending a caching prompt: ``"Box 3 contains"`` (``"Container D contains"``)."""
    from entitylens.task.text import box_name

    return f"{box_name(box, variant)} contains"


def _row_meta(row: Any) -> dict[str, Any]:
    state = row.state
    objects = set(o for box in state.initial for o in box)
    for op in state.operations:
        objects.update(op.objects)
    return {
        "state_id": state.state_id,
        "sample_id": state.sample_id,
        "num_operations": state.num_operations,
        "box": row.box,
        "numops": row.numops,
        "numops_by_op": dict(sorted(row.numops_by_op.items())),
        "gold": list(row.gold),
        "initial": list(state.initial[row.box]),
        "variant": state.variant,
        "objects": sorted(objects),
    }


def build_prompts(data: Sequence[Any], prefix: str = "") -> list[CachePrompt]:
    """Turn a dataset into caching prompts, one per row.

    Args:
        data: :class:`~entitylens.task.types.BoxRow` s (one prompt each),
            :class:`~entitylens.task.types.State` s (one prompt per box),
            :class:`~entitylens.task.io.P24Item` s (their next-token prompt), plain strings (used
            verbatim, ids ``"0"``, ``"1"``, ...) or :class:`CachePrompt` s.
        prefix: Text put before each row's context (e.g. a few-shot prefix). Not applied to strings or
            :class:`CachePrompt` s, which are taken as complete prompts.

    Returns:
        The prompts. A row's text is ``prefix + context + " " + "Box N contains"``.

    Raises:
        EntitylensError: Mixed or unsupported items, or duplicate row ids.

    """
    from entitylens.task.io import P24Item
    from entitylens.task.types import BoxRow, State

    prompts: list[CachePrompt] = []
    for i, item in enumerate(data):
        if isinstance(item, CachePrompt):
            prompts.append(item)
        elif isinstance(item, str):
            prompts.append(CachePrompt(row_id=str(i), text=item))
        elif isinstance(item, P24Item):
            meta = {
                "sample_id": item.sample_id,
                "box": item.query_box,
                "gold": [item.answer],
                "initial": sorted(o for o, b in item.assignments if b == item.query_box),
                "objects": sorted(o for o, _ in item.assignments),
            }
            text = f"{prefix}{item.prompt}"
            prompts.append(CachePrompt(row_id=f"{item.sample_id}:{item.query_box}", text=text, meta=meta))
        elif isinstance(item, (BoxRow, State)):
            rows = [item] if isinstance(item, BoxRow) else [BoxRow(item, b) for b in range(item.num_boxes)]
            for row in rows:
                ctx = row.state.context.rstrip()
                text = f"{prefix}{ctx} {query_text(row.state.variant, row.box)}"
                meta = _row_meta(row)
                prompts.append(CachePrompt(row_id=f"{row.state.state_id}:{row.box}", text=text, meta=meta))
        else:
            raise EntitylensError(
                f"item {i} of the data is a {type(item).__name__}; pass BoxRow, State, str or CachePrompt items"
            )
    seen: set[str] = set()
    for p in prompts:
        if p.row_id in seen:
            raise EntitylensError(f"row id {p.row_id!r} appears twice; give every row a unique id")
        seen.add(p.row_id)
    if not prompts:
        raise EntitylensError("the data has no rows; pass a non-empty dataset")
    return prompts


# ------------------------------------------------------------------------------------------- identity


def model_fingerprint(model: Any) -> str:
    """Fingerprint a bridge cheaply: its config plus a strided sample of every parameter.

    Two models with different weights (another checkpoint, another seed, another dtype) get different
    fingerprints; the same weights loaded twice get the same one.

    Args:
        model: A ``TransformerBridge`` (any ``torch.nn.Module`` with a ``cfg``).

    Returns:
        Hex SHA-256.

    """
    h = hashlib.sha256()
    cfg = getattr(model, "cfg", None)
    for key in ("n_layers", "d_model", "n_heads", "d_vocab", "n_ctx", "architecture"):
        h.update(f"{key}={getattr(cfg, key, None)};".encode())
    seen: set[int] = set()
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if id(p) in seen:
                continue
            seen.add(id(p))
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // 2048)
            sample = flat[::step][:2048].to("cpu", torch.float64).numpy()
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
            h.update(sample.tobytes())
    return h.hexdigest()


def _model_info(model: Any) -> dict[str, Any]:
    info = getattr(model, "entitylens_info", None)
    if info is None:
        return {}
    if hasattr(info, "to_dict"):
        info = info.to_dict()
    elif hasattr(info, "__dataclass_fields__"):
        info = asdict(info)
    try:
        return json.loads(json.dumps(info, default=str))
    except (TypeError, ValueError):
        return {"repr": repr(info)}


def prompts_sha256(prompts: Sequence[CachePrompt]) -> str:
    """SHA-256 identifying a list of prompts (ids, texts and row metadata)."""
    return sha256_json([[p.row_id, p.text, dict(p.meta)] for p in prompts])


# -------------------------------------------------------------------------------------------- running


class _StopForward(Exception):
    """Raised from the last needed hook to end a forward pass early."""


def _load_malloc_trim() -> Any:
    """Return glibc's ``malloc_trim`` (via ctypes), or ``None`` off glibc."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version"):  # musl and others: no malloc_trim semantics
            return None
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # pragma: no cover - depends on the C library
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_MALLOC_TRIM = _load_malloc_trim()
_TRIM_POINTS = (
    "blocks.{layer}.attn.hook_pattern",
    "blocks.{layer}.hook_resid_mid",
    "blocks.{layer}.mlp.hook_post",
    "blocks.{layer}.hook_resid_post",
)
"""Hook points after which :func:`_run_batch` returns free heap memory: after the attention softmax, the
attention block, the MLP's activation and the whole block -- the points where the largest intermediates
(``[batch, head, pos, pos]`` scores, ``[batch, pos, d_mlp]`` projections) have just been freed."""


def release_free_memory() -> bool:
    """Return the C heap's free memory to the operating system (glibc ``malloc_trim(0)``).

    glibc raises its mmap threshold after large frees, so a forward pass's large intermediates come
    from the heap and stay resident after they are freed; trimming between layers keeps the resident
    size close to what is actually live. Freed memory only: no tensor is touched.

    Returns:
        Whether any memory was released (always ``False`` off glibc).

    """
    return bool(_MALLOC_TRIM(0)) if _MALLOC_TRIM is not None else False


@dataclass
class _Encoded:
    ids: list[np.ndarray]
    positions: np.ndarray  # [rows, roles], -1 = missing
    tokens_sha256: str


def _encode_all(model: Any, prompts: Sequence[CachePrompt], config: CacheConfig) -> _Encoded:
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise EntitylensError("the model has no tokenizer; load it with its tokenizer to cache prompts")
    prepend_bos = config.prepend_bos
    if prepend_bos is None:
        prepend_bos = model_prepends_bos(model)
    n_ctx = int(getattr(model.cfg, "n_ctx", 0) or 0)
    ids_list: list[np.ndarray] = []
    positions = np.full((len(prompts), len(config.roles)), -1, dtype=np.int64)
    h = hashlib.sha256()
    for r, p in enumerate(progress(prompts, desc="tokenizing", unit="prompt")):
        ids, offsets = tokenize_with_offsets(tokenizer, p.text, prepend_bos=prepend_bos)
        if n_ctx and len(ids) > n_ctx:
            raise EntitylensError(
                f"row {p.row_id}: prompt has {len(ids)} tokens, more than the model's context of {n_ctx}; "
                "shorten the prompt (drop the few-shot prefix) or use a model with a longer context"
            )
        found = find_roles(p.text, offsets, config.roles, allow_missing=config.allow_missing_roles, row=p.row_id)
        for j, role in enumerate(config.roles):
            idx = found[role]
            positions[r, j] = -1 if idx is None else idx
        arr = np.asarray(ids, dtype=np.int64)
        h.update(len(arr).to_bytes(8, "little"))
        h.update(arr.tobytes())
        ids_list.append(arr)
    return _Encoded(ids=ids_list, positions=positions, tokens_sha256=h.hexdigest())


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def _is_hf_model(model: Any) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(getattr(model, "original_model", None), PreTrainedModel)


def _run_batch(
    model: Any,
    specs: Sequence[HookSpec],
    ids: Sequence[np.ndarray],
    positions: np.ndarray,
    storage_dtype: torch.dtype,
    pad_id: int,
    stop_early: bool,
    release_memory: bool = False,
) -> dict[str, Tensor]:
    """One left-padded forward; returns ``key -> [layer, batch, role, *feature]`` on the CPU."""
    device = torch.device(getattr(model.cfg, "device", None) or "cpu")
    batch = len(ids)
    width = max(len(x) for x in ids)
    tokens = torch.full((batch, width), pad_id, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    pos = torch.zeros(positions.shape, dtype=torch.long)
    for b, arr in enumerate(ids):
        pad = width - len(arr)
        tokens[b, pad:] = torch.from_numpy(arr)
        mask[b, pad:] = 1
        row_pos = torch.from_numpy(positions[b])
        # A missing role (-1) reads the last token; its value is replaced by NaN afterwards.
        pos[b] = torch.where(row_pos >= 0, row_pos + pad, torch.full_like(row_pos, width - 1))
    # Index tensors per device: a model dispatched over several GPUs runs its layers on different devices.
    indices: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def index_on(dev: torch.device) -> tuple[Tensor, Tensor]:
        if dev not in indices:
            indices[dev] = (torch.arange(batch, device=dev)[:, None], pos.to(dev))
        return indices[dev]

    gathered: dict[tuple[int, int], Tensor] = {}
    n_needed = sum(len(s.names) for s in specs)

    def make_hook(slot: tuple[int, int], name: str):
        def hook_fn(act: Tensor, hook: Any = None) -> None:
            if not isinstance(act, Tensor) or act.dim() < 2 or act.shape[0] != batch or act.shape[1] != width:
                shape = tuple(act.shape) if isinstance(act, Tensor) else type(act).__name__
                raise EntitylensError(
                    f"hook {name} gives activations of shape {shape}, not [batch, pos, ...]; "
                    "cache a per-position hook such as resid_post, attn_out or mlp_out"
                )
            batch_idx, pos_idx = index_on(act.device)
            gathered[slot] = act.detach()[batch_idx, pos_idx].to(storage_dtype)
            if stop_early and len(gathered) == n_needed:
                raise _StopForward

        return hook_fn

    def trim_hook(act: Any, hook: Any = None) -> None:
        if isinstance(act, Tensor) and act.device.type == "cpu":
            release_free_memory()

    fwd_hooks = [(name, make_hook((k, j), name)) for k, s in enumerate(specs) for j, name in enumerate(s.names)]
    if release_memory and device.type == "cpu" and _MALLOC_TRIM is not None:
        # CPU only (a GPU forward's intermediates live in the CUDA allocator). Registered after the capture
        # hooks, so a hook point that is both gathers first, then trims.
        hook_dict = getattr(model, "hook_dict", {})
        for layer in range(int(model.cfg.n_layers)):
            for pattern in _TRIM_POINTS:
                if pattern.format(layer=layer) in hook_dict:
                    fwd_hooks.append((pattern.format(layer=layer), trim_hook))
    # A Hugging Face model builds a KV cache during a plain forward unless told not to: every layer's keys
    # and values would stay alive until the forward ends, growing memory with depth for nothing.
    extra = {"use_cache": False} if _is_hf_model(model) else {}
    with torch.no_grad(), model.hooks(fwd_hooks=fwd_hooks):
        try:
            model(tokens.to(device), attention_mask=mask.to(device), return_type=None, **extra)
        except _StopForward:
            pass
    if release_memory:
        release_free_memory()  # the last block's intermediates (its trim hook may not have run)
    out: dict[str, Tensor] = {}
    for k, s in enumerate(specs):
        missing = [name for j, name in enumerate(s.names) if (k, j) not in gathered]
        if missing:
            raise EntitylensError(
                f"hook {missing[0]} never fired during the forward pass; choose a hook this model runs"
            )
        first = gathered[(k, 0)].device
        out[s.key] = torch.stack([gathered[(k, j)].to(first) for j in range(len(s.names))]).cpu()
    return out


def _check_finite(
    values: Mapping[str, Tensor],
    present: np.ndarray,
    specs: Sequence[HookSpec],
    roles: Sequence[str],
    row_ids: Sequence[str],
) -> None:
    present_t = torch.from_numpy(present)
    for s in specs:
        t = values[s.key]  # [layer, batch, role, *feature]
        bad = ~torch.isfinite(t.float()).reshape(*t.shape[:3], -1).all(dim=-1)
        bad &= present_t[None]
        if bool(bad.any()):
            layer_i, b, r = (int(x) for x in bad.nonzero()[0])
            raise EntitylensError(
                f"non-finite activation (NaN/inf) at row {row_ids[b]}, hook {s.names[layer_i]}, "
                f"role {roles[r]}; "
                "load the model in float32 or check its weights and inputs (shards already written are kept)"
            )


def _meta_identity(meta: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "model": meta["model"]["fingerprint"],
        "dataset": meta["dataset_sha256"],
        "tokens": meta["tokens_sha256"],
        "config": meta["config"],
        "hooks": meta["hooks"],
    }


def _read_meta(out: Path) -> dict[str, Any] | None:
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


def _clear_cache_dir(out: Path) -> None:
    """Remove exactly the files a cache consists of (nothing else in the directory)."""
    for path in sorted(out.glob("shard_*.safetensors")) + [out / META_FILE, out / ROWS_FILE]:
        if path.exists():
            path.unlink()


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

    Returns:
        A :class:`CacheIndex`; read the values with :func:`load_cache`.

    Raises:
        EntitylensError: Unknown hook/role, a role missing from a row, a non-finite activation, or an
            existing cache in ``out_dir`` built from another model, dataset or configuration.

    """
    from entitylens import __version__

    out = Path(out_dir)
    prompts = build_prompts(data, prefix=config.prefix)
    specs = resolve_model_hooks(model, config.hooks, config.layers)
    storage_dtype = DTYPES[config.dtype]
    encoded = _encode_all(model, prompts, config)
    n_rows = len(prompts)
    n_shards = (n_rows + config.shard_size - 1) // config.shard_size
    vocabulary = sorted({o for p in prompts for o in p.meta.get("objects", ())})
    rows_doc = {
        "row_ids": [p.row_id for p in prompts],
        "rows": [{"row_id": p.row_id, **dict(p.meta)} for p in prompts],
        "object_vocabulary": vocabulary,
    }
    rows_bytes = (json.dumps(rows_doc, indent=1, sort_keys=True) + "\n").encode()
    meta: dict[str, Any] = {
        "format": CACHE_FORMAT,
        "format_version": CACHE_FORMAT_VERSION,
        "entitylens_version": __version__,
        "model": {
            "spec": model_spec,
            "label": model_label or (_model_label(model_spec) if model_spec else None),
            "fingerprint": model_fingerprint(model),
            "info": _model_info(model),
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
        "n_shards": n_shards,
        "rows_file": ROWS_FILE,
        "rows_sha256": hashlib.sha256(rows_bytes).hexdigest(),
        "shards": {},
        "complete": False,
    }
    meta["fingerprint"] = sha256_json(_meta_identity(meta))

    existing = None if overwrite else _read_meta(out)
    if overwrite and out.exists():
        _clear_cache_dir(out)
    done: dict[str, Any] = {}
    if existing is not None:
        old_id, new_id = _meta_identity(existing), _meta_identity(meta)
        for part, what in (
            ("model", "a different model"),
            ("dataset", "a different dataset"),
            ("tokens", "a different tokenization (tokenizer or BOS setting)"),
            ("config", "a different configuration"),
            ("hooks", "different hooks"),
        ):
            if old_id[part] != new_id[part]:
                raise EntitylensError(
                    f"{out} holds a cache built from {what}; use a new --out directory or pass --overwrite "
                    "to replace it"
                )
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
    meta["shards"] = dict(sorted(done.items()))
    prepare_output_dir(out)
    rows_path = out / ROWS_FILE
    if not rows_path.exists() or sha256_file(rows_path) != meta["rows_sha256"]:
        with atomic_write(rows_path, "wb") as f:
            f.write(rows_bytes)
    write_json(out / META_FILE, meta)

    row_ids = [p.row_id for p in prompts]
    pad_id = _pad_id(model.tokenizer)
    computed = 0
    bar = progress(total=n_rows, desc="caching", unit="prompt")
    try:
        for k in range(n_shards):
            name = shard_name(k)
            start, stop = k * config.shard_size, min((k + 1) * config.shard_size, n_rows)
            if name in meta["shards"]:
                bar.update(stop - start)
                continue
            parts: dict[str, list[Tensor]] = {s.key: [] for s in specs}
            for b0 in range(start, stop, config.batch_size):
                b1 = min(b0 + config.batch_size, stop)
                values = _run_batch(
                    model,
                    specs,
                    encoded.ids[b0:b1],
                    encoded.positions[b0:b1],
                    storage_dtype,
                    pad_id,
                    config.stop_early,
                    config.release_memory,
                )
                present = encoded.positions[b0:b1] >= 0
                _check_finite(values, present, specs, config.roles, row_ids[b0:b1])
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
            digest = _write_shard(out / name, tensors, {"fingerprint": meta["fingerprint"], "shard": k})
            meta["shards"][name] = {"rows": [start, stop], "sha256": digest}
            meta["shards"] = dict(sorted(meta["shards"].items()))
            meta["complete"] = len(meta["shards"]) == n_shards
            write_json(out / META_FILE, meta)
            computed += 1
    finally:
        bar.close()
    if not meta["complete"]:  # every shard was reused from an earlier run
        meta["complete"] = len(meta["shards"]) == n_shards
        write_json(out / META_FILE, meta)
    return CacheIndex(
        directory=out,
        n_rows=n_rows,
        shards=tuple(shard_name(k) for k in range(n_shards)),
        computed=computed,
        reused=n_shards - computed,
        fingerprint=meta["fingerprint"],
    )


def _write_shard(path: Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, Any]) -> str:
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


# -------------------------------------------------------------------------------------------- loading


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

    def features(self, hook: str, role: str) -> Float[Tensor, "layer n d_model"]:
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
    meta = _read_meta(out)
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
