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


class KVRunner:
    """One batch on a Hugging Face causal LM with a DynamicCache; rows may feed several tokens per forward.

    Models with sliding-window layers get a cache that never evicts and explicit per-position masks
    (:func:`position_masks`), so a padded row attends to exactly what it would attend to alone.
    """

    def __init__(self, hf: Any, batch: int, prefix_cache: Any, prefix_len: int, pad_id: int) -> None:
        from transformers import DynamicCache

        self.hf = hf
        self.device = device_of(hf)
        self.pad_id = pad_id
        self.sliding = sliding_window_layout(hf)
        if prefix_cache is not None and prefix_len > 0:
            self.cache = copy.deepcopy(prefix_cache)
            self.cache.batch_repeat_interleave(batch)
            self.mask = torch.ones(batch, prefix_len, dtype=torch.long, device=self.device)
        else:
            self.cache = DynamicCache() if self.sliding else DynamicCache(config=hf.config)
            self.mask = torch.zeros(batch, 0, dtype=torch.long, device=self.device)
        # Position of every cache slot (-1: pad); only used with sliding windows.
        self.slot_pos = torch.arange(self.mask.shape[1], device=self.device).repeat(batch, 1)

    def forward(self, feeds: list[list[int]], positions: list[int]) -> Float[Tensor, "batch vocab"]:
        """Feed each row its tokens (left-padded to one width) at its positions; next-token logits per row."""
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

    def select(self, keep: list[int]) -> None:
        """Keep only the rows ``keep`` (finished rows leave the batch and the cache)."""
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.cache.batch_select_indices(idx)
        self.mask = self.mask.index_select(0, idx)
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


