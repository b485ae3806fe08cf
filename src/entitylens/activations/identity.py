"""Which model a cache was built from: a cheap fingerprint of its weights and its load record.

:func:`model_fingerprint` is what a cache (and a patch run) compares to refuse another model's data;
:func:`model_record` is the JSON-ready ``ModelInfo`` kept in ``meta.json`` for people to read.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from typing import Any

import torch


def model_fingerprint(model: Any) -> str:
    """Fingerprint a bridge cheaply: its config plus a strided sample of every parameter.

    Two models with different weights (another checkpoint, another seed, another dtype) get different
    fingerprints; the same weights loaded twice get the same one.

    Args:
        model: A ``TransformerBridge`` (any ``torch.nn.Module`` with a ``cfg``).

    Returns:
        Hex SHA-256.

    """
    h = hashlib.sha256()
    cfg = getattr(model, "cfg", None)
    for key in ("n_layers", "d_model", "n_heads", "d_vocab", "n_ctx", "architecture"):
        h.update(f"{key}={getattr(cfg, key, None)};".encode())
    seen: set[int] = set()
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if id(p) in seen:
                continue
            seen.add(id(p))
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // 2048)
            sample = flat[::step][:2048].to("cpu", torch.float64).numpy()
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
            h.update(sample.tobytes())
    return h.hexdigest()


def model_record(model: Any) -> dict[str, Any]:
    """The model's ``entitylens_info`` (its :class:`~entitylens.models.ModelInfo`) as JSON-ready data.

    Args:
        model: A bridge, loaded by :func:`entitylens.models.load_model` or not.

    Returns:
        The record (``{}`` for a model without one; ``{"repr": ...}`` when it is not JSON-serialisable).
    """
    info = getattr(model, "entitylens_info", None)
    if info is None:
        return {}
    if hasattr(info, "to_dict"):
        info = info.to_dict()
    elif hasattr(info, "__dataclass_fields__"):
        info = asdict(info)
    try:
        return json.loads(json.dumps(info, default=str))
    except (TypeError, ValueError):
        return {"repr": repr(info)}
