"""Interventions along probe directions: does the model *use* what a probe reads?

:func:`run_probe_intervention` takes a probe run (``entitylens probe --out``: its saved weights), one of its
label columns (``apple=removed`` of a ``tags_box`` probe, ``apple`` of ``box_contents``, ``box3:apple`` of
``global``), the cache it was fitted on and the model, and at every probed layer edits the residual stream at
one role of each selected prompt along that column's direction (:mod:`entitylens.patching.directions`: null,
set or add), runs the model on and measures the answer at the prompt's end -- for the column's object ``o``:

* ``p_object``: the probability of ``o``'s first token;
* ``logit_diff``: ``o``'s first-token logit minus the largest first-token logit of the state's other objects;
* ``top1_object``: whether ``o``'s first token is the model's top token.

The same edit along ``random`` unit directions (seeded; same norm, same mode and value) is the control: an
effect is the probe direction's only where it leaves the random band. Prompts are the cache's rows whose
queried box stands to ``o`` as the column says (a ``tags_box`` column ``o=removed``: ``o`` was in the box and
was removed; other columns: ``o`` is in the box), as the replayed world (:mod:`entitylens.probing.world`)
says. A ``tags_object`` column (``box3=removed``, a probe read at object tokens) has no object of its own:
each prompt querying box 3 is scored on the object of the last operation that changed the box (removed from
it, or put or moved into it, as the tag says), edited at that object's token there (``@last_touch``).
A K&S prompt ending ``contains`` gets `` the`` appended so that the next token names an object.

Probe accuracy is not use: a direction a probe reads may be one the model never reads. This is the test.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from entitylens._io import RunDir, prepare_output_dir, sha256_file, write_json
from entitylens.activations import load_cache
from entitylens.activations.identity import model_fingerprint
from entitylens.activations.roles import find_roles, tokenize_with_offsets
from entitylens.errors import EntitylensError
from entitylens.frames import frame, write_csv
from entitylens.models.tokens import model_prepends_bos
from entitylens.patching.directions import EDIT_MODES, run_direction_edits
from entitylens.plots import plot_intervention
from entitylens.probing.outputs import PROBE_WEIGHTS, read_probe_weights
from entitylens.probing.world import TAG_CLASSES, prompt_world

__all__ = ["INTERVENE_COLUMNS", "InterveneConfig", "InterveneResult", "check_intervention_dir",
           "intervention_identity", "run_probe_intervention", "write_intervention_outputs"]

INTERVENE_COLUMNS = ("layer", "direction", "metric", "clean", "edited", "effect", "ci_low", "ci_high", "n")
"""Columns of ``intervene.csv``."""

ROW_RELATIONS = ("auto", *TAG_CLASSES, "all")


@dataclass(frozen=True)
class InterveneConfig:
    """What :func:`run_probe_intervention` edits, where and how.

    Attributes:
        column: The probe's label column whose direction is edited (see ``target_names`` in the probe's meta).
        probe_role: Which of the probe run's roles' probes to use (default: its only or first role).
        role: Role of the token edited in each prompt (a catalogue role, or ``@last_touch``: the queried
            box's mention in the last operation that changed it).
        layers: Probed layers to intervene at (default: all).
        mode: ``"null"`` (project the direction out), ``"set"`` or ``"add"``.
        value: The ``set`` value / ``add`` shift along the unit direction.
        random: Random unit directions per layer (the control).
        rows: Which prompts: ``auto`` (the column's own relation: its tag, else ``present``), a tag class
            (``present``, ``removed``, ``never``) of the queried box and the object, or ``all``.
        max_rows: At most this many prompts (the first ones in cache order).
        seed: Seed of the random directions.
        batch_size: Sequences per forward.
        allow_other_model: Edit a model other than the cached one (a probe of one model applied to its pair).
    """

    column: str
    probe_role: str | None = None
    role: str = "query_box"
    layers: tuple[int, ...] | None = None
    mode: str = "null"
    value: float = 0.0
    random: int = 8
    rows: str = "auto"
    max_rows: int = 64
    seed: int = 0
    batch_size: int = 8
    allow_other_model: bool = False

    def __post_init__(self) -> None:
        if self.mode not in EDIT_MODES:
            raise EntitylensError(f"unknown mode {self.mode!r}; use one of {', '.join(EDIT_MODES)}")
        if self.rows not in ROW_RELATIONS:
            raise EntitylensError(f"unknown rows {self.rows!r}; use one of {', '.join(ROW_RELATIONS)}")
        if int(self.random) < 0 or int(self.max_rows) < 1 or int(self.batch_size) < 1:
            raise EntitylensError("random must be >= 0, max_rows and batch_size >= 1")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))


@dataclass(frozen=True)
class InterveneResult:
    """What :func:`run_probe_intervention` produced.

    Attributes:
        table: ``intervene.csv`` (columns :data:`INTERVENE_COLUMNS`).
        rows: The cache row ids edited.
        objects: The object each prompt is scored on (the column's; for ``tags_object`` columns, the object
            of the last operation that changed the queried box).
        skipped: Selected rows left out (no such role in the prompt), with why.
        identity: What the results belong to (probe weights, cache, model, settings).
    """

    table: pd.DataFrame
    rows: tuple[str, ...]
    objects: tuple[str, ...]
    skipped: tuple[str, ...]
    identity: dict[str, Any]


def _column_object(target: str, column: str) -> tuple[str | None, int | None, str]:
    """The column's object (``None`` for a ``tags_object`` column: each prompt's own), its box and its tag."""
    m = re.fullmatch(r"box(?P<box>\d+)=(?P<cls>never|present|removed)", column)
    if target == "tags_object" and m is not None:
        return None, int(m.group("box")), m.group("cls")
    m = re.fullmatch(r"(?P<obj>.+)=(?P<cls>never|present|removed)", column)
    if m is not None:
        return m.group("obj"), None, m.group("cls")
    m = re.fullmatch(r"box(?P<box>\d+):(?P<obj>.+)", column)
    if m is not None:
        return m.group("obj"), int(m.group("box")), "present"
    return column, None, "present"


def _last_touch(world: Any) -> tuple[int, Any] | None:
    """The last operation that changed the queried box, with its index (``None`` when none did)."""
    touched = [i for i, op in enumerate(world.operations) if world.query_box in op.boxes]
    return None if not touched else (touched[-1], world.operations[touched[-1]])


def _focus(world: Any, obj: str | None, relation: str, role: str) -> tuple[str, str] | None:
    """The object a prompt is scored on and the catalogue role to edit (``None``: the prompt has neither).

    A column naming an object scores that object; a ``tags_object`` column scores the object of the last
    operation that changed the queried box (removed from it, or put or moved into it, as the tag says), and
    ``@last_touch`` is then that object's token in that operation (else the box's mention in it).
    """
    last = _last_touch(world)
    if obj is None:
        if last is None:
            return None
        i, op = last
        took_out = op.box == world.query_box and op.kind != "put"
        if op.kind == "move_contents" or took_out != (relation == "removed"):
            return None
        obj = op.objects[0]
        return obj, (f"op{i}_object{world.structure.operations[i].object_names.index(obj)}"
                     if role == "@last_touch" else role)
    if role != "@last_touch":
        return obj, role
    if last is None:
        return None
    i, op = last
    return obj, f"op{i}_box" if op.box == world.query_box else f"op{i}_dest"


def _first_token(tokenizer: Any, obj: str) -> int:
    ids = tokenizer(" " + obj, add_special_tokens=False)["input_ids"]
    return int(ids[0])


def _select(cache: Any, cfg: InterveneConfig, obj: str | None, box: int | None, relation: str, model: Any
            ) -> tuple[list[str], list[list[int]], list[int], list[list[int]], list[str], list[str]]:
    """The prompts to edit.

    Returns:
        Row ids, token ids (answer slot appended), edit positions, candidates (the scored object first),
        skipped rows, and each prompt's scored object.
    """
    want = relation if cfg.rows == "auto" else cfg.rows
    tok = model.tokenizer
    bos = model_prepends_bos(model)
    row_ids, ids, positions, cands, skipped, objects = [], [], [], [], [], []
    for r, meta in zip(cache.row_ids, cache.rows, strict=True):
        text = meta.get("text")
        if not isinstance(text, str):
            raise EntitylensError("the cache's rows.json has no prompt texts; rebuild it with `entitylens cache "
                                  "--overwrite`")
        w = prompt_world(text)
        q = w.query_box
        if q is None or (box is not None and q != box):
            continue
        focus = _focus(w, obj, relation, cfg.role)
        tags = w.tags(len(w.operations))
        if focus is None or (q, focus[0]) not in tags:
            continue
        o, role = focus
        if want != "all" and TAG_CLASSES[tags[(q, o)]] != want:
            continue
        full = text + " the" if text.rstrip().endswith("contains") else text
        tids, offsets = tokenize_with_offsets(tok, full, prepend_bos=bos)
        found = find_roles(full, offsets, [role], allow_missing=True)[role]
        if found is None:
            skipped.append(f"{r} (no {role})")
            continue
        others = sorted({x for (_, x) in tags if x != o})
        row_ids.append(r)
        ids.append(tids)
        positions.append(int(found))
        cands.append([_first_token(tok, o)] + [_first_token(tok, x) for x in others])
        objects.append(o)
        if len(row_ids) >= cfg.max_rows:
            break
    return row_ids, ids, positions, cands, skipped, objects


def _metrics(logits: torch.Tensor, lse: torch.Tensor, top: torch.Tensor, cand: torch.Tensor, valid: torch.Tensor
             ) -> dict[str, torch.Tensor]:
    """Per-row metrics (``[..., n]``) from candidate logits (column 0 = the object)."""
    others = torch.where(valid[..., 1:], logits[..., 1:], torch.full_like(logits[..., 1:], float("-inf")))
    return {"p_object": (logits[..., 0] - lse).exp(),
            "logit_diff": logits[..., 0] - others.amax(-1),
            "top1_object": (top == cand[:, 0]).double()}


def run_probe_intervention(probe_dir: str | os.PathLike[str], cache_dir: str | os.PathLike[str], model: Any,
                           config: InterveneConfig) -> InterveneResult:
    """Edit the residual stream along a probe column's direction at every layer and measure the answer.

    Args:
        probe_dir: An ``entitylens probe`` output directory (with its weights).
        cache_dir: The cache that probe was fitted on (its rows' prompts are edited).
        model: The cached model as a ``TransformerBridge``.
        config: The :class:`InterveneConfig`.

    Returns:
        The :class:`InterveneResult`.

    Raises:
        EntitylensError: Unknown column or role, another model than the cached one, or no prompt to edit.
    """
    tensors, info = read_probe_weights(probe_dir)
    if config.column not in info["columns"]:
        near = [c for c in info["columns"] if config.column.split("=")[0] in c][:5]
        raise EntitylensError(f"column {config.column!r} is not one of the probe's {len(info['columns'])} columns"
                              f"{' (e.g. ' + ', '.join(near) + ')' if near else ''}; see target_names in its meta.json")
    roles = info["roles"]
    prole = config.probe_role or roles[0]
    if prole not in roles:
        raise EntitylensError(f"the probe run has no role {prole!r}; use one of {', '.join(roles)}")
    cache = load_cache(cache_dir)
    fp = model_fingerprint(model)
    if fp != cache.meta["model"]["fingerprint"] and not config.allow_other_model:
        raise EntitylensError("the model is not the one the cache (and probe) came from; load the cached model, or "
                              "pass --allow-other-model to apply this probe to another model")
    layers = list(info["layers"]) if config.layers is None else list(config.layers)
    missing = [x for x in layers if x not in info["layers"]]
    if missing:
        raise EntitylensError(f"layers {missing} were not probed (probed: {info['layers']}); pick probed layers")
    hook = cache.meta["hooks"][info["hook"]]
    hook_names = [hook["names"][hook["layers"].index(x)] for x in layers]
    j = info["columns"].index(config.column)
    li = [info["layers"].index(x) for x in layers]
    probe_dirs = tensors[f"{prole}/coef"][li, :, j]  # [L, d]
    obj, box, relation = _column_object(info["target"], config.column)
    row_ids, ids, positions, cands, skipped, objects = _select(cache, config, obj, box, relation, model)
    if not row_ids:
        raise EntitylensError(f"no cached prompt has the queried box and {obj or 'an object'!r} as "
                              f"{config.column!r} says (rows={config.rows}); cache more states or pass --rows all")
    width = max(len(c) for c in cands)
    cand = torch.tensor([c + [c[0]] * (width - len(c)) for c in cands])
    valid = torch.tensor([[True] * len(c) + [False] * (width - len(c)) for c in cands])
    gen = torch.Generator().manual_seed(int(config.seed))
    randoms = torch.randn(len(layers), config.random, probe_dirs.shape[1], generator=gen)
    directions = torch.cat([probe_dirs[:, None].float(), randoms], 1)
    run = run_direction_edits(model, ids, positions, hook_names, directions, cand, mode=config.mode,
                              value=config.value, batch_size=config.batch_size)
    clean = _metrics(run.clean, run.clean_lse, run.clean_top, cand, valid)
    edited = _metrics(run.edited, run.edited_lse, run.edited_top, cand, valid)
    table = _table(layers, clean, edited, len(row_ids))
    identity = intervention_identity(probe_dir, cache.meta["fingerprint"], fp, config)
    return InterveneResult(table=table, rows=tuple(row_ids), objects=tuple(objects), skipped=tuple(skipped),
                           identity=identity)


def intervention_identity(probe_dir: str | os.PathLike[str], cache_fingerprint: str, model_fp: str,
                          config: InterveneConfig) -> dict[str, Any]:
    """What an intervention run's results belong to: the probe's weights, the cache, the model and the settings."""
    ident = {"probe_weights_sha256": sha256_file(Path(probe_dir) / PROBE_WEIGHTS), "cache": cache_fingerprint,
             "model": model_fp, **asdict(config)}
    ident["layers"] = None if config.layers is None else list(config.layers)
    return ident


def check_intervention_dir(out_dir: str | os.PathLike[str], identity: dict[str, Any], overwrite: bool) -> None:
    """Refuse, before any work, an output directory holding another run (or another intervention's results)."""
    RunDir(out_dir, "meta.json", "an intervention run",
           is_mine=lambda rec: rec.get("kind") == "entitylens.intervene").check(identity, overwrite=overwrite)


def _table(layers: list[int], clean: dict[str, torch.Tensor], edited: dict[str, torch.Tensor], n: int
           ) -> pd.DataFrame:
    """``intervene.csv``: per layer and metric, the probe direction's effect and the random directions'."""
    out = []
    for metric, c in clean.items():
        e = edited[metric].double()  # [L, V, n]
        diff = e - c.double()
        for i, layer in enumerate(layers):
            d = diff[i, 0]
            half = 1.96 * float(d.std()) / n**0.5 if n > 1 else float("nan")
            mean = float(d.mean())
            out.append({"layer": layer, "direction": "probe", "metric": metric, "clean": float(c.double().mean()),
                        "edited": float(e[i, 0].mean()), "effect": mean, "ci_low": mean - half,
                        "ci_high": mean + half, "n": n})
            if e.shape[1] > 1:
                per_dir = diff[i, 1:].mean(-1)
                out.append({"layer": layer, "direction": "random", "metric": metric,
                            "clean": float(c.double().mean()), "edited": float(e[i, 1:].mean()),
                            "effect": float(per_dir.mean()), "ci_low": float(per_dir.quantile(0.025)),
                            "ci_high": float(per_dir.quantile(0.975)), "n": n})
    return frame(out, INTERVENE_COLUMNS)


def write_intervention_outputs(out_dir: str | os.PathLike[str], result: InterveneResult, *, overwrite: bool = False,
                               title: str | None = None) -> list[Path]:
    """Write ``intervene.csv``, ``intervene.png``/``.pdf`` and ``meta.json`` (refusing another run's directory).

    Args:
        out_dir: Output directory.
        result: The :class:`InterveneResult`.
        overwrite: Replace a directory holding another intervention's results.
        title: Figure title.

    Returns:
        The written paths.
    """
    check_intervention_dir(out_dir, result.identity, overwrite)
    out = prepare_output_dir(out_dir)
    write_csv(result.table, out / "intervene.csv")
    col = result.identity["column"]
    pngs = plot_intervention(result.table, out / "intervene",
                             title=title or f"{result.identity['mode']} along {col!r} at {result.identity['role']}")
    write_json(out / "meta.json", {"kind": "entitylens.intervene", "identity": result.identity,
                                   "objects": list(result.objects), "rows": list(result.rows),
                                   "skipped": list(result.skipped)})
    return [out / "intervene.csv", *pngs, out / "meta.json"]
