"""Evaluate the testbed models and the baselines into a run directory (``entitylens eval``'s outputs).

:func:`run_testbed_eval` scores the weight-free baselines (``random``, ``nothing``, ``initial``) and the
testbed checkpoints on the targeted evaluation set (:func:`entitylens.task.targeted.eval_states`) with a
named protocol (``compact`` or the paper's ``kst24``), through :func:`entitylens.behavior.evaluate.evaluate`
(resumable per model), and writes ``run.json``, ``predictions.jsonl``, ``summary.csv``, ``comparison.csv``
(base vs code, stem vs each arm) and ``accuracy_by_numops.png/.pdf`` with
:func:`entitylens.behavior.runs.write_outputs`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from entitylens._io import sha256_json
from entitylens.behavior.baselines import BASELINES
from entitylens.behavior.compact import compact_predictor
from entitylens.behavior.evaluate import EvalConfig, EvalResult, Predictor, evaluate, model_predictor
from entitylens.behavior.runs import check_or_write_config, lazy_predictor, run_record
from entitylens.behavior.tables import write_outputs
from entitylens.errors import EntitylensError
from entitylens.models.testbed.checkpoints import load_testbed, read_meta, resolve_testbed_spec
from entitylens.task.io import state_records
from entitylens.task.targeted import DEFAULT_EVAL_STATES, EVAL_SEED, eval_states

PROTOCOL_NAMES: tuple[str, ...] = ("compact", "kst24")
"""Protocols the testbed evaluation accepts: the testbed's own compact form and the paper's 2-shot statements
(the testbed tokenizer knows its words, but the testbed models were never trained on it and score about 0)."""

DEFAULT_MODELS: tuple[str, ...] = (
    "random",
    "nothing",
    "initial",
    "testbed:stem",
    "testbed:base",
    "testbed:code",
)
"""What ``entitylens testbed eval`` evaluates by default."""


def _label(spec: str) -> str:
    return spec.split(":", 1)[1] if spec.startswith("testbed:") and "/" not in spec else spec


def default_pairs(labels: Sequence[str]) -> list[tuple[str, str]]:
    """Comparison pairs among ``labels``: base vs code, then stem vs each arm (those present)."""
    pairs = [("base", "code"), ("stem", "base"), ("stem", "code")]
    return [(a, b) for a, b in pairs if a in labels and b in labels]


def testbed_predictor(model: Any, protocol: str, config: EvalConfig | None = None) -> Predictor:
    """The predictor of a named protocol: ``"compact"`` or ``"kst24"`` (the paper's, via ``model_predictor``).

    Args:
        model: A loaded testbed bridge.
        protocol: ``"compact"`` or ``"kst24"``.
        config: Evaluation config for ``"kst24"`` (default: its defaults, no chat template).

    Returns:
        The predictor.
    """
    if protocol == "compact":
        return compact_predictor(model)
    if protocol == "kst24":
        return model_predictor(model, config or EvalConfig(protocol="kst24", chat="never"))
    raise EntitylensError(f"unknown testbed protocol {protocol!r}; use one of {', '.join(PROTOCOL_NAMES)}")


def run_testbed_eval(
    out: str | os.PathLike[str],
    models: Sequence[str] = DEFAULT_MODELS,
    *,
    protocol: str = "compact",
    num_states: int = DEFAULT_EVAL_STATES,
    seed: int = EVAL_SEED,
    config: EvalConfig | None = None,
    device: str = "cpu",
) -> list[EvalResult]:
    """Evaluate testbed checkpoints and baselines on the targeted evaluation set.

    Args:
        out: Run directory (resumable; refused if it holds a run with another config).
        models: Baselines (``random``, ``nothing``, ``initial``) and ``testbed:`` specs.
        protocol: ``"compact"`` (the testbed's) or ``"kst24"`` (the paper's 2-shot statement protocol).
        num_states: States in the evaluation set.
        seed: Evaluation-set seed.
        config: Evaluation config (score mode, buckets, baseline seed; for ``kst24`` also decoding).
        device: Torch device.

    Returns:
        One result per model.
    """
    if protocol not in PROTOCOL_NAMES:
        raise EntitylensError(
            f"unknown testbed protocol {protocol!r}; use one of {', '.join(PROTOCOL_NAMES)}"
        )
    for m in models:
        if m not in BASELINES and not m.startswith("testbed:"):
            raise EntitylensError(
                f"model {m!r} is neither a baseline ({', '.join(BASELINES)}) nor a testbed: spec"
            )
    labels = [_label(m) for m in models]
    if len(set(labels)) != len(labels):
        raise EntitylensError(f"models must be unique, got {labels}; list each model once")
    config = config or EvalConfig(protocol="kst24", chat="never")
    states = eval_states(seed, num_states=num_states)
    out = Path(out)
    hashes = {
        m: read_meta(resolve_testbed_spec(m)).get("recipe_hash") for m in models if m.startswith("testbed:")
    }
    pairs = default_pairs(labels)
    record = run_record(
        {
            "path": f"testbed eval_states(seed={seed}, num_states={num_states})",
            "sha256": sha256_json([state_records(s) for s in states]),
            "num_states": len(states),
        },
        [{"spec": m, "label": lab, "recipe_hash": hashes.get(m)} for m, lab in zip(models, labels)],
        {**config.prediction_fields(), "protocol": protocol},
        "float32",
        None,
        pairs,
    )
    check_or_write_config(out, record)
    results = []
    for m, lab in zip(models, labels):
        if m in BASELINES:
            results.append(evaluate(m, states, config, label=lab, run_dir=out))
            continue

        def make(spec: str = m) -> Predictor:
            return testbed_predictor(load_testbed(spec, device=device), protocol, config)

        predict = lazy_predictor(make)
        results.append(evaluate(None, states, config, label=lab, run_dir=out, predictor=predict))
    write_outputs(out, results, pairs, {lab: m for m, lab in zip(models, labels)})
    return results
