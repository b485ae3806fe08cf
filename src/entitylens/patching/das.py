"""Subspace interchange interventions and distributed alignment search (DAS) on the residual stream.

An interchange intervention on a ``k``-dimensional subspace with orthonormal basis ``Q`` (``[d, k]``) at a site
(``resid_pre`` of a layer, at a role) runs the corrupted (base) prompt with the site's activation replaced by

    ``h' = h_base + (h_source - h_base) Q Q^T``

(``h_source`` from the clean run at the same role): only the subspace's coordinates are swapped in. Its
interchange-intervention accuracy (IIA) is the fraction of pairs whose intervened run gives the causal
model's counterfactual answer (each pair's ``counterfactual_answer``: the clean context's answer to the
corrupted side's query, i.e. "the site's subspace holds the variable the two contexts differ in"; it is the
clean answer when both sides query one box). Pairs without one are refused unless explicit targets are given.

DAS (Geiger et al. 2023; pyvene's rotated-space intervention) learns ``Q`` by gradient descent on the
cross-entropy of the counterfactual answer, ``Q`` kept orthonormal by PyTorch's orthogonal
parametrisation, on a training split of the pairs; IIA is reported on the held-out pairs (a subspace that
only fits its training pairs is what the held-out number exposes). :func:`interchange_iia` scores any basis
(a learned one, probe directions, PCA of the clean - corrupted differences, a random one).

Speed: each pair's corrupted run is captured once on the fast engine's twin (residual stream, keys, values);
an intervention at layer ``l`` and position ``p`` recomputes only layers ``l..`` at positions ``p..answer``
(keys and values before ``p`` from the capture), so a site at the query token costs one position per layer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from entitylens.errors import EntitylensError
from entitylens.patching.engine_fast import layer_out
from entitylens.patching.sites import site_positions
from entitylens.patching.types import PatchPair
from entitylens.progress import progress

__all__ = ["Captured", "DASConfig", "DASResult", "behaving_pairs", "capture_pairs", "counterfactual_targets",
           "das_split", "interchange", "interchange_iia", "pca_basis", "train_das"]


@dataclass(frozen=True)
class DASConfig:
    """Settings of :func:`train_das`.

    Attributes:
        k: Subspace dimension.
        steps: Optimisation steps (each over one minibatch of training pairs).
        lr: Adam learning rate.
        batch: Training pairs per step.
        test_fraction: Fraction of pairs held out (IIA reported on them).
        seed: Seed of the split, the initial rotation and the minibatches.
        criterion: ``"pairwise"`` (default): an intervention succeeds when the counterfactual answer's logit
            beats the other answer's (the pair's corrupted answer), trained with the logistic loss on that
            difference -- the pair's two candidate tokens, as the patching metric; ``"top1"``: the
            counterfactual answer must be the top-1 token, trained with the cross-entropy over the vocabulary.
        behaving_only: Keep only pairs the model itself gets right both ways (the clean run prefers the
            counterfactual answer, the corrupted run the other): IIA is defined on what the model does.
    """

    k: int = 1
    steps: int = 100
    lr: float = 0.05
    batch: int = 16
    test_fraction: float = 0.3
    seed: int = 0
    criterion: Literal["pairwise", "top1"] = "pairwise"
    behaving_only: bool = True

    def __post_init__(self) -> None:
        if self.criterion not in ("pairwise", "top1"):
            raise EntitylensError(f"unknown criterion {self.criterion!r}; use pairwise or top1")
        if self.k < 1 or self.steps < 1 or self.batch < 1 or not self.lr > 0:
            raise EntitylensError("DAS needs k, steps and batch >= 1 and lr > 0; e.g. k=1, steps=100, lr=0.05")
        if not 0.0 < self.test_fraction < 1.0:
            raise EntitylensError(f"test_fraction must be in (0, 1), got {self.test_fraction}")


@dataclass
class DASResult:
    """A learned subspace at one site and its interchange accuracies.

    Attributes:
        layer: Layer of the site (``resid_pre``).
        role: Role of the site.
        basis: ``[d, k]`` orthonormal basis (float32, CPU).
        train_iia: IIA on the training pairs.
        test_iia: IIA on the held-out pairs.
        train: Indices of the training pairs; test: of the held-out pairs.
        seconds: Training time.
        losses: Loss per step.
    """

    layer: int
    role: str
    basis: Tensor
    train_iia: float
    test_iia: float
    train: list[int]
    test: list[int]
    seconds: float
    losses: list[float] = field(default_factory=list)


def interchange(h_base: Tensor, h_source: Tensor, basis: Tensor) -> Tensor:
    """``h_base + (h_source - h_base) Q Q^T``: the source's coordinates in the subspace of ``basis`` ``[d, k]``."""
    return h_base + ((h_source - h_base) @ basis) @ basis.mT


class _Site:
    """One pair's captured runs at one site: base activation, source activation, suffix to recompute."""

    def __init__(self, fp: Any, p: PatchPair, clean: Any, corr: Any, layer: int, role: str) -> None:
        self.fp, self.corr, self.layer = fp, corr, layer
        self.pos = int(site_positions(p, role, "corrupted")[0])
        self.answer = p.corrupted_answer_pos
        if self.pos > self.answer:
            raise EntitylensError(f"pair {p.name!r}: role {role!r} comes after the answer position; it cannot "
                                  "change the answer")
        self.h_base = corr.resid[layer][self.pos]
        self.h_src = clean.resid[layer][int(site_positions(p, role, "clean")[0])]

    def logits(self, basis: Tensor) -> Tensor:
        """Answer logits ``[V]`` of the intervened base run (differentiable in ``basis``)."""
        hidden = self.corr.resid[self.layer][self.pos:self.answer + 1][None].clone()
        hidden[0, 0] = interchange(self.h_base, self.h_src, basis.to(self.h_base.dtype))
        out = self.fp.run_layers(self.corr, self.pos, self.answer, self.layer, self.fp.r.n_layers, hidden,
                              lambda j: [])
        return self.fp.r.logits(out[:, -1])[0]


class _PaddedPrefixKV:
    """Stand-in for an HF cache: each row's own keys/values before its position, left-padded to one length."""

    def __init__(self, sites: Sequence[_Site]) -> None:
        P = max(s.pos for s in sites)
        self.P = P
        L = len(sites[0].corr.keys)
        self.keys, self.values = [], []
        for j in range(L):
            ks, vs = [], []
            for s in sites:
                k, v = s.corr.keys[j][:, :, :s.pos], s.corr.values[j][:, :, :s.pos]
                pad = P - s.pos
                ks.append(torch.nn.functional.pad(k, (0, 0, pad, 0)))
                vs.append(torch.nn.functional.pad(v, (0, 0, pad, 0)))
            self.keys.append(torch.cat(ks))
            self.values.append(torch.cat(vs))

    def update(self, key: Tensor, value: Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """The rows' prefixes behind their one new key/value."""
        return torch.cat([self.keys[layer_idx], key], 2), torch.cat([self.values[layer_idx], value], 2)


def _batched_logits(fp: Any, sites: Sequence[_Site], basis: Tensor) -> Tensor:
    """Answer logits ``[B, V]`` of sites whose position is the answer's, in one batched forward per layer.

    Each row keeps its own prefix (left-padded and masked), rotary position and layer-``l`` input.
    """
    r = fp.r
    layer = sites[0].layer
    hb = torch.stack([s.h_base for s in sites])
    hs = torch.stack([s.h_src for s in sites])
    hidden = interchange(hb, hs, basis.to(hb.dtype))[:, None]
    cache = _PaddedPrefixKV(sites)
    P = cache.P
    slot = torch.arange(P + 1, device=hidden.device)
    real = torch.stack([(slot >= P - s.pos) for s in sites])  # [B, P+1]: padding slots hidden
    mask = torch.where(real, 0.0, torch.finfo(hidden.dtype).min).to(hidden.dtype)[:, None, None, :]
    pos_ids = torch.tensor([[s.pos] for s in sites], device=hidden.device)
    rope = {t: (torch.cat([s.corr.rope[t][0][:, s.pos:s.pos + 1] for s in sites]),
                torch.cat([s.corr.rope[t][1][:, s.pos:s.pos + 1] for s in sites])) for t in sites[0].corr.rope}
    for j in range(layer, r.n_layers):
        hidden = layer_out(r.layers[j](hidden, attention_mask=mask, position_ids=pos_ids, past_key_values=cache,
                                       use_cache=True, position_embeddings=rope[r.layer_types[j]]))
    return r.logits(hidden[:, -1])


def _logits(fp: Any, sites: Sequence[_Site], basis: Tensor) -> Tensor:
    """Answer logits ``[B, V]`` of several sites: batched when each site is at its answer position."""
    if fp.r.sliding_window is None and all(s.pos == s.answer for s in sites) and len(sites) > 1:
        return _batched_logits(fp, sites, basis)
    return torch.stack([s.logits(basis) for s in sites])


def _hits(logits: Tensor, tg: Sequence[int], alt: Sequence[Any], criterion: str) -> list[bool]:
    """Whether each row gives its counterfactual answer (``pairwise``: over every alternative; ``top1``).

    ``alt`` holds per row one alternative token or a list of them (:func:`_alternatives`).
    """
    t = torch.tensor(list(tg), device=logits.device)
    if criterion == "top1":
        return (logits.argmax(-1) == t).tolist()
    return (_margin(logits, t, alt) > 0).tolist()


def _alternatives(pairs: Sequence[PatchPair], tg: Sequence[int]) -> list[list[int]]:
    """The answers an intervention must beat, per pair: the base's own, and the source's own when it differs.

    With cross-query pairs the source's own answer is another token than the target: an intervention that
    copies it did not move the variable.
    """
    return [[p.corrupted_answer, p.clean_answer if p.clean_answer != t else p.corrupted_answer]
            for p, t in zip(pairs, tg, strict=True)]


def _margin(logits: Tensor, t: Tensor, alt: Sequence[Any]) -> Tensor:
    """The target's logit minus the largest alternative's, per row."""
    a = torch.tensor([[x] if isinstance(x, int) else list(x) for x in alt], device=logits.device)
    return logits.gather(1, t[:, None])[:, 0] - logits.gather(1, a).amax(1)


def counterfactual_targets(pairs: Sequence[PatchPair]) -> list[int]:
    """Each pair's causal-model answer token (:attr:`PatchPair.counterfactual_answer`).

    Raises:
        EntitylensError: a pair records none (a file from an older version, a hand-built pair).
    """
    missing = [p.name or f"pairs[{i}]" for i, p in enumerate(pairs) if p.counterfactual_answer is None]
    if missing:
        raise EntitylensError(
            f"{len(missing)} of {len(pairs)} pairs (e.g. {missing[0]!r}) have no causal-model answer to score "
            "interchange accuracy against; rebuild them with `entitylens patch pairs`, or pass targets"
        )
    return [int(p.counterfactual_answer) for p in pairs]  # type: ignore[arg-type]


def _targets(pairs: Sequence[PatchPair], targets: Sequence[int] | None) -> list[int]:
    tg = counterfactual_targets(pairs) if targets is None else [int(t) for t in targets]
    if len(tg) != len(pairs):
        raise EntitylensError(f"{len(tg)} targets for {len(pairs)} pairs; give one counterfactual answer per pair")
    return tg


def _behaving(caps: Sequence[tuple[Any, Any]], pairs: Sequence[PatchPair], tg: Sequence[int], alt: Sequence[int]
              ) -> list[int]:
    """Indices of the pairs the model gets right both ways (see :func:`behaving_pairs`)."""
    keep = []
    for i, (c, x) in enumerate(caps):
        own = pairs[i].clean_answer
        src_ok = _hits(c.answer_logits[None], [own], [alt[i]], "pairwise")[0]
        if own != tg[i]:
            src_ok = src_ok and _hits(c.answer_logits[None], [own], [tg[i]], "pairwise")[0]
        if src_ok and not _hits(x.answer_logits[None], [tg[i]], [alt[i]], "pairwise")[0]:
            keep.append(i)
    return keep


def _engine(model: Any) -> Any:
    from entitylens.patching.engine_fast import TwinRunner, Unsupported
    from entitylens.patching.paths_fast import FastPaths

    try:
        return FastPaths(TwinRunner(model))
    except Unsupported as e:
        raise EntitylensError(f"DAS runs on the fast engine, which cannot run this model ({e})") from None


def _capture(fp: Any, pairs: Sequence[PatchPair]) -> list[tuple[Any, Any]]:
    return [(fp.capture(p.clean_tokens, p.clean_answer_pos), fp.capture(p.corrupted_tokens, p.corrupted_answer_pos))
            for p in progress(pairs, desc="capture", unit="pair")]


@dataclass
class Captured:
    """Each pair's clean and corrupted runs on the fast engine's twin, captured once for many layers or bases."""

    fp: Any
    runs: list[tuple[Any, Any]]


def capture_pairs(model: Any, pairs: Sequence[PatchPair]) -> Captured:
    """Capture every pair once (pass the result to :func:`pca_basis` / :func:`interchange_iia` per layer)."""
    fp = _engine(model)
    return Captured(fp, _capture(fp, pairs))


def behaving_pairs(captured: Captured, pairs: Sequence[PatchPair], targets: Sequence[int] | None = None
                   ) -> list[int]:
    """Indices of the pairs the model gets right both ways (the pairs :func:`train_das` keeps by default).

    The source (clean) run prefers its own answer over the base answer, and over the counterfactual answer when
    that is another token; the base (corrupted) run does not prefer the counterfactual answer over its own.
    """
    return _behaving(captured.runs, pairs, _targets(pairs, targets), [p.corrupted_answer for p in pairs])


def pca_basis(model: Any, pairs: Sequence[PatchPair], layer: int, role: str, k: int,
              captured: Captured | None = None) -> Tensor:
    """The top-``k`` principal directions ``[d, k]`` of the clean - corrupted differences at the site (uncentred).

    The subspace where the pairs' clean and corrupted activations differ most: a data-driven basis to score
    with :func:`interchange_iia` next to a learned one. ``captured``: these pairs' runs from :func:`capture_pairs`.
    """
    cap = captured or capture_pairs(model, pairs)
    diffs = [(site.h_src - site.h_base).double()
             for site in (_Site(cap.fp, p, c, x, layer, role) for p, (c, x) in zip(pairs, cap.runs, strict=True))]
    D = torch.stack(diffs)
    if k > min(D.shape):
        raise EntitylensError(f"k={k} exceeds what {len(pairs)} pairs at d_model={D.shape[1]} can span; "
                              f"use k <= {min(D.shape)}")
    _, _, vh = torch.linalg.svd(D, full_matrices=False)
    return vh[:k].T.float().contiguous()


def interchange_iia(model: Any, pairs: Sequence[PatchPair], layer: int, role: str, basis: Tensor,
                    targets: Sequence[int] | None = None, criterion: str = "pairwise",
                    captured: Captured | None = None) -> Tensor:
    """Whether each pair's intervened run gives its counterfactual answer, ``[pair]`` bool.

    Args:
        model: A ``TransformerBridge`` (run on the fast engine's twin).
        pairs: Tokenised pairs (base = corrupted prompt, source = clean prompt).
        layer: ``resid_pre`` layer of the site.
        role: Role of the site.
        basis: ``[d, k]`` orthonormal basis (e.g. :attr:`DASResult.basis`, probe directions, a random one).
        targets: Counterfactual answer token per pair (default: :func:`counterfactual_targets`).
        criterion: ``"pairwise"`` (over the pair's corrupted answer) or ``"top1"`` (see :class:`DASConfig`).
        captured: These pairs' runs from :func:`capture_pairs` (captured here when ``None``).

    Raises:
        EntitylensError: a basis of the wrong shape, or pairs without a causal-model answer and no ``targets``.
    """
    tg = _targets(pairs, targets)
    cap = captured or capture_pairs(model, pairs)
    fp, caps = cap.fp, cap.runs
    d = int(fp.r.twin.config.hidden_size)
    if basis.ndim != 2 or basis.shape[0] != d:
        raise EntitylensError(f"basis must be [d_model={d}, k], got {tuple(basis.shape)}")
    ok: list[bool] = []
    sites = [_Site(fp, p, clean, corr, layer, role) for p, (clean, corr) in zip(pairs, caps, strict=True)]
    alt = _alternatives(pairs, tg)
    with torch.no_grad():
        for b0 in range(0, len(sites), 32):
            ok.extend(_hits(_logits(fp, sites[b0:b0 + 32], basis), tg[b0:b0 + 32], alt[b0:b0 + 32], criterion))
    return torch.tensor(ok, dtype=torch.bool)


def train_das(model: Any, pairs: Sequence[PatchPair], layers: Sequence[int], role: str,
              config: DASConfig | None = None, targets: Sequence[int] | None = None) -> list[DASResult]:
    """Learn a ``k``-dimensional subspace of ``resid_pre`` at ``role`` for every layer; held-out IIA per layer.

    Args:
        model: A ``TransformerBridge``.
        pairs: Tokenised pairs (at least 4).
        layers: Layers to search.
        role: The site's role.
        config: :class:`DASConfig`.
        targets: Counterfactual answer token per pair (default: :func:`counterfactual_targets`).

    Returns:
        One :class:`DASResult` per layer.

    Raises:
        EntitylensError: fewer than 4 (behaving) pairs, ``k`` above ``d_model``, a layer outside the model, or
            pairs without a causal-model answer and no ``targets``.
    """
    cfg = config or DASConfig()
    if len(pairs) < 4:
        raise EntitylensError(f"DAS needs at least 4 pairs (a training and a held-out split), got {len(pairs)}")
    tg = _targets(pairs, targets)
    fp = _engine(model)
    d = int(fp.r.twin.config.hidden_size)
    if cfg.k > d:
        raise EntitylensError(f"subspace dimension k={cfg.k} is larger than d_model={d}; use k <= {d}")
    n_layers = fp.r.n_layers
    bad = [la for la in layers if not 0 <= la < n_layers]
    if bad:
        raise EntitylensError(f"layers {bad} are outside the model's 0-{n_layers - 1}")
    caps = _capture(fp, pairs)
    keep = list(range(len(pairs)))
    if cfg.behaving_only:
        keep = _behaving(caps, pairs, tg, [p.corrupted_answer for p in pairs])
        if len(keep) < 4:
            raise EntitylensError(f"only {len(keep)} of {len(pairs)} pairs are ones the model gets right both ways "
                                  "(clean prefers its answer, corrupted the other); DAS needs 4: use pairs the model "
                                  "solves, or behaving_only=False (--all-pairs)")
    alt = _alternatives(pairs, tg)
    tr_k, te_k = das_split(len(keep), cfg)
    train, test = [keep[i] for i in tr_k], [keep[i] for i in te_k]
    for prm in fp.r.twin.parameters():
        prm.requires_grad_(False)
    out = []
    for layer in progress(list(layers), desc="DAS", unit="layer"):
        out.append(_train_layer(fp, pairs, caps, tg, alt, layer, role, cfg, train, test, d))
    return out


def das_split(n: int, cfg: DASConfig) -> tuple[list[int], list[int]]:
    """The seeded (train, held-out) split of ``n`` pairs: ``test_fraction`` held out, at least one on each side."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    n_test = max(1, min(n - 1, round(cfg.test_fraction * n)))
    return sorted(order[n_test:]), sorted(order[:n_test])


def _basis(rot: torch.nn.Module) -> Tensor:
    """The parametrised module's ``[d, k]`` basis (its weight is ``[k, d]`` with orthonormal rows)."""
    weight: Tensor = rot.weight  # type: ignore[assignment]
    return weight.mT


def _train_layer(fp: Any, pairs: Sequence[PatchPair], caps: Any, tg: list[int], alt: list[list[int]], layer: int,
                 role: str,
                 cfg: DASConfig, train: list[int], test: list[int], d: int) -> DASResult:
    t0 = time.perf_counter()
    sites = [_Site(fp, p, c, x, layer, role) for p, (c, x) in zip(pairs, caps, strict=True)]
    torch.manual_seed(cfg.seed)
    rot = torch.nn.utils.parametrizations.orthogonal(torch.nn.Linear(d, cfg.k, bias=False))
    opt = torch.optim.Adam(rot.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    losses = []
    for _ in range(cfg.steps):
        idx = [train[i] for i in torch.randperm(len(train), generator=gen)[:cfg.batch].tolist()]
        basis = _basis(rot)  # [d, k], orthonormal columns
        logits = _logits(fp, [sites[i] for i in idx], basis).float()
        t = torch.tensor([tg[i] for i in idx], device=logits.device)
        if cfg.criterion == "top1":
            loss = torch.nn.functional.cross_entropy(logits, t)
        else:
            margin = _margin(logits, t, [alt[i] for i in idx])
            loss = torch.nn.functional.softplus(-margin).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    basis = _basis(rot).detach().float().clone()
    hit: list[bool] = []
    with torch.no_grad():
        for b0 in range(0, len(sites), 32):
            hit.extend(_hits(_logits(fp, sites[b0:b0 + 32], basis), tg[b0:b0 + 32], alt[b0:b0 + 32], cfg.criterion))
    iia = lambda rows: sum(hit[i] for i in rows) / len(rows)  # noqa: E731
    if not math.isfinite(losses[-1]):
        raise EntitylensError(f"DAS diverged at layer {layer} (loss {losses[-1]}); lower lr")
    return DASResult(layer=layer, role=role, basis=basis, train_iia=iia(train), test_iia=iia(test), train=train,
                     test=test, seconds=time.perf_counter() - t0, losses=losses)
