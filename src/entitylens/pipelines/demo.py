"""The demo: the whole pipeline on the embedded testbed pair (base arm vs code arm), with a report.

``entitylens demo --out runs/demo`` runs, on the shipped checkpoints of the testbed:

1. the behavioural evaluation by numops, within the arms' training range (at most
   :data:`~entitylens.testbed.recipe.TRAIN_OPS_PER_BOX` operations per box) and beyond it, for stem, base and
   code, with the random / "always nothing" / "copy the initial contents" baselines, and the paired
   base-vs-code comparison whose unit is the state -- ``eval/``;
2. linear probes on the residual stream after every block, at the query token (the last prompt token of a
   compact prompt) and at the queried box's token in the initial description, for base and code, with
   rows for numops 0 (the initial contents suffice) and numops >= 1 (the *updated* state) -- ``cache/``,
   ``probe/``; then "where is the state": the probe family (global, mention, incremental, object tags) on
   one prompt per state (:mod:`entitylens.pipelines.demo_where`);
3. exact activation patching of the residual stream at every layer x the roles that carry the last two
   operations and the query, on pairs that change the object of the last operation, for base and code on
   one colour scale -- ``patch/``;

then writes ``report.md`` (:mod:`entitylens.pipelines.demo_report`), whose numbers and sentences are computed
from the CSV files the stages wrote, and returns the findings for the closing summary.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from entitylens._io import sha256_json
from entitylens.activations import CacheConfig, cache_activations, compact_cache_prompts
from entitylens.activations.roles import find_roles, tokenize_with_offsets
from entitylens.errors import EntitylensError
from entitylens.models import load_model
from entitylens.models.tokens import model_prepends_bos
from entitylens.patching import PatchPair
from entitylens.patching.job import PatchConfig, run_patch_job
from entitylens.patching.pair_io import patch_pair_record
from entitylens.pipelines.demo_report import ARMS, Findings, find_all, write_report
from entitylens.pipelines.demo_where import run_where_stage
from entitylens.plots import plot_patch_comparison
from entitylens.probing.linear import ProbeConfig
from entitylens.probing.outputs import compare_probe_runs, write_probe_outputs
from entitylens.probing.run import ProbeRunConfig, run_probes
from entitylens.task.compact import COMPACT, compact_prompt, ordered_contents
from entitylens.task.targeted import eval_states
from entitylens.task.types import Operation
from entitylens.task.vocab import BNC_OBJECTS
from entitylens.testbed import run_testbed_eval

__all__ = ["EVAL_MODELS", "PROBE_ROLES", "STAGES", "DemoConfig", "changed_put_pairs", "run_demo"]

EVAL_MODELS = ("random", "nothing", "initial", "testbed:stem", "testbed:base", "testbed:code")
"""What the demo evaluates: the three baselines and the three shipped checkpoints."""

PROBE_ROLES = ("query_box", "query_box_desc")
"""Where the probes read the residual stream: the query token (the last token of a compact prompt, where the
answer is produced) and the queried box's token in the initial description (before any operation)."""

STAGES = ("eval", "probe", "patch")
"""The demo's stages, in order."""

PROBE_SEED, PATCH_SEED = 12345, 54321
"""Seeds of the probe and patch states (the evaluation uses the standard set's)."""


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo's stages (the defaults finish in a few minutes on a 2-core CPU).

    Attributes:
        eval_states: States in the behavioural evaluation (7 rows each).
        probe_states: States whose 7 query prompts are cached for the probes.
        patch_pairs: Clean/corrupted pairs for patching.
        where_states: States (one prompt each) the probe family reads ("where is the state").
        seed: Seed of the probe split.
    """

    eval_states: int = 720
    probe_states: int = 240
    patch_pairs: int = 24
    where_states: int = 120
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.eval_states, self.probe_states, self.patch_pairs, self.where_states) < 1:
            raise EntitylensError("demo sizes must be >= 1; pass positive --eval-states/--probe-states/--patch-pairs/"
                                  "--where-states")


def run_eval_stage(out: Path, config: DemoConfig) -> Path:
    """Behavioural evaluation of the testbed models and baselines (compact protocol)."""
    run_testbed_eval(out / "eval", EVAL_MODELS, num_states=config.eval_states)
    return out / "eval"


def run_probe_stage(out: Path, config: DemoConfig) -> dict[str, Path]:
    """Cache the residual streams of base and code on the same prompts and probe every layer at both roles."""
    states = eval_states(seed=PROBE_SEED, num_states=config.probe_states)
    prompts = compact_cache_prompts(states)
    dirs = {}
    for arm in ARMS:
        model = load_model(f"testbed:{arm}")
        cache_dir = out / "cache" / arm
        cache_activations(
            model, prompts, CacheConfig(hooks=("resid_post",), roles=PROBE_ROLES), cache_dir,
            model_spec=f"testbed:{arm}",
            dataset_source={"testbed_eval_states": {"seed": PROBE_SEED, "num_states": config.probe_states}},
        )  # fmt: skip
        run = run_probes(cache_dir, ProbeRunConfig(target="box_contents", roles=PROBE_ROLES,
                                                   probe=ProbeConfig(seed=config.seed)))  # fmt: skip
        write_probe_outputs(out / "probe" / arm, run, title=f"testbed {arm}: probes by layer")
        dirs[arm] = out / "probe" / arm
    for name, metric in (("compare_updated", "exact_match_numops>=1"), ("compare_initial", "exact_match_numops=0")):
        compare_probe_runs(dirs["base"], dirs["code"], out / "probe" / name, metric=metric, labels=ARMS)
    run_where_stage(out, ARMS, config.where_states, config.seed)
    return dirs


def changed_put_pairs(model: Any, states: Sequence[Any], limit: int) -> tuple[list[Any], tuple[str, ...]]:
    """Compact-format patching pairs that differ in the object of the last operation.

    Clean = a state whose last operation puts one object into a box, queried on that box; corrupted = the
    same prompt with a different, unused object put instead (same length, a valid world, different
    answers). Only states with the most common number of operations are kept, so every pair has the same
    roles: the previous operation's object and box, the changed object and its box, the queried box's
    token in the description and the query token.

    Returns:
        The pairs and the role names they share.
    """
    candidates: dict[int, list[Any]] = {}
    for s in states:
        if len(s.operations) < 2 or s.operations[-1].kind != "put" or len(s.operations[-1].objects) != 1:
            continue
        candidates.setdefault(len(s.operations), []).append(s)
    if not candidates:
        raise EntitylensError("no state ends with a single-object put; raise --patch-pairs to sample more states")
    n_ops = max(sorted(candidates), key=lambda k: len(candidates[k]))
    roles = (f"op{n_ops - 2}_object", f"op{n_ops - 2}_box", f"op{n_ops - 1}_object", f"op{n_ops - 1}_box",
             "query_box_desc", "query_box")  # fmt: skip
    # Role positions must index the same token sequence as the pair (BOS included when the model adds it).
    bos = model_prepends_bos(model)
    pairs = []
    for s in candidates[n_ops]:
        pair = _changed_put_pair(model.tokenizer, bos, s, roles)
        if pair is not None:
            pairs.append(pair)
        if len(pairs) >= limit:
            break
    if not pairs:
        raise EntitylensError("no patching pair could be built from the evaluation states; raise --patch-pairs")
    return pairs, roles


def _changed_put_pair(tok: Any, bos: bool, s: Any, roles: tuple[str, ...]) -> PatchPair | None:
    """The pair of one state (``None`` when its roles or a distinguishing answer token are missing)."""
    last = s.operations[-1]
    mentioned = {o for c in s.initial for o in c} | {o for op in s.operations for o in op.objects}
    free = [o for o in BNC_OBJECTS if o not in mentioned]
    swap = Operation("put", (free[s.sample_id % len(free)],), last.box)
    corrupted = dataclasses.replace(s, operations=s.operations[:-1] + (swap,))
    clean_p, corr_p = compact_prompt(s, last.box), compact_prompt(corrupted, last.box)
    clean_ans = COMPACT.answer_text(ordered_contents(s.initial, s.operations)[last.box])
    corr_ans = COMPACT.answer_text(ordered_contents(corrupted.initial, corrupted.operations)[last.box])
    try:
        return PatchPair.from_texts(
            tok, clean_p, corr_p, clean_ans, corr_ans,
            clean_roles=find_roles(clean_p, tokenize_with_offsets(tok, clean_p, prepend_bos=bos)[1], roles),
            corrupted_roles=find_roles(corr_p, tokenize_with_offsets(tok, corr_p, prepend_bos=bos)[1], roles),
            bos=bos, name=s.state_id,
        )  # fmt: skip
    except EntitylensError:
        return None  # a role the prompt lacks (a move names no object), or no distinguishing token


def run_patch_stage(out: Path, config: DemoConfig) -> dict[str, Path]:
    """Exact resid_pre patching (every layer x role) on changed-last-put pairs, base and code (the one patch job)."""
    states = eval_states(seed=PATCH_SEED, num_states=30 * config.patch_pairs)
    results = {}
    dirs = {}
    for arm in ARMS:
        model = load_model(f"testbed:{arm}")
        pairs, roles = changed_put_pairs(model, states, config.patch_pairs)
        dirs[arm] = out / "patch" / arm
        job = run_patch_job(
            model, pairs, dirs[arm], PatchConfig(component="resid_pre", grid="layer_role", roles=roles),
            pairs_sha256=sha256_json([patch_pair_record(p) for p in pairs]), label=f"testbed {arm}",
            info={"model": f"testbed:{arm}", "pairs": "changed_put_pairs"}, overwrite=True,
        )  # fmt: skip
        results[arm] = job.result
    plot_patch_comparison(
        [(arm, results[arm].mean().numpy(), results[arm].layers, results[arm].cells) for arm in ARMS],
        out / "patch" / "patch_compare_resid_pre",
        title="resid_pre patching: base vs code",
    )
    return dirs


def run_demo(
    out: str | os.PathLike[str],
    config: DemoConfig | None = None,
    *,
    stages: Sequence[str] = STAGES,
    say: Callable[[str], None] | None = None,
) -> tuple[Path, Findings]:
    """Run the demo stages into ``out`` and write ``report.md``.

    Args:
        out: The demo's directory.
        config: Stage sizes.
        stages: ``eval`` always runs; ``probe`` and ``patch`` are optional.
        say: Where the one-line stage announcements go (``None``: nowhere).

    Returns:
        The report's path and the findings it states (for the closing summary).
    """
    config = config or DemoConfig()
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise EntitylensError(f"unknown demo stage {unknown[0]!r}; use a comma-separated subset of {','.join(STAGES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tell = say or (lambda _msg: None)
    todo = [s for s in STAGES if s == "eval" or s in stages]
    runners: dict[str, Callable[[Path, DemoConfig], object]] = {
        "eval": run_eval_stage, "probe": run_probe_stage, "patch": run_patch_stage,
    }  # fmt: skip
    what = {"eval": "behavioural evaluation", "probe": "caching and probing", "patch": "activation patching"}
    for i, stage in enumerate(todo, 1):
        tell(f"[{i}/{len(todo)}] {what[stage]}")
        runners[stage](out, config)
    findings = find_all(out, have_probes="probe" in todo, have_patch="patch" in todo)
    return write_report(out, findings), findings
