"""Model plumbing of the decode loop: the Hugging Face model inside a bridge, and the batch runners.

* :func:`unwrapped_hf_model` -- the plain Hugging Face model inside a ``TransformerBridge`` (wrappers swapped
  out, SDPA attention), checked once per model against the bridge (:func:`unwrap_agrees`);
* :class:`KVRunner` -- one batch on an HF causal LM with a ``DynamicCache``; rows may feed several tokens per
  forward (jump-forward). Models with sliding-window layers get position-windowed masks
  (:func:`position_masks`) and a cache that never evicts, so a padded row sees what it would see alone;
* :class:`RecomputeRunner` -- no KV cache: the bridge's forward on each row's full sequence (TL-native
  bridges).
"""

from __future__ import annotations

import contextlib
import copy
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from entitylens.behavior.cascade import shared_prefix
from entitylens.errors import EntitylensError


def is_hf_model(m: Any) -> bool:
    """Whether ``m`` is a Hugging Face ``PreTrainedModel``."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(m, PreTrainedModel)


def original_model(model: Any) -> Any:
    """The model a bridge wraps (``bridge.original_model``), ``model`` itself for an HF model, else None."""
    if is_hf_model(model):
        return model
    try:
        return model.original_model
    except AttributeError:
        return None


@contextlib.contextmanager
def unwrapped_hf_model(model: Any) -> Iterator[Any]:
    """The plain Hugging Face model inside a :class:`TransformerBridge`, with SDPA attention.

    A bridge inserts wrapper modules (hook points) into the Hugging Face module tree and switches attention
    to eager. Inside this context the wrappers are swapped back for the modules they wrap and attention is
    SDPA, so the model runs as plain transformers would (bridge hooks do not fire). Everything is restored
    on exit, also on error.

    Args:
        model: A :class:`TransformerBridge` or a Hugging Face ``PreTrainedModel`` (yielded unchanged).

    Yields:
        The Hugging Face model.
    """
    hf = original_model(model)
    if hf is None or not is_hf_model(hf):
        raise EntitylensError("this model has no Hugging Face model inside; use DecodeConfig(backend='recompute')")
    from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent

    swaps: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []

    def visit(mod: torch.nn.Module) -> None:
        for name, child in list(mod._modules.items()):
            if child is None:
                continue
            if isinstance(child, GeneralizedComponent):
                orig = child._modules.get("_original_component")
                if orig is None:
                    continue
                swaps.append((mod, name, child))
                mod._modules[name] = orig
                visit(orig)
            else:
                visit(child)

    configs: dict[int, Any] = {}
    for cfg in (getattr(hf, "config", None),):
        if cfg is None:
            continue
        configs[id(cfg)] = cfg
        text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else None
        if text_cfg is not None:
            configs[id(text_cfg)] = text_cfg
    for sub in hf.modules():
        cfg = getattr(sub, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            configs[id(cfg)] = cfg
    saved = [(cfg, cfg._attn_implementation) for cfg in configs.values() if hasattr(cfg, "_attn_implementation")]
    try:
        visit(hf)
        for cfg, _ in saved:
            cfg._attn_implementation = "sdpa"
        yield hf
    finally:
        for mod, name, child in reversed(swaps):
            mod._modules[name] = child
        for cfg, impl in saved:
            cfg._attn_implementation = impl


@contextlib.contextmanager
def cpu_sdpa_gqa(device: torch.device) -> Iterator[None]:
    """On CPU, let SDPA run grouped-query attention itself (``enable_gqa``), also under a padding mask.

    With a mask, transformers copies every key/value head group (``repeat_kv``: the whole cache, every layer)
    before SDPA at each multi-token forward -- and, before 5.23, at every one-token step too. On CPU, SDPA's
    own ``enable_gqa`` gives bit-identical outputs 4.5x faster at a jump step (batch 32, 600 keys). Inside this
    context transformers' ``use_gqa_in_sdpa`` answers yes for every CPU call (its own switch,
    ``TRANSFORMERS_SDPA_FORCE_GQA``, exists only from 5.23); restored on exit. On CUDA a mask with
    ``enable_gqa`` falls back to the math kernel, so there nothing changes.
    """
    sa: Any = None
    with contextlib.suppress(ImportError):
        from transformers.integrations import sdpa_attention as sa
    if device.type != "cpu" or sa is None or not hasattr(sa, "use_gqa_in_sdpa"):
        yield
        return
    original = sa.use_gqa_in_sdpa

    def on_cpu(attention_mask: Tensor | None, key: Tensor, value: Tensor) -> bool:
        return key.device.type == "cpu" and key.shape[-1] == value.shape[-1] or original(attention_mask, key, value)

    sa.use_gqa_in_sdpa = on_cpu
    try:
        yield
    finally:
        sa.use_gqa_in_sdpa = original


_UNWRAP_CHECKED: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def unwrap_agrees(bridge: Any, tokenizer: Any) -> bool:
    """Whether the unwrapped Hugging Face model gives the bridge's logits (checked once per model)."""
    hf = original_model(bridge)
    if hf is bridge:
        return True
    got = _UNWRAP_CHECKED.get(hf)
    if got is not None:
        return got
    ids = tokenizer("Box 0 contains the car and the map.", add_special_tokens=True)["input_ids"]
    x = torch.tensor([ids], device=device_of(hf))
    with torch.inference_mode():
        ref = hf(input_ids=x).logits.float()
        with unwrapped_hf_model(bridge) as plain:
            out = plain(input_ids=x).logits.float()
    scale = float(ref.abs().max()) + 1.0
    ok = bool(torch.isfinite(out).all()) and float((out - ref).abs().max()) <= 2e-2 * scale
    _UNWRAP_CHECKED[hf] = ok
    return ok


def device_of(module: Any) -> torch.device:
    """Device of a module's first parameter (CPU when it has none)."""
    try:
        return next(module.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def logits_width(model: Any, hf: Any, tokenizer: Any) -> int:
    """Width of the model's logits (its unembedding's rows; may exceed the tokenizer's vocabulary)."""
    if hf is not None and hasattr(hf, "get_output_embeddings") and hf.get_output_embeddings() is not None:
        return int(hf.get_output_embeddings().weight.shape[0])
    cfg = getattr(model, "cfg", None)
    if cfg is not None and getattr(cfg, "d_vocab", None):
        return int(cfg.d_vocab)
    return len(tokenizer)




# ---------------------------------------------------------------------------------------------- batch runners
def sliding_window_layout(hf: Any) -> tuple[int, tuple[str, ...] | None] | None:
    """The sliding window of a Hugging Face model: ``(window, layer_types)``, or None without sliding layers.

    ``layer_types`` is the per-layer list (``"sliding_attention"`` / ``"full_attention"``) for models that
    mix both (Gemma-2/3, Qwen2 with ``use_sliding_window``), ``None`` for models whose every layer slides
    (Mistral-style ``sliding_window``).
    """
    cfg = getattr(hf, "config", None)
    if cfg is None:
        return None
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    window = getattr(cfg, "sliding_window", None)
    if not window:
        return None
    types = getattr(cfg, "layer_types", None)
    if types is None:
        return int(window), None
    types = tuple(types)
    return (int(window), types) if "sliding_attention" in types else None


def position_masks(
    query_pos: Tensor, key_pos: Tensor, window: int, layer_types: tuple[str, ...] | None, dtype: torch.dtype
) -> Tensor | dict[str, Tensor]:
    """Additive attention masks that window by token *position*, not by cache slot.

    In a padded batch the cache holds pad slots between a row's tokens, so a window counted in slots (what a
    Hugging Face sliding-window cache and mask do) sees fewer real tokens than the same row alone. Here a
    key is visible to a query when it is a real token (``key_pos >= 0``), not in the query's future, and --
    for sliding layers -- fewer than ``window`` positions back, exactly HF's rule for an unpadded sequence.
    A pad query attends only to its own slot (its output is never read).

    Args:
        query_pos: Position of every new slot, ``-1`` for pads: ``[batch, q]``.
        key_pos: Position of every cache slot after the update (the new slots last), ``-1`` for pads:
            ``[batch, k]``.
        window: The sliding window.
        layer_types: Per-layer types (a dict of masks is returned), or None (every layer slides: one mask).
        dtype: The model's dtype.

    Returns:
        ``[batch, 1, q, k]`` mask(s): 0 where attention is allowed, the dtype's minimum elsewhere.
    """
    q = query_pos[:, :, None]
    k = key_pos[:, None, :]
    causal = (k >= 0) & (k <= q)
    n_q, n_k = query_pos.shape[1], key_pos.shape[1]
    own = torch.zeros(n_q, n_k, dtype=torch.bool, device=query_pos.device)
    own[torch.arange(n_q), torch.arange(n_k - n_q, n_k)] = True
    causal = causal | ((q < 0) & own[None])
    sliding = causal & ((q - k < window) | (q < 0))
    zero = torch.zeros((), dtype=dtype, device=query_pos.device)
    low = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=query_pos.device)

    def additive(allowed: Tensor) -> Tensor:
        return torch.where(allowed, zero, low)[:, None]

    if layer_types is None:
        return additive(sliding)
    return {"full_attention": additive(causal), "sliding_attention": additive(sliding)}


def growing_cache() -> Any:
    """A ``DynamicCache`` whose layers append into reserved room instead of concatenating.

    transformers' ``DynamicLayer`` concatenates the whole key/value history at every step (a copy that grows
    with the sequence: 8-13% of a CPU decode). This layer writes each step into a buffer with room for
    :data:`CACHE_RESERVE` more positions and hands attention a view of the filled part (bit-identical
    attention: SDPA reads strided keys exactly as contiguous ones). Anything that replaces the tensors
    (``batch_select_indices``, ``batch_repeat_interleave``) is picked up: the next update re-reserves.
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):  # type: ignore[misc]
        kbuf: Tensor | None = None
        vbuf: Tensor | None = None

        def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            keys: Tensor = self.keys  # type: ignore[assignment]
            values: Tensor = self.values  # type: ignore[assignment]
            n = keys.shape[-2] if keys.dim() == 4 else 0
            new = key_states.shape[-2]
            kb, vb = self.kbuf, self.vbuf
            if not (kb is not None and vb is not None and n > 0 and keys.data_ptr() == kb.data_ptr()
                    and kb.shape[0] == key_states.shape[0] and n + new <= kb.shape[-2]):
                b, h, _, d = key_states.shape
                kb = key_states.new_empty(b, h, n + new + CACHE_RESERVE, d)
                vb = value_states.new_empty(b, value_states.shape[1], n + new + CACHE_RESERVE, value_states.shape[-1])
                if n:
                    kb[:, :, :n] = keys
                    vb[:, :, :n] = values
                self.kbuf, self.vbuf = kb, vb
            kb[:, :, n : n + new] = key_states
            vb[:, :, n : n + new] = value_states
            self.keys, self.values = kb[:, :, : n + new], vb[:, :, : n + new]
            return kb[:, :, : n + new], vb[:, :, : n + new]

        def batch_select_indices(self, indices: Tensor) -> None:
            # Select from the reserved buffers (one copy that keeps the room), not from the views.
            if not self.is_initialized or self.kbuf is None or self.vbuf is None or self.keys is None:
                super().batch_select_indices(indices)
                return
            n = self.keys.shape[-2]
            self.kbuf, self.vbuf = self.kbuf.index_select(0, indices), self.vbuf.index_select(0, indices)
            self.keys, self.values = self.kbuf[:, :, :n], self.vbuf[:, :, :n]

    cache = DynamicCache()
    cache.layer_class_to_replicate = GrowingLayer
    return cache


CACHE_RESERVE = 128
"""Positions a :func:`growing_cache` layer reserves beyond what it holds (one re-reservation per 128 steps)."""

CASCADE_ATTENTION = True
"""Decode steps after a shared prefix use shared-prefix attention (:mod:`entitylens.behavior.cascade`)."""


class KVRunner:
    """One batch on a Hugging Face causal LM with a DynamicCache; rows may feed several tokens per forward.

    The first forward (each row's own prompt tokens after the shared prefix) runs row by row, unpadded, each
    on top of the shared prefix's cache, and the rows' caches are then laid side by side, left-padded, into
    one :func:`growing_cache`: a padded prefill would spend the padding's compute and attention (30-40% of a
    batch's tokens) and copy the prefix once per row. Later forwards (one chosen token, or a jump-forward's
    tokens) run batched. Models with sliding-window layers get a cache that never evicts and explicit
    per-position masks (:func:`position_masks`), so a padded row attends to exactly what it would attend to
    alone; they prefill batched.
    """

    def __init__(self, hf: Any, batch: int, prefix_cache: Any, prefix_len: int, pad_id: int) -> None:
        from transformers import DynamicCache

        self.hf = hf
        self.device = device_of(hf)
        self.pad_id = pad_id
        self.sliding = sliding_window_layout(hf)
        self.prefix = prefix_cache if prefix_cache is not None and prefix_len > 0 else None
        self.prefix_len = prefix_len if self.prefix is not None else 0
        self.fresh = self.sliding is None  # the next forward is the row-by-row prefill
        # Shared-prefix attention (behavior/cascade.py): the batch cache holds only the rows' own tokens.
        self.cascade = self.fresh and self.prefix is not None and CASCADE_ATTENTION
        self.prefix_kv: list[tuple[Tensor, Tensor]] = []
        self.cache: Any = None  # built by the prefill
        self.mask = torch.zeros(batch, 0, dtype=torch.long, device=self.device)
        self.slot_pos = self.mask  # position of every cache slot (-1: pad); only used with sliding windows
        if self.fresh:
            return
        if prefix_cache is not None and prefix_len > 0:
            self.cache = copy.deepcopy(prefix_cache)
            self.cache.batch_repeat_interleave(batch)
            self.mask = torch.ones(batch, prefix_len, dtype=torch.long, device=self.device)
        else:
            self.cache = DynamicCache() if self.sliding else DynamicCache(config=hf.config)
            self.mask = torch.zeros(batch, 0, dtype=torch.long, device=self.device)
        self.slot_pos = torch.arange(self.mask.shape[1], device=self.device).repeat(batch, 1)

    def forward(self, feeds: list[list[int]], positions: list[int]) -> Float[Tensor, "batch vocab"]:
        """Feed each row its tokens (left-padded to one width) at its positions; next-token logits per row."""
        if self.fresh:
            self.fresh = False
            return self._prefill_rows(feeds, positions)
        width = max(len(f) for f in feeds)
        ids, mask, pos = [], [], []
        for f, p in zip(feeds, positions, strict=True):
            pad = width - len(f)
            ids.append([self.pad_id] * pad + f)
            mask.append([0] * pad + [1] * len(f))
            pos.append([p] * pad + list(range(p, p + len(f))))
        dev = self.device
        new_mask = torch.tensor(mask, dtype=torch.long, device=dev)
        self.mask = torch.cat([self.mask, new_mask], dim=1)
        position_ids = torch.tensor(pos, dtype=torch.long, device=dev)
        attention: Any = self.mask
        if self.sliding is not None:
            query_pos = torch.where(new_mask.bool(), position_ids, -1)
            self.slot_pos = torch.cat([self.slot_pos, query_pos], dim=1)
            window, types = self.sliding
            attention = position_masks(query_pos, self.slot_pos, window, types, self.hf.dtype)
        with shared_prefix(self.hf, self.prefix_kv) if self.cascade else contextlib.nullcontext():
            out = self.hf(
                input_ids=torch.tensor(ids, dtype=torch.long, device=dev),
                attention_mask=attention,
                position_ids=position_ids,
                past_key_values=self.cache,
                use_cache=True,
                logits_to_keep=1,
            )
        self.cache = out.past_key_values
        return out.logits[:, -1, :]

    def _prefill_rows(self, feeds: list[list[int]], positions: list[int]) -> Tensor:
        """The first forward, row by row without padding; the rows' caches laid side by side (left-padded)."""
        width = max(len(f) for f in feeds)
        logits, caches = [], []
        for f, p in zip(feeds, positions, strict=True):
            cache = growing_cache()
            if self.prefix is not None:
                for i, layer in enumerate(self.prefix.layers):
                    cache.update(layer.keys, layer.values, i)
            out = self.hf(input_ids=torch.tensor([f], device=self.device),
                          position_ids=torch.arange(p, p + len(f), device=self.device)[None],
                          past_key_values=cache, use_cache=True, logits_to_keep=1)
            logits.append(out.logits[0, -1])
            caches.append(out.past_key_values)
        batch = growing_cache()
        P = self.prefix_len
        head = 0 if self.cascade else P  # cascade: the prefix stays out of the batch cache (kept once)
        for i in range(len(caches[0].layers)):
            ks, vs = [], []
            for f, c in zip(feeds, caches, strict=True):
                k, v = c.layers[i].keys, c.layers[i].values
                pad = width - len(f)
                ks.append(torch.cat([k[:, :, :head], k.new_zeros(1, k.shape[1], pad, k.shape[3]), k[:, :, P:]], 2))
                vs.append(torch.cat([v[:, :, :head], v.new_zeros(1, v.shape[1], pad, v.shape[3]), v[:, :, P:]], 2))
            batch.update(torch.cat(ks), torch.cat(vs), i)
        self.cache = batch
        if self.cascade and self.prefix is not None:
            self.prefix_kv = [(layer.keys, layer.values) for layer in self.prefix.layers]
        mask = [[1] * head + [0] * (width - len(f)) + [1] * len(f) for f in feeds]
        self.mask = torch.tensor(mask, dtype=torch.long, device=self.device)
        return torch.stack(logits)

    def select(self, keep: list[int]) -> None:
        """Keep only the rows ``keep`` (finished rows leave the batch and the cache)."""
        if self.fresh:  # nothing built yet: the prefill lays out the rows it is given
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.cache.batch_select_indices(idx)
        self.mask = self.mask.index_select(0, idx)
        if self.sliding is not None:
            self.slot_pos = self.slot_pos.index_select(0, idx)


def prefix_cache(runnable: Any, ids: list[int], device: torch.device) -> Any:
    """The KV cache of the shared prefix (batch 1); a non-evicting cache for sliding-window models."""
    from transformers import DynamicCache

    kwargs: dict[str, Any] = {}
    if sliding_window_layout(runnable) is not None:
        kwargs["past_key_values"] = DynamicCache()  # a sliding cache would evict what later pads push out
    return runnable(
        input_ids=torch.tensor([ids], device=device), use_cache=True, logits_to_keep=1, **kwargs
    ).past_key_values


class RecomputeRunner:
    """No KV cache: each row's full sequence goes through the bridge's forward at every step."""

    def __init__(self, model: Any, batch: int) -> None:
        self.model = model
        self.device = torch.device(getattr(getattr(model, "cfg", None), "device", None) or device_of(model))
        self.seqs: list[list[int]] = [[] for _ in range(batch)]

    def forward(self, feeds: list[list[int]], positions: list[int]) -> Float[Tensor, "batch vocab"]:
        """Append each row's tokens and run its whole sequence; next-token logits per row."""
        rows = []
        for seq, f in zip(self.seqs, feeds, strict=True):
            seq.extend(f)
            x = torch.tensor([seq], dtype=torch.long, device=self.device)
            rows.append(self.model(x, return_type="logits")[0, -1, :])
        return torch.stack(rows)

    def select(self, keep: list[int]) -> None:
        """Keep only the rows ``keep``."""
        self.seqs = [self.seqs[i] for i in keep]


