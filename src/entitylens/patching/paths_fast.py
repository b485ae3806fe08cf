"""Path patching on the fast engine's twin: both steps recompute only what the patch can change.

The same two steps as :mod:`entitylens.patching.paths` (the reference, on the bridge's hooks), run on the
plain Hugging Face twin of :class:`~entitylens.patching.engine_fast.TwinRunner` with causal reuse:

* step 1 (one row per sender): a sender at layer ``l`` and position ``p`` cannot change anything at
  positions ``< p`` or layers ``< l``, so it starts from the corrupted run's residual stream at layer ``l``
  for positions ``p..`` (keys and values before ``p`` from the corrupted run), patches the sender, freezes
  every later head (``o_proj``'s input set to the corrupted run's ``z``; MLPs too with ``freeze_mlps``) and
  stops after the last receiver's layer, recording each receiver's input (the residual stream, or the
  ``q_proj`` / ``k_proj`` / ``v_proj`` output: the bridge's pre-rotary ``hook_q`` / ``hook_k`` / ``hook_v``);
* step 2 (one row per cell): only the receiver's input changes, at positions from the later of the
  sender's and the receiver's, so each cell starts at the receiver's layer and that position. A receiver
  position before the sender's, or after the answer, is an exact no-op (the corrupted run's metric).

Rows of a batch share their start position and layer. Same numbers as the reference (tested to 1e-5 on
tiny models; the benchmark checks SmolLM2 to 1e-4).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from entitylens.patching.engine_fast import CaptureKV, PrefixKV, TwinRunner, layer_out
from entitylens.patching.paths import reads_after
from entitylens.patching.sites import Site, site_positions
from entitylens.patching.types import PatchPair

__all__ = ["FastPaths", "fast_path_grid"]


@dataclass
class _Run:
    """One full run on the twin: residual stream per layer, keys/values, rotary tables, z, sublayer outputs."""

    resid: list[Tensor]  # [T, d] entering each layer, then the final one
    keys: list[Tensor]
    values: list[Tensor]
    rope: dict[str, tuple[Tensor, Tensor]]
    z: list[Tensor]  # [T, H, dh]
    attn: list[Tensor]  # [T, d] what attention adds to the stream
    mlp: list[Tensor]  # [T, d] what the MLP adds
    answer_logits: Tensor


class FastPaths:
    """Path patching on a :class:`~entitylens.patching.engine_fast.TwinRunner` (see the module docstring)."""

    def __init__(self, runner: TwinRunner) -> None:
        self.r = runner
        self.proj = {"q": "q_proj", "k": "k_proj", "v": "v_proj"}

    def capture(self, tokens: Tensor, answer_pos: int) -> _Run:
        """A full run recording everything both steps read."""
        r = self.r
        L = r.n_layers
        z: list[Tensor | None] = [None] * L
        attn: list[Tensor | None] = [None] * L
        mlp: list[Tensor | None] = [None] * L
        handles = []
        for j, layer in enumerate(r.layers):
            handles.append(layer.self_attn.o_proj.register_forward_pre_hook(
                lambda m, a, j=j: z.__setitem__(j, a[0][0].reshape(a[0].shape[1], r.n_heads, r.d_head).clone())))
            handles.append(r.attn_to_resid(layer).register_forward_hook(
                lambda m, a, o, j=j: attn.__setitem__(j, layer_out(o)[0].detach().clone())))
            handles.append(r.mlp_to_resid(layer).register_forward_hook(
                lambda m, a, o, j=j: mlp.__setitem__(j, layer_out(o)[0].detach().clone())))
        kv = CaptureKV(L)
        dev = r.device
        try:
            with torch.no_grad():
                hidden = r.inner.embed_tokens(tokens[None].to(dev))
                n = hidden.shape[1]
                pos_ids = torch.arange(n, device=dev)[None]
                rope = r.rope(hidden, pos_ids)
                masks = r.masks(0, n - 1, hidden.dtype)
                resid = []
                for j, layer in enumerate(r.layers):
                    resid.append(hidden[0])
                    hidden = layer_out(layer(hidden, attention_mask=masks[j], position_ids=pos_ids,
                                             past_key_values=kv, use_cache=True,
                                             position_embeddings=rope[r.layer_types[j]]))
                resid.append(hidden[0])
                logits = r.logits(hidden[:, answer_pos])[0]
        finally:
            for h in handles:
                h.remove()
        return _Run(resid=resid, keys=kv.keys, values=kv.values, rope=rope, z=z, attn=attn, mlp=mlp,  # type: ignore[arg-type]
                    answer_logits=logits)

    def run_layers(self, run: _Run, start: int, end: int, j0: int, j1: int, hidden: Tensor,
                hooks: Callable[[int], list[Any]], record: Callable[[int, Tensor], None] | None = None) -> Tensor:
        """Run layers ``j0..j1-1`` on positions ``start..end`` (keys/values before ``start`` from ``run``)."""
        r = self.r
        dev = r.device
        pos_ids = torch.arange(start, end + 1, device=dev)[None]
        rope = {t: (c[:, start:end + 1], s[:, start:end + 1]) for t, (c, s) in run.rope.items()}
        masks = r.masks(start, end, hidden.dtype)
        cache = PrefixKV(run.keys, run.values, start)
        for j in range(j0, j1):
            if record is not None:
                record(j, hidden)
            handles = hooks(j)
            try:
                hidden = layer_out(r.layers[j](hidden, attention_mask=masks[j], position_ids=pos_ids,
                                               past_key_values=cache, use_cache=True,
                                               position_embeddings=rope[r.layer_types[j]]))
            finally:
                for h in handles:
                    h.remove()
        if record is not None:
            record(j1, hidden)
        return hidden

    def step1(self, p: PatchPair, clean: _Run, corr: _Run, senders: Sequence[Site], receivers: Sequence[Site],
              freeze_mlps: bool) -> tuple[int, dict[Site, Tensor]]:
        """One batch of senders sharing layer and position: each receiver's input ``[rows, T - start, ...]``."""
        r = self.r
        s0 = senders[0]
        start = int(site_positions(p, s0.role, "corrupted").min())
        end = len(p.corrupted_tokens) - 1
        ls = s0.layer
        last = max(x.layer + (0 if x.component == "resid_pre" else 1) for x in receivers)
        last = min(max(last, ls + 1), r.n_layers)
        B = len(senders)
        hidden = corr.resid[ls][start:end + 1][None].expand(B, -1, -1).clone()
        out: dict[Site, Tensor] = {}
        n_heads, d_head = r.n_heads, r.d_head

        def hooks(j: int) -> list[Any]:
            layer = r.layers[j]
            hs = []
            if j == ls:
                hs.append(self._sender_hook(j, senders, p, clean, start))
            if j > ls:
                zc = corr.z[j][start:end + 1]

                def freeze_z(m: Any, a: Any, zc: Tensor = zc) -> Any:
                    x = a[0]
                    return (zc.reshape(1, zc.shape[0], n_heads * d_head).expand(x.shape[0], -1, -1).to(x.dtype),)

                hs.append(layer.self_attn.o_proj.register_forward_pre_hook(freeze_z))
            if freeze_mlps and (j > ls or s0.component != "mlp_out"):
                mc = corr.mlp[j][start:end + 1]

                def freeze_mlp(m: Any, a: Any, o: Any, mc: Tensor = mc) -> Any:
                    layer_out(o)[:] = mc.to(layer_out(o).dtype)
                    return o

                hs.append(r.mlp_to_resid(layer).register_forward_hook(freeze_mlp))
            for x in receivers:
                if x.component in self.proj and x.layer == j:
                    mod = getattr(layer.self_attn, self.proj[x.component])
                    hs.append(mod.register_forward_hook(lambda m, a, o, x=x: out.__setitem__(x, o.detach().clone())))
            return hs

        def record(j: int, h: Tensor) -> None:
            for x in receivers:
                if (x.component == "resid_pre" and x.layer == j) or (x.component == "resid_post" and x.layer + 1 == j):
                    out[x] = h.detach().clone()

        with torch.no_grad():
            self.run_layers(corr, start, end, ls, last, hidden, hooks, record)
        return start, out

    def _sender_hook(self, j: int, senders: Sequence[Site], p: PatchPair, clean: _Run, start: int) -> Any:
        """The senders' clean values written at layer ``j`` (rows share the component)."""
        rows, idx, heads, vals = [], [], [], []
        for row, s in enumerate(senders):
            src, dst = site_positions(p, s.role, "clean"), site_positions(p, s.role, "corrupted")
            table = clean.z if s.component == "head" else clean.attn if s.component == "attn_out" else clean.mlp
            for sp, dp in zip(src.tolist(), dst.tolist(), strict=True):
                rows.append(row)
                idx.append(dp - start)
                heads.append(s.head or 0)
                v = table[s.layer][sp]
                vals.append(v if s.component != "head" else v[s.head])
        dev = self.r.device
        comp = {"head": "head_z"}.get(senders[0].component, senders[0].component)
        return self.r.register_setter(j, comp, torch.tensor(rows, device=dev), torch.tensor(idx, device=dev),
                                      torch.stack(vals), torch.tensor(heads, device=dev))

    def step2(self, p: PatchPair, corr: _Run, cells: Sequence[tuple[Site, Tensor, Tensor]], start: int,
              join: int) -> Tensor:
        """Answer logits ``[rows, V]`` of cells ``(receiver, positions, values)`` sharing ``start`` and ``join``."""
        r = self.r
        a = p.corrupted_answer_pos
        B = len(cells)
        hidden = corr.resid[join][start:a + 1][None].expand(B, -1, -1).clone()
        d_head = r.d_head
        for row, (x, pos, val) in enumerate(cells):
            if x.component in ("resid_pre", "resid_post"):
                hidden[row, pos - start] = val.to(hidden.dtype)

        def hooks(j: int) -> list[Any]:
            hs = []
            for row, (x, pos, val) in enumerate(cells):
                if x.component in self.proj and x.layer == j:
                    assert x.head is not None
                    sl = slice(x.head * d_head, (x.head + 1) * d_head)

                    def set_proj(m: Any, args: Any, o: Tensor, row: int = row, pos: Tensor = pos, val: Tensor = val,
                                 sl: slice = sl) -> Tensor:
                        o = o.clone()
                        o[row, pos - start, sl] = val[:, sl].to(o.dtype)
                        return o

                    hs.append(getattr(r.layers[j].self_attn, self.proj[x.component]).register_forward_hook(set_proj))
            return hs

        with torch.no_grad():
            hidden = self.run_layers(corr, start, a, join, r.n_layers, hidden, hooks)
            return r.logits(hidden[:, -1])


def fast_path_grid(fp: FastPaths, p: PatchPair, senders: Sequence[Site], receivers: Sequence[Site],
                   freeze_mlps: bool, batch: int) -> tuple[Tensor, Tensor, Tensor]:
    """One pair's ``[sender, receiver]`` answer logits rows, and its clean and corrupted answer logits.

    Returns:
        ``([S, R, V] logits (nan where the receiver cannot read the sender), clean [V], corrupted [V])``.
    """
    clean = fp.capture(p.clean_tokens, p.clean_answer_pos)
    corr = fp.capture(p.corrupted_tokens, p.corrupted_answer_pos)
    S, R = len(senders), len(receivers)
    V = corr.answer_logits.shape[-1]
    out = torch.full((S, R, V), float("nan"), dtype=corr.answer_logits.dtype, device=corr.answer_logits.device)
    # step 1: senders grouped by (layer, start position, component), rows of a forward share them
    groups: dict[tuple[int, int, str], list[int]] = {}
    for si, s in enumerate(senders):
        key = (s.layer, int(site_positions(p, s.role, "corrupted").min()), s.component)
        groups.setdefault(key, []).append(si)
    inputs: dict[int, tuple[int, dict[Site, Tensor], int]] = {}  # sender -> (start, recordings, row)
    for idx in groups.values():
        for b0 in range(0, len(idx), batch):
            chunk = idx[b0:b0 + batch]
            start, rec = fp.step1(p, clean, corr, [senders[i] for i in chunk], receivers, freeze_mlps)
            for row, si in enumerate(chunk):
                inputs[si] = (start, rec, row)
    # step 2: cells grouped by (start, join layer); no-op cells take the corrupted run's logits
    a = p.corrupted_answer_pos
    todo: dict[tuple[int, int], list[tuple[int, int, Site, Tensor, Tensor]]] = {}
    for si, s in enumerate(senders):
        start_s, rec, row = inputs[si]
        for ri, x in enumerate(receivers):
            if not reads_after(s, x):
                continue
            pos = site_positions(p, x.role, "corrupted")
            pos = pos[pos >= start_s]
            if len(pos) == 0 or int(pos.min()) > a:
                out[si, ri] = corr.answer_logits
                continue
            val = rec[x][row][(pos - start_s).to(rec[x].device)]
            join = x.layer + (1 if x.component == "resid_post" else 0)
            todo.setdefault((int(pos.min()), join), []).append((si, ri, x, pos.to(val.device), val))
    for (start, join), cells in sorted(todo.items()):
        for b0 in range(0, len(cells), batch):
            part = cells[b0:b0 + batch]
            logits = fp.step2(p, corr, [(c[2], c[3], c[4]) for c in part], start, join)
            for k, c in enumerate(part):
                out[c[0], c[1]] = logits[k]
    return out, clean.answer_logits, corr.answer_logits
