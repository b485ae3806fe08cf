"""Behavioural evaluation with the KST24 protocol: one statement per state, scored per box.

:func:`evaluate` runs one model (a loaded ``TransformerBridge`` or a weight-free baseline name such as
``"random"``) over a list of states and returns an :class:`EvalResult`. With ``run_dir`` it appends each
batch's rows to ``<run_dir>/predictions.jsonl`` as soon as the batch finishes, so a killed run (even
``kill -9``) resumes where it stopped: finished states are skipped, a half-written tail is discarded, and
the final file is rewritten in canonical order (model, then dataset order, then box) so it equals an
uninterrupted run's byte for byte.

The run-directory layer (several models, config records, summaries, comparisons and figures) is in
:mod:`entitylens.behavior.runs`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from entitylens.behavior.baselines import BASELINES, baseline_statement, mentioned_objects
from entitylens.errors import EntitylensError
from entitylens.progress import progress
from entitylens.task.parse import INVALID, parse_statement
from entitylens.task.prompts import StatementProtocol, get_protocol, statement_text
from entitylens.task.score import RowScore, ScoreReport, aggregate, score_statement
from entitylens.task.types import State

PREDICTIONS_FILE = "predictions.jsonl"

COMPACT_PROTOCOL = "compact"
"""The testbed's compact protocol (:mod:`entitylens.behavior.compact`), accepted wherever a statement protocol
name is: ``EvalConfig(protocol="compact")``, ``entitylens eval --protocol compact``."""


@dataclass(frozen=True)
class EvalConfig:
    """How to evaluate (everything that changes predictions; recorded with every run).

    Attributes:
        protocol: Prompt protocol name: ``"kst24"`` (default), ``"kst24-code"``, ``"kst24-outlines"`` (see
            :func:`entitylens.task.prompts.get_protocol`) or ``"compact"`` (the testbed's one query per box,
            :mod:`entitylens.behavior.compact`; chat and decoding settings do not apply to it).
        chat: ``"auto"`` (chat template for chat/instruct models, per the registry), ``"always"`` or ``"never"``.
        decoding: ``"constrained"`` (greedy, constrained to the statement grammar; the paper's protocol) or
            ``"unconstrained"`` (plain greedy).
        forced: Forced grammar text: ``"jump"`` appends it without decoding steps (fast); ``"step"`` decodes it
            token by token, exactly like outlines.
        batch_size: States per batch; ``"auto"`` (default): from free GPU memory with back-off on
            out-of-memory, on CPU up to 32 rows as free memory allows (decoding is batch-invariant).
        score_mode: ``"set"`` (order-insensitive, default) or ``"strict"`` (exact string).
        max_numops: Last numops bucket (the paper pools nothing beyond 7; rows above are pooled as "7+").
        seed: Seed for the ``random`` baseline.
        budget_margin: Extra tokens allowed beyond the state-derived budget (see :func:`token_budget`).
        engine: ``"native"`` (entitylens's own decoder through the bridge; the reference) or ``"vllm"``
            (vLLM with the statement grammar as a regex structured output, :mod:`entitylens.behavior.vllm`).
            vLLM lets the model pick its own tokens through forced text, as outlines does, so it needs
            ``forced="step"``, the constrained protocol and a statement protocol (not ``"compact"``). Not part
            of the prediction fields: a vLLM shard merges with a native ``forced="step"`` shard.

    """

    protocol: str = "kst24"
    chat: Literal["auto", "always", "never"] = "auto"
    decoding: Literal["constrained", "unconstrained"] = "constrained"
    forced: Literal["jump", "step"] = "jump"
    batch_size: int | Literal["auto"] = "auto"
    score_mode: Literal["set", "strict"] = "set"
    max_numops: int = 7
    seed: int = 0
    budget_margin: int = 16
    engine: Literal["native", "vllm"] = "native"

    def __post_init__(self) -> None:
        checks = {
            "chat": ("auto", "always", "never"),
            "decoding": ("constrained", "unconstrained"),
            "forced": ("jump", "step"),
            "score_mode": ("set", "strict"),
        }
        for name, allowed in checks.items():
            if getattr(self, name) not in allowed:
                raise EntitylensError(f"EvalConfig.{name}={getattr(self, name)!r} is not one of {allowed}")
        if self.batch_size != "auto" and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise EntitylensError(f"batch_size must be a positive integer or 'auto', got {self.batch_size!r}")
        if self.max_numops < 0 or self.budget_margin < 0:
            raise EntitylensError("max_numops and budget_margin must be >= 0")
        if self.protocol != COMPACT_PROTOCOL:
            get_protocol(self.protocol)  # raises on an unknown protocol
        if self.engine not in ("native", "vllm"):
            raise EntitylensError(f"EvalConfig.engine={self.engine!r} is not one of ('native', 'vllm')")
        if self.engine == "vllm" and (self.forced != "step" or self.decoding != "constrained"
                                      or self.protocol == COMPACT_PROTOCOL):
            raise EntitylensError("engine='vllm' runs the constrained statement protocol with forced='step' (the model "
                                  "picks its own tokens through forced text, as outlines); use --forced step, or the "
                                  "native engine for jump-forward, unconstrained or compact runs")

    def prediction_fields(self) -> dict[str, Any]:
        """The fields that change predictions.

        Batch size does not (decoding is batch-invariant), nor does the engine (its predictions are the native
        ``forced="step"`` decoder's).
        """
        d = asdict(self)
        d.pop("batch_size")
        d.pop("engine")
        return d


@dataclass(frozen=True)
class Prediction:
    """One scored (model, state, box) row — a line of ``predictions.jsonl``.

    Attributes:
        model: Model label.
        state_id: ``State.state_id``.
        sample_id: Scenario id.
        box: Queried box.
        numops: Operations that changed the box.
        numops_by_op: ``numops`` by operation type.
        gold: Gold contents.
        statement: The raw generated statement (whole state).
        raw_box: The statement's text for this box (``None`` if the box is missing).
        prediction: Parsed contents, or ``None`` if the box is invalid/missing.
        correct: Whether the prediction is right.
        truncated: Whether generation hit the token budget before the statement ended.

    """

    model: str
    state_id: str
    sample_id: int
    box: int
    numops: int
    numops_by_op: Mapping[str, int]
    gold: tuple[str, ...]
    statement: str
    raw_box: str | None
    prediction: tuple[str, ...] | None
    correct: bool
    truncated: bool

    def to_json(self) -> str:
        """One canonical JSON line (sorted keys)."""
        d = asdict(self)
        d["numops_by_op"] = dict(self.numops_by_op)
        d["gold"] = list(self.gold)
        d["prediction"] = None if self.prediction is None else list(self.prediction)
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Prediction:
        """Inverse of :meth:`to_json` (after ``json.loads``)."""
        return cls(
            model=d["model"],
            state_id=d["state_id"],
            sample_id=int(d["sample_id"]),
            box=int(d["box"]),
            numops=int(d["numops"]),
            numops_by_op=dict(d["numops_by_op"]),
            gold=tuple(d["gold"]),
            statement=d["statement"],
            raw_box=d["raw_box"],
            prediction=None if d["prediction"] is None else tuple(d["prediction"]),
            correct=bool(d["correct"]),
            truncated=bool(d["truncated"]),
        )


@dataclass(frozen=True)
class EvalResult:
    """All scored rows of one model, in dataset order.

    Attributes:
        model: Model label.
        predictions: One :class:`Prediction` per (state, box).
        config: The evaluation config.
        info: What was evaluated (model info, dataset hash ...), as recorded in the run.

    """

    model: str
    predictions: tuple[Prediction, ...]
    config: EvalConfig
    info: Mapping[str, Any] = field(default_factory=dict)

    def report(self) -> ScoreReport:
        """Accuracy overall, by numops (0..max_numops) and per state, with 95% intervals (rows clustered by state)."""
        return aggregate(
            (RowScore(p.state_id, p.box, p.numops, p.correct) for p in self.predictions),
            max_numops=self.config.max_numops,
        )

    @property
    def truncated_states(self) -> int:
        """Number of states whose statement hit the token budget."""
        return len({p.state_id for p in self.predictions if p.truncated})

    @property
    def num_states(self) -> int:
        """Number of states evaluated."""
        return len({p.state_id for p in self.predictions})


def score_generation(
    model: str, state: State, statement: str, truncated: bool, mode: str = "set"
) -> list[Prediction]:
    """Parse and score one generated statement into its per-box rows.

    Args:
        model: Model label.
        state: The state the statement is about.
        statement: Generated text (may start with ``Statement:``).
        truncated: Whether generation hit its budget.
        mode: ``"set"`` or ``"strict"`` scoring.

    Returns:
        One :class:`Prediction` per box.

    """
    parsed = parse_statement(statement, num_boxes=state.num_boxes)
    correct = score_statement(parsed, state.contents, mode=mode)  # type: ignore[arg-type]
    rows = []
    for b in range(state.num_boxes):
        pred = parsed.boxes[b]
        rows.append(
            Prediction(
                model=model,
                state_id=state.state_id,
                sample_id=state.sample_id,
                box=b,
                numops=state.numops[b],
                numops_by_op=dict(state.numops_by_op[b]),
                gold=tuple(state.contents[b]),
                statement=statement,
                raw_box=parsed.raw[b],
                prediction=None if pred is INVALID else tuple(pred),  # type: ignore[arg-type]
                correct=correct[b],
                truncated=truncated,
            )
        )
    return rows


def token_budget(tokenizer: Any, state: State, prefix: str, margin: int) -> int:
    r"""Token budget for one state's statement, derived from the state (never from the gold answer).

    The budget is the token length of the longest *plausible* statement — every box listing every object
    mentioned with it anywhere in the prompt — plus the forced prefix and ``margin``. A statement longer
    than that is cut and flagged ``truncated`` (KST24's fixed 100 new tokens could silently cut crowded
    states; this never does so silently).

    Args:
        tokenizer: The model's tokenizer.
        state: The state.
        prefix: Forced text before the statement (e.g. ``"\\nStatement:"``).
        margin: Extra tokens.

    Returns:
        Maximum number of new tokens.

    """
    longest = f"{prefix} {statement_text(mentioned_objects(state))}"
    return len(tokenizer(longest, add_special_tokens=False)["input_ids"]) + margin


# --------------------------------------------------------------------------------------------- predictors

Predictor = Callable[[Sequence[State]], list[tuple[str, bool]]]
"""Maps a batch of states to (statement, truncated) pairs, in order."""


def _baseline_predictor(name: str, seed: int) -> Predictor:
    def predict(states: Sequence[State]) -> list[tuple[str, bool]]:
        return [(baseline_statement(name, s, seed), False) for s in states]

    return predict


def uses_chat(model: Any, config: EvalConfig) -> bool:
    """Whether prompts for ``model`` go through its chat template under ``config``."""
    if config.chat != "auto":
        return config.chat == "always"
    info = getattr(model, "entitylens_info", None)
    return bool(getattr(info, "chat", False))


def prompt_form(protocol: StatementProtocol, tokenizer: Any, chat: bool
                ) -> tuple[str, Callable[[State], str], str | None]:
    """How a state becomes a prompt: the generation prefix, the renderer and the prompts' shared text.

    Args:
        protocol: The statement protocol.
        tokenizer: The model's tokenizer (its chat template renders chat prompts).
        chat: Render through the chat template.

    Returns:
        ``(prefix, render, shared)``: the forced text the statement starts with, ``state -> prompt``, and the
        text every plain prompt starts with (``None`` for chat prompts).
    """
    if chat:
        return (protocol.chat_generation_prefix, lambda s: protocol.chat_prompt(tokenizer, s.context), None)
    return protocol.generation_prefix, lambda s: protocol.prompt(s.context), protocol.prompt("x")[: -len("x")]


def model_predictor(model: Any, config: EvalConfig, protocol: StatementProtocol | None = None) -> Predictor:
    """A predictor running constrained (or plain) greedy decoding on a loaded model.

    Args:
        model: A ``TransformerBridge`` from :func:`entitylens.models.load_model`.
        config: The evaluation config.
        protocol: Prompt protocol (default: ``config.protocol``).

    Returns:
        The predictor.

    """
    # Imported here so that scoring and the weight-free baselines never import torch.
    from entitylens.behavior.decode import DecodeConfig, generate_statements
    from entitylens.models.tokens import model_prepends_bos, prompt_ids  # torch, as above

    if protocol is None and config.protocol == COMPACT_PROTOCOL:
        from entitylens.behavior.compact import compact_predictor  # torch, as above

        return compact_predictor(model)
    protocol = protocol or get_protocol(config.protocol)
    tokenizer = model.tokenizer
    prefix, render, shared = prompt_form(protocol, tokenizer, uses_chat(model, config))
    dconf = DecodeConfig(
        mode=config.decoding,
        forced=config.forced,
        batch_size=config.batch_size,
        prefix=prefix,
        num_boxes=7,
    )

    n_ctx = getattr(getattr(model, "cfg", None), "n_ctx", None)
    bos = model_prepends_bos(model)

    def predict(states: Sequence[State]) -> list[tuple[str, bool]]:
        prompts = [render(s) for s in states]
        budgets = [token_budget(tokenizer, s, prefix, config.budget_margin) for s in states]
        if n_ctx:
            for s, p, b in zip(states, prompts, budgets):
                need = len(prompt_ids(tokenizer, p, bos)) + b
                if need > n_ctx:
                    raise EntitylensError(
                        f"state {s.state_id}: prompt + statement budget is {need} tokens, {need - n_ctx} more than "
                        f"the model's context of {n_ctx}; use a model with a longer context or shorter states"
                    )
        gens = generate_statements(model, prompts, dconf, max_new_tokens=budgets, shared_prefix=shared)
        return [(g.text, g.truncated) for g in gens]

    return predict


# ------------------------------------------------------------------------------------------ resumable log


def read_predictions_log(path: Path) -> tuple[list[Prediction], int]:
    """Read complete lines of a predictions log; return rows and the byte length of the valid part.

    A torn last line (the state ``kill -9`` mid-append leaves) and everything after it are left out.
    """
    rows: list[Prediction] = []
    good = 0
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while True:
        nl = data.find(b"\n", pos)
        if nl < 0:
            break
        try:
            rows.append(Prediction.from_dict(json.loads(data[pos:nl])))
        except (ValueError, KeyError, TypeError):
            break  # a torn write: everything from here on is discarded
        pos = nl + 1
        good = pos
    return rows, good


def load_finished(path: Path, model: str, states_by_id: Mapping[str, State]) -> dict[str, list[Prediction]]:
    """Finished states of ``model`` in a predictions log, repairing a torn tail in place.

    A state counts as finished only when all its box rows are present (a batch is written with one
    ``write`` call, but a kill can still tear it); incomplete states are dropped and recomputed.

    Args:
        path: The ``predictions.jsonl`` file (may not exist).
        model: Model label to select.
        states_by_id: The states of this run, by id.

    Returns:
        Finished state id → its rows (ordered by box).

    """
    if not path.exists():
        return {}
    rows, good = read_predictions_log(path)
    if good != path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(good)
    by_state: dict[str, list[Prediction]] = {}
    for r in rows:
        if r.model == model and r.state_id in states_by_id:
            by_state.setdefault(r.state_id, []).append(r)
    finished = {}
    for sid, rs in by_state.items():
        boxes = sorted({r.box for r in rs})
        if boxes == list(range(states_by_id[sid].num_boxes)):
            finished[sid] = sorted({r.box: r for r in rs}.values(), key=lambda r: r.box)
    return finished


def _append(path: Path, rows: Iterable[Prediction]) -> None:
    payload = "".join(r.to_json() + "\n" for r in rows).encode()
    with open(path, "ab") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------- evaluate


def evaluate(
    model: Any,
    states: Sequence[State],
    config: EvalConfig | None = None,
    *,
    label: str | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    predictor: Predictor | None = None,
) -> EvalResult:
    """Evaluate one model on ``states`` with the KST24 protocol.

    Args:
        model: A loaded ``TransformerBridge``, a baseline name (``"random"``, ``"nothing"``, ``"initial"``), or
            None when ``predictor`` and ``label`` are given.
        states: The states (one generation each).
        config: Evaluation config (default :class:`EvalConfig`).
        label: Model label in the outputs (default: :func:`entitylens.models.model_label` of the spec it was
            loaded from -- the label ``entitylens eval`` uses -- or the baseline name).
        run_dir: If given, append rows to ``run_dir/predictions.jsonl`` per batch and resume from it
            (created when missing).
        predictor: Override how statements are produced (advanced; used by tests and the testbed).

    Returns:
        The scored rows of this model, in dataset order.

    """
    config = config or EvalConfig()
    if not states:
        raise EntitylensError("the dataset has no states; generate one with `entitylens data generate`")
    if model is None:
        if predictor is None or label is None:
            raise EntitylensError("evaluate(None, ...) needs both predictor= and label=; pass a model instead")
    elif isinstance(model, str):
        if model not in BASELINES:
            raise EntitylensError(f"unknown baseline {model!r}; load a model with load_model() or use {BASELINES}")
        label = label or model
        predictor = predictor or _baseline_predictor(model, config.seed)
    else:
        from entitylens.models.loading import model_label  # torch: scoring and baselines never import it

        info = getattr(model, "entitylens_info", None)
        label = label or (model_label(info.spec) if info is not None else type(model).__name__)
        predictor = predictor or model_predictor(model, config)
    states_by_id = {s.state_id: s for s in states}
    if len(states_by_id) != len(states):
        raise EntitylensError("the dataset lists a state twice (same sample_id and prefix); deduplicate it")

    log = Path(run_dir) / PREDICTIONS_FILE if run_dir is not None else None
    if log is not None:
        if log.parent.exists() and not log.parent.is_dir():
            raise EntitylensError(f"run_dir {log.parent} is a file; give a directory such as runs/eval")
        log.parent.mkdir(parents=True, exist_ok=True)
    done = load_finished(log, label, states_by_id) if log is not None else {}
    todo = [s for s in states if s.state_id not in done]
    # One predictor call per batch; its rows are appended to the log as soon as it returns. With
    # batch_size="auto" the decoder sizes its own batches inside each chunk of 64 states.
    chunk = 64 if config.batch_size == "auto" else int(config.batch_size)
    bar = progress(total=len(states), initial=len(states) - len(todo), desc=f"eval {label}", unit="state")
    try:
        for i in range(0, len(todo), chunk):
            batch = todo[i : i + chunk]
            outputs = predictor(batch)
            if len(outputs) != len(batch):
                raise RuntimeError(f"predictor returned {len(outputs)} outputs for {len(batch)} states")
            new_rows: list[Prediction] = []
            for s, (text, truncated) in zip(batch, outputs):
                rows = score_generation(label, s, text, truncated, config.score_mode)
                done[s.state_id] = rows
                new_rows.extend(rows)
            if log is not None:
                _append(log, new_rows)
            bar.update(len(batch))
    finally:
        bar.close()
    ordered = tuple(r for s in states for r in done[s.state_id])
    return EvalResult(model=label, predictions=ordered, config=config)
