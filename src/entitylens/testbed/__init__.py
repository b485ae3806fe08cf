"""The controlled testbed: a tiny base/code model pair trained by the project on this CPU.

A shared *stem* (a small Hugging Face Llama) is trained from scratch on compact boxes-world text until it
copies; a *base* arm and a *code* arm continue from it with identical optimiser, seed, steps and token
budget, differing only in what fills half of every batch (prose vs Python container programs). The
shipped checkpoints load as ``TransformerBridge`` models through ``testbed:stem|base|code`` specs and are
evaluated with the same pipeline as real models (compact or KST24 protocol). See ``docs/testbed.md``.

Public API:

- tokenizer: :func:`build_tokenizer`, :func:`get_tokenizer`, :func:`tokenizer_json`
- data: :func:`compact_prompt`, :func:`compact_context`, :func:`boxes_episode`, :func:`filler_episode`,
  :func:`code_program`, :func:`prose_text`, :func:`ordered_contents`
- evaluation set: :func:`eval_states`, :data:`EVAL_SEED`
- protocol: :class:`CompactProtocol`, :data:`COMPACT`, :func:`compact_predictor`, :func:`testbed_predictor`,
  :func:`compact_structure`, :func:`find_compact_roles`, :func:`cache_prompts`
- training: :class:`Recipe`, :class:`ModelDims`, :data:`RECIPES`, :func:`train_stage`, :func:`token_budget`
- checkpoints: :func:`load_testbed`, :func:`resolve_testbed_spec`, :func:`checkpoint_dir`, :func:`read_meta`
- runs: :func:`run_testbed_eval`
"""

from entitylens.testbed.checkpoints import (
    CHECKPOINTS_DIR,
    checkpoint_dir,
    load_hf_checkpoint,
    load_testbed,
    read_meta,
    resolve_testbed_spec,
)
from entitylens.testbed.data import (
    boxes_episode,
    code_program,
    compact_context,
    compact_prompt,
    filler_episode,
    ordered_contents,
    prose_text,
)
from entitylens.testbed.evalset import DEFAULT_EVAL_STATES, EVAL_SEED, eval_states
from entitylens.testbed.protocol import (
    COMPACT,
    PROTOCOL_NAMES,
    CompactProtocol,
    cache_prompts,
    compact_answers,
    compact_predictor,
    compact_structure,
    find_compact_roles,
    testbed_predictor,
)
from entitylens.testbed.tokenizer import build_tokenizer, get_tokenizer, tokenizer_json
from entitylens.testbed.train import RECIPES, STAGES, ModelDims, Recipe, get_recipe, token_budget, train_stage

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
    "cache_prompts",
    "checkpoint_dir",
    "code_program",
    "compact_answers",
    "compact_context",
    "compact_predictor",
    "compact_prompt",
    "compact_structure",
    "eval_states",
    "filler_episode",
    "find_compact_roles",
    "get_recipe",
    "get_tokenizer",
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


def __getattr__(name: str) -> object:
    """Import :func:`run_testbed_eval` on first use.

    It pulls in the run/figure layer (matplotlib), which role lookups and caching (``find_roles`` uses
    the compact protocol) should not pay for.
    """
    if name == "run_testbed_eval":
        from entitylens.testbed.run import run_testbed_eval

        return run_testbed_eval
    raise AttributeError(f"module 'entitylens.testbed' has no attribute {name!r}")

