"""Deterministic CPU training of the testbed: a shared *stem*, then a *base* and a *code* arm.

Mirrors the paper's design (the code model is the base model trained further), controlled:

* **stem** — a small Llama (RoPE, RMSNorm, SwiGLU; a Hugging Face ``LlamaForCausalLM``, so it loads into a
  ``TransformerBridge`` like any hub model) trained from scratch on compact boxes episodes with 0-2
  operations until it copies (>= 90% at ``numops`` 0 on fresh states);
* **base** and **code** arms — both continue from the stem with the same optimiser, seed, steps, batch
  shape and token budget. In every batch the same boxes rows (0-2 operations, the identical stream in both
  arms) fill the boxes share, and the other rows — always exactly ``filler_tokens`` tokens each — are
  Python container programs (code arm) or descriptive prose (base arm). The two arms' recipes differ only
  in ``stage`` and ``filler``; the token counts per source are recorded and a test checks they match.

A :class:`Recipe` is a frozen dataclass; its *recipe hash* is the SHA-256 of its canonical JSON. Training
is deterministic on one machine: a seeded data stream (every row is a function of ``(seed, index)``),
``torch.manual_seed``, a fixed ``torch.set_num_threads`` and no dropout, so the same recipe gives the same
final loss (to 1e-6; in practice bit-identical).

Outputs of a stage, written to a temporary directory and moved into place only when complete:
``model.safetensors``, ``config.json`` (Hugging Face Llama config), ``tokenizer.json`` (+
``tokenizer_config.json``, so the directory is also a plain HF model directory), ``meta.json`` (recipe,
recipe hash, token counts per source, final losses, evaluation accuracy by ``numops``, versions,
machine), ``train_log.csv`` and ``train_log.png`` -- all byte-identical on a retrain -- and ``timing.json``
(wall-clock seconds, which differ from run to run).
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from entitylens import __version__
from entitylens._io import atomic_write, clean_stale_temps, sha256_json, temp_prefix, write_json
from entitylens.behavior.compact import compact_answers
from entitylens.errors import EntitylensError
from entitylens.models.testbed.checkpoints import (
    CHECKPOINT_FILES,
    load_hf_checkpoint,
    read_meta,
    save_hf_checkpoint,
)
from entitylens.models.testbed.tokenizer import testbed_tokenizer, tokenizer_json
from entitylens.progress import progress
from entitylens.task.score import RowScore, aggregate
from entitylens.task.targeted import DEFAULT_EVAL_STATES, EVAL_SEED, VALIDATION_SEED, eval_states
from entitylens.testbed.data import Episode, boxes_episode, filler_episode
from entitylens.testbed.recipe import (
    ModelDims,
    Recipe,
    get_recipe,
)

LOG_COLUMNS: tuple[str, ...] = (
    "step", "tokens", "lr", "loss", "boxes_loss", "filler_loss", "val_acc_numops0", "val_acc_numops1",
    "val_acc_numops2", "val_acc_numops3plus", "val_acc",
)  # fmt: skip
"""Columns of ``train_log.csv`` (losses are means over the steps since the previous row). Wall-clock times
go to ``timing.json`` (``elapsed_s`` per logged step, ``train_seconds``), so a retrain reproduces every
other file byte for byte."""


# ------------------------------------------------------------------------------------------------ model


def build_config(dims: ModelDims, vocab_size: int) -> Any:
    """The Hugging Face ``LlamaConfig`` of ``dims`` for the testbed tokenizer."""
    from transformers import LlamaConfig


    tok = testbed_tokenizer()
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=dims.d_model,
        intermediate_size=dims.d_mlp,
        num_hidden_layers=dims.layers,
        num_attention_heads=dims.heads,
        num_key_value_heads=dims.kv_heads,
        max_position_embeddings=dims.n_ctx,
        rope_parameters={"rope_type": "default", "rope_theta": dims.rope_theta},
        initializer_range=dims.init_std,
        tie_word_embeddings=dims.tie_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        attention_dropout=0.0,
    )


def build_model(dims: ModelDims, seed: int) -> Any:
    """A freshly initialised ``LlamaForCausalLM`` (float32, SDPA attention), seeded; global RNG untouched."""
    from transformers import LlamaForCausalLM


    cfg = build_config(dims, len(testbed_tokenizer()))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    model.config.name_or_path = "entitylens/testbed"
    return model


# ------------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Batch:
    """One training batch (right-padded).

    Attributes:
        ids: Token ids, ``pad`` after each row's end.
        boxes_target: Where a boxes row's *next* token is in the loss (aligned with ``ids[:, 1:]``).
        filler_target: Where a filler row's next token is in the loss.
        tokens: Non-pad tokens per source.
        boxes_weight: Loss weight of each boxes target (the recipe's weight of its token class).
    """

    ids: Int[Tensor, "batch pos"]
    boxes_target: Bool[Tensor, "batch pos_minus_1"]
    filler_target: Bool[Tensor, "batch pos_minus_1"]
    tokens: Mapping[str, int]
    boxes_weight: Float[Tensor, "batch pos_minus_1"] | None = None


def batch_episodes(recipe: Recipe, step: int) -> list[Episode]:
    """The rows of batch ``step``: ``boxes_rows`` boxes episodes, then ``filler_rows`` filler rows."""
    rows = [
        boxes_episode(recipe.boxes_seed, step * recipe.boxes_rows + j, recipe.ops_weights, recipe.ops_per_box)
        for j in range(recipe.boxes_rows)
    ]
    if recipe.filler is not None:
        rows += [
            filler_episode(recipe.filler, recipe.seed, step * recipe.filler_rows + j, recipe.filler_tokens)
            for j in range(recipe.filler_rows)
        ]
    return rows


def make_batch(recipe: Recipe, step: int, pad_id: int = 0) -> Batch:
    """Batch ``step`` of ``recipe`` as tensors (a pure function of the recipe and the step)."""
    rows = batch_episodes(recipe, step)
    width = max(len(e) for e in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    boxes_t = torch.zeros((len(rows), width - 1), dtype=torch.bool)
    filler_t = torch.zeros((len(rows), width - 1), dtype=torch.bool)
    weight = torch.zeros((len(rows), width - 1), dtype=torch.float32)
    class_weights = torch.tensor(recipe.loss_weights, dtype=torch.float32)
    tokens = {"boxes": 0, "code": 0, "prose": 0}
    for r, e in enumerate(rows):
        n = len(e)
        ids[r, :n] = torch.tensor(e.ids, dtype=torch.long)
        tokens[e.source] += n
        if e.source == "boxes":
            if recipe.loss_on == "answers":
                boxes_t[r, : n - 1] = torch.tensor(e.answer[1:], dtype=torch.bool)
            else:
                boxes_t[r, : n - 1] = True
            weight[r, : n - 1] = class_weights[torch.tensor(e.token_class[1:], dtype=torch.long)]
        else:
            filler_t[r, : n - 1] = True
    return Batch(ids, boxes_t, filler_t, tokens, weight)


def token_budget(recipe: Recipe, steps: int | None = None) -> dict[str, int]:
    """Tokens per source a recipe trains on (counted from the data stream itself).

    Args:
        recipe: The recipe.
        steps: Count only the first ``steps`` steps (default: all).

    Returns:
        ``{"boxes": n, "code": n, "prose": n, "total": n}`` (non-pad tokens, BOS included).
    """
    counts = {"boxes": 0, "code": 0, "prose": 0}
    for step in range(recipe.steps if steps is None else steps):
        for e in batch_episodes(recipe, step):
            counts[e.source] += len(e)
    counts["total"] = sum(counts.values())
    return counts


# --------------------------------------------------------------------------------------------- training


@contextlib.contextmanager
def _num_threads(n: int) -> Any:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def batch_loss(model: Any, batch: Batch, recipe: Recipe) -> tuple[Tensor, float, float]:
    """The training loss of a batch, with its boxes and filler parts (as floats, NaN when absent)."""
    logits = model(input_ids=batch.ids).logits[:, :-1].float()
    target = batch.ids[:, 1:]
    if batch.boxes_weight is None or recipe.loss_weights == (1.0, 1.0, 1.0):
        boxes = F.cross_entropy(logits[batch.boxes_target], target[batch.boxes_target])
    else:  # weighted mean over the token classes (context / answer / operated answer)
        ce = F.cross_entropy(logits[batch.boxes_target], target[batch.boxes_target], reduction="none")
        w = batch.boxes_weight[batch.boxes_target]
        boxes = (ce * w).sum() / w.sum().clamp_min(1e-12)
    if recipe.filler is None or not bool(batch.filler_target.any()):
        return boxes, float(boxes.detach()), float("nan")
    filler = F.cross_entropy(logits[batch.filler_target], target[batch.filler_target])
    loss = (1.0 - recipe.filler_weight) * boxes + recipe.filler_weight * filler
    return loss, float(boxes.detach()), float(filler.detach())


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train_stage` produced.

    Attributes:
        out: The checkpoint directory.
        recipe: The recipe trained.
        final_loss: Mean training loss over the last logging interval.
        last_step_loss: Loss of the very last step (used by the determinism test).
        meta: The ``meta.json`` contents.
    """

    out: Path
    recipe: Recipe
    final_loss: float
    last_step_loss: float
    meta: Mapping[str, Any]


def _validate(model: Any, states: Sequence[Any]) -> dict[str, float]:
    """Validation accuracy (compact protocol) overall and by numops bucket 0, 1, 2, 3+."""
    was_training = model.training
    model.eval()
    answers = compact_answers(model, states, tokenizer=testbed_tokenizer())
    model.train(was_training)
    right = [0, 0, 0, 0]
    n = [0, 0, 0, 0]
    for s, ans in zip(states, answers):
        for b, a in enumerate(ans):
            k = min(s.numops[b], 3)
            right[k] += a is not None and sorted(a) == sorted(s.contents[b])
            n[k] += 1
    acc = {f"val_acc_numops{k}": (right[k] / n[k] if n[k] else float("nan")) for k in range(3)}
    acc["val_acc_numops3plus"] = right[3] / n[3] if n[3] else float("nan")
    acc["val_acc"] = sum(right) / sum(n)
    return acc


def _check_parent(rec: Recipe, parent_dir: str | os.PathLike[str] | None) -> dict[str, Any] | None:
    """The parent checkpoint's ``meta.json`` (``None`` for the stem), refused when it does not fit ``rec``."""
    if rec.parent is None:
        return None
    if parent_dir is None:
        raise EntitylensError(f"stage {rec.stage} continues from {rec.parent}; pass its checkpoint directory")
    parent_meta = read_meta(parent_dir)
    if parent_meta.get("stage") != rec.parent:
        raise EntitylensError(
            f"{parent_dir} holds stage {parent_meta.get('stage')!r}, not {rec.parent!r}; "
            f"train `--stage {rec.parent}` first"
        )
    parent_dims = Recipe.from_dict(parent_meta["recipe"]).dims
    if parent_dims != rec.dims:
        raise EntitylensError(f"{parent_dir} has model dims {parent_dims} but the recipe needs {rec.dims}")
    return parent_meta


def _train_loop(
    model: Any,
    opt: Any,
    rec: Recipe,
    val: Sequence[Any],
    t_start: float,
    callback: Callable[[dict[str, Any]], None] | None,
) -> tuple[dict[str, int], list[dict[str, Any]], float]:
    """Run ``rec.steps`` optimiser steps; returns the tokens per source, the log rows and the last loss."""
    log: list[dict[str, Any]] = []
    tokens = {"boxes": 0, "code": 0, "prose": 0}
    acc_loss: list[float] = []
    acc_boxes: list[float] = []
    acc_filler: list[float] = []
    last_loss = float("nan")
    bar = progress(range(rec.steps), desc=f"train {rec.stage}", unit="step")
    for step in bar:
        batch = make_batch(rec, step)
        for k, v in batch.tokens.items():
            tokens[k] += v
        lr = rec.lr_at(step)
        for g in opt.param_groups:
            g["lr"] = lr
        loss, boxes_l, filler_l = batch_loss(model, batch, rec)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), rec.grad_clip)
        opt.step()
        last_loss = float(loss.detach())
        acc_loss.append(last_loss)
        acc_boxes.append(boxes_l)
        acc_filler.append(filler_l)
        done = step + 1
        if done % rec.eval_every == 0 or done == rec.steps:
            accs = _validate(model, val)
            row = {
                "step": done,
                "tokens": sum(tokens.values()),
                "lr": lr,
                "loss": sum(acc_loss) / len(acc_loss),
                "boxes_loss": sum(acc_boxes) / len(acc_boxes),
                "filler_loss": sum(acc_filler) / len(acc_filler),
                **accs,
                "elapsed_s": round(time.time() - t_start, 1),
            }
            log.append(row)
            acc_loss, acc_boxes, acc_filler = [], [], []
            bar.set_postfix(
                loss=f"{row['loss']:.3f}", acc0=f"{accs['val_acc_numops0']:.2f}",
                acc1=f"{accs['val_acc_numops1']:.2f}", acc2=f"{accs['val_acc_numops2']:.2f}",
            )  # fmt: skip
            if callback is not None:
                callback(row)
    return tokens, log, last_loss


def train_stage(
    stage: str,
    out: str | os.PathLike[str],
    *,
    recipe: Recipe | None = None,
    steps: int | None = None,
    parent_dir: str | os.PathLike[str] | None = None,
    evaluate_final: bool = True,
    eval_num_states: int | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train one stage and write its checkpoint directory (atomically: all files or none).

    Args:
        stage: ``"stem"``, ``"base"`` or ``"code"``.
        out: The checkpoint directory to create (replaced if it exists, only once training succeeded).
        recipe: The recipe (default: :data:`RECIPES` ``[stage]``).
        steps: Override the number of steps (smoke tests); recorded in ``meta.json``.
        parent_dir: The parent stage's checkpoint directory (arms only).
        evaluate_final: Evaluate the final model on the standard evaluation set (compact protocol).
        eval_num_states: Size of that evaluation set (default: the standard 720 states).
        callback: Called with each log row (tests / progress).

    Returns:
        The result.

    Raises:
        EntitylensError: Unknown stage, missing or mismatched parent checkpoint.
    """
    base_recipe = recipe if recipe is not None else get_recipe(stage)
    if base_recipe.stage != stage:
        raise EntitylensError(
            f"recipe is for stage {base_recipe.stage!r}, not {stage!r}; pass the matching recipe"
        )
    rec = base_recipe.with_steps(steps) if steps is not None else base_recipe
    out = Path(out)
    _check_output_dir(out)
    parent_meta = _check_parent(rec, parent_dir)

    val = eval_states(VALIDATION_SEED, num_states=rec.val_states)
    t_start = time.time()
    with _num_threads(rec.threads):
        torch.manual_seed(rec.seed)
        if rec.parent is None:
            model = build_model(rec.dims, rec.seed)
        else:
            model = load_hf_checkpoint(parent_dir)  # type: ignore[arg-type]
        model.config._attn_implementation = "sdpa"
        model.train()
        opt = torch.optim.AdamW(
            model.parameters(), lr=rec.lr, betas=rec.betas, eps=rec.eps, weight_decay=rec.weight_decay
        )
        tokens, log, last_loss = _train_loop(model, opt, rec, val, t_start, callback)
        train_seconds = time.time() - t_start
        model.eval()
        final_eval = _final_eval(model, eval_num_states) if evaluate_final else None

    meta = _meta(rec, base_recipe, steps, tokens, log, last_loss, final_eval, parent_meta)
    timing = {"train_seconds": round(train_seconds, 1), "elapsed_s": {str(r["step"]): r["elapsed_s"] for r in log}}
    _write_checkpoint(model, out, meta, log, timing)
    return TrainResult(out, rec, float(log[-1]["loss"]), last_loss, meta)


def _check_output_dir(out: Path) -> None:
    """Refuse an output directory that holds anything but a previous checkpoint (it would be replaced)."""
    if out.exists():
        if not out.is_dir():
            raise EntitylensError(f"{out} is a file; choose a directory for the checkpoint")
        foreign = sorted(p.name for p in out.iterdir() if p.name not in CHECKPOINT_FILES)
        if foreign:
            raise EntitylensError(
                f"{out} holds files that are not a testbed checkpoint ({', '.join(foreign[:3])}); "
                "choose another --out (nothing was changed)"
            )


def _final_eval(model: Any, num_states: int | None) -> dict[str, Any]:
    n = DEFAULT_EVAL_STATES if num_states is None else num_states
    states = eval_states(EVAL_SEED, num_states=n)
    answers = compact_answers(model, states, tokenizer=testbed_tokenizer())
    rows = [
        RowScore(s.state_id, b, s.numops[b], a is not None and sorted(a) == sorted(s.contents[b]))
        for s, ans in zip(states, answers)
        for b, a in enumerate(ans)
    ]
    rep = aggregate(rows, max_numops=7)
    return {
        "protocol": "compact",
        "eval_seed": EVAL_SEED,
        "states": n,
        "overall": rep.overall.accuracy,
        "by_numops": {str(k): {"accuracy": v.accuracy, "n": v.n} for k, v in sorted(rep.by_numops.items())},
    }


def _meta(
    rec: Recipe,
    base_recipe: Recipe,
    steps_override: int | None,
    tokens: Mapping[str, int],
    log: Sequence[Mapping[str, Any]],
    last_loss: float,
    final_eval: Mapping[str, Any] | None,
    parent_meta: Mapping[str, Any] | None,
) -> dict[str, Any]:
    import transformers


    return _no_nan(
        {
            "stage": rec.stage,
            "recipe": rec.to_dict(),
            "recipe_hash": rec.recipe_hash,
            "code_recipe_hash": base_recipe.recipe_hash,
            "steps_override": steps_override,
            "parent": None
            if parent_meta is None
            else {"stage": parent_meta["stage"], "recipe_hash": parent_meta["recipe_hash"]},
            "tokens": {**tokens, "total": sum(tokens.values())},
            "final": {
                "loss": log[-1]["loss"],
                "boxes_loss": log[-1]["boxes_loss"],
                "filler_loss": log[-1]["filler_loss"],
                "last_step_loss": last_loss,
                **{k: log[-1][k] for k in LOG_COLUMNS if k.startswith("val_acc")},
            },
            "eval": final_eval,
            "tokenizer_sha256": sha256_json(tokenizer_json()),
            "versions": {
                "entitylens": __version__,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "python": platform.python_version(),
            },
            "machine": {
                "platform": platform.platform(),
                "processor": platform.processor() or platform.machine(),
                "cpu_count": os.cpu_count(),
                "torch_threads": rec.threads,
            },
        }
    )


def _no_nan(obj: Any) -> Any:
    """``obj`` with every NaN float replaced by ``None`` (JSON has no NaN)."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _no_nan(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_no_nan(v) for v in obj]
    return obj


def _write_log_csv(path: Path, log: Sequence[Mapping[str, Any]]) -> None:
    with atomic_write(path) as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(LOG_COLUMNS)
        for row in log:
            w.writerow([_fmt(row[c]) for c in LOG_COLUMNS])


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def plot_log(log: Sequence[Mapping[str, Any]], out: str | os.PathLike[str], title: str = "") -> Path:
    """Plot a training log (losses and validation accuracy against steps) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in log]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax1.plot(steps, [r["loss"] for r in log], label="loss")
    ax1.plot(steps, [r["boxes_loss"] for r in log], label="boxes rows")
    if any(not math.isnan(r["filler_loss"]) for r in log):
        ax1.plot(steps, [r["filler_loss"] for r in log], label="filler")
    ax1.set_xlabel("step")
    ax1.set_ylabel("cross-entropy")
    ax1.legend()
    for key, name in (("val_acc_numops0", "numops 0"), ("val_acc_numops1", "numops 1"),
                      ("val_acc_numops2", "numops 2"), ("val_acc_numops3plus", "numops 3+")):  # fmt: skip
        ax2.plot(steps, [r.get(key, math.nan) for r in log], label=name)
    ax2.set_ylim(0, 1)
    ax2.set_xlabel("step")
    ax2.set_ylabel("validation accuracy")
    ax2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    with atomic_write(out, "wb") as f:
        fig.savefig(f, format="png", dpi=90, metadata={"Software": None})
    plt.close(fig)
    return out


def _write_checkpoint(
    model: Any, out: Path, meta: Mapping[str, Any], log: Sequence[Mapping[str, Any]], timing: Mapping[str, Any]
) -> None:

    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out.parent)  # a killed earlier run's partial checkpoint
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out.name), suffix=".tmp", dir=out.parent))
    try:
        save_hf_checkpoint(model, tmp)
        write_json(tmp / "meta.json", meta)
        write_json(tmp / "timing.json", timing)
        _write_log_csv(tmp / "train_log.csv", log)
        plot_log(log, tmp / "train_log.png", title=f"testbed {meta['stage']} ({meta['recipe_hash'][:12]})")
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
