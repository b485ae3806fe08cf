"""The demo: the whole pipeline on the embedded testbed pair (base arm vs code arm), with a report.

``entitylens demo --out runs/demo`` runs, on the shipped checkpoints of :mod:`entitylens.testbed`:

1. the behavioural evaluation by numops (including buckets beyond the arms' 0-2-operation training range)
   for stem, base and code, with the random / "always nothing" / "copy the initial contents" baselines,
   and the paired base-vs-code comparison (exact McNemar) — ``eval/``;
2. linear probes by layer on the residual stream at the queried box token (the last prompt token of a
   compact prompt), for base and
   code, and the comparison figure — ``cache/``, ``probe/``;
3. exact activation patching (resid_pre, layer × role) on clean/corrupted pairs that differ in the object
   of the last operation, for base and code on one colour scale — ``patch/``;

and writes ``report.md`` with the figures embedded and the numbers in tables (read back from the CSV
files the pipelines wrote, so the report and ``summary.csv`` cannot disagree).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from entitylens._io import atomic_write
from entitylens.errors import EntitylensError
from entitylens.table import read_csv

ARMS = ("base", "code")
EVAL_MODELS = ("random", "nothing", "initial", "testbed:stem", "testbed:base", "testbed:code")


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo's stages (the defaults finish in a few minutes on a 2-core CPU).

    Attributes:
        eval_states: States in the behavioural evaluation (7 rows each).
        probe_states: States whose 7 query prompts are cached for the probes.
        patch_pairs: Clean/corrupted pairs for patching.
        seed: Seed of the probe split.
    """

    eval_states: int = 720
    probe_states: int = 240
    patch_pairs: int = 24
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.eval_states, self.probe_states, self.patch_pairs) < 1:
            raise EntitylensError("demo sizes must be >= 1; pass positive --eval-states/--probe-states/--patch-pairs")


def _pct(x: str | float | None) -> str:
    if x in (None, ""):
        return ""
    return f"{100 * float(x):.1f}"


# ----------------------------------------------------------------------------------------------- stages


def run_eval_stage(out: Path, config: DemoConfig) -> Path:
    """Behavioural evaluation of the testbed models and baselines (compact protocol)."""
    from entitylens.testbed import run_testbed_eval

    run_testbed_eval(out / "eval", EVAL_MODELS, num_states=config.eval_states)
    return out / "eval"


def run_probe_stage(out: Path, config: DemoConfig) -> dict[str, Path]:
    """Cache residual streams of base and code on the same prompts and probe every layer."""
    from entitylens.activations import CacheConfig, cache_activations
    from entitylens.models import load_model
    from entitylens.probing.linear import ProbeConfig
    from entitylens.probing.run import ProbeRunConfig, compare_probe_runs, run_probes, write_probe_outputs
    from entitylens.testbed import cache_prompts, eval_states

    states = eval_states(seed=12345, num_states=config.probe_states)
    prompts = cache_prompts(states)
    dirs = {}
    for arm in ARMS:
        model = load_model(f"testbed:{arm}")
        cache_dir = out / "cache" / arm
        cache_activations(
            model, prompts, CacheConfig(hooks=("resid_post",), roles=("query_box",)), cache_dir,
            model_spec=f"testbed:{arm}",
            dataset_source={"testbed_eval_states": {"seed": 12345, "num_states": config.probe_states}},
        )
        run = run_probes(
            cache_dir,
            ProbeRunConfig(target="box_contents", roles=("query_box",), probe=ProbeConfig(seed=config.seed)),
        )
        write_probe_outputs(out / "probe" / arm, run, title=f"testbed {arm}: probes by layer")
        dirs[arm] = out / "probe" / arm
    compare_probe_runs(dirs["base"], dirs["code"], out / "probe" / "compare", labels=("base", "code"))
    return dirs


def changed_put_pairs(model: Any, states: Sequence[Any], limit: int) -> tuple[list[Any], tuple[str, ...]]:
    """Compact-format patching pairs that differ in the object of the last operation.

    Clean = a state whose last operation puts one object into a box, queried on that box; corrupted = the
    same prompt with a different, unused object put instead (same length, a valid world, different
    answers). Only states with the most common number of operations are kept, so every pair has the same
    roles: the changed object, its box token, the previous operation's object and the query token.

    Returns:
        The pairs and the role names they share.
    """
    from entitylens.activations.roles import tokenize_with_offsets
    from entitylens.models.tokens import model_prepends_bos
    from entitylens.patching import PatchPair
    from entitylens.task.types import Operation
    from entitylens.task.vocab import BNC_OBJECTS
    from entitylens.testbed import COMPACT, compact_prompt, find_compact_roles, ordered_contents

    candidates: dict[int, list[Any]] = {}
    for s in states:
        if len(s.operations) < 2 or s.operations[-1].kind != "put" or len(s.operations[-1].objects) != 1:
            continue
        candidates.setdefault(len(s.operations), []).append(s)
    if not candidates:
        raise EntitylensError("no state ends with a single-object put; raise --patch-pairs to sample more states")
    n_ops = max(sorted(candidates), key=lambda k: len(candidates[k]))
    roles = (f"op{n_ops - 2}_object", f"op{n_ops - 1}_object", f"op{n_ops - 1}_box", "query_box")
    tok = model.tokenizer
    # Role positions must index the same token sequence as the pair (BOS included when the model adds it).
    bos = model_prepends_bos(model)
    pairs = []
    for s in candidates[n_ops]:
        last = s.operations[-1]
        mentioned = {o for c in s.initial for o in c} | {o for op in s.operations for o in op.objects}
        free = [o for o in BNC_OBJECTS if o not in mentioned]
        swap = Operation("put", (free[s.sample_id % len(free)],), last.box)
        corrupted = dataclasses.replace(s, operations=s.operations[:-1] + (swap,))
        clean_p, corr_p = compact_prompt(s, last.box), compact_prompt(corrupted, last.box)
        clean_ans = COMPACT.answer_text(ordered_contents(s.initial, s.operations)[last.box])
        corr_ans = COMPACT.answer_text(ordered_contents(corrupted.initial, corrupted.operations)[last.box])
        clean_offsets = tokenize_with_offsets(tok, clean_p, prepend_bos=bos)[1]
        corr_offsets = tokenize_with_offsets(tok, corr_p, prepend_bos=bos)[1]
        try:
            pair = PatchPair.from_texts(
                tok, clean_p, corr_p, clean_ans, corr_ans,
                clean_roles=find_compact_roles(clean_p, clean_offsets, roles),
                corrupted_roles=find_compact_roles(corr_p, corr_offsets, roles),
                bos=bos, name=s.state_id,
            )  # fmt: skip
        except EntitylensError:
            continue  # no distinguishing token
        pairs.append(pair)
        if len(pairs) >= limit:
            break
    if not pairs:
        raise EntitylensError("no patching pair could be built from the evaluation states; raise --patch-pairs")
    return pairs, roles


def run_patch_stage(out: Path, config: DemoConfig) -> dict[str, Path]:
    """Exact resid_pre patching (layer × role) on drop-last-operation pairs, base and code."""
    from entitylens.models import load_model
    from entitylens.patching import run_patching, write_patch_outputs
    from entitylens.plots import plot_patch_comparison
    from entitylens.testbed import eval_states

    states = eval_states(seed=54321, num_states=30 * config.patch_pairs)
    results = {}
    dirs = {}
    for arm in ARMS:
        model = load_model(f"testbed:{arm}")
        pairs, roles = changed_put_pairs(model, states, config.patch_pairs)
        res = run_patching(model, pairs, "resid_pre", "layer_role", roles=roles)
        dirs[arm] = out / "patch" / arm
        write_patch_outputs(dirs[arm], res, label=f"testbed {arm}", overwrite=True)
        results[arm] = res
    ma, mb = results["base"].mean(), results["code"].mean()
    plot_patch_comparison(
        [(arm, m.numpy(), results[arm].layers, results[arm].cells) for arm, m in (("base", ma), ("code", mb))],
        out / "patch" / "patch_compare_resid_pre",
        title="resid_pre patching: base vs code",
    )
    return dirs


# ----------------------------------------------------------------------------------------------- report


def write_report(out: Path, have_probes: bool, have_patch: bool) -> Path:
    """Write ``report.md`` from the CSV files the stages wrote."""
    summary = read_csv(out / "eval" / "summary.csv").rows
    comparison = read_csv(out / "eval" / "comparison.csv").rows
    models = [m for m in dict.fromkeys(r["model"] for r in summary)]
    buckets = [r["bucket"] for r in summary if r["model"] == models[0]]
    lines = [
        "# entitylens demo: the testbed base vs code pair",
        "",
        "The stem was trained from scratch on compact boxes-world text; the base and code arms continued from it",
        "with the same optimiser, seed, steps and token budget, half of every batch being boxes text with 0-2",
        "operations and the other half prose (base) or Python container programs (code). See docs/testbed.md.",
        "Buckets 3 and above are beyond the arms' training range.",
        "",
        "## Accuracy by number of operations on the queried box (%, 95% Wald interval)",
        "",
        "| model | " + " | ".join(buckets) + " |",
        "|---|" + "---|" * len(buckets),
    ]
    for m in models:
        rows = {r["bucket"]: r for r in summary if r["model"] == m}
        cells = [f"{_pct(rows[b]['accuracy'])} [{_pct(rows[b]['ci_low'])}, {_pct(rows[b]['ci_high'])}]"
                 if rows[b]["n"] != "0" else "" for b in buckets]  # fmt: skip
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    n_row = {r["bucket"]: r["n"] for r in summary if r["model"] == models[0]}
    lines += ["| n | " + " | ".join(n_row[b] for b in buckets) + " |", ""]
    lines += ["![accuracy by numops](eval/accuracy_by_numops.png)", ""]
    bc = [r for r in comparison if r["base"] == "base" and r["variant"] == "code"]
    if bc:
        lines += [
            "## Code arm vs base arm (paired, same items; exact McNemar test)",
            "",
            "| bucket | n | base % | code % | code − base (points) | base only | code only | p |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in bc:
            lines.append(
                f"| {r['bucket']} | {r['n']} | {_pct(r['base_accuracy'])} | {_pct(r['variant_accuracy'])} | "
                f"{100 * float(r['difference']):+.1f} | {r['base_only']} | {r['variant_only']} | "
                f"{float(r['p_value']):.3g} |"
            )
        overall = next(r for r in bc if r["bucket"] == "overall")
        diff, p = 100 * float(overall["difference"]), float(overall["p_value"])
        verdict = (
            f"Overall the code arm is {abs(diff):.1f} points {'above' if diff > 0 else 'below'} the base arm "
            f"(exact McNemar p = {p:.3g}); "
            + ("this difference is statistically significant at the 5% level." if p < 0.05
               else "this difference is not statistically significant at the 5% level.")
        )  # fmt: skip
        lines += ["", verdict, ""]
    if have_probes:
        lines += ["## Probes by layer (queried box's object set, residual stream after each block)", ""]
        for arm in ARMS:
            table = read_csv(out / "probe" / arm / "probe.csv").rows
            best = [r for r in table if r.get("metric") in ("exact_match", "selectivity")]
            lines.append(f"**{arm}**")
            lines.append("")
            lines.append("| role | layer | metric | value | 95% interval |")
            lines.append("|---|---|---|---|---|")
            for r in best:
                lines.append(
                    f"| {r['role']} | {r['layer']} | {r['metric']} | {_pct(r['value'])} | "
                    f"[{_pct(r.get('ci_low'))}, {_pct(r.get('ci_high'))}] |"
                )
            lines.append("")
        lines += ["![probes: base vs code](probe/compare/probe_compare.png)", ""]
    if have_patch:
        lines += [
            "## Activation patching (resid_pre, clean → corrupted; 1 = clean behaviour restored)",
            "",
            "Pairs differ in the object of the last operation (a put into the queried box); cells are the",
            "changed object, its box, the previous operation's object and the query token.",
            "",
            "![patching: base vs code](patch/patch_compare_resid_pre.png)",
            "",
        ]
    lines += ["Numbers are read from eval/summary.csv, eval/comparison.csv, probe/*/probe.csv and patch/*/patch.csv."]
    path = out / "report.md"
    with atomic_write(path) as f:
        f.write("\n".join(lines) + "\n")
    return path


def run_demo(
    out: str | os.PathLike[str], config: DemoConfig | None = None, *, stages: Sequence[str] = ("eval", "probe", "patch")
) -> Path:
    """Run the demo stages into ``out`` and write ``report.md``; returns its path."""
    config = config or DemoConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run_eval_stage(out, config)
    have_probes = "probe" in stages
    have_patch = "patch" in stages
    if have_probes:
        run_probe_stage(out, config)
    if have_patch:
        run_patch_stage(out, config)
    return write_report(out, have_probes, have_patch)
