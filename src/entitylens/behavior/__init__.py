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
* :func:`~entitylens.behavior.runs.run_eval` -- run directories (resumable, shardable);
  :func:`~entitylens.behavior.combine.merge_runs` / :func:`~entitylens.behavior.combine.combine_runs`;
  :func:`~entitylens.behavior.tables.compare`, :func:`~entitylens.behavior.tables.summary_table` --
  summaries, paired comparisons (the state as the unit) and figures;
* :func:`~entitylens.behavior.compact.compact_answers` -- the testbed's compact protocol, decoded by the same
  loop.
"""

from __future__ import annotations

import importlib
import sys
import types
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
    "merge_runs": "entitylens.behavior.combine",
    "combine_runs": "entitylens.behavior.combine",
    "load_run": "entitylens.behavior.combine",
    "compare": "entitylens.behavior.tables",
    "summary_table": "entitylens.behavior.tables",
    "CompactDecoding": "entitylens.behavior.compact",
    "compact_answers": "entitylens.behavior.compact",
    "compact_predictor": "entitylens.behavior.compact",
    "exact_mcnemar": "entitylens.stats",
    "BASELINES": "entitylens.behavior.baselines",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    """Import the decoding API on first use."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'entitylens.behavior' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


class _Package(types.ModuleType):
    """Keeps ``entitylens.behavior.evaluate`` the *function* once its submodule is imported.

    Importing a submodule sets it as an attribute of its package, which would shadow the lazily exported
    function of the same name (``from entitylens.behavior import evaluate`` would give the module). The
    submodule stays importable as ``entitylens.behavior.evaluate`` through ``from ... import`` and
    ``sys.modules``.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if (isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}"
                and _LAZY.get(name) == value.__name__ and hasattr(value, name)):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
