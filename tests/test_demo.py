"""The README's main job, shortened: `entitylens demo` on the shipped testbed pair writes a report whose
numbers are the ones in the pipelines' CSV files."""

import contextlib
import csv
import io
import json
import re

import pytest

from entitylens.cli import main


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["--quiet", "demo", "--out", str(out), "--eval-states", "24", "--probe-states", "40",
                   "--patch-pairs", "4", "--where-states", "28"])
    assert rc == 0
    return out, buf.getvalue()


@pytest.fixture(scope="module")
def demo_dir(demo_run):
    return demo_run[0]


def test_demo_writes_report_and_every_artifact(demo_dir):
    for rel in ("report.md", "eval/summary.csv", "eval/comparison.csv", "eval/accuracy_by_numops.png",
                "probe/base/probe.csv", "probe/code/probe.csv", "probe/compare_updated/probe_compare.png",
                "probe/compare_initial/probe_compare.png",
                "patch/base/patch.csv", "patch/code/patch.csv", "patch/patch_compare_resid_pre.png"):
        assert (demo_dir / rel).is_file(), rel
    report = (demo_dir / "report.md").read_text()
    for fig in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):
        assert (demo_dir / fig).is_file(), fig


def test_where_section_follows_the_probe_csvs(demo_dir, demo_run):
    """Each family target's row names its best layer by balanced accuracy and that value, from its probe.csv."""
    report = (demo_dir / "report.md").read_text()
    assert "## Where is the state" in report
    targets = ("global", "mention", "incremental", "tags_object")
    lines = [ln for ln in report.splitlines() if ln.startswith("| ") and ln.split("|")[1].strip() in targets]
    assert len(lines) == 2 * len(targets)
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        target, arm, layer, bal = cells[0], cells[2], int(cells[3]), cells[4]
        rows = _csv(demo_dir / "probe" / f"{arm}-{target}" / "probe.csv")
        bals = {int(r["layer"]): float(r["value"]) for r in rows if r["metric"] == "balanced_accuracy"}
        assert layer == max(bals, key=lambda k: (bals[k], -k))
        assert bal.split(" [")[0] == f"{100 * bals[layer]:.1f}"
        assert (demo_dir / "probe" / f"compare-{target}" / "probe_compare.png").is_file()
    assert "where is the state:" in demo_run[1]


def test_report_accuracy_table_equals_summary_csv(demo_dir):
    summary = _csv(demo_dir / "eval" / "summary.csv")
    report = (demo_dir / "report.md").read_text().splitlines()
    header = next(line for line in report if line.startswith("| model |"))
    buckets = [c.strip() for c in header.strip("|").split("|")][1:]
    models = {r["model"] for r in summary}
    assert models == {"random", "nothing", "initial", "stem", "base", "code"}
    checked = 0
    for line in report:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] not in models or len(cells) != len(buckets) + 1:
            continue
        for bucket, cell in zip(buckets, cells[1:]):
            row = next(r for r in summary if r["model"] == cells[0] and r["bucket"] == bucket)
            if row["n"] == "0":
                assert cell == ""
                continue
            acc, lo, hi = (float(x) for x in re.fullmatch(r"([\d.]+) \[([\d.]+), ([\d.]+)\]", cell).groups())
            assert acc == pytest.approx(100 * float(row["accuracy"]), abs=0.051)
            assert lo == pytest.approx(100 * float(row["ci_low"]), abs=0.051)
            assert hi == pytest.approx(100 * float(row["ci_high"]), abs=0.051)
            checked += 1
    assert checked >= 6 * 3


def test_report_comparison_equals_comparison_csv(demo_dir):
    comp = [r for r in _csv(demo_dir / "eval" / "comparison.csv") if (r["base"], r["variant"]) == ("base", "code")]
    report = (demo_dir / "report.md").read_text()
    lines = report.splitlines()
    head = next(x for x in lines if x.startswith("| bucket | states |"))
    cols = [c.strip() for c in head.strip("|").split("|")]
    for r in comp:
        line = next(x for x in lines if x.startswith(f"| {r['bucket']} | {r['n_states']} |"))
        cell = dict(zip(cols, (c.strip() for c in line.strip("|").split("|"))))
        assert int(cell["rows"]) == int(r["n"])
        assert float(cell["base %"]) == pytest.approx(100 * float(r["base_accuracy"]), abs=0.051)
        assert float(cell["code %"]) == pytest.approx(100 * float(r["variant_accuracy"]), abs=0.051)
        assert float(cell["code − base (points)"]) == pytest.approx(100 * float(r["difference"]), abs=0.051)
        lo, hi = (float(x) for x in re.fullmatch(r"\[([-+\d.]+), ([-+\d.]+)\]", cell["95% interval"]).groups())
        assert (lo, hi) == (pytest.approx(100 * float(r["ci_low"]), abs=0.051),
                            pytest.approx(100 * float(r["ci_high"]), abs=0.051))
        assert float(cell["p"]) == pytest.approx(float(r["p_value"]), rel=1e-2)
        assert (int(cell["base only"]), int(cell["code only"])) == (int(r["base_only"]), int(r["variant_only"]))
    overall = next(r for r in comp if r["bucket"] == "overall")
    verdict = "not significant" if float(overall["p_value"]) >= 0.05 else "significant"
    assert f"p = {float(overall['p_value']):.3g}): {verdict} at the 5% level" in report


def _first_decodable(rows, role):
    """The first layer whose numops>=1 interval clears the best baseline, recomputed from probe.csv."""
    by = {(int(r["layer"]), r["metric"]): r for r in rows if r["role"] == role}
    layers = sorted({k[0] for k in by})
    base = max(float(by[(layers[0], f"baseline_{b}_numops>=1")]["value"])
               for b in ("empty", "majority", "sibling_lookup"))
    return next((la for la in layers if float(by[(la, "exact_match_numops>=1")]["ci_low"]) > base), None), base


def test_probe_sentences_follow_the_numbers(demo_dir, demo_run):
    report = (demo_dir / "report.md").read_text()
    for arm in ("base", "code"):
        printed = next(x for x in demo_run[1].splitlines() if x.startswith(f"{arm}: updated state (numops ≥ 1)"))
        rows = _csv(demo_dir / "probe" / arm / "probe.csv")
        assert {r["role"] for r in rows} == {"query_box", "query_box_desc"}
        layers = {int(r["layer"]) for r in rows}
        assert layers == set(range(len(layers))) and len(layers) >= 2  # every block
        for role in ("query_box", "query_box_desc"):
            first, base = _first_decodable(rows, role)
            where = {"query_box": "the query token", "query_box_desc": "the queried box's token in the description"}
            sentence = next(x for x in report.splitlines() if x.startswith(f"In {arm}, at "))
            clause = sentence.split(f"at {where[role]}, ")[1].split("; at ")[0]
            if first is None:
                assert "the updated contents (numops ≥ 1) never do" in clause
                assert f"baseline {100 * base:.1f}%)" in clause
                assert f"{role}: never" in printed
            else:
                assert (f"the updated contents (numops ≥ 1) first beat the best baseline ({100 * base:.1f}%) with "
                        f"their interval at layer {first} (") in clause
                assert f"{role}: layer {first}" in printed


def test_patch_grid_covers_every_layer_and_sentence_names_the_strongest_cell(demo_dir, demo_run):
    report = (demo_dir / "report.md").read_text()
    for arm in ("base", "code"):
        rows = [r for r in _csv(demo_dir / "patch" / arm / "patch.csv") if r["pair"] == "mean"]
        n_layers = len({r["layer"] for r in rows})
        cells = {r["cell"] for r in rows}
        assert n_layers == len({r["layer"] for r in _csv(demo_dir / "probe" / arm / "probe.csv")})
        assert cells == {"changed_object", "query_box", "query_box_desc"}
        # only pairs both arms answer right both ways: the clean run prefers the clean answer, the corrupted the other
        per_pair = [r for r in _csv(demo_dir / "patch" / arm / "patch.csv") if r["pair"] != "mean"]
        assert per_pair and all(float(r["source_logit_diff"]) > 0 > float(r["target_logit_diff"]) for r in per_pair)
        best = max(rows, key=lambda r: (float(r["normalised"]), -int(r["layer"])))
        assert (f"In {arm}, patching restores most of the clean answer at {best['cell']} in layer {best['layer']} "
                f"({float(best['normalised']):.2f})") in report
        assert f"{arm}: strongest patching cells layer {best['layer']} {best['cell']}" in demo_run[1]
    counts = json.loads((demo_dir / "patch" / "pairs.json").read_text())
    assert counts["patched"] == 4 and counts["built"] >= counts["solved_by_both"] >= counts["patched"]
    assert (f"{counts['solved_by_both']} of the {counts['built']} pairs built are answered right both ways by both "
            f"arms") in report
