"""The fast engine: a plain Hugging Face twin of ``bridge.original_model`` with causal K/V reuse.

:class:`TwinRunner` runs a parameter-sharing copy of the bridge's HF model without the bridge's hook wrappers
(:func:`build_twin`; SDPA attention by default, :data:`TWIN_ATTN_IMPLEMENTATION`). Patching position ``p`` at
layer ``l`` leaves every position ``< p`` unchanged, so a batch of cells starting at ``s`` reuses the target
run's keys/values for positions ``< s`` (:class:`PrefixKV`, recorded during the full run by :class:`CaptureKV`)
and recomputes only positions ``s..answer`` of the layers at and after the cell's; rows join the batch at
their own layer (:func:`fast_batches`, :func:`join_layer`). A model this engine cannot run raises
:class:`Unsupported` and :func:`~entitylens.patching.exact.patch_grid` falls back to the hooks engine.

Module settings: :data:`FAST_MODEL_TYPES`, :data:`MIX_START_POSITIONS`, :data:`TWIN_ATTN_IMPLEMENTATION`.
"""

from __future__ import annotations

import copy
import inspect
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from entitylens.patching.jobs import Capture, Cell, Job, metrics_row
from entitylens.patching.metric import answer_metrics
from entitylens.progress import progress

__all__ = [
    "FAST_MODEL_TYPES",
    "MIX_START_POSITIONS",
    "TWIN_ATTN_IMPLEMENTATION",
    "CaptureKV",
    "PrefixKV",
    "TwinRunner",
    "Unsupported",
    "build_twin",
    "fast_batches",
    "join_layer",
    "layer_out",
]

FAST_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"})
"""Hugging Face ``model_type`` values the fast engine runs: every family of the paper's registry (Llama-2,
Code Llama, Llemma, FLoat and DeepSeek are ``llama``; Mistral; Gemma / CodeGemma; Gemma-2/3, with their
sliding-window layers) plus Qwen2/3."""

MIX_START_POSITIONS: bool | None = None
"""Stack cells with different start positions in one batch (each row keeps its own patched positions; the
batch recomputes from the smallest). ``None``: only on accelerators -- a CPU is FLOP-bound, so there cells are
grouped by exact start position."""

TWIN_ATTN_IMPLEMENTATION = "sdpa"
"""Attention kernel of the fast engine's twin (``"sdpa"``; ``"eager"`` matches the bridge bit-for-bit-ish)."""


class Unsupported(Exception):
    """The fast engine cannot run this model (the caller falls back to hooks)."""


class CaptureKV:
    """Stand-in for an HF cache during a full run: records each layer's (rotated) keys and values."""

    def __init__(self, n_layers: int) -> None:
        self.keys: list[Tensor | None] = [None] * n_layers
        self.values: list[Tensor | None] = [None] * n_layers

    def update(self, key: Tensor, value: Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """Record layer ``layer_idx``'s keys and values; attention uses them unchanged."""
        self.keys[layer_idx], self.values[layer_idx] = key, value
        return key, value


class PrefixKV:
    """Stand-in for an HF cache during a chunk run: prepends the target run's keys/values for positions < s."""

    def __init__(self, keys: list[Tensor], values: list[Tensor], start: int) -> None:
        self.keys, self.values, self.start = keys, values, start

    def update(self, key: Tensor, value: Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """The chunk's keys and values behind the target run's for positions ``< start`` (batch-expanded)."""
        if self.start == 0:
            return key, value
        b = key.shape[0]
        pk = self.keys[layer_idx][:, :, : self.start].expand(b, -1, -1, -1)
        pv = self.values[layer_idx][:, :, : self.start].expand(b, -1, -1, -1)
        return torch.cat([pk, key], dim=2), torch.cat([pv, value], dim=2)


def build_twin(bridge: Any, attn_implementation: str) -> Any:
    """A plain HF model sharing every parameter/buffer with ``bridge.original_model`` (no bridge wrappers)."""
    from transformers import PreTrainedModel

    hf = getattr(bridge, "original_model", None)
    if not isinstance(hf, PreTrainedModel):
        raise Unsupported("the bridge does not wrap a Hugging Face PreTrainedModel")
    cfg = copy.deepcopy(hf.config)
    if getattr(cfg, "model_type", None) not in FAST_MODEL_TYPES:
        raise Unsupported(f"model_type {getattr(cfg, 'model_type', None)!r} is not in {sorted(FAST_MODEL_TYPES)}")
    if any(t not in ("full_attention", "sliding_attention") for t in (getattr(cfg, "layer_types", None) or [])):
        raise Unsupported(f"the model has attention layers of types {sorted(set(cfg.layer_types))}")
    with torch.device("meta"):
        twin = type(hf)._from_config(cfg, attn_implementation=attn_implementation)
    orig: dict[str, Tensor] = {}
    for name, t in itertools.chain(
        hf.named_parameters(remove_duplicate=False), hf.named_buffers(remove_duplicate=False)
    ):
        orig.setdefault(name.replace("._original_component", ""), t)
    for name, _ in itertools.chain(
        list(twin.named_parameters(remove_duplicate=False)), list(twin.named_buffers(remove_duplicate=False))
    ):
        if name not in orig:
            raise Unsupported(f"no tensor for {name} in the bridge's model")
        mod_name, _, attr = name.rpartition(".")
        mod = twin.get_submodule(mod_name) if mod_name else twin
        if attr in mod._parameters:
            t = orig[name]
            mod._parameters[attr] = t if isinstance(t, torch.nn.Parameter) else torch.nn.Parameter(t, False)
        else:
            mod._buffers[attr] = orig[name]
    if any(t.is_meta for t in itertools.chain(twin.parameters(), twin.buffers())):
        raise Unsupported("some tensors could not be shared with the bridge")
    if len({t.device for t in twin.parameters()}) > 1:
        raise Unsupported("the model is spread over several devices")
    inner = getattr(twin, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if inner is None or not all(hasattr(inner, a) for a in needed) or not hasattr(twin, "lm_head"):
        raise Unsupported("unexpected module layout")
    for layer in inner.layers:
        if not (hasattr(layer, "self_attn") and hasattr(layer, "mlp") and hasattr(layer.self_attn, "o_proj")):
            raise Unsupported("unexpected decoder-layer layout")
    twin.eval()
    return twin


class TwinRunner:
    """Patches cells on a plain HF twin of the bridge's model, reusing the target run causally.

    Args:
        bridge: A ``TransformerBridge`` wrapping a supported Hugging Face model.

    Raises:
        Unsupported: the model cannot run on this engine (see :func:`build_twin`).
    """

    def __init__(self, bridge: Any) -> None:
        self.bridge = bridge
        self.attn_implementation = TWIN_ATTN_IMPLEMENTATION
        self.path = f"hf-{self.attn_implementation}-causal-reuse"
        self.twin = build_twin(bridge, self.attn_implementation)
        self.inner = self.twin.model
        self.layers = list(self.inner.layers)
        self.n_layers = len(self.layers)
        cfg = self.twin.config
        self.n_heads = int(cfg.num_attention_heads)
        self.d_head = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        window = getattr(cfg, "sliding_window", None)
        types = list(getattr(cfg, "layer_types", None) or [])
        if not types:  # Mistral-style: every layer slides when sliding_window is set
            types = ["sliding_attention" if window else "full_attention"] * self.n_layers
        self.layer_types: list[str] = types[: self.n_layers]
        self.sliding_window: int | None = int(window) if window and "sliding_attention" in types else None
        # Rotary tables per layer type (Gemma-3's local and global layers use different bases).
        self.rope_by_type = "layer_type" in inspect.signature(self.inner.rotary_emb.forward).parameters
        self.softcap = getattr(cfg, "final_logit_softcapping", None)
        # Gemma-2/3 normalise the attention output before adding it to the residual stream.
        self.post_attn_norm = all(hasattr(layer, "pre_feedforward_layernorm") for layer in self.layers)

    @property
    def device(self) -> torch.device:
        """The device of the twin's parameters."""
        return next(self.twin.parameters()).device

    def mask(self, start: int, end: int, dtype: torch.dtype, sliding: bool = False) -> Tensor | None:
        """Additive causal mask for queries ``start..end`` over keys ``0..end`` (``None`` when not needed).

        With ``sliding`` a key is also hidden once it is ``sliding_window`` or more positions back (the rule
        of Hugging Face's sliding-window layers).
        """
        n = end - start + 1
        slides = sliding and self.sliding_window is not None and end + 1 > self.sliding_window
        if not slides and (n == 1 or (start == 0 and self.attn_implementation == "sdpa")):
            return None  # a single query sees every key; SDPA applies is_causal itself from position 0
        q = torch.arange(start, end + 1, device=self.device)[:, None]
        k = torch.arange(0, end + 1, device=self.device)[None, :]
        allowed = k <= q
        if slides:
            allowed = allowed & (q - k < int(self.sliding_window))  # type: ignore[arg-type]
        zero = torch.zeros((), dtype=dtype, device=self.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)[None, None]

    def masks(self, start: int, end: int, dtype: torch.dtype) -> list[Tensor | None]:
        """The mask of every layer (sliding layers get the windowed one)."""
        by_type = {t: self.mask(start, end, dtype, t == "sliding_attention") for t in set(self.layer_types)}
        return [by_type[t] for t in self.layer_types]

    def rope(self, hidden: Tensor, pos_ids: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        """Rotary (cos, sin) per layer type."""
        if not self.rope_by_type:
            table = self.inner.rotary_emb(hidden, pos_ids)
            return {t: table for t in set(self.layer_types)}
        return {t: self.inner.rotary_emb(hidden, pos_ids, t) for t in set(self.layer_types)}

    def logits(self, hidden: Tensor) -> Tensor:
        """Final norm, unembedding and (Gemma-2) logit soft-capping."""
        out = self.twin.lm_head(self.inner.norm(hidden))
        if self.softcap:
            out = torch.tanh(out / self.softcap) * self.softcap
        return out

    def attn_to_resid(self, layer: Any) -> Any:
        """The module whose output attention adds to the residual stream (``attn_out``, as TransformerLens)."""
        return layer.post_attention_layernorm if self.post_attn_norm else layer.self_attn

    def mlp_to_resid(self, layer: Any) -> Any:
        """The module whose output the MLP adds to the residual stream (``mlp_out``)."""
        return layer.post_feedforward_layernorm if self.post_attn_norm else layer.mlp

    def check_length(self, n_pos: int) -> None:
        """Nothing to check: sliding windows are applied by :meth:`mask`."""

    def _hooks_for_capture(self, component: str, store: dict[int, Tensor]) -> list[Any]:
        handles = []
        for j, layer in enumerate(self.layers):
            if component in ("attn_out", "resid_mid"):
                handles.append(
                    self.attn_to_resid(layer).register_forward_hook(
                        lambda m, a, o, j=j: store.__setitem__(j, layer_out(o)[0].detach())
                    )
                )
            elif component == "mlp_out":
                handles.append(
                    self.mlp_to_resid(layer).register_forward_hook(
                        lambda m, a, o, j=j: store.__setitem__(j, o[0].detach())
                    )
                )
            elif component == "head_z":
                handles.append(
                    layer.self_attn.o_proj.register_forward_pre_hook(
                        lambda m, a, j=j: store.__setitem__(
                            j, a[0][0].detach().reshape(a[0].shape[1], self.n_heads, self.d_head).clone()
                        )
                    )
                )
        return handles

    def capture(
        self, tokens: Tensor, component: str, layers: Sequence[int], answer_pos: int, good: int, bad: int
    ) -> Capture:
        """One full run: per-layer residuals, keys/values, the component's activations, answer metrics."""
        self.check_length(len(tokens))
        dev = self.device
        ids = tokens[None].to(dev)
        n_pos = ids.shape[1]
        store: dict[int, Tensor] = {}
        kv = CaptureKV(self.n_layers)
        handles = self._hooks_for_capture(component, store)
        try:
            with torch.no_grad():
                hidden = self.inner.embed_tokens(ids)
                pos_ids = torch.arange(n_pos, device=dev)[None]
                rope = self.rope(hidden, pos_ids)
                resid = []
                masks = self.masks(0, n_pos - 1, hidden.dtype)
                for j, layer in enumerate(self.layers):
                    resid.append(hidden[0])
                    hidden = layer_out(
                        layer(
                            hidden,
                            attention_mask=masks[j],
                            position_ids=pos_ids,
                            past_key_values=kv,
                            use_cache=True,
                            position_embeddings=rope[self.layer_types[j]],
                        )
                    )
                resid.append(hidden[0])
                logits = self.logits(hidden[:, answer_pos])[0]
        finally:
            for h in handles:
                h.remove()
        if component == "resid_pre":
            acts = {j: resid[j] for j in layers}
        elif component == "resid_post":
            acts = {j: resid[j + 1] for j in layers}
        elif component == "resid_mid":
            acts = {j: resid[j] + store[j] for j in layers}  # store: what attention adds to the stream
        else:
            acts = {j: store[j] for j in layers}
        ld, prob, top1 = metrics_row(logits, good, bad)
        return Capture(
            acts=acts,
            ld=ld,
            prob=prob,
            top1=top1,
            resid=resid,
            keys=kv.keys,
            values=kv.values,
            rope=rope,
        )

    def verify(self, tokens: Tensor, answer_pos: int, capture_logits_fn: Callable[[], Tensor]) -> float:
        """Max |twin - bridge| over the answer-position logits, relative to max(1, max |logit|)."""
        with torch.no_grad():
            ref = self.bridge(tokens[None].to(self.device))[0, answer_pos].float()
            ours = capture_logits_fn().float()
        return float((ref - ours).abs().max() / ref.abs().max().clamp_min(1.0))

    def answer_logits(self, tokens: Tensor, answer_pos: int) -> Tensor:
        """The twin's logits at ``answer_pos`` of one plain run (no cache, no hooks)."""
        dev = self.device
        ids = tokens[None].to(dev)
        with torch.no_grad():
            hidden = self.inner.embed_tokens(ids)
            pos_ids = torch.arange(ids.shape[1], device=dev)[None]
            rope = self.rope(hidden, pos_ids)
            masks = self.masks(0, ids.shape[1] - 1, hidden.dtype)
            for j, layer in enumerate(self.layers):
                hidden = layer_out(
                    layer(
                        hidden,
                        attention_mask=masks[j],
                        position_ids=pos_ids,
                        past_key_values=None,
                        use_cache=False,
                        position_embeddings=rope[self.layer_types[j]],
                    )
                )
            return self.logits(hidden[:, answer_pos])[0]

    def run_cells(
        self,
        job: Job,
        src: Capture,
        dst: Capture,
        component: str,
        cells: Sequence[Cell],
        batch_cells: int,
        out: tuple[Tensor, Tensor, Tensor],
        desc: str,
    ) -> None:
        """Run ``cells`` in batches grouped by start position (:func:`fast_batches`); write metrics into ``out``."""
        if not cells:
            return
        a = job.dst_answer_pos
        mix = self.device.type != "cpu" if MIX_START_POSITIONS is None else MIX_START_POSITIONS
        batches = fast_batches(cells, component, batch_cells, mix, self.n_layers)
        for batch in progress(batches, desc=desc, unit="batch", leave=False):
            self._run_batch(job, src, dst, component, batch, a, out)

    def _run_batch(
        self,
        job: Job,
        src: Capture,
        dst: Capture,
        component: str,
        batch: list[Cell],
        a: int,
        out: tuple[Tensor, Tensor, Tensor],
    ) -> None:
        assert dst.resid is not None and dst.keys is not None and dst.values is not None
        assert dst.rope is not None
        dev = self.device
        start = min(min(c.dst) for c in batch)
        n = a - start + 1
        pos_ids = torch.arange(start, a + 1, device=dev)[None]
        rope = {t: (cos[:, start : a + 1], sin[:, start : a + 1]) for t, (cos, sin) in dst.rope.items()}
        masks = self.masks(start, a, dst.resid[0].dtype)
        cache = PrefixKV(dst.keys, dst.values, start)  # type: ignore[arg-type]
        joins: dict[int, list[Cell]] = {}
        for c in batch:
            joins.setdefault(join_layer(component, c.layer), []).append(c)
        order: list[Cell] = []
        hidden: Tensor | None = None
        with torch.no_grad():
            for j in range(min(joins), self.n_layers + 1):
                new = joins.get(j, [])
                offset = 0 if hidden is None else hidden.shape[0]
                if new:
                    h_new = dst.resid[j][start : a + 1][None].expand(len(new), n, -1).clone()
                    if component in ("resid_pre", "resid_post"):
                        for r, c in enumerate(new):
                            for sp, dp in zip(c.src, c.dst):
                                h_new[r, dp - start] = src.acts[c.layer][sp]
                    hidden = h_new if hidden is None else torch.cat([hidden, h_new], dim=0)
                    order.extend(new)
                if j == self.n_layers:
                    break
                assert hidden is not None
                handle = None
                if new and component not in ("resid_pre", "resid_post"):
                    handle = self._in_layer_patch(component, j, new, offset, start, src, dst)
                try:
                    hidden = layer_out(
                        self.layers[j](
                            hidden,
                            attention_mask=masks[j],
                            position_ids=pos_ids,
                            past_key_values=cache,
                            use_cache=True,
                            position_embeddings=rope[self.layer_types[j]],
                        )
                    )
                finally:
                    if handle is not None:
                        handle.remove()
            assert hidden is not None
            logits = self.logits(hidden[:, -1])
        ld, prob, top1 = answer_metrics(logits, job.good, job.bad)
        li = torch.tensor([c.li for c in order], device=ld.device)
        ci = torch.tensor([c.ci for c in order], device=ld.device)
        out[0][li, ci], out[1][li, ci], out[2][li, ci] = ld, prob, top1

    def _in_layer_patch(
        self, component: str, j: int, new: list[Cell], offset: int, start: int, src: Capture, dst: Capture
    ) -> Any:
        rows, idx, heads, vals = [], [], [], []
        for r, c in enumerate(new):
            for sp, dp in zip(c.src, c.dst):
                rows.append(offset + r)
                idx.append(dp - start)
                heads.append(c.head)
                v = src.acts[j][sp]
                if component == "resid_mid":
                    assert dst.resid is not None
                    v = v - dst.resid[j][dp]  # attn_out that turns this row's resid_mid into the source's
                vals.append(v if c.head is None else v[c.head])
        dev = self.device
        heads_t = None if component != "head_z" else torch.tensor(heads, device=dev)
        return self.register_setter(j, component, torch.tensor(rows, device=dev), torch.tensor(idx, device=dev),
                                    torch.stack(vals), heads_t)

    def register_setter(self, j: int, component: str, rows: Tensor, idx: Tensor, vals: Tensor,
                        heads: Tensor | None = None) -> Any:
        """A hook on layer ``j`` writing ``vals`` into ``[rows, idx(, heads)]``; returns its handle.

        ``component``: ``"head_z"`` (a head's ``z``, the input of ``o_proj``; ``heads`` required), or what
        attention (``"attn_out"`` / ``"resid_mid"``) or the MLP (``"mlp_out"``) adds to the residual stream
        (Gemma-2/3: after its output norm).
        """
        layer = self.layers[j]
        if component != "head_z":
            target = self.mlp_to_resid(layer) if component == "mlp_out" else self.attn_to_resid(layer)

            def set_hook(m: Any, args: Any, output: Any) -> Any:
                layer_out(output)[rows, idx] = vals.to(layer_out(output).dtype)
                return output

            return target.register_forward_hook(set_hook)
        assert heads is not None
        n_heads, d_head = self.n_heads, self.d_head

        def z_hook(m: Any, args: Any) -> Any:
            x = args[0]
            z = x.reshape(x.shape[0], x.shape[1], n_heads, d_head).clone()
            z[rows, idx, heads] = vals.to(z.dtype)
            return (z.reshape(x.shape),) + tuple(args[1:])

        return layer.self_attn.o_proj.register_forward_pre_hook(z_hook)


def layer_out(x: Any) -> Tensor:
    """The hidden states of a decoder layer's output (first element of a tuple, or the tensor itself)."""
    return x[0] if isinstance(x, tuple) else x


def join_layer(component: str, layer: int) -> int:
    """First layer the fast engine must recompute for a cell at ``layer``."""
    return layer + 1 if component == "resid_post" else layer


def fast_batches(cells: Sequence[Cell], component: str, batch_cells: int, mix: bool, n_layers: int) -> list[list[Cell]]:
    """Group cells by start position (exact FLOPs on CPU); on accelerators also merge neighbours."""
    ordered = sorted(cells, key=lambda c: (min(c.dst), join_layer(component, c.layer), c.li, c.ci))
    batches: list[list[Cell]] = []
    for c in ordered:
        if batches and len(batches[-1]) < batch_cells and (mix or min(batches[-1][0].dst) == min(c.dst)):
            batches[-1].append(c)
        else:
            batches.append([c])
    return batches
