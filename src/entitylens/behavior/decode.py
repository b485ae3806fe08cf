r"""Batched, KV-cached greedy decoding of KST24 statements, constrained by the statement grammar.

One generation per state: the model writes the whole statement
``"\nStatement: Box 0 contains ..., Box 6 contains ...."`` under the token-level automaton of
:mod:`entitylens.behavior.automaton`.

* **Jump-forward** (``forced="jump"``, default): text forced by the grammar (``"\nStatement: Box 0 contains"``,
  ``", Box 3 contains"``) is appended as the tokenizer's canonical tokens without a model step; the tokens
  are fed to the model together with the next chosen token, so a jump costs no forward pass at all.
  ``forced="step"`` decodes forced text token by token under the mask instead: exactly what token-by-token
  constrained decoding (outlines) does.
* **Shared prefix**: the 2-shot demonstration prefix, identical for every prompt, is encoded once (batch 1)
  and its KV cache is copied into every batch. Sharing is at the token level: the cached tokens are the
  longest common prefix of the tokenized prefix and the tokenized prompts, so reuse is exact.
* **Batching**: prompts sorted by length, left padding, layout ``[prefix][pads][suffix]`` with an attention
  mask that is zero on pads and explicit ``position_ids`` that continue from the prefix without gaps. Rows
  that finish are dropped from the batch (and the cache). ``batch_size="auto"`` sizes batches from free GPU
  memory and halves on out-of-memory.
* **No silent truncation**: every prompt has a token budget; a statement that does not complete within it
  is returned with ``truncated=True``.

Backends: ``"hf"`` runs the Hugging Face model inside a :class:`TransformerBridge` with the bridge's wrapper
modules temporarily removed and SDPA attention (fast; bridge hooks do not fire); ``"hooked"`` runs the
same KV-cached loop through the bridge's wrappers (hooks fire, eager attention); ``"recompute"`` calls the
bridge's forward on the full sequence of each row at every step (TL-native bridges, no KV cache).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from entitylens.behavior.automaton import TokenAutomaton
from entitylens.behavior.grammar import DEAD, StatementGrammar
from entitylens.errors import EntitylensError
from entitylens.models.loading import tokenizer_prepends_bos
from entitylens.models.tokens import model_prepends_bos, prompt_ids
from entitylens.progress import progress

logger = logging.getLogger(__name__)

Mode = Literal["constrained", "unconstrained"]
Forced = Literal["jump", "step"]
Backend = Literal["auto", "hf", "hooked", "recompute"]

CPU_BATCH_SIZE = 8
"""Batch size used by ``batch_size="auto"`` when the model is not on a CUDA device."""


@dataclass(frozen=True)
class DecodeConfig:
    """How statements are decoded.

    Attributes:
        mode: ``"constrained"`` (grammar-constrained greedy, the KST24 protocol) or ``"unconstrained"``
            (plain greedy until EOS, a stop string or the budget).
        forced: ``"jump"``: append grammar-forced text as canonical tokens without model steps;
            ``"step"``: decode it token by token under the mask (exactly outlines' behaviour).
        num_boxes: Boxes in the statement.
        prefix: Forced text before ``" Box 0 contains"`` (the prompt ends at the description).
        max_new_tokens: Default token budget per prompt (forced tokens included); the caller usually
            passes per-prompt budgets derived from the state to :func:`generate_statements`.
        batch_size: Rows per batch, or ``"auto"`` (from free memory on CUDA, halving on out-of-memory;
            :data:`CPU_BATCH_SIZE` elsewhere).
        backend: ``"auto"`` (``"hf"`` when the bridge wraps a Hugging Face model, else ``"recompute"``),
            ``"hf"``, ``"hooked"`` or ``"recompute"`` (see the module docstring).
        stop_strings: Unconstrained mode stops when the generated text contains one of these; the
            returned text is cut before it.
    """

    mode: Mode = "constrained"
    forced: Forced = "jump"
    num_boxes: int = 7
    prefix: str = "\nStatement:"
    max_new_tokens: int = 256
    batch_size: int | Literal["auto"] = "auto"
    backend: Backend = "auto"
    stop_strings: tuple[str, ...] = ("\n\n",)

    def __post_init__(self) -> None:
        if self.mode not in ("constrained", "unconstrained"):
            raise EntitylensError(f"DecodeConfig mode={self.mode!r} is unknown; use 'constrained' or 'unconstrained'")
        if self.forced not in ("jump", "step"):
            raise EntitylensError(f"DecodeConfig forced={self.forced!r} is unknown; use 'jump' or 'step'")
        if self.backend not in ("auto", "hf", "hooked", "recompute"):
            raise EntitylensError(
                f"DecodeConfig backend={self.backend!r} is unknown; use 'auto', 'hf', 'hooked' or 'recompute'"
            )
        if not _is_positive_int(self.max_new_tokens):
            raise EntitylensError(
                f"DecodeConfig max_new_tokens={self.max_new_tokens!r} is invalid; use an integer >= 1"
            )
        if self.batch_size != "auto" and not _is_positive_int(self.batch_size):
            raise EntitylensError(
                f"DecodeConfig batch_size={self.batch_size!r} is invalid; use 'auto' or an integer >= 1"
            )
        if not isinstance(self.stop_strings, tuple) or not all(isinstance(s, str) and s for s in self.stop_strings):
            raise EntitylensError(
                f"DecodeConfig stop_strings={self.stop_strings!r} is invalid; use a tuple of non-empty strings"
            )
        # Validates num_boxes and prefix with the grammar's own messages.
        StatementGrammar(num_boxes=self.num_boxes, prefix=self.prefix)

    @property
    def grammar(self) -> StatementGrammar:
        """The statement grammar this configuration decodes under."""
        return StatementGrammar(num_boxes=self.num_boxes, prefix=self.prefix)


@dataclass(frozen=True)
class Generation:
    """One decoded statement.

    Attributes:
        text: The generated text (constrained: the statement including ``prefix``, a full match of the
            grammar's regex unless truncated; unconstrained: the text before the first stop string).
        token_ids: Generated token ids (forced tokens included, EOS excluded).
        truncated: The budget ran out before the statement was complete.
        steps: Model forward steps whose prediction chose a token for this row (forced tokens cost none).
        forced_tokens: Tokens appended by jump-forward without a model step.
    """

    text: str
    token_ids: tuple[int, ...]
    truncated: bool
    steps: int
    forced_tokens: int = 0


def _is_positive_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


# ---------------------------------------------------------------------------------------------- model plumbing
def _is_hf_model(m: Any) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(m, PreTrainedModel)


def _original_model(model: Any) -> Any:
    if _is_hf_model(model):
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
    hf = _original_model(model)
    if hf is None or not _is_hf_model(hf):
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


def _unwrap_agrees(bridge: Any, tokenizer: Any) -> bool:
    """Whether the unwrapped Hugging Face model gives the bridge's logits (checked once per model)."""
    hf = _original_model(bridge)
    if hf is bridge:
        return True
    got = _UNWRAP_CHECKED.get(hf)
    if got is not None:
        return got
    ids = tokenizer("Box 0 contains the car and the map.", add_special_tokens=True)["input_ids"]
    x = torch.tensor([ids], device=_device_of(hf))
    with torch.inference_mode():
        ref = hf(input_ids=x).logits.float()
        with unwrapped_hf_model(bridge) as plain:
            out = plain(input_ids=x).logits.float()
    scale = float(ref.abs().max()) + 1.0
    ok = bool(torch.isfinite(out).all()) and float((out - ref).abs().max()) <= 2e-2 * scale
    _UNWRAP_CHECKED[hf] = ok
    return ok


def _device_of(module: Any) -> torch.device:
    try:
        return next(module.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _logits_width(model: Any, hf: Any, tokenizer: Any) -> int:
    if hf is not None and hasattr(hf, "get_output_embeddings") and hf.get_output_embeddings() is not None:
        return int(hf.get_output_embeddings().weight.shape[0])
    cfg = getattr(model, "cfg", None)
    if cfg is not None and getattr(cfg, "d_vocab", None):
        return int(cfg.d_vocab)
    return len(tokenizer)


_AUTOMATA: weakref.WeakKeyDictionary[Any, dict[tuple[Any, ...], TokenAutomaton]] = weakref.WeakKeyDictionary()


def get_automaton(
    tokenizer: Any, grammar: StatementGrammar, vocab_size: int | None = None, device: str | torch.device = "cpu"
) -> TokenAutomaton:
    """The (cached) token automaton of ``grammar`` over ``tokenizer`` with masks on ``device``."""
    per_tok = _AUTOMATA.setdefault(tokenizer, {})
    key = (grammar, vocab_size, str(torch.device(device)))
    aut = per_tok.get(key)
    if aut is None:
        aut = TokenAutomaton(grammar, tokenizer, vocab_size=vocab_size, device=device)
        per_tok[key] = aut
    return aut


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


class _KVRunner:
    """One batch on a Hugging Face causal LM with a DynamicCache; rows may feed several tokens per forward.

    Models with sliding-window layers get a cache that never evicts and explicit per-position masks
    (:func:`position_masks`), so a padded row attends to exactly what it would attend to alone.
    """

    def __init__(self, hf: Any, batch: int, prefix_cache: Any, prefix_len: int, pad_id: int) -> None:
        from transformers import DynamicCache

        self.hf = hf
        self.device = _device_of(hf)
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
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.cache.batch_select_indices(idx)
        self.mask = self.mask.index_select(0, idx)
        self.slot_pos = self.slot_pos.index_select(0, idx)


def _prefix_cache(runnable: Any, ids: list[int], device: torch.device) -> Any:
    """The KV cache of the shared prefix (batch 1); a non-evicting cache for sliding-window models."""
    from transformers import DynamicCache

    kwargs: dict[str, Any] = {}
    if sliding_window_layout(runnable) is not None:
        kwargs["past_key_values"] = DynamicCache()  # a sliding cache would evict what later pads push out
    return runnable(
        input_ids=torch.tensor([ids], device=device), use_cache=True, logits_to_keep=1, **kwargs
    ).past_key_values


class _RecomputeRunner:
    """No KV cache: each row's full sequence goes through the bridge's forward at every step."""

    def __init__(self, model: Any, batch: int) -> None:
        self.model = model
        self.device = torch.device(getattr(getattr(model, "cfg", None), "device", None) or _device_of(model))
        self.seqs: list[list[int]] = [[] for _ in range(batch)]

    def forward(self, feeds: list[list[int]], positions: list[int]) -> Float[Tensor, "batch vocab"]:
        rows = []
        for seq, f in zip(self.seqs, feeds, strict=True):
            seq.extend(f)
            x = torch.tensor([seq], dtype=torch.long, device=self.device)
            rows.append(self.model(x, return_type="logits")[0, -1, :])
        return torch.stack(rows)

    def select(self, keep: list[int]) -> None:
        self.seqs = [self.seqs[i] for i in keep]


# ---------------------------------------------------------------------------------------------- decoding loop
@dataclass
class _Row:
    index: int
    prompt_ids: list[int]
    budget: int
    start_feed: list[int]  # tokens to feed in the first forward (prompt suffix + start jump)
    start_pos: int
    start_gen: list[int]
    start_state: int
    # runtime
    gen: list[int] = field(default_factory=list)
    feed: list[int] = field(default_factory=list)
    pos: int = 0
    state: int = 0
    steps: int = 0
    forced: int = 0
    text: str = ""
    done: bool = False
    truncated: bool = False

    def reset(self) -> None:
        self.gen = list(self.start_gen)
        self.feed = list(self.start_feed)
        self.pos = self.start_pos
        self.state = self.start_state
        self.steps = 0
        self.forced = len(self.start_gen)
        self.text = ""
        self.done = False
        self.truncated = False


class _Decoder:
    def __init__(self, model: Any, tokenizer: Any, config: DecodeConfig, backend: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.backend = backend
        self.hf = _original_model(model)
        self.device = _device_of(self.hf) if self.hf is not None else _device_of(model)
        width = _logits_width(model, self.hf, tokenizer)
        self.grammar = config.grammar
        self.automaton = get_automaton(tokenizer, self.grammar, width, self.device)
        self.eos_ids = self._eos_ids()
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad) if pad is not None else 0

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        gen_cfg = getattr(self.hf, "generation_config", None)
        eos = getattr(gen_cfg, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(e) for e in eos)
        return ids

    # ------------------------------------------------------------------ per-batch loop
    def run_batch(self, rows: list[_Row], runner: Any) -> None:
        for r in rows:
            r.reset()
        active = [r for r in rows if not self._finish_if_done(r)]
        if len(active) < len(rows):
            runner.select([i for i, r in enumerate(rows) if not r.done])
        if not active:
            return
        logits = runner.forward([r.feed for r in active], [r.pos for r in active])
        for r in active:
            r.pos += len(r.feed)
        while True:
            chosen = self._choose(active, logits)
            keep = []
            for i, (r, tok) in enumerate(zip(active, chosen, strict=True)):
                self._advance(r, tok)
                if not r.done:
                    keep.append(i)
            if not keep:
                return
            if len(keep) < len(active):
                runner.select(keep)
                active = [active[i] for i in keep]
            logits = runner.forward([r.feed for r in active], [r.pos for r in active])
            for r in active:
                r.pos += len(r.feed)

    def _choose(self, rows: list[_Row], logits: Tensor) -> list[int]:
        if self.config.mode == "constrained":
            masks = torch.stack([self.automaton.allowed(r.state) for r in rows])
            logits = logits.masked_fill(~masks, float("-inf"))
        return logits.argmax(dim=-1).tolist()

    def _finish_if_done(self, r: _Row) -> bool:
        if self.config.mode == "constrained" and self.grammar.accepts(r.state):
            r.done = True
        elif len(r.gen) >= r.budget:
            r.done = True
            r.truncated = True
        return r.done

    def _advance(self, r: _Row, tok: int) -> None:
        r.steps += 1
        if self.config.mode == "unconstrained":
            if tok in self.eos_ids:
                r.done = True
                return
            r.gen.append(tok)
            r.feed = [tok]
            text = self.automaton.decode(r.gen[-16:])
            for s in self.config.stop_strings:
                if s in text:
                    r.done = True
                    return
            self._finish_if_done(r)
            return
        nxt = self.automaton.next_state(r.state, tok)
        if nxt == DEAD:  # pragma: no cover - the mask makes this impossible
            raise AssertionError(f"token {tok} chosen outside the grammar mask")
        r.gen.append(tok)
        r.state = nxt
        r.feed = [tok]
        if self._finish_if_done(r):
            return
        if self.config.forced == "jump" and self.grammar.forced(r.state):
            jump = self.automaton.jump(r.state)
            room = r.budget - len(r.gen)
            ids = list(jump.token_ids[:room])
            if ids:
                r.gen.extend(ids)
                r.feed.extend(ids)
                r.forced += len(ids)
                r.state = jump.state if len(ids) == len(jump.token_ids) else self.automaton.walk(r.state, ids)
            self._finish_if_done(r)

    def result(self, r: _Row) -> Generation:
        if self.config.mode == "unconstrained":
            text = self.automaton.decode(r.gen)
            cuts = [text.index(s) for s in self.config.stop_strings if s in text]
            if cuts:
                text = text[: min(cuts)]
        else:
            text = self.automaton.text(r.gen)
        return Generation(
            text=text, token_ids=tuple(r.gen), truncated=r.truncated, steps=r.steps, forced_tokens=r.forced
        )


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError):
        return True
    msg = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def _auto_batch_size(hf: Any, device: torch.device, max_len: int) -> int:
    if device.type != "cuda" or hf is None:
        return CPU_BATCH_SIZE
    cfg = hf.config.get_text_config() if hasattr(hf.config, "get_text_config") else hf.config
    layers = int(getattr(cfg, "num_hidden_layers", 32))
    heads = int(getattr(cfg, "num_attention_heads", 32))
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    hidden = int(getattr(cfg, "hidden_size", 4096))
    head_dim = int(getattr(cfg, "head_dim", None) or hidden // heads)
    vocab = int(getattr(cfg, "vocab_size", 32000))
    elem = next(hf.parameters()).element_size()
    kv = 2 * layers * kv_heads * head_dim * max_len * elem
    # Prefill activations of one row (hidden states, MLP, attention scores) and fp32 logits, generously.
    act = max_len * (hidden * 16 + heads * max_len) * elem + vocab * 4 * 4
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(512, int(0.7 * free // max(1, kv + act))))


def generate_statements(
    model: Any,
    prompts: Sequence[str],
    config: DecodeConfig | None = None,
    shared_prefix: str | None = None,
    *,
    max_new_tokens: int | Sequence[int] | None = None,
    tokenizer: Any = None,
    bos: bool | None = None,
) -> list[Generation]:
    """Greedy-decode one statement per prompt, batched, with a shared-prefix KV cache.

    Prompts are tokenized by the one BOS rule of entitylens (:func:`entitylens.models.model_prepends_bos`):
    BOS first exactly when the model's own tokenizer adds it (not when TransformerLens' rebuilt tokenizer
    would), so SmolLM2 / Qwen2 prompts start with their first word, as in the paper's stack.

    Args:
        model: A :class:`TransformerBridge` (or a Hugging Face causal LM, with ``tokenizer``).
        prompts: Full prompts (the 2-shot prefix included), each ending at the test description.
        config: Decoding options (default :class:`DecodeConfig`).
        shared_prefix: Text every prompt starts with (the demonstrations); its KV cache is computed once.
            ``None`` disables sharing.
        max_new_tokens: Token budget per prompt (one int, or one per prompt); defaults to
            ``config.max_new_tokens``. Forced tokens count toward it.
        tokenizer: The tokenizer, when ``model`` is not a bridge that carries one.
        bos: Override the BOS rule (``None``: follow the model).

    Returns:
        One :class:`Generation` per prompt, in input order.

    Raises:
        EntitylensError: On bad input (empty prompts, a prompt that does not start with ``shared_prefix``,
            a budget that is not a positive integer, a model without tokenizer).
    """
    config = config or DecodeConfig()
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise EntitylensError("generate_statements needs a tokenizer; pass a TransformerBridge or tokenizer=...")
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise EntitylensError("generate_statements prompts must be a list of strings; wrap a single prompt in a list")
    prompts = list(prompts)
    if not prompts:
        return []
    if any(not p for p in prompts):
        raise EntitylensError("generate_statements got an empty prompt; every prompt must contain the description")
    budgets = _budgets(max_new_tokens, config.max_new_tokens, len(prompts))
    if shared_prefix is not None:
        if not isinstance(shared_prefix, str):
            raise EntitylensError("shared_prefix must be a string or None")
        bad = [i for i, p in enumerate(prompts) if not p.startswith(shared_prefix)]
        if bad:
            raise EntitylensError(
                f"prompt {bad[0]} does not start with shared_prefix; pass the demonstrations every prompt starts "
                "with, or shared_prefix=None"
            )
    backend = _resolve_backend(model, tokenizer, config.backend)
    ctx: contextlib.AbstractContextManager[Any]
    if backend == "hf" and not _is_hf_model(model):
        ctx = unwrapped_hf_model(model)
    else:
        ctx = contextlib.nullcontext(_original_model(model) if backend != "recompute" else model)
    if bos is None:
        bos = tokenizer_prepends_bos(tokenizer) if _is_hf_model(model) else model_prepends_bos(model)
    with torch.inference_mode(), ctx as runnable:
        return _generate(model, runnable, tokenizer, prompts, budgets, config, shared_prefix, backend, bool(bos))


def _budgets(max_new_tokens: int | Sequence[int] | None, default: int, n: int) -> list[int]:
    if max_new_tokens is None:
        return [default] * n
    if isinstance(max_new_tokens, int) and not isinstance(max_new_tokens, bool):
        vals = [max_new_tokens] * n
    else:
        vals = list(max_new_tokens)  # type: ignore[arg-type]
        if len(vals) != n:
            raise EntitylensError(f"max_new_tokens has {len(vals)} entries for {n} prompts; pass one per prompt")
    for v in vals:
        if not _is_positive_int(v):
            raise EntitylensError(f"max_new_tokens={v!r} is invalid; every budget must be an integer >= 1")
    return vals


def _resolve_backend(model: Any, tokenizer: Any, requested: str) -> str:
    hf = _original_model(model)
    has_hf = hf is not None and _is_hf_model(hf)
    if requested in ("hf", "hooked") and not has_hf:
        raise EntitylensError(
            f"backend={requested!r} needs a Hugging Face model inside the bridge; use DecodeConfig(backend='recompute')"
        )
    if requested == "recompute" and _is_hf_model(model):
        raise EntitylensError("backend='recompute' needs a TransformerBridge; use backend='hf' for a plain HF model")
    if requested != "auto":
        return requested
    if not has_hf:
        return "recompute"
    if _is_hf_model(model) or _unwrap_agrees(model, tokenizer):
        return "hf"
    logger.warning("the unwrapped Hugging Face model disagrees with the bridge; decoding through the bridge's hooks")
    return "hooked"


def _generate(
    model: Any,
    runnable: Any,
    tokenizer: Any,
    prompts: list[str],
    budgets: list[int],
    config: DecodeConfig,
    shared_prefix: str | None,
    backend: str,
    bos: bool,
) -> list[Generation]:
    dec = _Decoder(model, tokenizer, config, backend)
    aut, grammar = dec.automaton, dec.grammar
    enc = [prompt_ids(tokenizer, p, bos) for p in prompts]

    # Shared prefix: the longest token prefix common to the tokenized prefix and (nearly) every prompt.
    share_len = 0
    sharing = [False] * len(prompts)
    if shared_prefix and backend != "recompute":
        pre = prompt_ids(tokenizer, shared_prefix, bos)
        lcps = [min(_lcp(pre, ids), len(ids) - 1) for ids in enc]
        ok = [lc >= max(1, len(pre) - 2) for lc in lcps]
        if any(ok):
            share_len = min(lc for lc, o in zip(lcps, ok, strict=True) if o)
            sharing = ok

    rows: list[_Row] = []
    for i, (prompt, ids) in enumerate(zip(prompts, enc, strict=True)):
        start = share_len if sharing[i] else 0
        feed = ids[start:]
        gen: list[int] = []
        state = grammar.initial_state
        if config.mode == "constrained" and config.forced == "jump":
            jump = aut.jump(state, left_context=prompt)
            gen = list(jump.token_ids[: budgets[i]])
            state = jump.state if len(gen) == len(jump.token_ids) else aut.walk(state, gen)
        rows.append(_Row(i, ids, budgets[i], feed + gen, start, gen, state))

    prefix_cache = None
    if share_len and backend != "recompute":
        prefix_cache = _prefix_cache(runnable, enc[sharing.index(True)][:share_len], dec.device)

    out: list[Generation | None] = [None] * len(prompts)
    groups = [[r for r in rows if sharing[r.index]], [r for r in rows if not sharing[r.index]]]
    max_len = max(len(r.start_feed) + r.budget for r in rows) + share_len
    bs: int = (
        config.batch_size if config.batch_size != "auto" else _auto_batch_size(dec.hf, dec.device, max_len)
    )
    bar = progress(total=len(prompts), desc="decode", unit="prompt")
    try:
        for g, group in enumerate(groups):
            group.sort(key=lambda r: (-len(r.start_feed), r.index))
            pos = 0
            while pos < len(group):
                chunk = group[pos : pos + bs]
                try:
                    runner: Any
                    if backend == "recompute":
                        runner = _RecomputeRunner(runnable, len(chunk))
                    else:
                        runner = _KVRunner(runnable, len(chunk), prefix_cache if g == 0 else None,
                                           share_len if g == 0 else 0, dec.pad_id)
                    dec.run_batch(chunk, runner)
                except Exception as err:  # noqa: BLE001 - only out-of-memory is retried
                    if config.batch_size != "auto" or not _is_oom(err) or bs == 1:
                        raise
                    runner = None
                    if dec.device.type == "cuda":
                        torch.cuda.empty_cache()
                    bs = max(1, bs // 2)
                    logger.warning("out of memory at batch size %d; retrying with %d", len(chunk), bs)
                    continue
                for r in chunk:
                    out[r.index] = dec.result(r)
                bar.update(len(chunk))
                pos += len(chunk)
    finally:
        bar.close()
    return [o for o in out if o is not None]
