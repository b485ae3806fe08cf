"""Helpers shared by the decoding tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


@contextmanager
def separator_bias(model: Any, bias: float = 6.0) -> Iterator[Any]:
    """Add a logit bias on ``","`` and ``"."`` to ``model``'s unembedding so statements complete.

    A random tiny model almost never ends a box; a constant bias on the two separator tokens makes it end
    boxes after a few words. The bias is a parameter of the unembedding's ``nn.Linear`` (so the bridge, the
    plain HF model and outlines all see it) and is removed afterwards: a shared model is left as found.
    """
    tok = model.tokenizer
    head = model.original_model.lm_head
    lin = getattr(head, "original_component", head)
    assert isinstance(lin, torch.nn.Linear)
    ids = [tok.convert_tokens_to_ids(sep) for sep in (",", ".")]
    created = lin.bias is None
    if created:
        lin.bias = torch.nn.Parameter(torch.zeros(lin.weight.shape[0]), requires_grad=False)
    saved = lin.bias.detach().clone()
    with torch.no_grad():
        lin.bias[ids] += bias  # in place: every alias of the bias (the bridge's b_U) sees it
    try:
        yield model
    finally:
        with torch.no_grad():
            lin.bias.copy_(saved)
        if created:
            lin.bias = None
