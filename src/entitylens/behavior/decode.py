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
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from entitylens.behavior.automaton import get_automaton
from entitylens.behavior.grammar import DEAD, StatementGrammar
from entitylens.behavior.runners import (
    KVRunner,
    RecomputeRunner,
    cpu_sdpa_gqa,
    device_of,
    is_hf_model,
    logits_width,
    original_model,
    prefix_cache,
    unwrap_agrees,
    unwrapped_hf_model,
)
from entitylens.errors import EntitylensError
from entitylens.models.loading import tokenizer_prepends_bos
from entitylens.models.tokens import model_prepends_bos, prompt_ids
from entitylens.progress import progress

logger = logging.getLogger(__name__)

Mode = Literal["constrained", "unconstrained"]
Forced = Literal["jump", "step"]
Backend = Literal["auto", "hf", "hooked", "recompute"]

CPU_BATCH_SIZE = 32
"""Most rows per batch of ``batch_size="auto"`` on CPU (fewer when a quarter of the free memory holds fewer).

A CPU forward of a batch of one-token rows is compute-bound from a few dozen rows on, and a decode step's
weight reads are shared by every row: on SmolLM2 (one thread) 32 rows decode 1.3x faster per state than 8
(``benchmarks/eval_engines.py``)."""


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
        pad: Batch prompts of different token lengths with left padding (default). ``False`` puts only
            prompts of equal length in one batch, so no row is ever padded (the compact protocol's
            short answers: many prompts share a length).
    """

    mode: Mode = "constrained"
    forced: Forced = "jump"
    num_boxes: int = 7
    prefix: str = "\nStatement:"
    max_new_tokens: int = 256
    batch_size: int | Literal["auto"] = "auto"
    backend: Backend = "auto"
    stop_strings: tuple[str, ...] = ("\n\n",)
    pad: bool = True

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
        stop: Unconstrained mode: the stop string that ended the text (``None``: EOS or the budget).
    """

    text: str
    token_ids: tuple[int, ...]
    truncated: bool
    steps: int
    forced_tokens: int = 0
    stop: str | None = None


def _is_positive_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


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
        self.hf = original_model(model)
        self.device = device_of(self.hf) if self.hf is not None else device_of(model)
        width = logits_width(model, self.hf, tokenizer)
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
        stop = None
        if self.config.mode == "unconstrained":
            text = self.automaton.decode(r.gen)
            cuts = sorted((text.index(s), s) for s in self.config.stop_strings if s in text)
            if cuts:
                text, stop = text[: cuts[0][0]], cuts[0][1]
        else:
            text = self.automaton.text(r.gen)
        return Generation(
            text=text, token_ids=tuple(r.gen), truncated=r.truncated, steps=r.steps, forced_tokens=r.forced,
            stop=stop,
        )  # fmt: skip


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


def host_available_bytes() -> int:
    """Host memory available now (Linux ``sysconf``; 8 GiB where it cannot be read)."""
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not Linux
        return 8 * 2**30


def _auto_batch_size(hf: Any, device: torch.device, max_len: int) -> int:
    """Rows per batch for ``batch_size="auto"``: from free GPU memory, or on CPU up to :data:`CPU_BATCH_SIZE`."""
    if hf is None or device.type not in ("cuda", "cpu"):
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
    if device.type == "cpu":  # a quarter of the free host memory, and no more rows than keep the CPU busy
        return max(1, min(CPU_BATCH_SIZE, int(0.25 * host_available_bytes() // max(1, kv + act))))
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
    if backend == "hf" and not is_hf_model(model):
        ctx = unwrapped_hf_model(model)
    else:
        ctx = contextlib.nullcontext(original_model(model) if backend != "recompute" else model)
    if bos is None:
        bos = tokenizer_prepends_bos(tokenizer) if is_hf_model(model) else model_prepends_bos(model)
    dev = device_of(original_model(model) if original_model(model) is not None else model)
    with torch.inference_mode(), ctx as runnable, cpu_sdpa_gqa(dev):
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
    hf = original_model(model)
    has_hf = hf is not None and is_hf_model(hf)
    if requested in ("hf", "hooked") and not has_hf:
        raise EntitylensError(
            f"backend={requested!r} needs a Hugging Face model inside the bridge; use DecodeConfig(backend='recompute')"
        )
    if requested == "recompute" and is_hf_model(model):
        raise EntitylensError("backend='recompute' needs a TransformerBridge; use backend='hf' for a plain HF model")
    if requested != "auto":
        return requested
    if not has_hf:
        return "recompute"
    if is_hf_model(model) or unwrap_agrees(model, tokenizer):
        return "hf"
    logger.warning("the unwrapped Hugging Face model disagrees with the bridge; decoding through the bridge's hooks")
    return "hooked"


def _shared_prefix(pre: list[int], enc: list[list[int]]) -> tuple[int, list[bool]]:
    """The longest token prefix common to the tokenized prefix and (nearly) every prompt, and who shares it."""
    lcps = [min(_lcp(pre, ids), len(ids) - 1) for ids in enc]
    ok = [lc >= max(1, len(pre) - 2) for lc in lcps]
    if not any(ok):
        return 0, [False] * len(enc)
    return min(lc for lc, o in zip(lcps, ok, strict=True) if o), ok


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

    share_len, sharing = (0, [False] * len(prompts))
    if shared_prefix and backend != "recompute":
        share_len, sharing = _shared_prefix(prompt_ids(tokenizer, shared_prefix, bos), enc)

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

    shared_cache = None
    if share_len and backend != "recompute":
        shared_cache = prefix_cache(runnable, enc[sharing.index(True)][:share_len], dec.device)

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
                if not config.pad:  # equal lengths only: no row is ever padded
                    chunk = [r for r in chunk if len(r.start_feed) == len(chunk[0].start_feed)]
                try:
                    runner: Any
                    if backend == "recompute":
                        runner = RecomputeRunner(runnable, len(chunk))
                    else:
                        runner = KVRunner(runnable, len(chunk), shared_cache if g == 0 else None,
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
