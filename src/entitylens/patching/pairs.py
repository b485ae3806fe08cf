"""Clean/corrupted prompt pairs built from boxes datasets, and their tokenisation for a model.

Two levels:

* :class:`TextPair` -- model independent, stored as JSONL (:func:`write_pairs` / :func:`read_pairs`). A
  pair is two prompts in the K&S query form ``<context> Box N contains`` (or the P24 next-token form
  ``The X is in Box A, ... Box A contains the``), optionally behind a few-shot prefix, the text each
  prompt's gold answer continues with (``" the car and the map"``, ``" nothing"``, ``" spatula"``), and
  the token *roles* both prompts have (names from :mod:`entitylens.activations.roles`, plus a few
  pair-specific aliases such as ``changed_object`` that point at character spans).
  :func:`build_pairs` makes them from a dataset for one corruption *kind* (:data:`PAIR_KINDS`); golds are
  recomputed by replaying both worlds and a pair whose two answers are equal is refused.
* :class:`~entitylens.patching.exact.PatchPair` -- token ids for one tokenizer. :func:`to_patch_pairs`
  tokenises text pairs (through ``PatchPair.from_texts``) and maps every role to a token position on
  each side *by name*: prompts of different lengths (``drop_op``) stay aligned role by role. Tokenised
  pairs carry the tokenizer's fingerprint; :func:`write_patch_pairs` / :func:`read_patch_pairs` store
  them so a file tokenised for one model cannot silently be run on another.

Kinds (each pair changes one thing; every world stays valid, checked by replaying with
:func:`~entitylens.task.world.apply_operation`):

``op_object``   the object(s) of one move/remove/put become other valid objects (same number);
``op_box``      the destination of one move (or the box of one put) becomes another box with room;
``init_object`` one object of the initial description, untouched by every operation, becomes an object
                the scenario never mentions;
``drop_op``     one operation is removed (the corrupted prompt is shorter; later roles shift);
``p24``         P24 single-object next-token form; the corrupted prompt queries another box of the same
                context (pairs from a P24 file, or generated from the object vocabulary).

The pieces, one job each: :mod:`~entitylens.patching.text_pair` (the :class:`TextPair` type, kinds and role
names), :mod:`~entitylens.patching.pair_edits` and :mod:`~entitylens.patching.pair_build` (building pairs from a
dataset), :mod:`~entitylens.patching.pair_tokens` (tokenising for a model) and
:mod:`~entitylens.patching.pair_io` (pairs files). This module gathers their public names.
"""

from entitylens.patching.pair_build import build_pairs, compact_pairs
from entitylens.patching.pair_io import read_any_pairs, read_pairs, read_patch_pairs, write_pairs, write_patch_pairs
from entitylens.patching.pair_tokens import to_patch_pairs
from entitylens.patching.text_pair import (
    ALIAS_ROLES,
    DEFAULT_ROLES,
    PAIR_FORMAT,
    PAIR_KINDS,
    TOKEN_PAIR_FORMAT,
    Span,
    TextPair,
    default_roles,
    validate_role_names,
)

__all__ = [
    "ALIAS_ROLES",
    "DEFAULT_ROLES",
    "PAIR_FORMAT",
    "PAIR_KINDS",
    "TOKEN_PAIR_FORMAT",
    "Span",
    "TextPair",
    "build_pairs",
    "compact_pairs",
    "default_roles",
    "read_any_pairs",
    "read_pairs",
    "read_patch_pairs",
    "to_patch_pairs",
    "validate_role_names",
    "write_pairs",
    "write_patch_pairs",
]
