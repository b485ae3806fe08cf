"""Attribution patching: the first-order (gradient x activation difference) estimate of a patching grid.

For a pair, one clean forward caches the clean activations; one corrupted forward + one backward give the
corrupted activations and the gradient ``g`` of the corrupted run's logit difference with respect to each
of them. Patching cell ``c`` (positions ``dst`` at layer ``l``, from clean positions ``src``) is estimated as

    ``ld_patched - ld_corrupted  ~=  sum_{(s, d) in c} (a_clean[l, s] - a_corr[l, d]) . g[l, d]``

and normalised by ``ld_clean - ld_corrupted`` so it is on the same scale as :func:`patch_grid`'s
``normalised`` grid (1 = fully restores clean behaviour). It is exact for a metric that is linear in the
patched activation and degrades with curvature (attention saturation, layer norm), so
:func:`agreement` reports how well it tracks exact patching -- check it on a few pairs before trusting a
large attribution sweep.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from entitylens.errors import EntitylensError
from entitylens.patching.grid import (
    check_component_grid,
    check_model,
    check_tokens,
    grid_columns,
    pairs_list,
    resolve_layers,
)
from entitylens.patching.metric import answer_probability, logit_diff, normalise
from entitylens.patching.types import Component, Grid, PatchPair, PatchResult, hook_name
from entitylens.progress import progress

__all__ = ["PATH_GRAD", "agreement", "attribution_grid"]

PATH_GRAD = "bridge-grad"


@contextlib.contextmanager
def _frozen_params(model: Any) -> Iterator[None]:
    """Turn off ``requires_grad`` on every parameter (no parameter gradients), restoring it afterwards."""
    params = list(model.parameters())
    saved = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, saved):
            p.requires_grad_(flag)


def _grad_hook_name(component: str, layer: int) -> str:
    # hook_resid_mid is ln2.hook_in on the bridge: a value added there reaches the MLP but not the residual
    # stream. attn_out feeds only resid_mid, so d(metric)/d(attn_out) is d(metric)/d(resid_mid).
    return hook_name("attn_out" if component == "resid_mid" else component, layer)


def attribution_grid(
    model: Any,
    pairs: PatchPair | Sequence[PatchPair],
    component: Component = "resid_pre",
    grid: Grid = "layer_role",
    *,
    roles: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
) -> PatchResult:
    """Attribution patching over the same grids as :func:`~entitylens.patching.exact.patch_grid`.

    Two forwards and one backward per pair, on the bridge (eager attention, hooks).

    Args:
        model: A ``TransformerBridge``.
        pairs: One or more :class:`PatchPair`.
        component: Activation to attribute (see :data:`~entitylens.patching.exact.COMPONENTS`).
        grid: ``"layer_role"``, ``"layer_pos"`` or ``"layer_head"`` (as in ``patch_grid``).
        roles: Roles (columns of layer_role; patched positions of layer_head).
        layers: Grid rows (default: all layers).
        positions: Columns of a layer_pos grid.

    Returns:
        A :class:`PatchResult` with ``kind="attribution"``, ``path="bridge-grad"``: ``normalised`` is the
        estimated normalised metric, ``logit_diff`` the estimated patched logit difference,
        ``prob``/``top1`` are ``None``.

    Raises:
        EntitylensError: for the same bad inputs as ``patch_grid``.
    """
    check_model(model)
    check_component_grid(component, grid, "hooks")
    plist = pairs_list(pairs)
    check_tokens(model, plist)
    layer_list = resolve_layers(layers, int(model.cfg.n_layers))
    names, columns = grid_columns(grid, plist, roles, positions, int(model.cfg.n_heads), "clean", "corrupted")
    dev = next(model.parameters()).device
    est: list[Tensor] = []
    s_ld: list[Tensor] = []
    d_ld: list[Tensor] = []
    s_pr: list[Tensor] = []
    d_pr: list[Tensor] = []
    for pair, cols in zip(progress(plist, desc=f"attribution {component}", unit="pair"), columns):
        grid_vals, baselines = _attribute_pair(model, pair, cols, component, layer_list, len(names), dev)
        est.append(grid_vals)
        for acc, v in zip((s_ld, s_pr, d_ld, d_pr), baselines):
            acc.append(v)
    attr = torch.stack(est).detach().float().cpu()
    src_ld = torch.stack(s_ld).detach().float().cpu()
    dst_ld = torch.stack(d_ld).detach().float().cpu()
    patched = attr + dst_ld[:, None, None]
    return PatchResult(
        kind="attribution",
        component=component,
        grid=grid,
        path=PATH_GRAD,
        layers=tuple(layer_list),
        cells=tuple(names),
        pair_names=tuple(p.name for p in plist),
        normalised=normalise(patched, src_ld, dst_ld),
        logit_diff=patched,
        prob=None,
        top1=None,
        source_logit_diff=src_ld,
        target_logit_diff=dst_ld,
        source_prob=torch.stack(s_pr).detach().float().cpu(),
        target_prob=torch.stack(d_pr).detach().float().cpu(),
        n_forward_cells=0,
        n_noop_cells=0,
    )


def _attribute_pair(
    model: Any,
    pair: PatchPair,
    cols: Sequence[tuple[int, tuple[int, ...], tuple[int, ...], int | None]],
    component: str,
    layer_list: Sequence[int],
    n_cols: int,
    dev: torch.device,
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor, Tensor]]:
    """One pair: the ``[layer, cell]`` attribution grid and (clean ld, clean prob, corrupted ld, corrupted prob)."""
    value_names = {hook_name(component, layer): layer for layer in layer_list}
    grad_names = {_grad_hook_name(component, layer): layer for layer in layer_list}
    clean = pair.clean_tokens[None].to(dev)
    corr = pair.corrupted_tokens[None].to(dev)
    with torch.no_grad():
        logits_c, cache = model.run_with_cache(clean, names_filter=lambda n: n in value_names)
    clean_acts = {layer: cache[name][0].detach() for name, layer in value_names.items()}
    ac = logits_c[0, pair.clean_answer_pos][None]

    leaves: dict[int, Tensor] = {}
    corr_acts: dict[int, Tensor] = {}

    def value_hook(layer: int) -> Any:
        def hook(act: Tensor, hook: Any) -> None:
            corr_acts[layer] = act[0].detach().clone()

        return hook

    def grad_hook(layer: int) -> Any:
        def hook(act: Tensor, hook: Any) -> Tensor:
            leaf = torch.zeros_like(act, requires_grad=True)
            leaves[layer] = leaf
            return act + leaf

        return hook

    fwd = [(name, value_hook(layer)) for name, layer in value_names.items()]
    fwd += [(name, grad_hook(layer)) for name, layer in grad_names.items()]
    with torch.enable_grad(), _frozen_params(model):
        logits_x = model.run_with_hooks(corr, fwd_hooks=fwd)
        ax = logits_x[0, pair.corrupted_answer_pos][None]
        ld_x = logit_diff(ax, pair.clean_answer, pair.corrupted_answer)[0]
        order = [layer for layer in layer_list if layer in leaves]
        grads = torch.autograd.grad(ld_x, [leaves[layer] for layer in order], allow_unused=True)
    grad_by_layer = {layer: (torch.zeros_like(leaves[layer]) if g is None else g)[0] for layer, g in zip(order, grads)}
    grid_vals = torch.full((len(layer_list), n_cols), float("nan"), device=dev)
    for li, layer in enumerate(layer_list):
        src, dst, g = clean_acts[layer], corr_acts[layer], grad_by_layer[layer]
        for ci, sp, dp, head in cols:
            sp_t = torch.tensor(sp, device=dev)
            dp_t = torch.tensor(dp, device=dev)
            if head is None:
                d, gg = src[sp_t] - dst[dp_t], g[dp_t]
            else:
                d, gg = src[sp_t, head] - dst[dp_t, head], g[dp_t, head]
            grid_vals[li, ci] = (d.float() * gg.float()).sum()
    baselines = (
        logit_diff(ac, pair.clean_answer, pair.corrupted_answer)[0],
        answer_probability(ac, pair.clean_answer)[0],
        ld_x.detach(),
        answer_probability(ax.detach(), pair.clean_answer)[0],
    )
    return grid_vals.detach(), baselines


def _average_ranks(x: np.ndarray) -> np.ndarray:
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    starts = ends - counts
    return ((starts + ends - 1) / 2.0)[inverse]


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    denom = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


def agreement_line(a: Mapping[str, Any]) -> str:
    """One human line for an :func:`agreement` record: the verdict first, then the numbers behind it."""

    def f(x: Any) -> str:
        return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{float(x):.3f}"

    if not a:
        return "no agreement recorded"
    verdict = a.get("verdict", "")
    head = {
        "agrees": "attribution AGREES with exact patching where it matters",
        "disagrees": "attribution DISAGREES with exact patching where it matters (use exact patching; "
        + "; ".join(a.get("reasons") or [])
        + ")",
        "no important cells": f"exact patching finds no cell at |effect| >= {a.get('important_threshold')}",
    }.get(verdict, verdict)
    return (f"{head}: top-{a.get('k')} overlap {f(a.get('topk_overlap'))}; on the {a.get('important_cells')} cells "
            f"with |exact| >= {a.get('important_threshold')}: mean |error| {f(a.get('important_mean_abs_error'))}, "
            f"sign agreement {f(a.get('important_sign_agreement'))} (over all {a.get('n_cells')} cells: pearson "
            f"{f(a.get('pearson'))}, spearman {f(a.get('spearman'))})")  # fmt: skip


IMPORTANT_EFFECT = 0.2
"""Cells exact patching puts at ``|normalised| >=`` this are the ones attribution must get right."""

MIN_TOPK_OVERLAP = 0.8
"""Verdict threshold: top-k overlap of the largest cells."""

MIN_SIGN_AGREEMENT = 0.9
"""Verdict threshold: fraction of important cells whose sign attribution gets right."""

MAX_IMPORTANT_ERROR = 0.1
"""Verdict threshold: mean ``|attribution - exact|`` on important cells (normalised scale)."""


def agreement(
    exact: PatchResult | Float[Tensor, "..."],
    approx: PatchResult | Float[Tensor, "..."],
    *,
    k: int = 10,
    per_pair: bool = False,
    important: float = IMPORTANT_EFFECT,
) -> dict[str, Any]:
    """How well an approximate grid (attribution patching) tracks exact patching, where it matters.

    Compares the normalised grids averaged over pairs (or every pair's cells when ``per_pair``), over the
    cells that are finite in both. Correlations over *all* cells are dominated by the many cells near zero
    in both grids (a Spearman of 0.98 next to a top-10 overlap of 0 is common), so the verdict is taken on
    the cells that matter: the top-k overlap, and on the cells exact patching puts at ``|effect| >=
    important`` the mean absolute error and the sign agreement. ``verdict`` is ``"agrees"`` when the top-k
    overlap is at least :data:`MIN_TOPK_OVERLAP`, the sign agreement at least :data:`MIN_SIGN_AGREEMENT` and
    the mean error on important cells at most :data:`MAX_IMPORTANT_ERROR`; ``"disagrees"`` otherwise (with
    the ``reasons``); ``"no important cells"`` when exact patching finds none.

    Args:
        exact: The exact :class:`PatchResult` (or a tensor of normalised values).
        approx: The approximation, same shape.
        k: Size of the top-k sets (by absolute value).
        per_pair: Compare every (pair, layer, cell) instead of the pair-averaged (layer, cell) grid.
        important: Threshold on ``|exact|`` (normalised scale: 1 = the whole clean-corrupted gap).

    Returns:
        ``pearson``, ``spearman`` (average ranks for ties), ``topk_overlap`` (``|top-k(|exact|) &
        top-k(|approx|)| / k``), ``k``, ``n_cells``, ``important_threshold``, ``important_cells``,
        ``important_mean_abs_error``, ``important_max_abs_error``, ``important_sign_agreement``, ``verdict``
        and ``reasons``.

    Raises:
        EntitylensError: when the grids have different shapes or labels, or ``k`` is not positive.
    """
    a_np, b_np = _finite_cells(exact, approx, k=k, per_pair=per_pair)
    n = int(a_np.size)
    kk = min(k, n)
    nan = float("nan")
    if n == 0:
        return {"pearson": nan, "spearman": nan, "topk_overlap": nan, "k": 0, "n_cells": 0,
                "important_threshold": float(important), "important_cells": 0, "important_mean_abs_error": nan,
                "important_max_abs_error": nan, "important_sign_agreement": nan, "verdict": "no cells",
                "reasons": []}  # fmt: skip
    top_a = set(np.argsort(-np.abs(a_np), kind="stable")[:kk].tolist())
    top_b = set(np.argsort(-np.abs(b_np), kind="stable")[:kk].tolist())
    overlap = len(top_a & top_b) / kk
    big = np.abs(a_np) >= important
    m = int(big.sum())
    err = np.abs(b_np[big] - a_np[big])
    mae = float(err.mean()) if m else nan
    sign = float(np.mean(np.sign(b_np[big]) == np.sign(a_np[big]))) if m else nan
    reasons = _disagreement_reasons(kk, overlap, m, sign, mae) if m else []
    verdict = "no important cells" if not m else ("disagrees" if reasons else "agrees")
    return {
        "pearson": _pearson(a_np, b_np),
        "spearman": _pearson(_average_ranks(a_np), _average_ranks(b_np)),
        "topk_overlap": overlap,
        "k": kk,
        "n_cells": n,
        "important_threshold": float(important),
        "important_cells": m,
        "important_mean_abs_error": mae,
        "important_max_abs_error": float(err.max()) if m else nan,
        "important_sign_agreement": sign,
        "verdict": verdict,
        "reasons": reasons,
    }


def _finite_cells(
    exact: PatchResult | Float[Tensor, "..."], approx: PatchResult | Float[Tensor, "..."], *, k: int, per_pair: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The two normalised grids, checked to match, flattened to the cells finite in both (float64)."""

    def grid_of(r: PatchResult | Tensor) -> Tensor:
        if isinstance(r, PatchResult):
            return r.normalised if per_pair else r.mean()
        return torch.as_tensor(r)

    if isinstance(exact, PatchResult) and isinstance(approx, PatchResult):
        if (exact.layers, exact.cells, exact.component) != (approx.layers, approx.cells, approx.component):
            raise EntitylensError(
                "agreement: the two results have different layers, cells or component; "
                "run both with the same component, grid, layers and roles/positions"
            )
    a, b = grid_of(exact), grid_of(approx)
    if a.shape != b.shape:
        raise EntitylensError(
            f"agreement: grids of shapes {tuple(a.shape)} and {tuple(b.shape)} differ; "
            f"compare results computed on the same pairs and grid"
        )
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise EntitylensError(f"agreement: k must be a positive int, got {k!r}")
    a_np = a.detach().cpu().double().flatten().numpy()
    b_np = b.detach().cpu().double().flatten().numpy()
    ok = np.isfinite(a_np) & np.isfinite(b_np)
    return a_np[ok], b_np[ok]


def _disagreement_reasons(kk: int, overlap: float, m: int, sign: float, mae: float) -> list[str]:
    """Which verdict thresholds the ``m`` (> 0) important cells miss, in words."""
    reasons = []
    if overlap < MIN_TOPK_OVERLAP:
        reasons.append(f"top-{kk} overlap {overlap:.2f} < {MIN_TOPK_OVERLAP}")
    if sign < MIN_SIGN_AGREEMENT:
        reasons.append(f"sign agreement {sign:.2f} < {MIN_SIGN_AGREEMENT} on the {m} important cells")
    if mae > MAX_IMPORTANT_ERROR:
        reasons.append(f"mean |error| {mae:.2f} > {MAX_IMPORTANT_ERROR} on the {m} important cells")
    return reasons
