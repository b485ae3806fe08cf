"""The boxes task: types, world simulator, generator, splits, dataset I/O, prompts, parsing and scoring.

Nothing here imports torch.
"""

# Data layer imports (generate, io, profile, splits, text, vocab, world); their names are listed in the
# "data layer" block of __all__ below.
from entitylens.task.generate import (
    DEFAULT_NUM_STATES,
    PROFILES,
    GeneratorConfig,
    generate_dataset,
    generate_states,
    make_state,
    scenario_stream,
)
from entitylens.task.io import (
    KS_FIELDS,
    DatasetStats,
    P24Item,
    dataset_stats,
    format_stats,
    read_ks_jsonl,
    read_p24_jsonl,
    state_records,
    write_ks_jsonl,
)
from entitylens.task.parse import INVALID, BoxPrediction, ParsedStatement, parse_statement
from entitylens.task.profile import PAPER_NUM_STATES, PAPER_NUMOPS_PROFILE, select_profile
from entitylens.task.prompts import (
    CHAT_ACK,
    KST24,
    KST24_CODE,
    KST24_CODE_INSTRUCTION,
    KST24_DEMONSTRATIONS,
    KST24_INSTRUCTION,
    KST24_OUTLINES,
    PROTOCOLS,
    P24Prompt,
    StatementProtocol,
    box_phrase,
    get_protocol,
    kst24_prompt,
    p24_prompt,
    statement_text,
    supports_system_role,
)
from entitylens.task.score import (
    Accuracy,
    RowScore,
    ScoreMode,
    ScoreReport,
    aggregate,
    box_correct,
    score_state,
    score_statement,
)
from entitylens.task.splits import DEFAULT_FRACTIONS, SPLIT_NAMES, signature, signature_split, split_by_signature
from entitylens.task.text import (
    FORMS,
    VARIANTS,
    ParsedContext,
    describe_operation,
    parse_context,
    render_context,
    render_row,
)
from entitylens.task.types import MAX_PER_BOX, NUM_BOXES, OP_KINDS, BoxRow, Operation, State, sorted_contents
from entitylens.task.vocab import BNC_OBJECTS, DISJOINT_OBJECTS, VOCABULARIES, get_vocabulary
from entitylens.task.world import (
    Scenario,
    apply_operation,
    count_numops,
    replay,
    sample_initial,
    sample_operations,
    sample_scenario,
)

__all__ = ["MAX_PER_BOX", "NUM_BOXES", "OP_KINDS", "BoxRow", "Operation", "State", "sorted_contents"]

# --- data layer exports (world / text / io / splits / profile / generate / vocab) -------------------------
__all__ += [
    "BNC_OBJECTS",
    "DEFAULT_FRACTIONS",
    "DEFAULT_NUM_STATES",
    "DISJOINT_OBJECTS",
    "FORMS",
    "KS_FIELDS",
    "PAPER_NUMOPS_PROFILE",
    "PAPER_NUM_STATES",
    "PROFILES",
    "SPLIT_NAMES",
    "VARIANTS",
    "VOCABULARIES",
    "DatasetStats",
    "GeneratorConfig",
    "P24Item",
    "ParsedContext",
    "Scenario",
    "apply_operation",
    "count_numops",
    "dataset_stats",
    "describe_operation",
    "format_stats",
    "generate_dataset",
    "generate_states",
    "get_vocabulary",
    "make_state",
    "parse_context",
    "read_ks_jsonl",
    "read_p24_jsonl",
    "render_context",
    "render_row",
    "replay",
    "sample_initial",
    "sample_operations",
    "sample_scenario",
    "scenario_stream",
    "select_profile",
    "signature",
    "signature_split",
    "split_by_signature",
    "state_records",
    "write_ks_jsonl",
]
# --- end data layer ---------------------------------------------------------------------------------------

# --- protocol exports (prompts / parse / score) -----------------------------------------------------------
__all__ += [
    "CHAT_ACK",
    "INVALID",
    "KST24",
    "KST24_CODE",
    "KST24_CODE_INSTRUCTION",
    "KST24_DEMONSTRATIONS",
    "KST24_INSTRUCTION",
    "KST24_OUTLINES",
    "PROTOCOLS",
    "Accuracy",
    "BoxPrediction",
    "P24Prompt",
    "ParsedStatement",
    "RowScore",
    "ScoreMode",
    "ScoreReport",
    "StatementProtocol",
    "aggregate",
    "box_correct",
    "box_phrase",
    "get_protocol",
    "kst24_prompt",
    "p24_prompt",
    "parse_statement",
    "score_state",
    "score_statement",
    "statement_text",
    "supports_system_role",
]
