"""What a loaded model is: the :class:`ModelInfo` record every loader attaches to its bridge."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from entitylens.errors import EntitylensError


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


def model_info(model: Any) -> ModelInfo:
    """The :class:`ModelInfo` of a bridge returned by :func:`load_model`.

    Raises:
        EntitylensError: The bridge was not loaded through :func:`load_model`.
    """
    info = getattr(model, "entitylens_info", None)
    if not isinstance(info, ModelInfo):
        raise EntitylensError("this model was not loaded with entitylens.models.load_model; load it with that")
    return info
