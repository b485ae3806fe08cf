"""The testbed's *compact protocol*: one short query per box, scored like the paper's statements.

Two prompt/answer protocols run on the testbed models, over the same scorer and the same outputs
(:func:`entitylens.behavior.evaluate.evaluate` rows, ``predictions.jsonl``, ``summary.csv``):

* ``"kst24"`` — the paper's 2-shot statement protocol (:mod:`entitylens.task.prompts`), unchanged. The
  testbed tokenizer knows its words, so it runs, but the testbed models were never trained on it and
  score about 0;
* ``"compact"`` — the testbed's own format (:mod:`entitylens.testbed.data`): for every box the prompt is
  the state's compact context followed by ``| Bk``; the model greedily writes up to
  ``MAX_PER_BOX + 1`` tokens and its answer is what comes before the first ``;``. An answer is *valid*
  when it is made of distinct object tokens (at most ``MAX_PER_BOX``) and ended by ``;``. The per-box
  answers are assembled into a K&S statement (``"Box 0 contains the car, Box 1 contains nothing, ..."``;
  an invalid box is left out, so the scorer counts it invalid) and scored by the same scorer as the
  paper's protocol.

Decoding is batch-invariant: prompts are grouped by token length (the 7 prompts of a state always share
one), so no prompt is ever padded and a batch of one gives the same tokens as a batch of many.

:func:`compact_structure` parses a compact prompt into the role finder's
:class:`~entitylens.activations.roles.PromptStructure`, so the role names of
:mod:`entitylens.activations.roles` (``query_box``, ``query_box_desc``, ``box3_desc``, ``op0_object``,
``obj:car``, ``last`` ...) mean the same tokens in compact prompts; :func:`find_compact_roles` is the
compact counterpart of :func:`~entitylens.activations.roles.find_roles`, and :func:`cache_prompts` builds
the activation-cache rows.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from entitylens.errors import EntitylensError
from entitylens.task.prompts import box_phrase
from entitylens.task.types import MAX_PER_BOX, State
from entitylens.testbed.data import compact_prompt
from entitylens.testbed.tokenizer import OBJECTS

PROTOCOL_NAMES: tuple[str, ...] = ("compact", "kst24")
"""Protocols the testbed evaluation accepts."""

Predictor = Callable[[Sequence[State]], list[tuple[str, bool]]]


@dataclass(frozen=True)
class CompactProtocol:
    """The compact query protocol (see the module docstring).

    Attributes:
        name: Recorded with results (``"compact"``).
        max_objects: Most objects an answer may list (the box capacity).
        batch_size: Prompts per forward pass.
        backend: ``"hf"`` runs the Hugging Face model inside the bridge (``bridge.original_model``, SDPA
            attention; as :mod:`entitylens.behavior.decode` does), ``"bridge"`` the bridge's own forward
            (eager attention, hooks) — slower, with the same predictions (a test checks it).
        threads: ``torch.set_num_threads`` while decoding, restored afterwards (``None``: leave it). The
            testbed models are tiny: on a busy CPU one thread is tens of times faster than several.
    """

    name: str = "compact"
    max_objects: int = MAX_PER_BOX
    batch_size: int = 64
    backend: str = "hf"
    threads: int | None = 1

    def __post_init__(self) -> None:
        if self.max_objects < 1 or self.batch_size < 1:
            raise EntitylensError(
                f"max_objects={self.max_objects} and batch_size={self.batch_size} must be >= 1; "
                "pass positive values"
            )
        if self.backend not in ("hf", "bridge"):
            raise EntitylensError(f"unknown compact backend {self.backend!r}; use 'hf' or 'bridge'")
        if self.threads is not None and self.threads < 1:
            raise EntitylensError(f"threads={self.threads} must be >= 1 or None")

    def prompt(self, state: State, box: int) -> str:
        """The prompt asking for ``box`` of ``state`` (``"<compact context> | B3"``)."""
        return compact_prompt(state, box)

    @staticmethod
    def answer_text(contents: Sequence[str]) -> str:
        """A continuation naming ``contents`` in order: ``" car map ;"`` (``" ;"`` for an empty box)."""
        return "".join(f" {o}" for o in contents) + " ;"

    def parse_answer(self, text: str) -> tuple[str, ...] | None:
        """The objects of a generated continuation, or ``None`` if it is not a valid answer.

        Args:
            text: Generated text (``" car map ; B0"``); only what comes before the first ``;`` counts.

        Returns:
            The objects in generation order, or ``None`` (no ``;``, a non-object word, a repeated object,
            or more than :attr:`max_objects` objects).
        """
        words = text.split()
        if ";" not in words:
            return None
        answer = words[: words.index(";")]
        if len(answer) > self.max_objects or len(set(answer)) != len(answer):
            return None
        if any(w not in _OBJECT_SET for w in answer):
            return None
        return tuple(answer)


_OBJECT_SET = frozenset(OBJECTS)

COMPACT = CompactProtocol()
"""The default compact protocol."""


def statement_from_answers(answers: Sequence[Sequence[str] | None]) -> str:
    """Assemble per-box answers into a K&S statement; ``None`` (invalid) boxes are left out.

    Args:
        answers: Per box, the objects (in the order written) or ``None``.

    Returns:
        ``"Box 0 contains the car, Box 2 contains nothing."`` (``""`` when every box is invalid).
    """
    parts = [f"Box {b} contains {box_phrase(tuple(a))}" for b, a in enumerate(answers) if a is not None]
    return ", ".join(parts) + "." if parts else ""


# ------------------------------------------------------------------------------------------ decoding


def _logits(model: Any, ids: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos vocab"]:
    """Logits of a TransformerBridge or a Hugging Face causal LM."""
    if hasattr(model, "original_model"):
        return model(ids, return_type="logits")
    return model(input_ids=ids).logits


def _device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):  # pragma: no cover
        return torch.device("cpu")


def greedy_continuations(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    *,
    stop: str = ";",
    batch_size: int = 64,
) -> list[str]:
    """Greedy continuations of ``prompts`` (BOS prepended), batched without padding.

    Prompts are grouped by token length and each group is decoded in chunks of ``batch_size``; a row stops
    contributing once it has produced the ``stop`` token (its later tokens are dropped).

    Args:
        model: A ``TransformerBridge`` or a Hugging Face causal LM.
        tokenizer: The testbed tokenizer.
        prompts: Prompt texts.
        max_new_tokens: Tokens to generate per prompt.
        stop: Stop word (its token ends a continuation).
        batch_size: Prompts per forward pass.

    Returns:
        The decoded continuations, in prompt order.
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise EntitylensError("max_new_tokens and batch_size must be >= 1; pass positive values")
    stop_ids = tokenizer(" " + stop, add_special_tokens=False)["input_ids"]
    stop_id = stop_ids[0] if len(stop_ids) == 1 else None
    from entitylens.models.loading import tokenizer_prepends_bos
    from entitylens.models.tokens import model_prepends_bos, prompt_ids

    bos = model_prepends_bos(model) if hasattr(model, "original_model") else tokenizer_prepends_bos(tokenizer)
    encoded = [prompt_ids(tokenizer, p, bos) for p in prompts]
    groups: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        groups.setdefault(len(ids), []).append(i)
    out: list[str] = [""] * len(prompts)
    dev = _device(model)
    with torch.inference_mode():
        for length in sorted(groups):
            members = groups[length]
            for start in range(0, len(members), batch_size):
                chunk = members[start : start + batch_size]
                ids = torch.tensor([encoded[i] for i in chunk], dtype=torch.long, device=dev)
                new: list[list[int]] = [[] for _ in chunk]
                done = [False] * len(chunk)
                for _ in range(max_new_tokens):
                    nxt = _logits(model, ids)[:, -1].argmax(-1)
                    ids = torch.cat([ids, nxt[:, None]], dim=1)
                    for r, t in enumerate(nxt.tolist()):
                        if not done[r]:
                            new[r].append(int(t))
                            done[r] = t == stop_id
                    if all(done):
                        break
                for r, i in enumerate(chunk):
                    out[i] = tokenizer.decode(
                        new[r], skip_special_tokens=False, clean_up_tokenization_spaces=False
                    )
    return out


def compact_answers(
    model: Any, tokenizer: Any, states: Sequence[State], protocol: CompactProtocol = COMPACT
) -> list[list[tuple[str, ...] | None]]:
    """Per state and box, the model's parsed compact answer (``None`` when invalid).

    Args:
        model: A ``TransformerBridge`` or a Hugging Face causal LM.
        tokenizer: The testbed tokenizer.
        states: The states.
        protocol: The compact protocol.

    Returns:
        ``answers[i][b]`` for state ``i`` and box ``b``.
    """
    prompts = [protocol.prompt(s, b) for s in states for b in range(s.num_boxes)]
    runnable = model
    if protocol.backend == "hf" and hasattr(model, "original_model"):
        from transformers import PreTrainedModel

        if isinstance(model.original_model, PreTrainedModel):
            runnable = model.original_model
    old_threads = torch.get_num_threads()
    if protocol.threads is not None:
        torch.set_num_threads(protocol.threads)
    try:
        texts = greedy_continuations(
            runnable, tokenizer, prompts, protocol.max_objects + 1, stop=";", batch_size=protocol.batch_size
        )
    finally:
        torch.set_num_threads(old_threads)
    out: list[list[tuple[str, ...] | None]] = []
    pos = 0
    for s in states:
        out.append([protocol.parse_answer(t) for t in texts[pos : pos + s.num_boxes]])
        pos += s.num_boxes
    return out


def compact_predictor(model: Any, protocol: CompactProtocol = COMPACT, tokenizer: Any = None) -> Predictor:
    """A predictor for :func:`entitylens.behavior.evaluate.evaluate` running the compact protocol.

    Args:
        model: A testbed ``TransformerBridge`` (from ``load_model("testbed:stem")``) or HF model.
        protocol: The compact protocol.
        tokenizer: The tokenizer (default: ``model.tokenizer``).

    Returns:
        Maps states to ``(statement, truncated)``; ``truncated`` is always False (answers are short).
    """
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tok is None:
        raise EntitylensError("the compact predictor needs a tokenizer; pass a bridge or tokenizer=")

    def predict(states: Sequence[State]) -> list[tuple[str, bool]]:
        return [(statement_from_answers(a), False) for a in compact_answers(model, tok, states, protocol)]

    return predict


def testbed_predictor(model: Any, protocol: str, config: Any = None) -> Predictor:
    """The predictor of a named protocol: ``"compact"`` or ``"kst24"`` (the paper's, via ``model_predictor``).

    Args:
        model: A loaded testbed bridge.
        protocol: ``"compact"`` or ``"kst24"``.
        config: :class:`~entitylens.behavior.evaluate.EvalConfig` for ``"kst24"`` (default: its defaults).

    Returns:
        The predictor.
    """
    if protocol == "compact":
        return compact_predictor(model)
    if protocol == "kst24":
        from entitylens.behavior.evaluate import EvalConfig, model_predictor

        return model_predictor(model, config or EvalConfig(protocol="kst24", chat="never"))
    raise EntitylensError(f"unknown testbed protocol {protocol!r}; use one of {', '.join(PROTOCOL_NAMES)}")


# -------------------------------------------------------------------------------------------- roles

_WORD_RE = re.compile(r"\S+")
_LABEL_RE = re.compile(r"^B(\d+)$")
_COMPACT_RE = re.compile(r"^B0 .*\| B\d+$", re.DOTALL)


def is_compact_prompt(text: str) -> bool:
    """Whether ``text`` is a compact-protocol prompt (``"B0 ... | Bk"``)."""
    return bool(_COMPACT_RE.match(text))


def compact_structure(text: str) -> Any:
    """Parse a compact prompt into the role finder's ``PromptStructure`` (character spans).

    ``query_box`` is the final ``Bk`` label, ``desc_boxes`` maps each label's number (``"3"``) to its
    ``Bk`` token in the description, ``desc_objects`` each described object to its token, and each
    operation's spans are its objects, its (source) box and its destination. ``query_contains`` is
    ``None`` (the compact format has no ``contains``).

    Args:
        text: A compact prompt (:func:`is_compact_prompt`).

    Returns:
        The :class:`~entitylens.activations.roles.PromptStructure`.

    Raises:
        EntitylensError: If ``text`` is not a compact prompt.
    """
    from entitylens.activations.roles import OperationSpans, PromptStructure

    if not is_compact_prompt(text):
        raise EntitylensError("not a compact prompt (expected 'B0 ... | Bk'); build it with compact_prompt()")
    words = [(m.group(), m.span()) for m in _WORD_RE.finditer(text)]
    bar = max(i for i, (w, _) in enumerate(words) if w == "|")
    q_word, q_span = words[-1]
    desc_boxes: dict[str, tuple[int, int]] = {}
    desc_objects: dict[str, tuple[int, int]] = {}
    operations = []
    i = 0
    # description: "Bk objects ;" per box, then operations, each ended by "."
    while i < bar:
        m = _LABEL_RE.match(words[i][0])
        if m is None or m.group(1) in desc_boxes:
            break
        desc_boxes[m.group(1)] = words[i][1]
        i += 1
        while i < bar and words[i][0] != ";":
            desc_objects[words[i][0]] = words[i][1]
            i += 1
        i += 1  # the ";"
    while i < bar:
        verb = words[i][0]
        j = i + 1
        objs: list[tuple[int, int]] = []
        while j < bar and not _LABEL_RE.match(words[j][0]) and words[j][0] != ".":
            objs.append(words[j][1])
            j += 1
        boxes = []
        while j < bar and _LABEL_RE.match(words[j][0]):
            boxes.append(words[j][1])
            j += 1
        if verb not in ("put", "remove", "move") or not boxes or j >= bar or words[j][0] != ".":
            raise EntitylensError(
                f"cannot parse the compact operation starting at {text[words[i][1][0] :][:40]!r}"
            )
        operations.append(
            OperationSpans(
                objects=tuple(objs),
                box=boxes[0],
                dest=boxes[1] if verb == "move" and len(boxes) > 1 else None,
            )
        )
        i = j + 1
    qm = _LABEL_RE.match(q_word)
    assert qm is not None
    return PromptStructure(
        query_label=qm.group(1),
        query_box=q_span,
        query_contains=None,
        desc_boxes=desc_boxes,
        desc_objects=desc_objects,
        operations=tuple(operations),
    )


def find_compact_roles(
    text: str, offsets: Sequence[tuple[int, int]] | Any, roles: Sequence[str], *, allow_missing: bool = False
) -> dict[str, int | None]:
    """Token index of each role in a compact prompt (the compact counterpart of ``find_roles``).

    Args:
        text: A compact prompt.
        offsets: Per-token character offsets (BOS included as ``(0, 0)`` if the ids include it), or the
            tokenizer (then the text is tokenized without special tokens).
        roles: Role names of :data:`entitylens.activations.roles.ROLE_CATALOGUE`.
        allow_missing: Return ``None`` for an absent role instead of raising.

    Returns:
        Role -> token index.
    """
    from entitylens.activations.roles import find_roles

    # parse_prompt recognises compact prompts, so the shared role finder serves them unchanged.
    return find_roles(text, offsets, roles, allow_missing=allow_missing)


def cache_prompts(states: Sequence[State], protocol: CompactProtocol = COMPACT) -> list[Any]:
    """Activation-cache rows (:class:`~entitylens.activations.cache.CachePrompt`) of compact prompts.

    One row per (state, box), id ``"<state_id>:<box>"``, with the metadata the K&S rows carry (``box``,
    ``numops``, ``gold``, ``objects``...).
    """
    from entitylens.activations.cache import CachePrompt, _row_meta
    from entitylens.task.types import BoxRow

    rows = []
    for s in states:
        for b in range(s.num_boxes):
            meta = dict(_row_meta(BoxRow(s, b)))
            meta["protocol"] = protocol.name
            rows.append(CachePrompt(row_id=f"{s.state_id}:{b}", text=protocol.prompt(s, b), meta=meta))
    return rows
