"""Testbed recipes: the model dimensions and training settings of each stage, and their hash.

A :class:`Recipe` is a frozen dataclass; its *recipe hash* is the SHA-256 of its canonical JSON (with
:data:`FORMAT_VERSION`), recorded in every checkpoint's ``meta.json``. :data:`RECIPES` holds the recipes of
the shipped checkpoints (the stem, then the base and code arms that continue from it); ``docs/testbed.md``
tells how they were found. Training them is :mod:`entitylens.testbed.train`'s job.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from entitylens._io import sha256_json
from entitylens.errors import EntitylensError
from entitylens.models.testbed.checkpoints import STAGES
from entitylens.testbed.data import check_op_count_weights

FILLERS: Mapping[str, str | None] = {"stem": None, "base": "prose", "code": "code"}
"""What fills the non-boxes share of each stage's batches."""

FORMAT_VERSION = 2
"""Bumped whenever a data generator changes what a recipe produces (it is part of the recipe hash)."""

@dataclass(frozen=True)
class ModelDims:
    """Architecture of the testbed model (a Hugging Face ``LlamaConfig``).

    Attributes:
        d_model: Residual width.
        layers: Transformer blocks.
        heads: Attention heads.
        kv_heads: Key/value heads.
        d_mlp: SwiGLU hidden width.
        n_ctx: Maximum positions.
        rope_theta: RoPE base.
        init_std: Weight initialisation standard deviation.
        tie_embeddings: Share the input embedding and the unembedding.
    """

    d_model: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 4
    d_mlp: int = 256
    n_ctx: int = 2048
    rope_theta: float = 10000.0
    init_std: float = 0.02
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        for name in ("d_model", "layers", "heads", "kv_heads", "d_mlp", "n_ctx"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise EntitylensError(f"ModelDims.{name}={v!r} must be a positive integer")
        if self.d_model % self.heads or self.heads % self.kv_heads:
            raise EntitylensError(
                f"ModelDims needs d_model % heads == 0 and heads % kv_heads == 0 (got {self.d_model}, "
                f"{self.heads}, {self.kv_heads}); adjust them"
            )
        if self.init_std <= 0 or self.rope_theta <= 0:
            raise EntitylensError("ModelDims.init_std and rope_theta must be positive")


@dataclass(frozen=True)
class Recipe:
    """Everything that determines a training stage's weights (its SHA-256 is the recipe hash).

    Attributes:
        stage: ``"stem"``, ``"base"`` or ``"code"``.
        parent: Stage whose weights this one starts from (``None``: from scratch).
        dims: Architecture.
        steps: Optimiser steps.
        batch_size: Rows per step.
        lr: Peak learning rate (AdamW).
        final_lr_frac: The cosine schedule ends at ``lr * final_lr_frac``.
        warmup_steps: Linear warm-up steps.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        eps: AdamW epsilon.
        grad_clip: Gradient-norm clip.
        seed: Seed of the weight initialisation and of the filler stream.
        boxes_seed: Seed of the boxes episode stream (equal in both arms, so their boxes rows are identical).
        ops_weights: Relative weight of 0, 1, 2, ... operations in a boxes episode.
        ops_per_box: At most this many operations change any one box of a training episode (the training
            range; ``None``: no cap).
        loss_weights: Weights of a boxes row's context tokens, answers of untouched boxes and answers of
            boxes an operation changed, in its (weighted-mean) token loss.
        filler: ``None`` (stem), ``"prose"`` (base arm) or ``"code"`` (code arm).
        filler_rows: Rows per batch filled by the filler (the rest are boxes episodes).
        filler_tokens: Tokens in every filler row (BOS included).
        loss_on: Boxes-row tokens in the loss: ``"answers"`` (the query answers) or ``"all"``.
        filler_weight: Weight of the filler rows' mean token loss; the boxes answers' mean loss gets
            ``1 - filler_weight`` (0 when there is no filler).
        eval_every: Steps between validation evaluations (logged).
        val_states: States in the validation set (fresh, at mixed ``numops``).
        threads: ``torch.set_num_threads`` during training (fixed for determinism).
        format_version: :data:`FORMAT_VERSION` of the data generators.
    """

    stage: str
    parent: str | None
    dims: ModelDims = field(default_factory=ModelDims)
    steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-3
    final_lr_frac: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 0
    boxes_seed: int = 1000
    ops_weights: tuple[float, ...] = (1.0, 1.0, 1.0)
    ops_per_box: int | None = None
    loss_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    filler: str | None = None
    filler_rows: int = 0
    filler_tokens: int = 96
    loss_on: str = "all"
    filler_weight: float = 0.5
    eval_every: int = 250
    val_states: int = 54
    threads: int = 1
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise EntitylensError(f"unknown stage {self.stage!r}; use one of {', '.join(STAGES)}")
        if self.parent is not None and self.parent not in STAGES:
            raise EntitylensError(f"unknown parent stage {self.parent!r}; use one of {', '.join(STAGES)}")
        if isinstance(self.dims, Mapping):
            object.__setattr__(self, "dims", ModelDims(**self.dims))
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        object.__setattr__(self, "ops_weights", check_op_count_weights(self.ops_weights))
        object.__setattr__(self, "loss_weights", tuple(float(w) for w in self.loss_weights))
        if len(self.loss_weights) != 3 or any(w < 0 for w in self.loss_weights) or not sum(self.loss_weights) > 0:
            raise EntitylensError(
                f"Recipe.loss_weights={self.loss_weights!r} needs 3 non-negative weights (context, answer, "
                "operated answer) with a positive sum"
            )
        if self.ops_per_box is not None and (isinstance(self.ops_per_box, bool) or self.ops_per_box < 1):
            raise EntitylensError(f"Recipe.ops_per_box={self.ops_per_box!r} must be None or a positive integer")
        for name in ("steps", "batch_size", "eval_every", "val_states", "threads", "filler_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise EntitylensError(f"Recipe.{name}={v!r} must be a positive integer")
        if not 0 <= self.filler_rows < self.batch_size:
            raise EntitylensError(
                f"Recipe.filler_rows={self.filler_rows} must be in 0..batch_size-1 ({self.batch_size - 1})"
            )
        if (self.filler is None) != (self.filler_rows == 0):
            raise EntitylensError(
                "Recipe.filler and filler_rows go together: set both (an arm) or neither (stem)"
            )
        if self.filler not in (None, "code", "prose"):
            raise EntitylensError(f"unknown filler {self.filler!r}; use code, prose or None")
        if self.loss_on not in ("answers", "all"):
            raise EntitylensError(f"Recipe.loss_on={self.loss_on!r}; use 'answers' or 'all'")
        if not (self.lr > 0 and 0 <= self.final_lr_frac <= 1 and 0 <= self.filler_weight < 1):
            raise EntitylensError("Recipe needs lr > 0, 0 <= final_lr_frac <= 1 and 0 <= filler_weight < 1")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip <= 0:
            raise EntitylensError("Recipe needs warmup_steps >= 0, weight_decay >= 0 and grad_clip > 0")

    def to_dict(self) -> dict[str, Any]:
        """Canonical JSON-ready dict (tuples as lists)."""
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        d["ops_weights"] = list(self.ops_weights)
        d["loss_weights"] = list(self.loss_weights)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Recipe:
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        d["dims"] = ModelDims(**d["dims"])
        d["betas"] = tuple(d["betas"])
        d["ops_weights"] = tuple(d["ops_weights"])
        if "loss_weights" in d:
            d["loss_weights"] = tuple(d["loss_weights"])
        return cls(**d)

    @property
    def recipe_hash(self) -> str:
        """SHA-256 of the canonical JSON of :meth:`to_dict`."""
        return sha256_json(self.to_dict())

    @property
    def boxes_rows(self) -> int:
        """Boxes episodes per batch."""
        return self.batch_size - self.filler_rows

    def with_steps(self, steps: int) -> Recipe:
        """The same recipe with another number of steps (warm-up and eval cadence shrunk to fit)."""
        return dataclasses.replace(
            self,
            steps=int(steps),
            warmup_steps=min(self.warmup_steps, max(0, int(steps) // 10)),
            eval_every=min(self.eval_every, int(steps)),
        )

    def lr_at(self, step: int) -> float:
        """Learning rate at ``step``: linear warm-up, then cosine from ``lr`` to ``lr * final_lr_frac``."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, self.steps - self.warmup_steps)
        progress_ = min(1.0, (step - self.warmup_steps) / span)
        cos = 0.5 * (1.0 + math.cos(math.pi * progress_))
        return self.lr * (self.final_lr_frac + (1.0 - self.final_lr_frac) * cos)


TRAIN_OPS_PER_BOX = 2
"""The training range: no training episode changes any one box more than twice (evaluation goes to 8)."""

STEM = Recipe(
    stage="stem",
    parent=None,
    dims=ModelDims(d_model=128, layers=4, heads=4, kv_heads=4, d_mlp=512),
    steps=5000,
    batch_size=32,
    lr=2e-3,
    warmup_steps=200,
    ops_weights=(1.0,) * 11,
    ops_per_box=TRAIN_OPS_PER_BOX,
    loss_weights=(0.3, 1.0, 5.0),
    eval_every=250,
    val_states=108,
)
"""The stem recipe: episodes of 0-10 operations (uniform), at most 2 per box, the loss weighted towards
the answers of boxes an operation changed (see docs/testbed.md for the search that found it)."""

_ARM = dict(
    parent="stem",
    dims=STEM.dims,
    steps=3000,
    batch_size=32,
    lr=1e-3,
    warmup_steps=100,
    boxes_seed=2000,
    seed=1,
    ops_weights=(1.0,) * 11,
    ops_per_box=TRAIN_OPS_PER_BOX,
    loss_weights=(0.3, 1.0, 5.0),
    filler_rows=16,
    filler_tokens=96,
    eval_every=250,
    val_states=108,
)
BASE = Recipe(stage="base", filler="prose", **_ARM)  # type: ignore[arg-type]
"""The base arm: boxes episodes + prose."""

CODE = Recipe(stage="code", filler="code", **_ARM)  # type: ignore[arg-type]
"""The code arm: boxes episodes + Python container programs."""

RECIPES: Mapping[str, Recipe] = {"stem": STEM, "base": BASE, "code": CODE}
"""The recipes of the shipped checkpoints, by stage."""


def get_recipe(stage: str) -> Recipe:
    """The recipe of ``stage`` (raises a one-line error for an unknown stage)."""
    if stage not in RECIPES:
        raise EntitylensError(f"unknown testbed stage {stage!r}; use one of {', '.join(STAGES)}")
    return RECIPES[stage]
