"""Circuit jobs: path-patching grids and multi-site circuit tests, pairs in, a checked run directory out.

:func:`run_path_job` runs :func:`~entitylens.patching.paths.path_patch` and writes ``path.csv`` (one row per
pair x sender x receiver), ``path_summary.csv`` (mean normalised effect per sender x receiver with a 95%
interval over pairs: percentile bootstrap, pairs resampled, seed 0), ``path.png`` (the sender x receiver
heatmap) and ``meta.json``. :func:`run_sites_job` runs :func:`~entitylens.patching.sites.patch_sites` and
writes ``sites.csv``, ``sites_summary.csv`` (the circuit summary table: circuit, effect, interval) and
``meta.json``. Both refuse a directory that holds another run (:class:`~entitylens._io.RunDir`); the same
inputs give byte-identical files.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from entitylens._io import RunDir, atomic_write, prepare_output_dir, sha256_file, write_json, write_timing
from entitylens.activations.identity import model_fingerprint
from entitylens.errors import EntitylensError
from entitylens.frames import frame, write_csv
from entitylens.patching.das import (
    Captured,
    DASConfig,
    DASResult,
    behaving_pairs,
    capture_pairs,
    counterfactual_targets,
    das_split,
    interchange_iia,
    pca_basis,
    train_das,
)
from entitylens.patching.paths import PathResult, path_patch
from entitylens.patching.sites import Site, SiteResult, patch_sites
from entitylens.patching.types import PatchPair
from entitylens.plots import plot_iia, plot_patch_heatmap
from entitylens.probing.outputs import PROBE_WEIGHTS
from entitylens.stats import cluster_bootstrap

__all__ = ["DAS_BASES", "DAS_COLUMNS", "PATH_COLUMNS", "SITES_COLUMNS", "SUMMARY_COLUMNS", "probe_subspaces",
           "read_subspaces", "run_das_job", "run_path_job", "run_sites_job", "summarise"]

PATH_COLUMNS = ("pair", "sender", "receiver", "ld", "normalised", "prob", "top1")
SITES_COLUMNS = ("pair", "circuit", "ld", "normalised", "prob", "top1")
SUMMARY_COLUMNS = ("sender", "receiver", "circuit", "effect", "ci_low", "ci_high", "n_pairs")
DAS_COLUMNS = ("layer", "role", "k", "source", "train_iia", "test_iia", "n_train", "n_test")
SUBSPACES = "das_subspaces.safetensors"
DAS_BASES = ("das", "pca", "full", "probe")
"""Bases ``patch das`` scores: learned (DAS), PCA of the training pairs' differences, the whole site, probe
directions."""
_PROBE_OFFSET = {"resid_pre": 0, "resid_post": -1}  # resid_pre of layer l is the probe hook's layer l + offset


def summarise(values: torch.Tensor, resamples: int = 1000) -> tuple[float, float, float, int]:
    """Mean over pairs of ``[pair]`` values (nan skipped) and a 95% percentile-bootstrap interval over pairs."""
    v = values.double().numpy()
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan"), 0
    mean = float(v.mean())
    if len(v) < 2:
        return mean, float("nan"), float("nan"), 1
    boots = cluster_bootstrap(lambda idx: float(v[idx].mean()), len(v), resamples=resamples, seed=0)
    return mean, float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5)), len(v)


def _check_dir(out: str | os.PathLike[str], kind: str, identity: dict[str, Any], overwrite: bool) -> Path:
    RunDir(out, "meta.json", f"a {kind.split('.')[-1]} run",
           is_mine=lambda rec: rec.get("kind") == kind).check(identity, overwrite=overwrite)
    return prepare_output_dir(out)


def _identity(model: Any, pairs_sha256: str, **settings: Any) -> dict[str, Any]:
    return {"model": model_fingerprint(model), "pairs_sha256": pairs_sha256, **settings}


def run_path_job(model: Any, pairs: Sequence[PatchPair], senders: Sequence[Site], receivers: Sequence[Site],
                 out: str | os.PathLike[str], *, pairs_sha256: str, freeze_mlps: bool = False, batch: int = 16,
                 label: str = "", overwrite: bool = False) -> tuple[PathResult, list[Path]]:
    """Path-patch every (sender, receiver) on every pair and write the run directory.

    Args:
        model: A ``TransformerBridge``.
        pairs: Tokenised pairs.
        senders: Sites the paths start at.
        receivers: Sites the paths end at.
        out: Run directory.
        pairs_sha256: Hash of the pairs file (part of the run's identity).
        freeze_mlps: Freeze the MLPs too in the sender's run.
        batch: Most rows per forward.
        label: Model label for the figure title.
        overwrite: Replace another run's results in ``out``.

    Returns:
        The :class:`~entitylens.patching.paths.PathResult` and the files written.
    """
    ident = _identity(model, pairs_sha256, senders=[str(s) for s in senders],
                      receivers=[str(r) for r in receivers], freeze_mlps=freeze_mlps)
    d = _check_dir(out, "entitylens.path", ident, overwrite)
    res = path_patch(model, pairs, senders, receivers, freeze_mlps=freeze_mlps, batch=batch)
    rows, summary = [], []
    for si, s in enumerate(senders):
        for ri, r in enumerate(receivers):
            for pi, name in enumerate(res.pair_names):
                rows.append({"pair": name or str(pi), "sender": str(s), "receiver": str(r),
                             "ld": float(res.ld[pi, si, ri]), "normalised": float(res.normalised[pi, si, ri]),
                             "prob": float(res.prob[pi, si, ri]), "top1": float(res.top1[pi, si, ri])})
            mean, lo, hi, n = summarise(res.normalised[:, si, ri])
            summary.append({"sender": str(s), "receiver": str(r), "circuit": "", "effect": mean, "ci_low": lo,
                            "ci_high": hi, "n_pairs": n})
    write_csv(frame(rows, PATH_COLUMNS), d / "path.csv")
    table = frame(summary, SUMMARY_COLUMNS)
    write_csv(table, d / "path_summary.csv")
    title = f"{label + ': ' if label else ''}path patching, mean normalised over {len(res.pair_names)} pairs"
    pngs = plot_patch_heatmap(res.mean().numpy(), [str(s) for s in senders], [str(r) for r in receivers],
                              d / "path", title=title, row_label="sender")
    write_json(d / "meta.json", {"kind": "entitylens.path", "identity": ident, "pairs": list(res.pair_names),
                                 "ld_clean": res.ld_clean.tolist(), "ld_corrupted": res.ld_corrupted.tolist()})
    return res, [d / "path.csv", d / "path_summary.csv", *pngs, d / "meta.json"]


def run_sites_job(model: Any, pairs: Sequence[PatchPair], circuits: Sequence[Sequence[Site]],
                  out: str | os.PathLike[str], *, pairs_sha256: str, freeze: Sequence[Site] = (), batch: int = 16,
                  overwrite: bool = False) -> tuple[SiteResult, pd.DataFrame, list[Path]]:
    """Patch each circuit's sites jointly on every pair and write the run directory with the circuit summary.

    Args:
        model: A ``TransformerBridge``.
        pairs: Tokenised pairs.
        circuits: Each a set of sites patched together.
        out: Run directory.
        pairs_sha256: Hash of the pairs file.
        freeze: Sites held at their corrupted values in every circuit's run.
        batch: Most circuits per forward.
        overwrite: Replace another run's results in ``out``.

    Returns:
        The :class:`~entitylens.patching.sites.SiteResult`, the summary table and the files written.
    """
    ident = _identity(model, pairs_sha256, circuits=[[str(s) for s in c] for c in circuits],
                      freeze=[str(s) for s in freeze])
    d = _check_dir(out, "entitylens.sites", ident, overwrite)
    res = patch_sites(model, pairs, circuits, freeze=freeze, batch=batch)
    rows, summary = [], []
    for ci, name in enumerate(res.circuits):
        for pi, pname in enumerate(res.pair_names):
            rows.append({"pair": pname or str(pi), "circuit": name, "ld": float(res.ld[pi, ci]),
                         "normalised": float(res.normalised[pi, ci]), "prob": float(res.prob[pi, ci]),
                         "top1": float(res.top1[pi, ci])})
        mean, lo, hi, n = summarise(res.normalised[:, ci])
        summary.append({"sender": "", "receiver": "", "circuit": name, "effect": mean, "ci_low": lo, "ci_high": hi,
                        "n_pairs": n})
    write_csv(frame(rows, SITES_COLUMNS), d / "sites.csv")
    table = frame(summary, SUMMARY_COLUMNS)
    write_csv(table, d / "sites_summary.csv")
    write_json(d / "meta.json", {"kind": "entitylens.sites", "identity": ident, "pairs": list(res.pair_names),
                                 "ld_clean": res.ld_clean.tolist(), "ld_corrupted": res.ld_corrupted.tolist()})
    return res, table, [d / "sites.csv", d / "sites_summary.csv", d / "meta.json"]


def read_subspaces(path: str | os.PathLike[str]) -> tuple[str, dict[int, torch.Tensor]]:
    """The role and the per-layer ``[d, k]`` bases of a ``das_subspaces.safetensors`` file."""
    from safetensors import safe_open

    p = Path(path)
    if p.is_dir():
        p = p / SUBSPACES
    if not p.is_file():
        raise EntitylensError(f"{p} does not exist; pass a `patch das` run directory or its {SUBSPACES}")
    with safe_open(str(p), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("entitylens_das", "{}"))
        bases = {int(k.removeprefix("layer")): f.get_tensor(k) for k in f.keys()}
    return str(meta.get("role", "")), bases


def run_das_job(model: Any, pairs: Sequence[PatchPair], layers: Sequence[int], role: str,
                out: str | os.PathLike[str], *, pairs_sha256: str, config: DASConfig | None = None,
                subspaces: str | os.PathLike[str] | None = None, basis: str = "das", label: str = "",
                overwrite: bool = False, probe: str | os.PathLike[str] | None = None,
                probe_columns: Sequence[str] | None = None, probe_role: str | None = None,
                ks: Sequence[int] | None = None) -> tuple[pd.DataFrame, list[Path]]:
    """DAS per layer at ``role`` (or the IIA of another basis, or of given subspaces); writes the run.

    Writes ``das.csv`` (layer, role, k, train / held-out IIA), ``das_subspaces.safetensors`` (one ``[d, k]``
    basis per layer; training runs only), ``das.png`` (IIA by layer), ``meta.json`` and ``timing.json``.
    IIA is scored against each pair's causal-model answer (``counterfactual_answer``).

    Args:
        model: A ``TransformerBridge``.
        pairs: Tokenised pairs (base = corrupted, source = clean), with their causal-model answers.
        layers: ``resid_pre`` layers.
        role: The site's role.
        out: Run directory.
        pairs_sha256: Hash of the pairs file.
        config: :class:`~entitylens.patching.das.DASConfig`.
        subspaces: Score these bases (a ``das_subspaces.safetensors`` or its run directory) on every pair
            instead of training (cross-model: learned on the pair model; shapes must match).
        basis: ``"das"`` (learn, default); ``"pca"``: the top-``k`` principal directions of the clean -
            corrupted differences (computed on the training split); ``"full"``: the whole site (activation
            patching, ``k = d_model``); ``"probe"``: the span of a probe run's directions (``probe``). The
            fixed bases are scored on the same train / held-out split DAS uses.
        label: Model label for the figure.
        overwrite: Replace another run's results in ``out``.
        probe: An ``entitylens probe`` run directory (``basis="probe"``).
        probe_columns: The probe columns to span (default all).
        probe_role: The probe's role (default its first).
        ks: Sweep these subspace dimensions (``das`` / ``pca``; default ``config.k``): one row per layer and
            ``k``, one line per ``k`` in the figure; a learned sweep writes ``das_subspaces_k{k}.safetensors``
            per ``k``.

    Returns:
        The ``das.csv`` table and the files written.

    Raises:
        EntitylensError: an unknown basis, ``probe`` missing or given without ``basis="probe"``, subspaces
            without the layers or role asked for, or pairs without a causal-model answer.
    """
    import time

    cfg = config or DASConfig()
    bases, src_sha = ({}, None) if subspaces is None else _given_subspaces(subspaces, layers, role)
    if basis not in DAS_BASES:
        raise EntitylensError(f"unknown basis {basis!r}; use one of {', '.join(DAS_BASES)}")
    if (basis == "probe") != (probe is not None):
        raise EntitylensError("--basis probe goes with --probe DIR (an `entitylens probe` run), and --probe with "
                              "--basis probe")
    given = None if probe is None else probe_subspaces(probe, layers, int(model.cfg.d_model), probe_columns,
                                                        probe_role)
    counterfactual_targets(pairs)  # pairs without a causal-model answer fail before anything is written
    ks = [cfg.k] if ks is None else sorted({int(k) for k in ks})
    sweep = {"ks": ks} if len(ks) > 1 else {}
    ident = _identity(model, pairs_sha256, layers=list(layers), role=role, config=dict(cfg.__dict__),
                      subspaces_sha256=src_sha, basis=basis, **sweep,
                      **({} if probe is None else {"probe_weights_sha256": sha256_file(Path(probe) / PROBE_WEIGHTS),
                                                   "probe_columns": probe_columns, "probe_role": probe_role}))
    d = _check_dir(out, "entitylens.das", ident, overwrite)
    t0 = time.perf_counter()
    rows, files = _job_rows(model, pairs, layers, role, cfg, basis, ks, d, given, bases if subspaces else None)
    table = frame(rows, DAS_COLUMNS)
    write_csv(table, d / "das.csv")
    kk = ", ".join(str(k) for k in ks)
    what = ("given subspaces" if subspaces else {"das": f"DAS, k = {kk}", "pca": f"PCA subspace, k = {kk}",
            "full": "whole site", "probe": "probe directions"}[basis])
    lines = ({f"{label or 'model'} k={k}": table[table["k"] == k] for k in ks} if sweep and basis in ("das", "pca")
             else {label or "model": table})
    pngs = plot_iia(lines, d / "das", title=f"{what} at {role} (resid_pre)")
    write_json(d / "meta.json", {"kind": "entitylens.das", "identity": ident, "pairs": [p.name for p in pairs]})
    write_timing(d, "das_seconds", time.perf_counter() - t0)
    return table, [d / "das.csv", *files, *pngs, d / "meta.json"]


def _job_rows(model: Any, pairs: Sequence[PatchPair], layers: Sequence[int], role: str, cfg: DASConfig, basis: str,
              ks: Sequence[int], d: Path, given: dict[int, torch.Tensor] | None,
              subspaces: dict[int, torch.Tensor] | None) -> tuple[list[dict[str, Any]], list[Path]]:
    """The ``das.csv`` rows of a ``patch das`` job (and the subspace files it wrote)."""
    rows: list[dict[str, Any]] = []
    files: list[Path] = []
    if subspaces is not None:
        cap = capture_pairs(model, pairs)
        for la in layers:
            hit = interchange_iia(model, pairs, la, role, subspaces[la], criterion=cfg.criterion, captured=cap)
            rows.append({"layer": la, "role": role, "k": int(subspaces[la].shape[1]), "source": "given",
                         "train_iia": float("nan"), "test_iia": float(hit.double().mean()), "n_train": 0,
                         "n_test": len(pairs)})
        return rows, files
    if basis in ("full", "probe"):
        return _fixed_rows(model, pairs, layers, role, cfg, basis, given), files
    for k in ks:
        kcfg = dataclasses.replace(cfg, k=k)
        if basis == "pca":
            rows += _fixed_rows(model, pairs, layers, role, kcfg, basis, None)
            continue
        path = d / (SUBSPACES if len(ks) == 1 else f"das_subspaces_k{k}.safetensors")
        rows += _learned_rows(model, pairs, layers, role, kcfg, path)
        files.append(path)
    return rows, files


def probe_subspaces(probe_dir: str | os.PathLike[str], layers: Sequence[int], d_model: int,
                    columns: Sequence[str] | None = None, role: str | None = None) -> dict[int, torch.Tensor]:
    """Orthonormal bases ``[d, k]`` of trained probes' directions, one per ``resid_pre`` layer.

    A probe run's raw-space weights (``probe_weights.safetensors``) are read; the basis of layer ``l`` spans the
    chosen columns' weight vectors of the probe on ``resid_pre`` ``l``, i.e. on ``resid_post`` ``l - 1`` (the
    same activation) when the probe read ``resid_post``; ``k`` is their rank.

    Args:
        probe_dir: An ``entitylens probe`` run directory.
        layers: ``resid_pre`` layers of the interventions.
        d_model: The model's width (the probe's must match).
        columns: Probe columns (target names) to span (default all).
        role: The probe's role (default its first).

    Raises:
        EntitylensError: a probe on another hook than the residual stream, a role or column it lacks, a layer
            it did not probe, or another width.
    """
    from entitylens.probing.outputs import read_probe_weights

    tensors, info = read_probe_weights(probe_dir)
    hook = str(info["hook"])
    if hook not in _PROBE_OFFSET:
        raise EntitylensError(f"the probe read {hook!r}, not the residual stream; use a probe run on resid_pre or "
                              "resid_post")
    prole = role or info["roles"][0]
    if prole not in info["roles"]:
        raise EntitylensError(f"the probe run has no role {prole!r}; use one of {', '.join(info['roles'])}")
    names = list(info["columns"])
    wanted = names if columns is None else list(columns)
    bad = [c for c in wanted if c not in names]
    if bad or not wanted:
        raise EntitylensError(f"probe column {bad[0] if bad else ''!r} is not one of the probe's {len(names)} "
                              f"columns (e.g. {', '.join(names[:4])}); pass --probe-columns from its target names")
    cols = [names.index(c) for c in wanted]
    out = {}
    for la in layers:
        pl = la + _PROBE_OFFSET[hook]
        if pl not in info["layers"]:
            raise EntitylensError(f"resid_pre {la} is {hook} {pl}, which the probe run did not probe (probed: "
                                  f"{info['layers']}); pick other layers")
        w = tensors[f"{prole}/coef"][info["layers"].index(pl)][:, cols].double()  # [d, c]
        if w.shape[0] != d_model:
            raise EntitylensError(f"the probe is {w.shape[0]} wide and the model {d_model}; use a probe of this model")
        u, sv, _ = torch.linalg.svd(w, full_matrices=False)
        keep = sv > sv[0] * 1e-6 if len(sv) and float(sv[0]) > 0 else torch.zeros_like(sv, dtype=torch.bool)
        if not bool(keep.any()):
            raise EntitylensError(f"the probe's weights at {hook} {pl} are all zero; pick other columns or layers")
        out[la] = u[:, keep].float().contiguous()
    return out


def _given_subspaces(subspaces: str | os.PathLike[str], layers: Sequence[int], role: str
                     ) -> tuple[dict[int, torch.Tensor], str]:
    """A ``patch das`` run's bases for ``layers`` (learned at ``role``) and the file's hash."""
    sub_role, bases = read_subspaces(subspaces)
    missing = [la for la in layers if la not in bases]
    if missing:
        raise EntitylensError(f"{subspaces} has no subspace for layer(s) {missing}; pick layers it has "
                              f"({sorted(bases)})")
    if sub_role and sub_role != role:
        raise EntitylensError(f"the subspaces were learned at role {sub_role!r}, not {role!r}; pass --role {sub_role}")
    sp = Path(subspaces)
    return bases, sha256_file(sp / SUBSPACES if sp.is_dir() else sp)


def _learned_rows(model: Any, pairs: Sequence[PatchPair], layers: Sequence[int], role: str, cfg: DASConfig,
                  path: Path) -> list[dict[str, Any]]:
    """Train DAS per layer, write the learned bases to ``path`` (safetensors) and return the ``das.csv`` rows."""
    from safetensors.torch import save

    results: list[DASResult] = train_das(model, pairs, layers, role, cfg)
    head = json.dumps({"role": role, "k": cfg.k, "kind": "entitylens.das"}, sort_keys=True)
    blob = save({f"layer{r.layer}": r.basis.contiguous() for r in results}, metadata={"entitylens_das": head})
    with atomic_write(path, "wb", encoding=None) as f:
        f.write(blob)
    return [{"layer": r.layer, "role": role, "k": cfg.k, "source": "learned", "train_iia": r.train_iia,
             "test_iia": r.test_iia, "n_train": len(r.train), "n_test": len(r.test)} for r in results]


def _fixed_rows(model: Any, pairs: Sequence[PatchPair], layers: Sequence[int], role: str, cfg: DASConfig,
                source: str, given: dict[int, torch.Tensor] | None = None) -> list[dict[str, Any]]:
    """IIA per layer of a basis DAS does not learn, on DAS's own split of the pairs.

    ``pca``: the top-k principal directions of the training pairs' clean - corrupted differences; ``full``: the
    whole site (activation patching of ``resid_pre`` at the role); ``probe`` (``given``): fixed bases per layer.
    Only pairs the model gets right both ways are kept when ``cfg.behaving_only`` (as :func:`train_das` does).
    """
    counterfactual_targets(pairs)  # pairs without a causal-model answer fail before the capture
    cap = capture_pairs(model, pairs)
    keep = behaving_pairs(cap, pairs) if cfg.behaving_only else list(range(len(pairs)))
    if len(keep) < 2:
        raise EntitylensError(f"only {len(keep)} of {len(pairs)} pairs are ones the model gets right both ways; "
                              "use pairs the model solves, or --all-pairs")
    tr, te = das_split(len(keep), cfg)
    train, test = [keep[i] for i in tr], [keep[i] for i in te]
    train_cap = Captured(cap.fp, [cap.runs[i] for i in train])
    d = int(cap.fp.r.twin.config.hidden_size)
    rows = []
    for la in layers:
        if source == "pca":
            q = pca_basis(model, [pairs[i] for i in train], la, role, cfg.k, captured=train_cap)
        else:
            q = torch.eye(d) if given is None else given[la]
        hit = interchange_iia(model, pairs, la, role, q, criterion=cfg.criterion, captured=cap)
        rows.append({"layer": la, "role": role, "k": int(q.shape[1]), "source": source,
                     "train_iia": float(hit[train].double().mean()), "test_iia": float(hit[test].double().mean()),
                     "n_train": len(train), "n_test": len(test)})
    return rows
