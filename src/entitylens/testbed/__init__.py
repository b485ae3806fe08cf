"""The controlled testbed: a tiny base/code model pair trained by the project on this CPU.

A shared *stem* (a small Hugging Face Llama) is trained from scratch on compact boxes-world text until it
copies; a *base* arm and a *code* arm continue from it with identical optimiser, seed, steps and token
budget, differing only in what fills half of every batch (prose vs Python container programs). The
shipped checkpoints load as ``TransformerBridge`` models through ``testbed:stem|base|code`` specs and are
evaluated with the same pipeline as real models (compact or KST24 protocol). See ``docs/testbed.md``.

The testbed is split along its jobs: its checkpoints and tokenizer are a model source
(:mod:`entitylens.models.testbed`, ``testbed:`` specs), its prompt form is the compact form of the task
(:mod:`entitylens.task.compact`) with its targeted evaluation sets (:mod:`entitylens.task.targeted`), its
answers are decoded by the one decode loop (:mod:`entitylens.behavior.compact`); this package holds what
only training needs. Nothing below it imports it.

Public API:

- data: :func:`boxes_episode`, :func:`filler_episode`, :func:`code_program`, :func:`prose_text`
- training: :class:`Recipe`, :class:`ModelDims`, :data:`RECIPES`, :func:`train_stage`, :func:`token_budget`
- runs: :func:`run_testbed_eval`, :func:`testbed_predictor`
- and, for convenience, from below: :func:`eval_states`, :data:`COMPACT`, :func:`compact_prompt`,
  :func:`ordered_contents`, :func:`compact_predictor`, :func:`load_testbed`, :func:`testbed_tokenizer` ...
"""

from entitylens.behavior.compact import compact_answers, compact_predictor
from entitylens.models.testbed.checkpoints import (
    CHECKPOINTS_DIR,
    STAGES,
    checkpoint_dir,
    load_hf_checkpoint,
    load_testbed,
    read_meta,
    resolve_testbed_spec,
)
from entitylens.models.testbed.tokenizer import build_tokenizer, testbed_tokenizer, tokenizer_json
from entitylens.task.compact import COMPACT, CompactProtocol, compact_context, compact_prompt, ordered_contents
from entitylens.task.targeted import DEFAULT_EVAL_STATES, EVAL_SEED, eval_states
from entitylens.testbed.data import boxes_episode, code_program, filler_episode, prose_text
from entitylens.testbed.recipe import RECIPES, ModelDims, Recipe, get_recipe
from entitylens.testbed.run import PROTOCOL_NAMES, run_testbed_eval, testbed_predictor
from entitylens.testbed.train import token_budget, train_stage

__all__ = [
    "CHECKPOINTS_DIR",
    "COMPACT",
    "DEFAULT_EVAL_STATES",
    "EVAL_SEED",
    "PROTOCOL_NAMES",
    "RECIPES",
    "STAGES",
    "CompactProtocol",
    "ModelDims",
    "Recipe",
    "boxes_episode",
    "build_tokenizer",
    "checkpoint_dir",
    "code_program",
    "compact_answers",
    "compact_context",
    "compact_predictor",
    "compact_prompt",
    "eval_states",
    "filler_episode",
    "get_recipe",
    "testbed_tokenizer",
    "load_hf_checkpoint",
    "load_testbed",
    "ordered_contents",
    "prose_text",
    "read_meta",
    "resolve_testbed_spec",
    "run_testbed_eval",
    "testbed_predictor",
    "token_budget",
    "tokenizer_json",
    "train_stage",
]

