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
3. exact activation patching of the residual stream at every layer x the changed object's mention, the
   queried box's description token and the query token, on pairs that change the object of one operation
   and that both arms answer right both ways, for base and code on one colour scale -- ``patch/``;

then writes ``report.md`` (:mod:`entitylens.pipelines.demo_report`), whose numbers and sentences are computed
from the CSV files the stages wrote, and returns the findings for the closing summary.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from entitylens._io import sha256_json, write_json
from entitylens.activations import CacheConfig, cache_activations, compact_cache_prompts
from entitylens.errors import EntitylensError
from entitylens.models import load_model
from entitylens.patching.job import PatchConfig, run_patch_job
from entitylens.patching.pair_io import patch_pair_record
from entitylens.pipelines.demo_report import ARMS, Findings, find_all, write_report
from entitylens.pipelines.demo_where import run_where_stage
from entitylens.plots import plot_patch_comparison
from entitylens.probing.linear import ProbeConfig
from entitylens.probing.outputs import compare_probe_runs, write_probe_outputs
from entitylens.probing.run import ProbeRunConfig, run_probes
from entitylens.task.targeted import eval_states
from entitylens.testbed import run_testbed_eval

__all__ = ["EVAL_MODELS", "PATCH_ROLES", "PROBE_ROLES", "STAGES", "DemoConfig", "run_demo", "solved_pairs"]

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


PATCH_ROLES = ("changed_object", "query_box_desc", "query_box")
"""The demo's patching cells: the changed operation's object, the queried box's token in the description and
the query token (every ``op_object`` pair has all three, whichever operation it changed)."""


def solved_pairs(models: dict[str, Any], states: Sequence[Any], limit: int) -> tuple[list[Any], int, int]:
    """Compact ``op_object`` pairs that every model answers right both ways, how many were built and solved.

    The pairs change the object of one operation (:func:`~entitylens.patching.pairs.build_pairs`, rendered by
    :func:`~entitylens.patching.pairs.compact_pairs`); a pair is kept when each model's clean run prefers the
    clean answer's token over the corrupted one at the scored position and its corrupted run the reverse --
    patching's normalised effect is a fraction of a difference the model actually makes.

    Returns:
        The first ``limit`` solved pairs (tokenised for the models, which share one tokenizer), the number of
        pairs built and the number every model solves.
    """
    import torch

    from entitylens.patching.pairs import build_pairs, compact_pairs, to_patch_pairs

    text = compact_pairs(build_pairs(states, "op_object", seed=PATCH_SEED, max_pairs=8 * limit))
    pairs = to_patch_pairs(next(iter(models.values())), text, roles=PATCH_ROLES)

    def right(model: Any, p: Any) -> bool:
        with torch.no_grad():
            c = model(p.clean_tokens[None])[0, p.clean_answer_pos]
            x = model(p.corrupted_tokens[None])[0, p.corrupted_answer_pos]
        return bool(c[p.clean_answer] > c[p.corrupted_answer]) and bool(x[p.corrupted_answer] > x[p.clean_answer])

    solved = [p for p in pairs if all(right(m, p) for m in models.values())]
    if not solved:
        raise EntitylensError(f"no op_object pair of {len(pairs)} is answered right both ways by every arm; raise "
                              "--patch-pairs")
    return solved[:limit], len(pairs), len(solved)


def run_patch_stage(out: Path, config: DemoConfig) -> dict[str, Path]:
    """Exact resid_pre patching (every layer x role) on op_object pairs both arms solve (the one patch job)."""
    states = eval_states(seed=PATCH_SEED, num_states=30 * config.patch_pairs)
    models = {arm: load_model(f"testbed:{arm}") for arm in ARMS}
    pairs, built, solved = solved_pairs(models, states, config.patch_pairs)
    results = {}
    dirs = {}
    for arm in ARMS:
        dirs[arm] = out / "patch" / arm
        job = run_patch_job(
            models[arm], pairs, dirs[arm], PatchConfig(component="resid_pre", grid="layer_role", roles=PATCH_ROLES),
            pairs_sha256=sha256_json([patch_pair_record(p) for p in pairs]), label=f"testbed {arm}",
            info={"model": f"testbed:{arm}", "pairs": "op_object, solved by both arms"}, overwrite=True,
        )  # fmt: skip
        results[arm] = job.result
    write_json(out / "patch" / "pairs.json", {"kind": "op_object", "built": built, "solved_by_both": solved,
                                               "patched": len(pairs), "pairs": [p.name for p in pairs]})
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
