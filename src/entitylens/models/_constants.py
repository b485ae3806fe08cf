"""Constants shared by the models package and the CLI (import-light: no torch)."""

from __future__ import annotations

DTYPE_CHOICES: tuple[str, ...] = ("float32", "bfloat16", "float16")
"""Canonical dtype names accepted by ``load_model`` (aliases: fp32, bf16, fp16, half)."""
