"""The controlled testbed as a model source: its shipped checkpoints, their loader and its tokenizer.

A model source like :mod:`entitylens.models.tiny`: ``testbed:stem|base|code|<directory>`` specs resolve
and load here, so :func:`entitylens.models.load_model` reaches them without importing the training code
in :mod:`entitylens.testbed` (which sits above the models and writes these checkpoints).

- :mod:`entitylens.models.testbed.checkpoints` -- the shipped checkpoints (``shipped/{stem,base,code}/``),
  the ``testbed:`` spec, reading/writing a checkpoint directory and :func:`load_testbed`;
- :mod:`entitylens.models.testbed.tokenizer` -- the word-level tokenizer every testbed model uses.
"""

from entitylens.models.testbed.checkpoints import (
    CHECKPOINT_FILES,
    CHECKPOINTS_DIR,
    SAVE_DTYPE,
    SPEC_PREFIX,
    STAGES,
    checkpoint_dir,
    load_hf_checkpoint,
    load_testbed,
    load_testbed_tokenizer,
    read_meta,
    resolve_testbed_spec,
    save_hf_checkpoint,
)
from entitylens.models.testbed.tokenizer import (
    BOX_LABELS,
    OBJECTS,
    SPECIAL_TOKENS,
    TOKENIZER_NAME,
    build_tokenizer,
    testbed_tokenizer,
    tokenizer_json,
    vocabulary_words,
    word_ids,
)

__all__ = [
    "BOX_LABELS",
    "CHECKPOINTS_DIR",
    "CHECKPOINT_FILES",
    "OBJECTS",
    "SAVE_DTYPE",
    "SPECIAL_TOKENS",
    "SPEC_PREFIX",
    "STAGES",
    "TOKENIZER_NAME",
    "build_tokenizer",
    "checkpoint_dir",
    "testbed_tokenizer",
    "load_hf_checkpoint",
    "load_testbed",
    "load_testbed_tokenizer",
    "read_meta",
    "resolve_testbed_spec",
    "save_hf_checkpoint",
    "tokenizer_json",
    "vocabulary_words",
    "word_ids",
]
