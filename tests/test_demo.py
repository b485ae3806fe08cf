"""The README's main job, shortened: `entitylens demo` on the shipped testbed pair writes a report whose
numbers are the ones in the pipelines' CSV files."""

import csv
import re

import pytest

from entitylens.cli import main


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    rc = main(["--quiet", "demo", "--out", str(out), "--eval-states", "24", "--probe-states", "40",
               "--patch-pairs", "4"])
    assert rc == 0
    return out


def test_demo_writes_report_and_every_artifact(demo_dir):
    for rel in ("report.md", "eval/summary.csv", "eval/comparison.csv", "eval/accuracy_by_numops.png",
                "probe/base/probe.csv", "probe/code/probe.csv", "probe/compare/probe_compare.png",
                "patch/base/patch.csv", "patch/code/patch.csv", "patch/patch_compare_resid_pre.png"):
        assert (demo_dir / rel).is_file(), rel
    report = (demo_dir / "report.md").read_text()
    for fig in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):
        assert (demo_dir / fig).is_file(), fig


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
    overall = next(r for r in comp if r["bucket"] == "overall")
    line = next(x for x in report.splitlines() if x.startswith("| overall |") and "|" in x[12:])
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert int(cells[1]) == int(overall["n"])
    assert float(cells[2]) == pytest.approx(100 * float(overall["base_accuracy"]), abs=0.051)
    assert float(cells[3]) == pytest.approx(100 * float(overall["variant_accuracy"]), abs=0.051)
    assert (int(cells[5]), int(cells[6])) == (int(overall["base_only"]), int(overall["variant_only"]))
    assert f"p = {float(overall['p_value']):.3g}" in report
