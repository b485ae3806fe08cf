"""The testbed's shipped checkpoints and the ``testbed:`` model spec: where they are and how they load.

The package ships ``shipped/{stem,base,code}/`` next to this module (written by
:func:`entitylens.testbed.train.train_stage`). Each directory is also a plain Hugging Face model directory
(``config.json``, ``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json``) plus ``meta.json``,
``train_log.csv`` and ``train_log.png``.

Specs:

* ``testbed:stem`` / ``testbed:base`` / ``testbed:code`` — the shipped checkpoints;
* ``testbed:<directory>`` — a checkpoint directory written by ``entitylens testbed train --out``.

:func:`load_testbed` wraps the checkpoint's ``LlamaForCausalLM`` in a ``TransformerBridge`` through
``TransformerBridge.boot_transformers(..., hf_model=, tokenizer=)`` (offline), with
``bridge.entitylens_info`` a :class:`~entitylens.models.ModelInfo` whose ``kind``/``source`` are
``"testbed"``, ``chat`` is False and ``source_hash`` is the checkpoint's recipe hash; the whole
``meta.json`` is ``bridge.entitylens_testbed_meta``.

This is a model source like :mod:`entitylens.models.tiny`; the training that writes the checkpoints lives
above, in :mod:`entitylens.testbed`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from entitylens.errors import EntitylensError
from entitylens.models.dtypes import check_device_dtype, dtype_name, parse_dtype
from entitylens.models.info import ModelInfo
from entitylens.models.testbed.tokenizer import build_tokenizer

CHECKPOINTS_DIR = Path(__file__).resolve().parent / "shipped"
"""Where the shipped checkpoints live."""

STAGES: tuple[str, ...] = ("stem", "base", "code")
"""Training stages: the shared stem and its two arms."""

SPEC_PREFIX = "testbed:"
"""Model-spec prefix of testbed checkpoints."""

CHECKPOINT_FILES: tuple[str, ...] = (
    "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "meta.json",
    "train_log.csv", "train_log.png", "timing.json",
)  # fmt: skip
"""Files every checkpoint directory holds."""

SAVE_DTYPE = torch.float32
"""Dtype of the stored weights (the models are small enough for float32)."""


def checkpoint_dir(stage: str) -> Path:
    """Directory of the shipped checkpoint of ``stage`` (``stem``, ``base`` or ``code``)."""
    if stage not in STAGES:
        raise EntitylensError(f"unknown testbed stage {stage!r}; use one of {', '.join(STAGES)}")
    return CHECKPOINTS_DIR / stage


def resolve_testbed_spec(spec: str) -> Path:
    """The checkpoint directory a ``testbed:`` spec names.

    Args:
        spec: ``testbed:stem|base|code`` or ``testbed:<directory>``.

    Returns:
        The directory (checked to hold ``meta.json`` and ``model.safetensors``).

    Raises:
        EntitylensError: Not a testbed spec, unknown stage, or a directory that is not a checkpoint.
    """
    if not str(spec).startswith(SPEC_PREFIX):
        raise EntitylensError(
            f"{spec!r} is not a testbed spec; use testbed:stem, testbed:base or testbed:code"
        )
    body = str(spec)[len(SPEC_PREFIX) :]
    if body in STAGES:
        path = checkpoint_dir(body)
    elif "/" in body or os.sep in body or body.startswith("."):
        path = Path(body).expanduser()
    else:
        raise EntitylensError(
            f"unknown testbed model {spec!r}; "
            "use testbed:stem, testbed:base, testbed:code or testbed:<directory>"
        )
    for name in ("meta.json", "model.safetensors", "config.json"):
        if not (path / name).is_file():
            raise EntitylensError(
                f"{path} has no {name}, so it is not a testbed checkpoint; train it with "
                "`entitylens testbed train --stage ...`"
            )
    return path


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``meta.json`` of a checkpoint directory."""
    p = Path(path) / "meta.json"
    if not p.is_file():
        raise EntitylensError(
            f"{path} has no meta.json; pass a checkpoint written by `entitylens testbed train`"
        )
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise EntitylensError(f"{p} is not valid JSON ({e.msg}); retrain that stage") from None


def save_hf_checkpoint(model: Any, path: str | os.PathLike[str]) -> None:
    """Write ``model`` (float32 safetensors + ``config.json``) and the testbed tokenizer into ``path``."""
    from safetensors.torch import save_file


    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(SAVE_DTYPE).contiguous().clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg.pop("_name_or_path", None)
    cfg.pop("transformers_version", None)
    cfg["dtype"] = "float32"
    cfg["architectures"] = ["LlamaForCausalLM"]
    with open(path / "config.json", "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    tok = build_tokenizer()
    tok.save_pretrained(str(path))
    for extra in ("special_tokens_map.json", "chat_template.jinja"):
        if (path / extra).exists():
            (path / extra).unlink()


def load_hf_checkpoint(path: str | os.PathLike[str], dtype: torch.dtype = torch.float32) -> Any:
    """Load a checkpoint directory's ``LlamaForCausalLM`` (eval mode).

    Args:
        path: A checkpoint directory.
        dtype: Parameter dtype.

    Returns:
        The model.
    """
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    if not (path / "model.safetensors").is_file() or not (path / "config.json").is_file():
        raise EntitylensError(
            f"{path} has no model.safetensors/config.json; pass a testbed checkpoint directory"
        )
    cfg_dict = json.loads((path / "config.json").read_text())
    cfg = LlamaConfig(**{k: v for k, v in cfg_dict.items() if k not in ("architectures", "model_type")})
    with torch.random.fork_rng(devices=[]):
        model = LlamaForCausalLM(cfg)
    state = load_file(str(path / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise EntitylensError(
            f"{path}/model.safetensors does not match its config (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); retrain the checkpoint"
        )
    if cfg.tie_word_embeddings:
        model.tie_weights()
    model.config.name_or_path = str(path)
    module: torch.nn.Module = model  # PreTrainedModel.to is typed through functools.wraps, which mypy cannot bind
    return module.to(dtype).eval()


def load_testbed_tokenizer(path: str | os.PathLike[str]) -> Any:
    """The tokenizer stored in a checkpoint directory (``tokenizer.json``), as the testbed wraps it."""
    p = Path(path) / "tokenizer.json"
    if not p.is_file():
        raise EntitylensError(f"{path} has no tokenizer.json; pass a testbed checkpoint directory")
    return build_tokenizer(p.read_text(encoding="utf-8"))


def load_testbed(spec: str, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32") -> Any:
    """Load a testbed checkpoint as a ``TransformerBridge`` (eval mode, left padding, BOS prepended).

    Args:
        spec: ``testbed:stem``, ``testbed:base``, ``testbed:code`` or ``testbed:<directory>``.
        device: Torch device.
        dtype: ``float32`` (default), ``bfloat16`` or ``float16``.

    Returns:
        The bridge, with ``entitylens_info`` (a :class:`~entitylens.models.ModelInfo`) and
        ``entitylens_testbed_meta`` (the checkpoint's ``meta.json``).
    """
    from transformer_lens.model_bridge import TransformerBridge

    path = resolve_testbed_spec(spec)
    meta = read_meta(path)
    torch_dtype = parse_dtype(dtype)
    dev = check_device_dtype(device, torch_dtype)
    with torch.random.fork_rng(devices=[]):
        model = load_hf_checkpoint(path).to(device=dev, dtype=torch_dtype)
        tokenizer = load_testbed_tokenizer(path)
        bridge = TransformerBridge.boot_transformers(
            f"entitylens/testbed-{meta.get('stage', 'model')}",
            hf_model=model,
            tokenizer=tokenizer,
            dtype=torch_dtype,
        )
    bridge.tokenizer.padding_side = "left"
    bridge.cfg.default_prepend_bos = True
    bridge.cfg.default_padding_side = "left"
    bridge.eval()
    bridge.entitylens_info = ModelInfo(
        spec=str(spec),
        kind="testbed",
        source="testbed",
        hub_id=None,
        registry_key=None,
        display_name=f"testbed {meta.get('stage')}",
        chat=False,
        dtype=dtype_name(torch_dtype),
        device=str(bridge.cfg.device),
        path=str(path),
        source_hash=meta.get("recipe_hash"),
        prepends_bos=True,
        paper_overall=None,
        has_hf_model=True,
    )
    bridge.entitylens_testbed_meta = meta
    return bridge
