"""One loading path from a model spec to a TransformerLens ``TransformerBridge``.

:func:`load_model` takes any spec :func:`~entitylens.models.specs.resolve_spec` understands (registry key,
hub id, local directory, ``.gguf`` file, ``tiny:``, ``testbed:``); the pieces live in their own modules:

- :mod:`entitylens.models.specs` -- what a spec refers to (:class:`ResolvedSpec`, :func:`model_label`);
- :mod:`entitylens.models.hf` -- the local Hugging Face cache, transformers' progress bars, tokenizers;
- :mod:`entitylens.models.gguf` -- GGUF files and their dequantized float32 cache;
- :mod:`entitylens.models.dtypes` -- dtype names and device checks;
- :mod:`entitylens.models.info` -- :class:`ModelInfo`, what was loaded;
- :mod:`entitylens.models.tiny` and :mod:`entitylens.models.testbed` -- the project's own model sources.

Every loaded bridge carries ``bridge.entitylens_info``, a :class:`ModelInfo` recording what was loaded
(for run configs), has a left-padding tokenizer with a pad token, and has
``bridge.cfg.default_prepend_bos`` set to what the family's own tokenizer does (Llama/Gemma/Mistral/
DeepSeek prepend BOS; GPT-2-style tokenizers such as SmolLM2, OLMo and Phi do not), so
``bridge.to_tokens(text)`` and :func:`encode` tokenize the way the model was trained.

The names of the modules above that callers used to import from here are re-exported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from entitylens.errors import EntitylensError
from entitylens.models.dtypes import check_device_dtype, dtype_name, parse_dtype
from entitylens.models.gguf import (
    GGUF_MARKER,
    cache_root,
    gguf_cache_dir,
    gguf_metadata,
    gguf_sha256,
    gguf_to_cache,
    locate_registry_gguf,
)
from entitylens.models.hf import (
    finish_tokenizer,
    hf_progress_bars,
    hub_cached_config,
    hub_location,
    load_hf_tokenizer,
    tokenizer_prepends_bos,
)
from entitylens.models.info import ModelInfo, model_info
from entitylens.models.specs import ResolvedSpec, model_label, resolve_spec
from entitylens.models.testbed.checkpoints import load_testbed, load_testbed_tokenizer
from entitylens.models.tiny import TinySpec, build_tiny_hf, build_tiny_native_config, tiny_prepends_bos, tiny_tokenizer

__all__ = [
    "ModelInfo",
    "ResolvedSpec",
    "cache_root",
    "check_device_dtype",
    "dtype_name",
    "gguf_cache_dir",
    "gguf_metadata",
    "gguf_sha256",
    "gguf_to_cache",
    "hub_cached_config",
    "load_model",
    "load_tokenizer",
    "locate_registry_gguf",
    "model_info",
    "model_label",
    "parse_dtype",
    "resolve_spec",
    "tokenizer_prepends_bos",
    "weights_location",
]


def load_model(
    spec: str,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    device_map: str | dict[str, Any] | None = None,
    *,
    seed: int | None = None,
    chat: bool | None = None,
    **kwargs: Any,
) -> Any:
    """Load ``spec`` as a TransformerLens ``TransformerBridge`` (eval mode, left-padding tokenizer).

    Args:
        spec: Registry key, hub id, local HF directory, ``.gguf`` file, or ``tiny:<name>[?seed=N]``.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``mps``. Ignored when ``device_map`` is given.
        dtype: ``float32`` / ``bfloat16`` / ``float16`` (or aliases, or a torch dtype).
        device_map: Passed to Hugging Face / accelerate for multi-GPU or offloaded 70B-class models
            (``"auto"``, ``"balanced"`` or an explicit dict). Not supported for ``tiny:`` specs.
        seed: Weight seed for ``tiny:`` specs (overrides ``?seed=``).
        chat: Override whether the model is treated as a chat model (default: registry fact or a guess
            from the name).
        **kwargs: Passed on to ``TransformerBridge.boot_transformers`` (``n_ctx``, ``revision``,
            ``max_memory``, ``n_devices``, ``trust_remote_code``...).

    Returns:
        The bridge, with ``bridge.entitylens_info`` (:class:`ModelInfo`).

    Raises:
        EntitylensError: Bad spec, missing files/packages, model not cached while offline, unsupported
            device or dtype.
    """
    resolved = resolve_spec(spec, seed=seed)
    torch_dtype = parse_dtype(dtype)
    if resolved.source == "testbed":  # the testbed model source has its own loader
        if device_map is not None or kwargs:
            raise EntitylensError("testbed: models take only device= and dtype=; drop the other options")

        return load_testbed(resolved.spec, device=device, dtype=torch_dtype)
    dev = _target_device(resolved, device, torch_dtype, device_map, kwargs)
    if resolved.source == "tiny":
        assert resolved.tiny is not None
        with torch.random.fork_rng(devices=[]):  # loading never moves the caller's RNG
            bridge, prepends_bos = _load_tiny(resolved.tiny, dev, torch_dtype)
        path: str | None = resolved.tiny.canonical
        source_hash: str | None = resolved.tiny.digest
    else:
        location, path, source_hash = _weights_location(resolved, kwargs.get("revision"))
        tokenizer = load_hf_tokenizer(location)
        prepends_bos = tokenizer_prepends_bos(tokenizer)
        finish_tokenizer(tokenizer)
        with hf_progress_bars():
            bridge = _boot(
                location, tokenizer=tokenizer, device=dev, dtype=torch_dtype, device_map=device_map, **kwargs
            )
    _finish_bridge(bridge, prepends_bos)
    bridge.entitylens_info = _loaded_info(resolved, bridge, torch_dtype, path, source_hash, prepends_bos, chat)
    return bridge


def _target_device(
    resolved: ResolvedSpec,
    device: str | torch.device,
    dtype: torch.dtype,
    device_map: str | dict[str, Any] | None,
    kwargs: dict[str, Any],
) -> torch.device | None:
    """The checked device to load onto; None when ``device_map``/``n_devices`` spread the model out."""
    multi_device = device_map is not None or (kwargs.get("n_devices") or 1) > 1
    if not multi_device:
        return check_device_dtype(device, dtype)
    if resolved.source == "tiny":
        raise EntitylensError(
            "device_map / n_devices are not supported for tiny: models (they fit anywhere); pass device= instead"
        )
    if torch.cuda.is_available():
        check_device_dtype("cuda", dtype)
    return None


def _weights_location(resolved: ResolvedSpec, revision: str | None) -> tuple[str, str | None, str | None]:
    """Where a hub, local or GGUF model loads from: ``(location, path recorded, source hash)``.

    A GGUF file is located (a registry model's file assembled on first use), hashed and dequantized into
    its cache first; the cache directory is then both the location and the recorded path.
    """
    if resolved.source == "hub":
        assert resolved.hub_id is not None
        location = hub_location(resolved.hub_id, revision)
        return location, (location if location != resolved.hub_id else None), None
    if resolved.source == "local":
        assert resolved.path is not None
        return resolved.path, resolved.path, None
    gguf_path = Path(resolved.path) if resolved.path else None
    if gguf_path is None:
        assert resolved.entry is not None
        gguf_path = locate_registry_gguf(resolved.entry, assemble=True)
        assert gguf_path is not None
    source_hash = gguf_sha256(gguf_path)
    location = str(gguf_to_cache(gguf_path, source_hash))
    return location, location, source_hash


def _loaded_info(
    resolved: ResolvedSpec,
    bridge: Any,
    dtype: torch.dtype,
    path: str | None,
    source_hash: str | None,
    prepends_bos: bool,
    chat: bool | None,
) -> ModelInfo:
    """The :class:`ModelInfo` of a bridge :func:`load_model` has just booted and finished."""
    from transformers import PreTrainedModel

    entry = resolved.entry
    return ModelInfo(
        spec=resolved.spec,
        kind=resolved.kind,
        source=resolved.source,
        hub_id=resolved.hub_id,
        registry_key=entry.key if entry else None,
        display_name=entry.display_name if entry else resolved.spec,
        chat=resolved.chat if chat is None else bool(chat),
        dtype=dtype_name(dtype),
        device=str(bridge.cfg.device),
        path=path,
        source_hash=source_hash,
        prepends_bos=prepends_bos,
        paper_overall=entry.paper_overall if entry else None,
        has_hf_model=isinstance(bridge.original_model, PreTrainedModel),
    )


def _boot(
    name: str,
    *,
    tokenizer: Any,
    device: torch.device | None,
    dtype: torch.dtype,
    device_map: Any,
    hf_model: Any = None,
    **kwargs: Any,
) -> Any:
    from transformer_lens.model_bridge import TransformerBridge

    if hf_model is not None:
        return TransformerBridge.boot_transformers(name, hf_model=hf_model, tokenizer=tokenizer, dtype=dtype, **kwargs)
    return TransformerBridge.boot_transformers(
        name,
        tokenizer=tokenizer,
        device=device,
        dtype=dtype,
        device_map=device_map,
        **kwargs,
    )


def _finish_bridge(bridge: Any, prepends_bos: bool) -> None:
    finish_tokenizer(bridge.tokenizer)
    bridge.cfg.default_prepend_bos = prepends_bos
    bridge.cfg.default_padding_side = "left"
    bridge.eval()


def _load_tiny(tiny: TinySpec, device: torch.device | None, dtype: torch.dtype) -> tuple[Any, bool]:
    from transformer_lens.model_bridge import TransformerBridge


    if tiny.name == "native":
        # The function TransformerLens attaches as TransformerBridge.boot_native (with setattr, so
        # type checkers cannot see the attribute).
        from transformer_lens.model_bridge.sources import boot_native

        tokenizer = tiny_tokenizer(bos=True)
        cfg = build_tiny_native_config(tiny, len(tokenizer))
        bridge = boot_native(
            cfg, tokenizer=tokenizer, device=device, dtype=dtype, model_name=tiny.canonical
        )
        return bridge, True
    model, tokenizer = build_tiny_hf(tiny)
    prepends_bos = tokenizer_prepends_bos(tokenizer)
    model = model.to(device=device or "cpu", dtype=dtype)
    bridge = TransformerBridge.boot_transformers(tiny.canonical, hf_model=model, tokenizer=tokenizer, dtype=dtype)
    return bridge, prepends_bos


def weights_location(spec: str, revision: str | None = None) -> str:
    """The Hugging Face model directory (or hub id) that ``spec``'s weights load from, for another engine.

    A registry GGUF model is assembled, hashed and dequantized into its float cache first (once), exactly
    as :func:`load_model` does, so an engine such as vLLM reads the same weights the bridge does.

    Raises:
        EntitylensError: ``tiny:`` and testbed models, which have no Hugging Face files.
    """
    resolved = resolve_spec(spec)
    if resolved.source in ("tiny", "testbed"):
        raise EntitylensError(f"{spec} has no Hugging Face files for another engine to load; run it on the native "
                              "engine (drop --engine)")
    return _weights_location(resolved, revision)[0]


def load_tokenizer(spec: str) -> Any:
    """Load only the tokenizer of ``spec`` (left padding, pad token set), without the model weights.

    For a GGUF spec whose float copy is cached, this reads the cached tokenizer (fast); otherwise the
    GGUF file's tokenizer (a few seconds). Note: the bridge's own tokenizer (``bridge.tokenizer``) may
    have been rebuilt by TransformerLens to always add BOS; both give the same ids with
    ``add_special_tokens=False``.
    """
    resolved = resolve_spec(spec)
    if resolved.source == "tiny":

        return tiny_tokenizer(bos=tiny_prepends_bos(resolved.tiny.name))  # type: ignore[union-attr]
    if resolved.source == "testbed":

        return load_testbed_tokenizer(resolved.path)  # type: ignore[arg-type]
    if resolved.source == "hub":
        assert resolved.hub_id is not None
        tok = load_hf_tokenizer(hub_location(resolved.hub_id))
    elif resolved.source == "local":
        tok = load_hf_tokenizer(resolved.path)  # type: ignore[arg-type]
    else:
        gguf_path = Path(resolved.path) if resolved.path else None
        if gguf_path is None:
            gguf_path = locate_registry_gguf(resolved.entry, assemble=True)  # type: ignore[arg-type]
        cached = gguf_cache_dir(gguf_sha256(gguf_path))  # type: ignore[arg-type]
        if (cached / GGUF_MARKER).is_file():
            tok = load_hf_tokenizer(str(cached))
        else:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)  # type: ignore[union-attr]
    finish_tokenizer(tok)
    return tok
