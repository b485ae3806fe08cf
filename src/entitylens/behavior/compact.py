"""The compact protocol's answers, decoded by the one decode loop of :mod:`entitylens.behavior.decode`.

For every (state, box) the prompt is the compact context followed by ``| Bk``
(:class:`entitylens.task.compact.CompactProtocol`); the model greedily writes at most ``max_objects + 1``
tokens and the answer is what precedes the first ``;``. The decode loop runs in unconstrained mode with
``;`` as its stop string and ``pad=False`` -- prompts are batched only with prompts of the same token length
(the 7 prompts of a state always share one), so no row is ever padded and a batch of one gives the same
answers as a batch of many. The answers are assembled into K&S statements and scored by the paper's scorer
(:func:`entitylens.behavior.evaluate.evaluate`), so ``entitylens eval --protocol compact`` writes the same
four outputs as the paper's protocol.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from entitylens.behavior.decode import DecodeConfig, generate_statements
from entitylens.behavior.evaluate import Predictor
from entitylens.errors import EntitylensError
from entitylens.task.compact import COMPACT, CompactProtocol, statement_from_answers
from entitylens.task.types import State


@dataclass(frozen=True)
class CompactDecoding:
    """How compact answers are decoded.

    Attributes:
        batch_size: Prompts per forward pass.
        backend: ``"hf"`` runs the Hugging Face model inside the bridge (SDPA, no hooks; the decode loop's
            ``"hf"`` backend), ``"bridge"`` the bridge's own modules (eager attention, hooks fire; the
            ``"hooked"`` backend) -- slower, with the same answers (tested).
        threads: ``torch.set_num_threads`` while decoding, restored afterwards (``None``: leave it). The
            testbed models are tiny: on a busy CPU one thread is tens of times faster than several.
    """

    batch_size: int = 64
    backend: str = "hf"
    threads: int | None = 1

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise EntitylensError(f"batch_size={self.batch_size} must be >= 1; pass a positive value")
        if self.backend not in ("hf", "bridge"):
            raise EntitylensError(f"unknown compact backend {self.backend!r}; use 'hf' or 'bridge'")
        if self.threads is not None and self.threads < 1:
            raise EntitylensError(f"threads={self.threads} must be >= 1 or None")


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def compact_answers(
    model: Any,
    states: Sequence[State],
    protocol: CompactProtocol = COMPACT,
    decoding: CompactDecoding | None = None,
    *,
    tokenizer: Any = None,
) -> list[list[tuple[str, ...] | None]]:
    """Per state and box, the model's parsed compact answer (``None`` when invalid).

    Args:
        model: A ``TransformerBridge`` (e.g. ``load_model("testbed:stem")``) or a Hugging Face causal LM.
        states: The states.
        protocol: The compact protocol.
        decoding: Batch size, backend and threads (default :class:`CompactDecoding`).
        tokenizer: The tokenizer when ``model`` carries none (a plain HF model).

    Returns:
        ``answers[i][b]`` for state ``i`` and box ``b``.
    """
    decoding = decoding or CompactDecoding()
    prompts = [protocol.prompt(s, b) for s in states for b in range(s.num_boxes)]
    config = DecodeConfig(
        mode="unconstrained", stop_strings=(";",), max_new_tokens=protocol.max_new_tokens,
        batch_size=decoding.batch_size, backend="hooked" if decoding.backend == "bridge" else "hf", pad=False,
    )  # fmt: skip
    with _threads(decoding.threads):
        gens = generate_statements(model, prompts, config, None, tokenizer=tokenizer)
    out: list[list[tuple[str, ...] | None]] = []
    pos = 0
    for s in states:
        row = []
        for g in gens[pos : pos + s.num_boxes]:
            row.append(protocol.parse_answer(g.text + " ;") if g.stop == ";" else None)
        out.append(row)
        pos += s.num_boxes
    return out


def compact_predictor(
    model: Any, protocol: CompactProtocol = COMPACT, decoding: CompactDecoding | None = None
) -> Predictor:
    """A predictor for :func:`entitylens.behavior.evaluate.evaluate` running the compact protocol.

    Args:
        model: A loaded model whose tokenizer knows the compact words (the testbed models).
        protocol: The compact protocol.
        decoding: How to decode.

    Returns:
        Maps states to ``(statement, truncated)``; ``truncated`` is always False (answers are short: an
        answer without its ``;`` within the budget is invalid, not truncated).
    """

    def predict(states: Sequence[State]) -> list[tuple[str, bool]]:
        return [(statement_from_answers(a), False) for a in compact_answers(model, states, protocol, decoding)]

    return predict


__all__ = ["CompactDecoding", "compact_answers", "compact_predictor"]
