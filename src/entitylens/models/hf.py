"""Hugging Face plumbing shared by the loaders: the local hub cache, transformers' progress bars, tokenizers.

- the hub cache: where a hub id's files are (:func:`hub_cached_config`), and where to load it from offline
  (:func:`hub_location`, which fails fast with the download command when the model is not cached);
- :func:`hf_progress_bars`: transformers' own progress bars follow entitylens's (``--quiet``, no TTY);
- tokenizers: :func:`load_hf_tokenizer`, :func:`finish_tokenizer` (left padding, a pad token) and
  :func:`tokenizer_prepends_bos`.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from entitylens.errors import EntitylensError
from entitylens.progress import bars_enabled, progress

# ----------------------------------------------------------------------------------------------------------
# Hub cache
# ----------------------------------------------------------------------------------------------------------


def _hub_offline() -> bool:
    truthy = {"1", "true", "yes", "on"}
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in truthy:
        return True
    if os.environ.get("TRANSFORMERS_OFFLINE", "").lower() in truthy:
        return True
    with contextlib.suppress(ImportError):
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    return False


def _hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_cached_config(hub_id: str) -> Path | None:
    """Path of the cached ``config.json`` of ``hub_id`` in the local HF cache, or None if not cached."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(hub_id, "config.json", cache_dir=_hf_cache_dir())
    return Path(found) if isinstance(found, str) else None


def hub_location(hub_id: str, revision: str | None = None) -> str:
    """Where to load a hub model from: its cached snapshot directory when offline, else the hub id.

    Offline, loading from the snapshot directory keeps every later step (config, weights, tokenizer,
    TransformerLens' tokenizer rebuild) on the local file system.
    """
    _check_hub_available(hub_id)
    if _hub_offline() and revision is None:
        config = hub_cached_config(hub_id)
        assert config is not None
        return str(config.parent)
    return hub_id


def _check_hub_available(hub_id: str) -> None:
    if hub_cached_config(hub_id) is None and _hub_offline():
        raise EntitylensError(
            f"{hub_id} is not in the local Hugging Face cache ({_hf_cache_dir()}) and the hub is offline "
            f"(HF_HUB_OFFLINE=1); run `hf download {hub_id}` on a machine with access and copy "
            "the cache here, or set HF_HOME to a cache that has it"
        )


# ----------------------------------------------------------------------------------------------------------
# transformers' progress bars
# ----------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def hf_progress_bars() -> Any:
    """Transformers' own progress bars follow ours: shown on a terminal, silent with ``--quiet`` or in a log.

    Covers its "Loading weights" bars (transformers' switch) and the GGUF conversion's bar, which uses
    plain tqdm and is routed through :func:`entitylens.progress.progress` while this context is open.
    """
    from transformers.utils import logging as hf_logging


    was = hf_logging.is_progress_bar_enabled()
    if not bars_enabled():
        hf_logging.disable_progress_bar()
    gguf_utils: Any = None
    with contextlib.suppress(ImportError):
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    saved = getattr(gguf_utils, "tqdm", None)
    if saved is not None:
        gguf_utils.tqdm = lambda iterable=None, **kw: progress(iterable, leave=False, **kw)
    try:
        yield
    finally:
        if saved is not None:
            gguf_utils.tqdm = saved
        if was:
            hf_logging.enable_progress_bar()


# ----------------------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------------------


def tokenizer_prepends_bos(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` puts its BOS token in front of plain text by itself."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer.encode("a")
    return len(ids) > 1 and ids[0] == tokenizer.bos_token_id


def finish_tokenizer(tokenizer: Any) -> None:
    """Make ``tokenizer`` pad on the left, with its EOS token as the pad token when it has none."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def load_hf_tokenizer(location: str) -> Any:
    """``AutoTokenizer.from_pretrained(location)`` (a hub id or a model directory)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(location)
