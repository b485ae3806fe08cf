"""Saving and loading fitted probes: one safetensors file per :class:`~entitylens.probing.linear.ProbeResult`.

The file holds the result's tensors and its split; the metadata carry the kind, the number of examples,
the held-out objects and the :class:`~entitylens.probing.linear.ProbeConfig` as JSON (format
``entitylens.probes/1``). Files written before the ``preconditioner`` option (with ``rotate``) still load.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from typing import Any

from torch import Tensor

from entitylens._io import atomic_write
from entitylens.errors import EntitylensError
from entitylens.probing.linear import ProbeConfig, ProbeResult
from entitylens.probing.splits import Split

__all__ = ["load_probe_result", "save_probe_result"]

_TENSORS = ("coef", "intercept", "mean", "scale", "C", "cv_score", "n_iter", "converged", "classes",
            "constant_targets", "y_train", "y_test", "train_logits", "test_logits")


def save_probe_result(result: ProbeResult, path: str | os.PathLike[str]) -> None:
    """Write a :class:`ProbeResult` to one safetensors file (tensors + JSON metadata), atomically.

    Args:
        result: The fitted probes.
        path: The file to write (replaced whole, never left half-written).
    """
    from safetensors.torch import save

    tensors: dict[str, Tensor] = {}
    for name in _TENSORS:
        v = getattr(result, name)
        if v is not None:
            tensors[name] = v.contiguous().cpu()
    tensors["split.train"] = result.split.train.contiguous()
    tensors["split.test"] = result.split.test.contiguous()
    assert result.split.test_heldout is not None  # Split.__post_init__ fills it in
    tensors["split.test_heldout"] = result.split.test_heldout.contiguous()
    tensors["split.dropped"] = result.split.dropped.contiguous()
    meta = {"kind": result.kind, "n_examples": str(result.n_examples),
            "config": json.dumps(asdict(result.config), sort_keys=True),
            "heldout_objects": json.dumps(list(result.split.heldout_objects)), "format": "entitylens.probes/1"}
    if result.column_groups:
        meta["column_groups"] = json.dumps(list(result.column_groups))
    # ONE header key of canonical JSON: safetensors writes several keys in a random order, which would
    # make two saves of the same probes differ byte for byte.
    blob = save(tensors, metadata={"entitylens": json.dumps(meta, sort_keys=True, separators=(",", ":"))})
    with atomic_write(path, "wb") as f:
        f.write(blob)


def load_probe_result(path: str | os.PathLike[str]) -> ProbeResult:
    """Read a :class:`ProbeResult` written by :func:`save_probe_result`.

    Args:
        path: The file.

    Returns:
        The :class:`ProbeResult`, with its split and configuration.

    Raises:
        EntitylensError: The file cannot be read or is not an entitylens probe file.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if "entitylens" in meta:
                meta = json.loads(meta["entitylens"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises its own error type for corrupt headers
        raise EntitylensError(f"cannot read probes from {path}: {e}; pass a file written by save_probe_result") from e
    if meta.get("format") != "entitylens.probes/1":
        raise EntitylensError(f"{path} is not an entitylens probe file; pass a file written by save_probe_result")
    cfg = json.loads(meta["config"])
    cfg["Cs"] = tuple(cfg["Cs"])
    if "rotate" in cfg:  # files written before the preconditioner option
        cfg["preconditioner"] = "eigen" if cfg.pop("rotate") else "diagonal"
    split = Split(train=tensors.pop("split.train"), test=tensors.pop("split.test"),
                  heldout_objects=tuple(json.loads(meta["heldout_objects"])),
                  test_heldout=tensors.pop("split.test_heldout"), dropped=tensors.pop("split.dropped"))
    kw: dict[str, Any] = {name: tensors.get(name) for name in _TENSORS}  # None: an optional field not saved
    return ProbeResult(kind=meta["kind"], split=split, n_examples=int(meta["n_examples"]),
                       config=ProbeConfig(**cfg), column_groups=tuple(json.loads(meta.get("column_groups", "[]"))),
                       **kw)
