"""Behavioural evaluation: constrained decoding of KST24 statements, parsing, scoring, comparisons.

The decoding engine (``grammar`` → ``automaton`` → ``decode``) is re-exported lazily, so importing a
torch-free submodule of this package does not import torch:

* :class:`~entitylens.behavior.grammar.StatementGrammar` -- the statement grammar as a character DFA;
* :class:`~entitylens.behavior.automaton.TokenAutomaton` -- the grammar over a tokenizer's vocabulary;
* :func:`~entitylens.behavior.decode.generate_statements`, :class:`~entitylens.behavior.decode.DecodeConfig`,
  :class:`~entitylens.behavior.decode.Generation` -- batched, KV-cached constrained greedy decoding.

and the evaluation layer on top of it:

* :func:`~entitylens.behavior.evaluate.evaluate`, :class:`~entitylens.behavior.evaluate.EvalConfig`,
  :class:`~entitylens.behavior.evaluate.EvalResult` -- one model on a list of states, resumable;
* :func:`~entitylens.behavior.runs.run_eval`, :func:`~entitylens.behavior.runs.merge_runs`,
  :func:`~entitylens.behavior.runs.compare`, :func:`~entitylens.behavior.runs.summary_table` -- run
  directories with summaries, paired comparisons (exact McNemar) and figures.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "StatementGrammar": "entitylens.behavior.grammar",
    "TokenAutomaton": "entitylens.behavior.automaton",
    "DecodeConfig": "entitylens.behavior.decode",
    "Generation": "entitylens.behavior.decode",
    "generate_statements": "entitylens.behavior.decode",
    "EvalConfig": "entitylens.behavior.evaluate",
    "EvalResult": "entitylens.behavior.evaluate",
    "Prediction": "entitylens.behavior.evaluate",
    "evaluate": "entitylens.behavior.evaluate",
    "ModelRun": "entitylens.behavior.runs",
    "run_eval": "entitylens.behavior.runs",
    "merge_runs": "entitylens.behavior.runs",
    "load_run": "entitylens.behavior.runs",
    "compare": "entitylens.behavior.runs",
    "summary_table": "entitylens.behavior.runs",
    "exact_mcnemar": "entitylens.behavior.stats",
    "BASELINES": "entitylens.behavior.baselines",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    """Import the decoding API on first use."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'entitylens.behavior' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
