"""The demo's "where is the state" part: the probe family on the testbed pair, and its report section.

:func:`run_where_stage` caches, for base and code, one compact prompt per state (the queried box cycling
through the seven) at the last token and every box mention, operation end and object mention, and probes
``global`` (every box's contents at the query), ``mention`` (a box's contents at its mentions),
``incremental`` (the whole state at each operation's end) and ``tags_object`` (at each object mention:
present / removed / never in each box) on every layer -- ``cache/<arm>-where``, ``probe/<arm>-<target>``,
``probe/compare-<target>``. :func:`where_findings` reads the CSV files back and :func:`where_section` renders
the report section; every sentence is computed from those numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from entitylens.activations import CacheConfig, cache_activations, compact_cache_prompts
from entitylens.frames import read_csv, records
from entitylens.models import load_model
from entitylens.probing.linear import ProbeConfig
from entitylens.probing.outputs import compare_probe_runs, write_probe_outputs
from entitylens.probing.run import ProbeRunConfig, run_probes
from entitylens.task.targeted import eval_states

__all__ = ["WHERE_TARGETS", "WhereCurve", "run_where_stage", "where_findings", "where_section"]

WHERE_TARGETS: tuple[tuple[str, str, str], ...] = (
    ("global", "every box's contents at the query token", "exact_match_queried_box"),
    ("mention", "a box's contents at each of its mentions", "exact_match"),
    ("incremental", "the whole state at each operation's end", "exact_match_changed_boxes"),
    ("tags_object", "at each object mention: present / removed / never in each box", "tag_recall_removed"),
)
"""(target, what it reads, the metric the report follows besides balanced accuracy)."""

WHERE_ROLES = ("last", "@mentions", "@op_ends", "@objects")
WHERE_SEED = 24680
"""Seed of the states the probe family reads (other states than the probes' and the patching's)."""


def run_where_stage(out: Path, arms: tuple[str, str], num_states: int, seed: int) -> None:
    """Cache one prompt per state at the family's positions for each arm and probe every family target."""
    states = eval_states(seed=WHERE_SEED, num_states=num_states)
    # one row per state (the context positions are the same for its seven queries), the queried box cycling
    prompts = [p for i, p in enumerate(compact_cache_prompts(states)) if i % 7 == (i // 7) % 7]
    for arm in arms:
        model = load_model(f"testbed:{arm}")
        cache_dir = out / "cache" / f"{arm}-where"
        cache_activations(model, prompts, CacheConfig(hooks=("resid_post",), roles=WHERE_ROLES), cache_dir,
                          model_spec=f"testbed:{arm}",
                          dataset_source={"testbed_eval_states": {"seed": WHERE_SEED, "num_states": num_states}})
        for target, _, _ in WHERE_TARGETS:
            run = run_probes(cache_dir, ProbeRunConfig(target=target, roles=("last",), probe=ProbeConfig(seed=seed)))
            write_probe_outputs(out / "probe" / f"{arm}-{target}", run, title=f"testbed {arm}: {target} probes")
    for target, _, _ in WHERE_TARGETS:
        compare_probe_runs(out / "probe" / f"{arms[0]}-{target}", out / "probe" / f"{arms[1]}-{target}",
                           out / "probe" / f"compare-{target}", metric="balanced_accuracy", labels=arms)


@dataclass(frozen=True)
class WhereCurve:
    """One arm's probes of one family target: balanced accuracy and the followed metric by layer.

    Attributes:
        layers: The probed layers.
        balanced: Balanced accuracy (value, low, high) per layer (0.5 = chance).
        followed: The target's followed metric (value, low, high) per layer.
        baseline: The majority baseline's exact match (``None`` where the followed metric has none).
    """

    layers: tuple[int, ...]
    balanced: tuple[tuple[float, float, float], ...]
    followed: tuple[tuple[float, float, float], ...]
    baseline: float | None

    def best(self) -> int:
        """Index of the layer with the highest balanced accuracy (the first on ties)."""
        return max(range(len(self.layers)), key=lambda i: (self.balanced[i][0], -i))

    def decodable(self) -> bool:
        """Whether the best layer's balanced-accuracy interval lies above chance (0.5)."""
        return self.balanced[self.best()][1] > 0.5


def where_findings(out: Path, arms: tuple[str, ...]) -> dict[str, dict[str, WhereCurve]]:
    """``{target: {arm: WhereCurve}}`` read from ``probe/<arm>-<target>/probe.csv`` (targets that ran)."""
    found: dict[str, dict[str, WhereCurve]] = {}
    for target, _, metric in WHERE_TARGETS:
        for arm in arms:
            path = out / "probe" / f"{arm}-{target}" / "probe.csv"
            if not path.is_file():
                continue
            rows = records(read_csv(path))
            by = {(int(r["layer"]), r["metric"]): r for r in rows}
            layers = tuple(sorted({k[0] for k in by}))

            def triple(layer: int, name: str, by: dict = by) -> tuple[float, float, float]:
                r = by.get((layer, name))
                if r is None:
                    return (float("nan"),) * 3  # type: ignore[return-value]
                lo, hi = r["ci_low"], r["ci_high"]
                return float(r["value"]), float(lo if lo is not None else "nan"), float(hi if hi is not None else "nan")

            base = by.get((layers[0], "baseline_majority")) if metric == "exact_match" else None
            found.setdefault(target, {})[arm] = WhereCurve(
                layers, tuple(triple(la, "balanced_accuracy") for la in layers),
                tuple(triple(la, metric) for la in layers), None if base is None else float(base["value"]))
    return found


def _pct(x: float) -> str:
    return "" if x != x else f"{100 * x:.1f}"


def where_sentence(target: str, curves: dict[str, WhereCurve]) -> str:
    """One sentence per target: where (if anywhere) each arm's probe beats chance."""
    parts = []
    for arm, c in curves.items():
        i = c.best()
        b = c.balanced[i]
        if c.decodable():
            parts.append(f"{arm} decodes it best at layer {c.layers[i]} ({_pct(b[0])}% balanced accuracy, "
                         f"[{_pct(b[1])}, {_pct(b[2])}])")
        else:
            parts.append(f"{arm} does not decode it above chance at any layer (best {_pct(b[0])}%)")
    return f"`{target}`: " + "; ".join(parts) + "."


def where_section(found: dict[str, dict[str, WhereCurve]]) -> list[str]:
    """The report's "Where is the state" section (empty when the stage did not run)."""
    if not found:
        return []
    lines = ["## Where is the state (the probe family of Tang et al. 2026, every layer)", "",
             "One prompt per state; labels from each prompt's replayed world. Balanced accuracy (%, 50 = chance,",
             "95% bootstrap interval over test scenarios) at the best layer, and the metric each target is read by.",
             "", "| target | reads | arm | best layer | balanced accuracy | followed metric (best layer) |",
             "|---|---|---|---|---|---|"]
    what = {t: (w, m) for t, w, m in WHERE_TARGETS}
    for target, curves in found.items():
        for arm, c in curves.items():
            i = c.best()
            b, f = c.balanced[i], c.followed[i]
            lines.append(f"| {target} | {what[target][0]} | {arm} | {c.layers[i]} | {_pct(b[0])} [{_pct(b[1])}, "
                         f"{_pct(b[2])}] | {what[target][1]} {_pct(f[0])} |")
    lines.append("")
    lines += [where_sentence(t, c) for t, c in found.items()]
    lines += ["", "Probe accuracy is not use: `entitylens intervene` nulls a probe's direction and measures the answer "
              "(docs/probing.md).", ""]
    lines += [f"![{t}: base vs code](probe/compare-{t}/probe_compare.png)" for t in found]
    return lines + [""]
