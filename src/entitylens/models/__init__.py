"""Models: one loading path from a spec (registry key, hub id, local dir, GGUF, tiny, testbed) to a TransformerBridge.

Public API (imported lazily, so ``import entitylens.models`` does not import torch until needed):

- :func:`load_model`, :func:`resolve_spec`, :class:`ModelInfo`, :func:`model_info`, :func:`load_tokenizer`
- :data:`REGISTRY`, :class:`RegistryEntry`, :data:`EXPERIMENTS`, :func:`experiment_pairs`
- :func:`object_token_ids`, :func:`first_token_ids`, :func:`encode`
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    # loading and its parts
    "ModelInfo": "info",
    "ResolvedSpec": "specs",
    "cache_root": "gguf",
    "check_device_dtype": "dtypes",
    "gguf_cache_dir": "gguf",
    "gguf_sha256": "gguf",
    "gguf_to_cache": "gguf",
    "load_model": "loading",
    "load_tokenizer": "loading",
    "weights_location": "loading",
    "model_info": "info",
    "model_label": "specs",
    "parse_dtype": "dtypes",
    "resolve_spec": "specs",
    "tokenizer_prepends_bos": "hf",
    "DTYPE_CHOICES": "_constants",
    # registry
    "EXPERIMENTS": "registry",
    "NUMOPS_COUNTS": "registry",
    "PAPER_RANDOM_BASELINE": "registry",
    "REGISTRY": "registry",
    "RegistryEntry": "registry",
    "experiment_pairs": "registry",
    "get_entry": "registry",
    "paper_entries": "registry",
    # tiny
    "TINY_NAMES": "tiny",
    "TinySpec": "tiny",
    "parse_tiny_spec": "tiny",
    "tiny_tokenizer": "tiny",
    # tokens
    "encode": "tokens",
    "first_token_ids": "tokens",
    "get_tokenizer": "tokens",
    "model_prepends_bos": "tokens",
    "object_token_ids": "tokens",
    "prompt_ids": "tokens",
    "shared_first_tokens": "tokens",
    "text_token_ids": "tokens",
}

__all__ = [
    "DTYPE_CHOICES",
    "EXPERIMENTS",
    "ModelInfo",
    "NUMOPS_COUNTS",
    "PAPER_RANDOM_BASELINE",
    "REGISTRY",
    "RegistryEntry",
    "ResolvedSpec",
    "TINY_NAMES",
    "TinySpec",
    "cache_root",
    "check_device_dtype",
    "encode",
    "experiment_pairs",
    "first_token_ids",
    "get_entry",
    "get_tokenizer",
    "gguf_cache_dir",
    "gguf_sha256",
    "gguf_to_cache",
    "load_model",
    "load_tokenizer",
    "model_info",
    "model_label",
    "model_prepends_bos",
    "object_token_ids",
    "paper_entries",
    "parse_dtype",
    "parse_tiny_spec",
    "prompt_ids",
    "resolve_spec",
    "shared_first_tokens",
    "text_token_ids",
    "tiny_tokenizer",
    "tokenizer_prepends_bos",
    "weights_location",
]

if TYPE_CHECKING:  # pragma: no cover
    from entitylens.models._constants import DTYPE_CHOICES
    from entitylens.models.dtypes import check_device_dtype, parse_dtype
    from entitylens.models.gguf import cache_root, gguf_cache_dir, gguf_sha256, gguf_to_cache
    from entitylens.models.hf import tokenizer_prepends_bos
    from entitylens.models.info import ModelInfo, model_info
    from entitylens.models.loading import load_model, load_tokenizer, weights_location
    from entitylens.models.registry import (
        EXPERIMENTS,
        NUMOPS_COUNTS,
        PAPER_RANDOM_BASELINE,
        REGISTRY,
        RegistryEntry,
        experiment_pairs,
        get_entry,
        paper_entries,
    )
    from entitylens.models.specs import ResolvedSpec, model_label, resolve_spec
    from entitylens.models.tiny import TINY_NAMES, TinySpec, parse_tiny_spec, tiny_tokenizer
    from entitylens.models.tokens import (
        encode,
        first_token_ids,
        get_tokenizer,
        model_prepends_bos,
        object_token_ids,
        prompt_ids,
        shared_first_tokens,
        text_token_ids,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'entitylens.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"entitylens.models.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
