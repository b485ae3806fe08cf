"""Shared-prefix ("cascade") attention for the batched decode steps of :class:`~entitylens.behavior.runners.KVRunner`.

Every row of a decode batch continues the same few-shot prefix. A plain batched cache holds one copy of the
prefix's keys and values per row, and every decode step reads all of them: at 32 rows and a 354-token
prefix that is most of the attention's memory traffic. Here the cache holds only each row's own tokens
(left-padded); the prefix's keys and values are kept once, and attention is computed in two parts merged
exactly by their softmax statistics:

    ``out = (exp(s_p - m) V_p + exp(s_s - m) V_s) / (sum exp(s_p - m) + sum exp(s_s - m))``

with ``s_p`` the scores against the shared prefix -- one matrix product per key/value head for the whole
batch -- ``s_s`` those against the row's own tokens (masked: padding, causality within a multi-token feed)
and ``m`` their joint maximum. This is softmax attention over the concatenated keys, computed in another
order: the logits agree with SDPA's to float rounding (not bit for bit), which
``tests/behavior/test_cascade.py`` bounds and the engine tests check at the statement level.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["CASCADE", "cascade_attention", "shared_prefix"]

CASCADE = "entitylens_cascade"
"""The attention implementation's name in transformers' registries."""

_PREFIX: contextvars.ContextVar[Sequence[tuple[Tensor, Tensor]] | None] = contextvars.ContextVar(
    "entitylens_cascade_prefix", default=None)
_REGISTERED = False


def cascade_attention(module: Any, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                      scaling: float | None = None, dropout: float = 0.0, **kwargs: Any) -> tuple[Tensor, None]:
    """Transformers' attention interface: the row's own keys from the cache, the shared prefix from the context.

    Args:
        module: The attention module (its ``layer_idx`` picks the prefix layer).
        query: ``[batch, heads, new, head_dim]``.
        key: ``[batch, kv_heads, own, head_dim]``: each row's own tokens (left-padded), the new ones included.
        value: Like ``key``.
        attention_mask: ``[batch, 1, new, own]`` boolean (True: attend) or additive, or ``None`` (all).
        scaling: Score scale (default ``head_dim ** -0.5``).
        dropout: Unused (inference only).
        kwargs: Ignored.

    Returns:
        ``([batch, new, heads, head_dim], None)``.
    """
    prefix = _PREFIX.get()
    if prefix is None:  # pragma: no cover - only reachable by registering the name by hand
        raise RuntimeError("cascade attention runs only inside shared_prefix()")
    kp, vp = prefix[module.layer_idx]  # [1, kv_heads, P, head_dim]
    dtype = query.dtype
    if dtype != torch.float32:  # scores, exponentials and sums in float32, as fused kernels accumulate
        query, key, value, kp, vp = (t.float() for t in (query, key, value, kp, vp))
    B, H, T, D = query.shape
    hk = key.shape[1]
    g = H // hk
    scale = D**-0.5 if scaling is None else scaling
    q = query.reshape(B, hk, g * T, D)  # heads of one key/value group are consecutive
    # Prefix: one product per key/value head for the whole batch ([hk, B*g*T, P]); it reads the prefix once.
    qh = q.transpose(0, 1).reshape(hk, B * g * T, D)
    sp = torch.bmm(qh, kp[0].transpose(1, 2)) * scale
    # Own tokens: per row, no head-group copies of the keys ([B, hk, g*T, own]).
    ss = torch.matmul(q, key.transpose(-1, -2)).mul_(scale).view(B, hk, g, T, -1)
    if attention_mask is not None:
        m = attention_mask[:, :, None]  # [B, 1, 1, T, own]
        ss = ss.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else ss + m
    mp = sp.amax(-1).view(hk, B, g * T).transpose(0, 1)  # [B, hk, g*T]
    mx = torch.maximum(mp, ss.amax(-1).view(B, hk, g * T))
    es = torch.exp(ss.view(B, hk, g * T, -1) - mx[..., None])
    ep = torch.exp(sp - mx.transpose(0, 1).reshape(hk, B * g * T)[..., None])
    den = es.sum(-1) + ep.sum(-1).view(hk, B, g * T).transpose(0, 1)
    op = torch.bmm(ep, vp[0]).view(hk, B, g * T, D).transpose(0, 1)
    out = (op + torch.matmul(es, value)) / den[..., None]  # [B, hk, g*T, D]
    return out.reshape(B, H, T, D).transpose(1, 2).to(dtype).contiguous(), None


def _register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CASCADE, cascade_attention)
    AttentionMaskInterface.register(CASCADE, sdpa_mask)
    _REGISTERED = True


@contextlib.contextmanager
def shared_prefix(hf: Any, prefix: Sequence[tuple[Tensor, Tensor]]) -> Iterator[None]:
    """Run ``hf``'s attention as cascade attention over ``prefix`` (per layer ``(keys, values)``, batch 1).

    Inside, the model's cache must hold only the rows' own tokens and its 2-D attention mask covers only
    them; positions stay absolute (pass ``position_ids``).
    """
    _register()
    config = hf.config
    saved = config._attn_implementation
    token = _PREFIX.set(prefix)
    config._attn_implementation = CASCADE
    try:
        yield
    finally:
        config._attn_implementation = saved
        _PREFIX.reset(token)
