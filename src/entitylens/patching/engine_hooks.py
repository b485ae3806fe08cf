"""The reference engine: ``run_with_hooks`` on the ``TransformerBridge``, many cells per forward.

Cells are stacked along the batch dimension, each row with its own layer, positions and head; every row
recomputes the whole prompt. ``PatchResult.path`` is :data:`~entitylens.patching.types.PATH_HOOKS`. The fast
engine (:mod:`entitylens.patching.engine_fast`) falls back to this one when it cannot run a model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from entitylens.patching.jobs import Capture, Cell, Job, metrics_row
from entitylens.patching.metric import answer_metrics
from entitylens.patching.types import PATH_HOOKS, hook_name
from entitylens.progress import progress

__all__ = ["HookRunner", "make_setter"]


class HookRunner:
    """Patches cells on the bridge itself through its hooks (see the module docstring).

    Args:
        bridge: A ``TransformerBridge``.
    """

    path = PATH_HOOKS

    def __init__(self, bridge: Any) -> None:
        self.bridge = bridge
        self.n_layers = int(bridge.cfg.n_layers)
        self.d_vocab = int(bridge.cfg.d_vocab)

    @property
    def device(self) -> torch.device:
        """The device of the bridge's parameters."""
        return next(self.bridge.parameters()).device

    def capture(
        self, tokens: Tensor, component: str, layers: Sequence[int], answer_pos: int, good: int, bad: int
    ) -> Capture:
        """One full unpatched run with a cache of the component (and ``resid_pre`` for ``resid_mid``)."""
        names = {hook_name(component, layer): layer for layer in layers}
        pre = {hook_name("resid_pre", layer): layer for layer in layers} if component == "resid_mid" else {}
        with torch.no_grad():
            logits, cache = self.bridge.run_with_cache(
                tokens[None].to(self.device), names_filter=lambda n: n in names or n in pre
            )
        acts = {layer: cache[name][0].detach() for name, layer in names.items()}
        ld, prob, top1 = metrics_row(logits[0, answer_pos], good, bad)
        cap = Capture(acts=acts, ld=ld, prob=prob, top1=top1)
        if pre:
            cap.pre = {layer: cache[name][0].detach() for name, layer in pre.items()}
        return cap

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
        """Run ``cells`` in batches of at most ``batch_cells`` rows; write their metrics into ``out``."""
        if not cells:
            return
        dev = self.device
        tokens = job.dst_tokens.to(dev)
        n_pos = len(tokens)
        # Logits of every row and position are materialised: cap rows at ~512 MiB of fp32 logits.
        cap = max(1, min(batch_cells, (1 << 27) // max(1, n_pos * self.d_vocab)))
        batches = [cells[i : i + cap] for i in range(0, len(cells), cap)]
        for batch in progress(batches, desc=desc, unit="batch", leave=False):
            by_layer: dict[int, list[tuple[int, int, int, int | None]]] = {}
            for row, cell in enumerate(batch):
                for sp, dp in zip(cell.src, cell.dst):
                    by_layer.setdefault(cell.layer, []).append((row, sp, dp, cell.head))
            if component == "resid_mid":
                # The bridge's hook_resid_mid aliases ln2.hook_in: a value returned there feeds the MLP but
                # not the residual stream. Patch the stream itself: set attn_out to (source mid - target pre).
                assert dst.pre is not None  # capture() records resid_pre for resid_mid
                hooks = [
                    (hook_name("attn_out", layer), make_setter(entries, src.acts[layer], dst.pre[layer]))
                    for layer, entries in by_layer.items()
                ]
            else:
                hooks = [
                    (hook_name(component, layer), make_setter(entries, src.acts[layer]))
                    for layer, entries in by_layer.items()
                ]
            with torch.no_grad():
                logits = self.bridge.run_with_hooks(tokens[None].expand(len(batch), n_pos), fwd_hooks=hooks)
            ld, prob, top1 = answer_metrics(logits[:, job.dst_answer_pos], job.good, job.bad)
            li = torch.tensor([c.li for c in batch], device=ld.device)
            ci = torch.tensor([c.ci for c in batch], device=ld.device)
            out[0][li, ci], out[1][li, ci], out[2][li, ci] = ld, prob, top1


def make_setter(
    entries: list[tuple[int, int, int, int | None]], source: Tensor, minus: Tensor | None = None
) -> Callable[..., Tensor]:
    """A bridge hook writing ``source[src_pos(, head)]`` (minus ``minus[dst_pos]``) into rows/positions(/heads)."""
    dev = source.device
    rows = torch.tensor([e[0] for e in entries], device=dev)
    sps = torch.tensor([e[1] for e in entries], device=dev)
    dps = torch.tensor([e[2] for e in entries], device=dev)
    if entries[0][3] is None:
        values = source[sps] if minus is None else source[sps] - minus[dps]

        def hook(act: Tensor, hook: Any) -> Tensor:
            act = act.clone()
            act[rows, dps] = values.to(act.dtype)
            return act
    else:
        heads = torch.tensor([e[3] for e in entries], device=dev)
        values = source[sps, heads]

        def hook(act: Tensor, hook: Any) -> Tensor:
            act = act.clone()
            act[rows, dps, heads] = values.to(act.dtype)
            return act

    return hook
