"""Model specs: what a ``--model SPEC`` string refers to, worked out without loading any weights.

A *spec* is one string (the ``--model SPEC`` of every CLI command):

- a registry key (``llama2-7b``, ``codellama-7b-instruct``, ``smollm2-135m-instruct``...; see
  :mod:`entitylens.models.registry`);
- a Hugging Face hub id (``org/name``), loaded from the local HF cache (offline, a model that is not
  cached fails fast with the command that pre-downloads it);
- a local HF model directory (must hold ``config.json``);
- a ``.gguf`` file (dequantized once and cached, see :mod:`entitylens.models.gguf`);
- ``tiny:<name>[?seed=N&...]`` random models for tests (:mod:`entitylens.models.tiny`);
- ``testbed:<stem|base|code|directory>`` the controlled-pretraining testbed checkpoints
  (:mod:`entitylens.models.testbed`).

:func:`resolve_spec` turns a spec into a :class:`ResolvedSpec` (touching only the file system);
:func:`model_label` is the one label of a model in every output.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from entitylens.errors import EntitylensError
from entitylens.models.gguf import gguf_metadata, locate_registry_gguf
from entitylens.models.hf import hub_cached_config
from entitylens.models.metadata import chat_from_metadata, gguf_chat, hf_dir_metadata
from entitylens.models.registry import EXPERIMENTS, REGISTRY, RegistryEntry, unknown_key_message
from entitylens.models.testbed.checkpoints import resolve_testbed_spec
from entitylens.models.tiny import TinySpec, parse_tiny_spec

SpecKind = Literal["registry", "hub", "local", "gguf", "tiny", "testbed"]
Source = Literal["hub", "local", "gguf", "tiny", "testbed"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
"""Files of which a Hugging Face model directory must hold at least one (its tokenizer)."""


@dataclass(frozen=True)
class ResolvedSpec:
    """What a spec refers to, without loading anything.

    Attributes:
        spec: The spec as written.
        kind: What the user wrote: ``registry``, ``hub``, ``local``, ``gguf`` or ``tiny``.
        source: Where the weights come from: ``hub`` (HF cache), ``local`` (HF directory), ``gguf``
            (a GGUF file, dequantized and cached) or ``tiny`` (built from a seed).
        hub_id: Hugging Face hub id, when known.
        path: Local directory or ``.gguf`` file, when known (for a registry GGUF model whose file is
            assembled on first use, ``None`` until then).
        entry: The registry entry (for registry keys, and for hub ids that are in the registry).
        tiny: The parsed tiny spec (``tiny`` only).
        chat: Whether the model is a chat/instruct model: the registry's fact, else the model's own metadata
            (:func:`entitylens.models.metadata.chat_from_metadata`: a chat template and an instruct/chat
            marker in its names -- GGUF header, HF config, file name as given and after resolving links).
    """

    spec: str
    kind: SpecKind
    source: Source
    hub_id: str | None = None
    path: str | None = None
    entry: RegistryEntry | None = None
    tiny: TinySpec | None = None
    chat: bool = False


def model_label(spec: str) -> str:
    """The one label of a model in every output (eval rows, cache and probe runs, patch runs, figures).

    Registry keys, baselines (``random``...), ``tiny:`` and ``testbed:`` specs are their own label; a hub id
    is labelled by its name (``meta-llama/Llama-2-7b-hf`` -> ``Llama-2-7b-hf``), a ``.gguf`` file by its stem
    and a model directory by its name, wherever it lives
    (``~/models/Qwen2.5-Coder.Q4.gguf`` -> ``Qwen2.5-Coder.Q4``), so the CLI and Python agree and a run
    resumed from either finds its rows.

    Args:
        spec: The model spec as given.

    Returns:
        The label.
    """
    spec = str(spec).strip()
    if spec.startswith(("tiny:", "testbed:")) or not (os.sep in spec or "/" in spec or spec.endswith(".gguf")):
        return spec
    if spec.lower().endswith(".gguf"):
        return Path(spec).stem
    return Path(spec.rstrip("/" + os.sep)).expanduser().name or spec


def _looks_like_path(spec: str) -> bool:
    return (
        spec.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or spec in (".", "..")
        or spec.count("/") > 1
        or "\\" in spec
        or bool(re.match(r"^[A-Za-z]:[\\/]", spec))
    )


def _guess_chat(name: str) -> bool:
    low = name.lower()
    return bool(re.search(r"(chat|instruct|-it\b|_it\b|-sft|-dpo|-rlhf)", low))


def _hub_chat(hub_id: str) -> bool:
    """A hub model's chat flag from its cached files (its name alone when it is not cached)."""
    with contextlib.suppress(Exception):
        config = hub_cached_config(hub_id)
        if config is not None:
            meta = hf_dir_metadata(config.parent)
            return chat_from_metadata([hub_id, *meta["names"]], meta["chat_template"])
    return _guess_chat(hub_id)


def _registry_by_hub_id(hub_id: str) -> RegistryEntry | None:
    for entry in REGISTRY.values():
        if entry.hub_id.lower() == hub_id.lower() and not entry.offline:
            return entry
    return None


def resolve_spec(spec: str, seed: int | None = None) -> ResolvedSpec:
    """Work out what ``spec`` refers to, without loading weights (fast; touches only the file system).

    Args:
        spec: A registry key, hub id, local directory, ``.gguf`` file or ``tiny:<name>``.
        seed: Seed for ``tiny:`` specs (overrides ``?seed=``); ignored otherwise.

    Returns:
        The resolved spec.

    Raises:
        EntitylensError: Empty spec, experiment name given as a model, unknown registry key (with the
            closest keys), missing local directory / GGUF file, directory without ``config.json``.
    """
    spec = str(spec).strip()
    if not spec:
        raise EntitylensError("empty model spec; pass a registry key (see `entitylens models list`) or a path")
    if spec.startswith("tiny:"):
        tiny = parse_tiny_spec(spec, seed=seed)
        return ResolvedSpec(spec, "tiny", "tiny", tiny=tiny, chat=False)
    if spec.startswith("testbed:"):

        return ResolvedSpec(spec, "testbed", "testbed", path=str(resolve_testbed_spec(spec)), chat=False)
    if spec in REGISTRY:
        entry = REGISTRY[spec]
        if entry.offline:
            path = locate_registry_gguf(entry, assemble=False)
            return ResolvedSpec(
                spec, "registry", "gguf", hub_id=entry.hub_id, path=str(path) if path else None,
                entry=entry, chat=entry.chat,
            )  # fmt: skip
        return ResolvedSpec(spec, "registry", "hub", hub_id=entry.hub_id, entry=entry, chat=entry.chat)
    if spec in EXPERIMENTS:
        raise EntitylensError(
            f"{spec!r} is an experiment (a list of model pairs), not a model; pick one of its models from "
            f"`entitylens models list --experiment {spec}`"
        )
    path = Path(spec).expanduser()
    if spec.lower().endswith(".gguf"):
        if not path.is_file():
            raise EntitylensError(f"GGUF file {spec} does not exist; check the path")
        chat = gguf_chat(path, gguf_metadata(path))  # also refuses a damaged file in one line
        return ResolvedSpec(spec, "gguf", "gguf", path=str(path.resolve()), chat=chat)
    if path.exists():
        if not path.is_dir():
            raise EntitylensError(
                f"{spec} is a file, not a model directory; pass a directory with config.json or a .gguf file"
            )
        if not (path / "config.json").is_file():
            raise EntitylensError(
                f"{spec} has no config.json, so it is not a Hugging Face model directory; point at the "
                "directory written by save_pretrained"
            )
        if not any((path / f).is_file() for f in TOKENIZER_FILES):
            raise EntitylensError(
                f"{spec} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...); save the model's "
                f"tokenizer into it with tokenizer.save_pretrained('{spec}')"
            )
        meta = hf_dir_metadata(path)
        chat = chat_from_metadata([spec, *meta["names"]], meta["chat_template"])
        return ResolvedSpec(spec, "local", "local", path=str(path.resolve()), chat=chat)
    if _looks_like_path(spec):
        raise EntitylensError(f"model directory {spec} does not exist; check the path (or use a hub id org/name)")
    if _HUB_ID.match(spec):
        hub_entry = _registry_by_hub_id(spec)
        chat = hub_entry.chat if hub_entry else _hub_chat(spec)
        return ResolvedSpec(spec, "hub", "hub", hub_id=spec, entry=hub_entry, chat=chat)
    raise EntitylensError(unknown_key_message(spec))
