"""Patching metrics: logit difference, its clean/corrupted normalisation, answer probability, top-1.

All functions work on the logits at the answer position only (``[batch, d_vocab]``), so a patching
engine never has to materialise logits for every position. The metric of a patched run is the
*logit difference* between the clean answer's and the corrupted answer's first distinguishing token,

    ``ld = logit[clean_answer] - logit[corrupted_answer]``,

normalised so that 1 means "behaves like the clean run" and 0 "behaves like the corrupted run":

    ``normalised = (ld - ld_corrupted) / (ld_clean - ld_corrupted)``.

A pair whose clean and corrupted logit differences coincide has no scale; its normalised values are
``nan`` (never a silent ``inf``).
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

__all__ = ["answer_metrics", "answer_probability", "logit_diff", "normalise", "top1_correct"]


def logit_diff(
    logits: Float[Tensor, "batch d_vocab"],
    clean_answer: Int[Tensor, " batch"] | int,
    corrupted_answer: Int[Tensor, " batch"] | int,
) -> Float[Tensor, " batch"]:
    """Logit of the clean answer minus logit of the corrupted answer, per row.

    Args:
        logits: Logits at the answer position.
        clean_answer: Token id of the clean answer's first distinguishing token (per row or shared).
        corrupted_answer: Token id of the corrupted answer's first distinguishing token.

    Returns:
        ``logits[i, clean_answer[i]] - logits[i, corrupted_answer[i]]`` in float32.
    """
    logits = logits.float()
    good = _as_index(clean_answer, logits)
    bad = _as_index(corrupted_answer, logits)
    return logits.gather(1, good[:, None])[:, 0] - logits.gather(1, bad[:, None])[:, 0]


def answer_probability(
    logits: Float[Tensor, "batch d_vocab"], answer: Int[Tensor, " batch"] | int
) -> Float[Tensor, " batch"]:
    """Softmax probability of ``answer`` at the answer position (computed in float32)."""
    logits = logits.float()
    idx = _as_index(answer, logits)
    return (logits.gather(1, idx[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)).exp()


def top1_correct(logits: Float[Tensor, "batch d_vocab"], answer: Int[Tensor, " batch"] | int) -> Bool[Tensor, " batch"]:
    """Whether ``answer`` is the arg-max token (ties count as correct only if ``answer`` is first)."""
    return logits.argmax(dim=-1) == _as_index(answer, logits)


def answer_metrics(
    logits: Float[Tensor, "batch d_vocab"],
    clean_answer: Int[Tensor, " batch"] | int,
    corrupted_answer: Int[Tensor, " batch"] | int,
) -> tuple[Float[Tensor, " batch"], Float[Tensor, " batch"], Bool[Tensor, " batch"]]:
    """Logit difference, clean-answer probability and top-1 accuracy in one call.

    Args:
        logits: Logits at the answer position.
        clean_answer: Clean answer token id(s).
        corrupted_answer: Corrupted answer token id(s).

    Returns:
        ``(logit_diff, probability of the clean answer, clean answer is top-1)``.
    """
    return (
        logit_diff(logits, clean_answer, corrupted_answer),
        answer_probability(logits, clean_answer),
        top1_correct(logits, clean_answer),
    )


def normalise(
    value: Float[Tensor, "*shape"],
    clean: Float[Tensor, "*base"] | float,
    corrupted: Float[Tensor, "*base"] | float,
) -> Float[Tensor, "*shape"]:
    """``(value - corrupted) / (clean - corrupted)``: 1 = clean behaviour, 0 = corrupted behaviour.

    ``clean`` and ``corrupted`` broadcast against ``value`` from the left (a per-pair baseline of shape
    ``[pair]`` normalises a ``[pair, layer, cell]`` grid). Where ``clean == corrupted`` the result is
    ``nan``.

    Args:
        value: Logit differences of patched runs.
        clean: Logit difference of the clean (source) run.
        corrupted: Logit difference of the corrupted (target) run.

    Returns:
        The normalised values, float32.
    """
    value = torch.as_tensor(value).float()
    clean_t = torch.as_tensor(clean, device=value.device).float()
    corr_t = torch.as_tensor(corrupted, device=value.device).float()
    extra = value.ndim - clean_t.ndim
    if extra < 0:
        raise ValueError("normalise: baselines have more dimensions than the values")
    clean_t = clean_t.reshape(*clean_t.shape, *([1] * extra))
    corr_t = corr_t.reshape(*corr_t.shape, *([1] * extra))
    gap = clean_t - corr_t
    safe = torch.where(gap == 0, torch.ones_like(gap), gap)
    out = (value - corr_t) / safe
    return torch.where(gap == 0, torch.full_like(out, float("nan")), out)


def _as_index(answer: Tensor | int, logits: Tensor) -> Tensor:
    idx = torch.as_tensor(answer, dtype=torch.long, device=logits.device)
    if idx.ndim == 0:
        idx = idx.expand(logits.shape[0])
    return idx
