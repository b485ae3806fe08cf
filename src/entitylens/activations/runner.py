"""Running the model for the cache: tokenising prompts at their roles and one hooked forward per batch.

:func:`encode_prompts` tokenises every prompt and finds the token index of each role;
:func:`run_batch` runs one left-padded forward whose hooks gather ``act[batch_idx, pos_idx]`` on the
model's device (the full ``[batch, pos, d]`` activation is never kept) and stop the forward once every
requested hook has fired. On the CPU the forward hands freed heap memory back to the OS between layers
(:func:`release_free_memory`). :func:`check_finite` refuses NaN/inf activations at present roles.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from entitylens.activations.hooks import HookSpec
from entitylens.activations.prompts import CachePrompt
from entitylens.activations.roles import find_roles, tokenize_with_offsets
from entitylens.errors import EntitylensError
from entitylens.models.tokens import model_prepends_bos
from entitylens.progress import progress

# ------------------------------------------------------------------------------------------- memory


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
"""Hook points after which :func:`run_batch` returns free heap memory: after the attention softmax, the
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


# ---------------------------------------------------------------------------------------- tokenising


@dataclass
class EncodedPrompts:
    """Every prompt tokenised, with the token index of each role.

    Attributes:
        ids: Token ids of each prompt (BOS included when prepended).
        positions: ``[rows, roles]`` token index of each role; ``-1`` where a role is missing.
        tokens_sha256: SHA-256 of all token ids (the cache's tokenisation identity).
    """

    ids: list[np.ndarray]
    positions: np.ndarray  # [rows, roles], -1 = missing
    tokens_sha256: str


def encode_prompts(
    model: Any,
    prompts: Sequence[CachePrompt],
    roles: Sequence[str],
    *,
    prepend_bos: bool | None,
    allow_missing_roles: bool,
) -> EncodedPrompts:
    """Tokenise every prompt with the model's tokenizer and find its roles.

    Args:
        model: A bridge with its tokenizer.
        prompts: The prompts.
        roles: Roles to find.
        prepend_bos: Put BOS first; ``None`` follows the model (:func:`entitylens.models.model_prepends_bos`).
        allow_missing_roles: Record a role absent from a prompt as ``-1`` instead of raising.

    Returns:
        The encoded prompts.

    Raises:
        EntitylensError: No tokenizer, a prompt longer than the model's context, or a missing role.
    """
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise EntitylensError("the model has no tokenizer; load it with its tokenizer to cache prompts")
    if prepend_bos is None:
        prepend_bos = model_prepends_bos(model)
    n_ctx = int(getattr(model.cfg, "n_ctx", 0) or 0)
    ids_list: list[np.ndarray] = []
    positions = np.full((len(prompts), len(roles)), -1, dtype=np.int64)
    h = hashlib.sha256()
    for r, p in enumerate(progress(prompts, desc="tokenizing", unit="prompt")):
        ids, offsets = tokenize_with_offsets(tokenizer, p.text, prepend_bos=prepend_bos)
        if n_ctx and len(ids) > n_ctx:
            raise EntitylensError(
                f"row {p.row_id}: prompt has {len(ids)} tokens, more than the model's context of {n_ctx}; "
                "shorten the prompt (drop the few-shot prefix) or use a model with a longer context"
            )
        found = find_roles(p.text, offsets, roles, allow_missing=allow_missing_roles, row=p.row_id)
        for j, role in enumerate(roles):
            idx = found[role]
            positions[r, j] = -1 if idx is None else idx
        arr = np.asarray(ids, dtype=np.int64)
        h.update(len(arr).to_bytes(8, "little"))
        h.update(arr.tobytes())
        ids_list.append(arr)
    return EncodedPrompts(ids=ids_list, positions=positions, tokens_sha256=h.hexdigest())


def pad_token_id(tokenizer: Any) -> int:
    """The id left padding uses: the pad token, else EOS, else BOS, else 0."""
    for attr in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


# -------------------------------------------------------------------------------------------- forward


def _is_hf_model(model: Any) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(getattr(model, "original_model", None), PreTrainedModel)


def run_batch(
    model: Any,
    specs: Sequence[HookSpec],
    ids: Sequence[np.ndarray],
    positions: np.ndarray,
    storage_dtype: torch.dtype,
    pad_id: int,
    stop_early: bool,
    release_memory: bool = False,
) -> dict[str, Tensor]:
    """One left-padded forward; returns ``key -> [layer, batch, role, *feature]`` on the CPU.

    Args:
        model: The bridge.
        specs: The resolved hooks.
        ids: Token ids of each prompt of the batch.
        positions: ``[batch, roles]`` role token indices (unpadded; ``-1`` = missing).
        storage_dtype: Dtype the gathered values are stored in.
        pad_id: Token id of the left padding.
        stop_early: End the forward once every requested hook has fired.
        release_memory: On the CPU, return freed heap memory to the OS between layers.

    Returns:
        The gathered activations per hook key.
    """
    device = torch.device(getattr(model.cfg, "device", None) or "cpu")
    tokens, mask, pos = pad_batch(ids, positions, pad_id)
    gathered: dict[tuple[int, int], Tensor] = {}
    fwd_hooks = gather_hooks(specs, pos, int(tokens.shape[1]), storage_dtype, stop_early, gathered)
    if release_memory and device.type == "cpu" and _MALLOC_TRIM is not None:
        # CPU only (a GPU forward's intermediates live in the CUDA allocator). Registered after the capture
        # hooks, so a hook point that is both gathers first, then trims.
        fwd_hooks += _trim_hooks(model)
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
    return stack_layers(specs, gathered)


def pad_batch(ids: Sequence[np.ndarray], positions: np.ndarray, pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Left-pad a batch: ``(tokens, attention mask, role positions shifted by the padding)``."""
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
    return tokens, mask, pos


def gather_hooks(
    specs: Sequence[HookSpec],
    pos: Tensor,
    width: int,
    storage_dtype: torch.dtype,
    stop_early: bool,
    gathered: dict[tuple[int, int], Tensor],
) -> list[tuple[str, Any]]:
    """Forward hooks storing ``act[batch_idx, pos_idx]`` of every hook name into ``gathered[(spec, layer)]``."""
    batch = int(pos.shape[0])
    # Index tensors per device: a model dispatched over several GPUs runs its layers on different devices.
    indices: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def index_on(dev: torch.device) -> tuple[Tensor, Tensor]:
        if dev not in indices:
            indices[dev] = (torch.arange(batch, device=dev)[:, None], pos.to(dev))
        return indices[dev]

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

    return [(name, make_hook((k, j), name)) for k, s in enumerate(specs) for j, name in enumerate(s.names)]


def _trim_hooks(model: Any) -> list[tuple[str, Any]]:
    """Forward hooks calling :func:`release_free_memory` at every :data:`_TRIM_POINTS` hook the model has."""

    def trim_hook(act: Any, hook: Any = None) -> None:
        if isinstance(act, Tensor) and act.device.type == "cpu":
            release_free_memory()

    hooks: list[tuple[str, Any]] = []
    hook_dict = getattr(model, "hook_dict", {})
    for layer in range(int(model.cfg.n_layers)):
        for pattern in _TRIM_POINTS:
            if pattern.format(layer=layer) in hook_dict:
                hooks.append((pattern.format(layer=layer), trim_hook))
    return hooks


def stack_layers(specs: Sequence[HookSpec], gathered: Mapping[tuple[int, int], Tensor]) -> dict[str, Tensor]:
    """``key -> [layer, batch, role, *feature]`` on the CPU; refuses a hook that never fired."""
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


def check_finite(
    values: Mapping[str, Tensor],
    present: np.ndarray,
    specs: Sequence[HookSpec],
    roles: Sequence[str],
    row_ids: Sequence[str],
) -> None:
    """Refuse a NaN or infinite activation at a role present in its row.

    Args:
        values: :func:`run_batch` output (``key -> [layer, batch, role, *feature]``).
        present: ``[batch, roles]``, whether each role is in each row.
        specs: The resolved hooks.
        roles: The roles, in column order.
        row_ids: Row id of each batch row (for the message).

    Raises:
        EntitylensError: Naming the first bad row, hook and role.
    """
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
