"""Position-selected activation caching: token roles, hook aliases, safetensors shards.

See ``docs/activations.md``. The main entry points:

- :func:`cache_activations` -- run a ``TransformerBridge`` over a dataset and store the activations of
  chosen hooks at chosen token roles as checksummed, resumable safetensors shards;
- :func:`load_cache` -- open such a cache (:class:`CachedActivations`, ``.features(hook, role)`` ->
  ``[layer, n, d_model]``);
- :func:`find_roles` -- token index of each role in one prompt, computed from the prompt text.
"""

from entitylens.activations.cache import (
    CacheConfig,
    CachedActivations,
    CacheIndex,
    CachePrompt,
    build_prompts,
    cache_activations,
    load_cache,
    model_fingerprint,
    query_text,
)
from entitylens.activations.hooks import HOOK_ALIASES, HookSpec, resolve_hooks, resolve_model_hooks
from entitylens.activations.prompts import compact_cache_prompts
from entitylens.activations.roles import (
    ROLE_CATALOGUE,
    PromptStructure,
    find_roles,
    parse_prompt,
    span_to_token,
    tokenize_with_offsets,
    validate_roles,
)

__all__ = [
    "HOOK_ALIASES",
    "ROLE_CATALOGUE",
    "CacheConfig",
    "CacheIndex",
    "CachePrompt",
    "CachedActivations",
    "HookSpec",
    "PromptStructure",
    "build_prompts",
    "cache_activations",
    "compact_cache_prompts",
    "find_roles",
    "load_cache",
    "model_fingerprint",
    "parse_prompt",
    "query_text",
    "resolve_hooks",
    "resolve_model_hooks",
    "span_to_token",
    "tokenize_with_offsets",
    "validate_roles",
]
