"""Pairs files: JSONL of :class:`~entitylens.patching.text_pair.TextPair` s or of tokenised pairs.

Text pairs (:func:`write_pairs` / :func:`read_pairs`) are model independent. Tokenised pairs
(:func:`write_patch_pairs` / :func:`read_patch_pairs`) carry the tokenizer's fingerprint, so a file tokenised
for one model cannot silently be run on another. Every write is atomic; every read names the file and line
of a bad record.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from entitylens._io import atomic_write
from entitylens.errors import EntitylensError
from entitylens.patching.text_pair import PAIR_FORMAT, TOKEN_PAIR_FORMAT, TextPair
from entitylens.patching.types import PatchPair, tokenizer_fingerprint
from entitylens.task.io import iter_jsonl

__all__ = [
    "iter_records",
    "read_any_pairs",
    "read_pairs",
    "read_patch_pairs",
    "write_pairs",
    "patch_pair_record",
    "write_patch_pairs",
]


def _dumps(rec: Mapping[str, Any]) -> str:
    return json.dumps(rec, sort_keys=True, ensure_ascii=False)


def write_pairs(path: str | os.PathLike[str], pairs: Sequence[TextPair]) -> int:
    """Write text pairs as JSONL, atomically (nothing partial is ever left); returns the count.

    Raises:
        EntitylensError: when ``pairs`` holds something other than :class:`TextPair`.
    """
    lines = []
    for i, p in enumerate(pairs):
        if not isinstance(p, TextPair):
            raise EntitylensError(f"pairs[{i}] is a {type(p).__name__}, not a TextPair; build it with build_pairs")
        lines.append(_dumps(p.to_json()))
    with atomic_write(path) as f:
        for line in lines:
            f.write(line + "\n")
    return len(lines)


def iter_records(path: str | os.PathLike[str]) -> list[tuple[int, dict[str, Any]]]:
    """Every ``(line number, record)`` of a pairs file, refusing a missing or empty file."""
    p = Path(path)
    if not p.is_file():
        raise EntitylensError(f"pairs file {p} does not exist; build one with `entitylens patch pairs`")
    out = list(iter_jsonl(p))
    if not out:
        raise EntitylensError(f"pairs file {p} is empty; build pairs with `entitylens patch pairs`")
    return out


def read_pairs(path: str | os.PathLike[str]) -> list[TextPair]:
    """Read text pairs written by :func:`write_pairs`.

    Raises:
        EntitylensError: naming the file and line of a malformed or invalid record.
    """
    out = []
    for lineno, rec in iter_records(path):
        fmt = rec.get("format")
        if fmt == TOKEN_PAIR_FORMAT:
            raise EntitylensError(f"{path} line {lineno}: holds tokenised pairs; read it with read_patch_pairs")
        if fmt != PAIR_FORMAT:
            raise EntitylensError(
                f"{path} line {lineno}: not an entitylens text pair (format {fmt!r}); "
                f"build the file with `entitylens patch pairs`"
            )
        try:
            out.append(TextPair.from_json(rec))
        except EntitylensError as e:
            raise EntitylensError(f"{path} line {lineno}: {e}") from None
    return out


def patch_pair_record(p: PatchPair) -> dict[str, Any]:
    """The JSON record of a tokenised pair (one line of :func:`write_patch_pairs`' file)."""
    return {
        "format": TOKEN_PAIR_FORMAT,
        "name": p.name,
        "clean_tokens": [int(x) for x in p.clean_tokens],
        "corrupted_tokens": [int(x) for x in p.corrupted_tokens],
        "clean_answer": p.clean_answer,
        "corrupted_answer": p.corrupted_answer,
        "counterfactual_answer": p.counterfactual_answer,
        "clean_answer_pos": p.clean_answer_pos,
        "corrupted_answer_pos": p.corrupted_answer_pos,
        "clean_roles": dict(p.clean_roles),
        "corrupted_roles": dict(p.corrupted_roles),
        "tokenizer_fingerprint": p.tokenizer_fingerprint,
    }


def write_patch_pairs(path: str | os.PathLike[str], pairs: Sequence[PatchPair]) -> int:
    """Write tokenised pairs (token ids, answer ids, role positions, tokenizer fingerprint) as JSONL, atomically."""
    lines = []
    for i, p in enumerate(pairs):
        if not isinstance(p, PatchPair):
            raise EntitylensError(f"pairs[{i}] is a {type(p).__name__}, not a PatchPair; tokenise with to_patch_pairs")
        lines.append(_dumps(patch_pair_record(p)))
    with atomic_write(path) as f:
        for line in lines:
            f.write(line + "\n")
    return len(lines)


def read_patch_pairs(path: str | os.PathLike[str], tokenizer: Any | None = None) -> list[PatchPair]:
    """Read tokenised pairs; with ``tokenizer`` also check they were made with it (same fingerprint).

    Raises:
        EntitylensError: a malformed record (file and line named), or pairs tokenised with another tokenizer.
    """
    want = None if tokenizer is None else tokenizer_fingerprint(tokenizer)
    out = []
    for lineno, rec in iter_records(path):
        if rec.get("format") != TOKEN_PAIR_FORMAT:
            raise EntitylensError(
                f"{path} line {lineno}: not a tokenised pair (format {rec.get('format')!r}); "
                f"read text pairs with read_pairs"
            )
        fp = rec.get("tokenizer_fingerprint")
        if want is not None and fp != want:
            raise EntitylensError(
                f"{path} line {lineno}: pairs were tokenised with another tokenizer than the model's "
                f"(fingerprint {str(fp)[:12]} vs {want[:12]}); rebuild them from the text pairs for this model"
            )
        try:
            out.append(
                PatchPair(
                    clean_tokens=torch.tensor(rec["clean_tokens"], dtype=torch.long),
                    corrupted_tokens=torch.tensor(rec["corrupted_tokens"], dtype=torch.long),
                    clean_answer=rec["clean_answer"],
                    corrupted_answer=rec["corrupted_answer"],
                    clean_roles=rec.get("clean_roles") or {},
                    corrupted_roles=rec.get("corrupted_roles") or {},
                    clean_answer_pos=rec.get("clean_answer_pos", -1),
                    corrupted_answer_pos=rec.get("corrupted_answer_pos", -1),
                    tokenizer_fingerprint=fp,
                    name=str(rec.get("name", "")),
                    counterfactual_answer=rec.get("counterfactual_answer"),
                )
            )
        except KeyError as e:
            raise EntitylensError(f"{path} line {lineno}: missing field {e.args[0]!r}; rebuild the file") from None
        except (TypeError, ValueError, RuntimeError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise EntitylensError(f"{path} line {lineno}: {msg}; rebuild the file") from None
    return out


def read_any_pairs(path: str | os.PathLike[str], tokenizer: Any | None = None) -> list[TextPair] | list[PatchPair]:
    """Read a pairs file of either kind (text pairs, or tokenised pairs), detected from its first record.

    Args:
        path: The pairs file.
        tokenizer: Check tokenised pairs were made with it (see :func:`read_patch_pairs`).

    Returns:
        The pairs.
    """
    first = iter_records(path)[0][1]
    return read_patch_pairs(path, tokenizer) if first.get("format") == TOKEN_PAIR_FORMAT else read_pairs(path)
