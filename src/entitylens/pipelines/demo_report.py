"""The demo's findings and ``report.md``: every number and sentence computed from the stages' CSV files.

:func:`find_all` reads ``eval/summary.csv``, ``eval/comparison.csv``, ``probe/<arm>/probe.csv`` and
``patch/<arm>/patch.csv`` into :class:`Findings`; :func:`write_report` renders them with the figures, and
:func:`summary_lines` gives the few lines the command prints at the end. The sentences under the figures
are built from the numbers (which layer first decodes the updated state, which cell restores the clean
answer, whether the paired interval excludes zero), never canned.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from entitylens._io import atomic_write
from entitylens.frames import read_csv, records
from entitylens.pipelines.demo_where import WhereCurve, where_findings, where_section
from entitylens.testbed.recipe import TRAIN_OPS_PER_BOX

__all__ = ["ARMS", "Findings", "ProbeCurve", "find_all", "summary_lines", "write_report"]

ARMS = ("base", "code")
"""The pair the demo compares."""

_BASELINES = ("baseline_empty", "baseline_majority", "baseline_sibling_lookup")
_ROLE_WORDS = {"query_box": "the query token", "query_box_desc": "the queried box's token in the description"}


def _f(v: Any) -> float | None:
    if v is None or v == "":
        return None
    x = float(v)
    return None if math.isnan(x) else x


def _pct(v: Any) -> str:
    x = _f(v)
    return "" if x is None else f"{100 * x:.1f}"


@dataclass(frozen=True)
class ProbeCurve:
    """One arm's probes at one role, layer by layer (fractions).

    Attributes:
        layers: The probed layers.
        initial: Exact-set accuracy on rows no operation changed (numops 0), with the interval.
        updated: Exact-set accuracy on rows an operation changed (numops >= 1), with the interval.
        baseline: The best baseline's exact-set accuracy on the numops >= 1 rows.
        baseline_initial: The best baseline's exact-set accuracy on the numops 0 rows.
        selectivity: Task minus control-task balanced accuracy (None without a control).
    """

    layers: tuple[int, ...]
    initial: tuple[tuple[float, float, float], ...]
    updated: tuple[tuple[float, float, float], ...]
    baseline: float
    baseline_initial: float
    selectivity: tuple[float | None, ...]

    @property
    def first_decodable(self) -> int | None:
        """The first layer whose updated-state accuracy beats the best baseline with its whole interval."""
        return next((layer for layer, (_, lo, _) in zip(self.layers, self.updated) if lo > self.baseline), None)

    @property
    def first_decodable_initial(self) -> int | None:
        """The first layer whose initial-state accuracy (numops 0) beats its best baseline with its interval."""
        return next((layer for layer, (_, lo, _) in zip(self.layers, self.initial) if lo > self.baseline_initial),
                    None)  # fmt: skip

    @property
    def best_updated(self) -> tuple[int, float]:
        """The layer with the highest updated-state accuracy, and that accuracy."""
        i = max(range(len(self.layers)), key=lambda k: (self.updated[k][0], -k))
        return self.layers[i], self.updated[i][0]


@dataclass(frozen=True)
class Findings:
    """What the demo found (see the module docstring).

    Attributes:
        summary: ``eval/summary.csv`` rows (strings).
        comparison: ``eval/comparison.csv`` rows of base vs code (strings).
        probes: Arm -> role -> curve (empty without the probe stage).
        patch: Arm -> ``{(layer, cell): normalised}`` of the mean over pairs (empty without the patch stage).
        patch_cells: The patching grid's cells (roles), in order.
        where: Target -> arm -> the probe family's curve (empty without the probe stage).
        patch_pairs: ``patch/pairs.json``: pairs built, solved by both arms, patched (empty without it).
    """

    summary: list[dict[str, Any]]
    comparison: list[dict[str, Any]]
    probes: dict[str, dict[str, ProbeCurve]] = field(default_factory=dict)
    patch: dict[str, dict[tuple[int, str], float]] = field(default_factory=dict)
    patch_cells: tuple[str, ...] = ()
    where: dict[str, dict[str, WhereCurve]] = field(default_factory=dict)
    patch_pairs: dict[str, Any] = field(default_factory=dict)

    def accuracy(self, model: str, bucket: str) -> float | None:
        """A model's accuracy in one bucket (None where the bucket is empty)."""
        row = next((r for r in self.summary if r["model"] == model and r["bucket"] == bucket), None)
        return None if row is None or row["n"] == "0" else _f(row["accuracy"])

    def overall(self) -> dict[str, Any]:
        """The overall base-vs-code comparison row."""
        return next(r for r in self.comparison if r["bucket"] == "overall")


def _probe_curve(rows: list[dict[str, Any]], role: str) -> ProbeCurve | None:
    by = {(int(r["layer"]), r["metric"]): r for r in rows if r["role"] == role}
    layers = tuple(sorted({k[0] for k in by}))
    if not layers or (layers[0], "exact_match_numops>=1") not in by:
        return None

    def triple(layer: int, metric: str) -> tuple[float, float, float]:
        r = by[(layer, metric)]
        return float(r["value"]), float(r["ci_low"]), float(r["ci_high"])

    def best_baseline(stratum: str) -> float:
        return max(float(by[(layers[0], f"{b}_{stratum}")]["value"]) for b in _BASELINES
                   if (layers[0], f"{b}_{stratum}") in by)  # fmt: skip

    sel = tuple(_f(by[(la, "selectivity")]["value"]) if (la, "selectivity") in by else None for la in layers)
    return ProbeCurve(layers, tuple(triple(la, "exact_match_numops=0") for la in layers),
                      tuple(triple(la, "exact_match_numops>=1") for la in layers), best_baseline("numops>=1"),
                      best_baseline("numops=0"), sel)  # fmt: skip


def find_all(out: Path, *, have_probes: bool, have_patch: bool) -> Findings:
    """Read the stages' CSV files under ``out`` into :class:`Findings`."""
    summary = records(read_csv(out / "eval" / "summary.csv"))
    comparison = [r for r in records(read_csv(out / "eval" / "comparison.csv"))
                  if (r["base"], r["variant"]) == ARMS]  # fmt: skip
    probes: dict[str, dict[str, ProbeCurve]] = {}
    patch: dict[str, dict[tuple[int, str], float]] = {}
    cells: tuple[str, ...] = ()
    for arm in ARMS if have_probes else ():
        rows = records(read_csv(out / "probe" / arm / "probe.csv"))
        roles = dict.fromkeys(r["role"] for r in rows)
        probes[arm] = {role: c for role in roles if (c := _probe_curve(rows, role)) is not None}
    for arm in ARMS if have_patch else ():
        rows = [r for r in records(read_csv(out / "patch" / arm / "patch.csv"))
                if r["pair"] == "mean" and r["kind"] == "activation"]  # fmt: skip
        patch[arm] = {(int(r["layer"]), r["cell"]): float(r["normalised"]) for r in rows}
        cells = tuple(dict.fromkeys(r["cell"] for r in rows))
    where = where_findings(out, ARMS) if have_probes else {}
    counts = out / "patch" / "pairs.json"
    patch_pairs = json.loads(counts.read_text()) if have_patch and counts.is_file() else {}
    return Findings(summary, comparison, probes, patch, cells, where, patch_pairs)


# ------------------------------------------------------------------------------------------------ sentences


def eval_sentence(f: Findings) -> str:
    """What the accuracy curve shows: the stem's operations, and the arms beyond the training range."""
    s = [f.accuracy("stem", str(k)) for k in range(3)]
    nothing, initial = f.accuracy("nothing", "1"), f.accuracy("initial", "1")
    text = (f"The stem is at {_pct(s[0])}% / {_pct(s[1])}% / {_pct(s[2])}% at numops 0 / 1 / 2, against "
            f"{_pct(nothing)}% (always nothing) and {_pct(initial)}% (copy the initial contents) at numops "
            "1.")  # fmt: skip
    beyond = str(TRAIN_OPS_PER_BOX + 1)
    b, c = f.accuracy("base", beyond), f.accuracy("code", beyond)
    if b is not None and c is not None:
        text += (f" Beyond the arms' training range (at most {TRAIN_OPS_PER_BOX} operations per box), at numops "
                 f"{beyond}, base is at {_pct(b)}% and code at {_pct(c)}%.")  # fmt: skip
    return text


def comparison_sentence(f: Findings) -> str:
    """The paired verdict overall, and the buckets whose interval excludes zero."""
    o = f.overall()
    diff, low, high = (100 * float(o[k]) for k in ("difference", "ci_low", "ci_high"))
    p = float(o["p_value"])
    verdict = "significant at the 5% level" if p < 0.05 else "not significant at the 5% level"
    text = (f"Overall, code − base = {diff:+.1f} points [{low:+.1f}, {high:+.1f}] over {o['n_states']} states "
            f"(paired test over states, p = {p:.3g}): {verdict}.")  # fmt: skip
    excl = [(r["bucket"], float(r["difference"])) for r in f.comparison if r["bucket"] != "overall"
            and _f(r["ci_low"]) is not None and (float(r["ci_low"]) > 0 or float(r["ci_high"]) < 0)]  # fmt: skip
    if excl:
        parts = [f"numops {b} ({'code' if x > 0 else 'base'} higher)" for b, x in excl]
        text += " The 95% interval excludes zero at " + ", ".join(parts) + "."
    else:
        text += " The 95% interval includes zero in every numops bucket."
    return text


def probe_sentence(arm: str, curves: dict[str, ProbeCurve]) -> str:
    """Where the initial and the updated state become decodable in one arm, role by role."""
    parts = []
    for role, c in curves.items():
        where = _ROLE_WORDS.get(role, role)
        first, first0 = c.first_decodable, c.first_decodable_initial
        if first0 is not None:
            v0 = c.initial[c.layers.index(first0)][0]
            init = (f"the initial contents (numops 0) beat their best baseline ({100 * c.baseline_initial:.1f}%) "
                    f"from layer {first0} ({100 * v0:.1f}%)")  # fmt: skip
        else:
            init = (f"the initial contents (numops 0) never beat their best baseline "
                    f"({100 * c.baseline_initial:.1f}%)")  # fmt: skip
        if first is not None:
            v, lo, hi = c.updated[c.layers.index(first)]
            upd = (f"the updated contents (numops ≥ 1) first beat the best baseline ({100 * c.baseline:.1f}%) with "
                   f"their interval at layer {first} ({100 * v:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}])")  # fmt: skip
        else:
            layer, best = c.best_updated
            upd = (f"the updated contents (numops ≥ 1) never do (best {100 * best:.1f}% at layer {layer}, "
                   f"baseline {100 * c.baseline:.1f}%)")  # fmt: skip
        parts.append(f"at {where}, {init}; {upd}")
    return f"In {arm}, " + "; ".join(parts) + "."


def patch_sentence(arm: str, grid: dict[tuple[int, str], float], strong: float = 0.5) -> str:
    """Which cell restores the clean answer most, and layer by layer the cells with a strong effect."""
    (layer, cell), v = max(grid.items(), key=lambda kv: (kv[1], -kv[0][0]))
    per_layer = []
    for la in sorted({k[0] for k in grid}):
        cells = sorted(((x, c) for (ly, c), x in grid.items() if ly == la and abs(x) >= strong), reverse=True)
        shown = ", ".join(f"{c} ({x:+.2f})" for x, c in cells) or "none"
        per_layer.append(f"layer {la}: {shown}")
    return (f"In {arm}, patching restores most of the clean answer at {cell} in layer {layer} ({v:.2f}); "
            f"cells with an effect of at least {strong} in size, by layer: " + "; ".join(per_layer) + ".")


# ------------------------------------------------------------------------------------------------ report

_INTRO = [
    "# entitylens demo: the testbed base vs code pair",
    "",
    "The stem was trained from scratch on compact boxes-world text; the base and code arms continued from it",
    "with the same boxes stream, optimiser, seed, steps and token budget; only the filler half of each batch",
    "differs: prose (base) or Python container programs (code). No training episode changes one box more than",
    f"{TRAIN_OPS_PER_BOX} times, so buckets above {TRAIN_OPS_PER_BOX} test generalisation. See docs/testbed.md.",
    "",
]


def _accuracy_section(f: Findings) -> list[str]:
    models = list(dict.fromkeys(r["model"] for r in f.summary))
    buckets = [r["bucket"] for r in f.summary if r["model"] == models[0]]
    lines = ["## Accuracy by number of operations on the queried box (%, 95% interval)", "",
             "| model | " + " | ".join(buckets) + " |", "|---|" + "---|" * len(buckets)]  # fmt: skip
    for m in models:
        rows = {r["bucket"]: r for r in f.summary if r["model"] == m}
        cells = [f"{_pct(rows[b]['accuracy'])} [{_pct(rows[b]['ci_low'])}, {_pct(rows[b]['ci_high'])}]"
                 if rows[b]["n"] != "0" else "" for b in buckets]  # fmt: skip
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    n_row = {r["bucket"]: r["n"] for r in f.summary if r["model"] == models[0]}
    lines += ["| n | " + " | ".join(n_row[b] for b in buckets) + " |", ""]
    return lines + ["![accuracy by numops](eval/accuracy_by_numops.png)", "", eval_sentence(f), ""]


def _comparison_section(f: Findings) -> list[str]:
    if not f.comparison:
        return []
    lines = [
        "## Code arm vs base arm (paired, same states)",
        "",
        "Interval: cluster bootstrap over states; p: exact paired test over states (the 7 boxes of a state are",
        "one unit). The box-row McNemar p is shown as a secondary column.",
        "",
        "| bucket | states | rows | base % | code % | code − base (points) | 95% interval | p | base only | "
        "code only | p (rows) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in f.comparison:
        lo, hi = _f(r["ci_low"]), _f(r["ci_high"])
        ci = "" if lo is None or hi is None else f"[{100 * lo:+.1f}, {100 * hi:+.1f}]"
        p, pr = _f(r["p_value"]), _f(r["p_value_rows"])
        lines.append(
            f"| {r['bucket']} | {r['n_states']} | {r['n']} | {_pct(r['base_accuracy'])} | "
            f"{_pct(r['variant_accuracy'])} | {100 * float(r['difference']):+.1f} | {ci} | "
            f"{'' if p is None else f'{p:.3g}'} | {r['base_only']} | {r['variant_only']} | "
            f"{'' if pr is None else f'{pr:.3g}'} |"
        )
    return lines + ["", comparison_sentence(f), ""]


def _probe_section(f: Findings) -> list[str]:
    if not f.probes:
        return []
    lines = ["## Probes by layer (the queried box's object set, residual stream after each block)", "",
             "Exact-set accuracy (%) on test rows no operation changed (numops 0) and rows an operation changed",
             "(numops ≥ 1: the *updated* state), with 95% intervals clustered by scenario; baseline = the best of",
             "always-empty, majority set and sibling lookup on the numops ≥ 1 rows; selectivity = task minus",
             "control-task balanced accuracy (points).", ""]  # fmt: skip
    for arm, curves in f.probes.items():
        lines += [f"**{arm}**", "", "| role | layer | numops 0 | numops ≥ 1 | baseline (≥ 1) | selectivity |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for role, c in curves.items():
            for i, layer in enumerate(c.layers):
                (a, alo, ahi), (u, ulo, uhi), sel = c.initial[i], c.updated[i], c.selectivity[i]
                lines.append(f"| {role} | {layer} | {_pct(a)} [{_pct(alo)}, {_pct(ahi)}] | {_pct(u)} "
                             f"[{_pct(ulo)}, {_pct(uhi)}] | {_pct(c.baseline)} | {_pct(sel)} |")  # fmt: skip
        lines += ["", probe_sentence(arm, curves), ""]
    return lines + ["![probes, updated state: base vs code](probe/compare_updated/probe_compare.png)", "",
                    "![probes, initial state: base vs code](probe/compare_initial/probe_compare.png)", ""]  # fmt: skip


def _patch_section(f: Findings) -> list[str]:
    if not f.patch:
        return []
    pp = f.patch_pairs
    solved = (f"{pp['solved_by_both']} of the {pp['built']} pairs built are answered right both ways by both arms "
              f"(the clean run prefers the clean answer's token, the corrupted run the other); the first "
              f"{pp['patched']} are patched, so every effect is a fraction of a difference the models make. "
              if pp else "")
    lines = ["## Activation patching (resid_pre, clean → corrupted; 1 = clean answer restored)", "",
             "Pairs differ in the object one operation moves, removes or puts (`op_object` pairs in the compact "
             f"form). {solved}Cells: the changed object's mention, the queried box's token in the description and "
             f"the query token ({', '.join(f.patch_cells)}).", "",
             "![patching: base vs code](patch/patch_compare_resid_pre.png)", ""]  # fmt: skip
    for arm, grid in f.patch.items():
        lines.append(patch_sentence(arm, grid))
    return lines + [""]


_SOURCES = "Numbers are read from eval/summary.csv, eval/comparison.csv, probe/*/probe.csv and patch/*/patch.csv."


def write_report(out: Path, findings: Findings) -> Path:
    """Write ``out/report.md`` from the findings; returns its path."""
    lines = [*_INTRO, *_accuracy_section(findings), *_comparison_section(findings), *_probe_section(findings),
             *where_section(findings.where), *_patch_section(findings), _SOURCES]  # fmt: skip
    path = out / "report.md"
    with atomic_write(path) as fh:
        fh.write("\n".join(lines) + "\n")
    return path


def summary_lines(f: Findings) -> list[str]:
    """The closing summary the demo prints: the pair's curve with the paired verdict, probes and patching."""
    buckets = [r["bucket"] for r in f.summary if r["model"] == "base" and r["bucket"] != "state"]
    lines = ["accuracy by numops (%):  " + "  ".join(f"{b:>5}" for b in buckets)]
    for m in ("stem", *ARMS):
        lines.append(f"  {m:<22}" + "  ".join(f"{_pct(f.accuracy(m, b)) or '-':>5}" for b in buckets))
    if f.comparison:
        lines.append(comparison_sentence(f))
    for arm, curves in f.probes.items():
        for what, first in (("initial state (numops 0)", {r: c.first_decodable_initial for r, c in curves.items()}),
                            ("updated state (numops ≥ 1)", {r: c.first_decodable for r, c in curves.items()})):
            lines.append(f"{arm}: {what} first decodable at "
                         + ", ".join(f"{role}: {'never' if v is None else f'layer {v}'}" for role, v in first.items()))
    if f.where:
        lines.append("where is the state: " + "; ".join(
            f"{t} " + "/".join(f"{arm} {'layer ' + str(c.layers[c.best()]) if c.decodable() else 'chance'}"
                               for arm, c in curves.items()) for t, curves in f.where.items()))
    for arm, grid in f.patch.items():
        top = sorted(grid.items(), key=lambda kv: (-kv[1], kv[0][0]))[:3]
        lines.append(f"{arm}: strongest patching cells " + ", ".join(f"layer {la} {c} ({v:.2f})"
                                                                     for (la, c), v in top))  # fmt: skip
    return lines
