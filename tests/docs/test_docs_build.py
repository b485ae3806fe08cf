"""The documentation site builds with ``mkdocs build --strict``, and the paper's numbers in it are right.

The build test runs mkdocs (with mkdocstrings generating docs/api.md from the docstrings) into a temporary
site directory; ``--strict`` turns every warning into a failure: a broken link or anchor, a page missing
from the nav, a docstring mkdocstrings cannot parse, a module that does not import. It is skipped only
when mkdocs or mkdocstrings is not installed (they are dev dependencies, so CI has them).

The table test checks docs/reproduce-the-paper.md against the model registry (which
tests/models/test_registry.py checks against the paper's CSV): every pair, hub id, size and paper number.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"


def _table_rows(markdown: str, header_start: str) -> list[list[str]]:
    """Cells of the data rows of every markdown table whose header row starts with ``header_start``."""
    rows: list[list[str]] = []
    lines = markdown.splitlines()
    for i, line in enumerate(lines):
        if not line.startswith(header_start):
            continue
        for body in lines[i + 2 :]:
            if not body.startswith("|"):
                break
            rows.append([c.strip().strip("`") for c in body.strip().strip("|").split("|")])
    return rows


def _section(markdown: str, heading: str) -> str:
    start = markdown.index(heading)
    nxt = markdown.find("\n#", start + len(heading))
    return markdown[start : nxt if nxt >= 0 else len(markdown)]


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None,
    reason='mkdocs / mkdocstrings not installed: pip install "mkdocs>=1.6" "mkdocstrings[python]>=0.26"',
)
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(REPO / "mkdocs.yml"),
         "--site-dir", str(site)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    for page in ("index", "tutorial", "reproduce-the-paper", "design", "api", "data", "patching", "testbed"):
        assert (site / f"{page}.html").is_file(), f"{page}.html missing from the built site"
    api = (site / "api.html").read_text(encoding="utf-8")
    # mkdocstrings gives every documented object an anchor id = its full dotted path.
    for obj in (
        "entitylens.task.generate.generate_states",
        "entitylens.task.io.read_ks_jsonl",
        "entitylens.models.loading.load_model",
        "entitylens.behavior.evaluate.evaluate",
        "entitylens.activations.cache.cache_activations",
        "entitylens.probing.linear.fit_probes",
        "entitylens.patching.exact.patch_grid",
        "entitylens.patching.attribution.attribution_grid",
        "entitylens.testbed.run.run_testbed_eval",
        "entitylens.pipelines.paper_table.paper_table",
        "entitylens.pipelines.patch_study.run_patch_study",
        "entitylens.patching.job.run_patch_job",
    ):
        assert f'id="{obj}"' in api, f"api.html does not document {obj}"
    # Docstrings were rendered, not just headings.
    from entitylens.task.generate import generate_states

    summary = (generate_states.__doc__ or "").strip().splitlines()[0]
    assert summary and summary in api, "docstrings were not rendered into api.html"
    # Search index exists and covers the tutorial.
    index = (site / "search" / "search_index.json").read_text(encoding="utf-8")
    assert "entitylens data generate" in index


def test_every_docs_page_is_in_the_nav() -> None:
    nav = (REPO / "mkdocs.yml").read_text(encoding="utf-8")
    pages = sorted(p.name for p in DOCS.glob("*.md"))
    assert pages, "docs/ has no pages"
    missing = [p for p in pages if not re.search(rf":\s*{re.escape(p)}\s*$", nav, flags=re.M)]
    assert not missing, f"docs pages missing from mkdocs.yml nav: {missing}"


def test_reproduce_page_pairs_and_numbers_match_the_registry() -> None:
    from entitylens.models import REGISTRY, experiment_pairs

    page = (DOCS / "reproduce-the-paper.md").read_text(encoding="utf-8")
    headings = {"code": "### Experiment 1: code", "math": "### Experiment 2: math",
                "alignment": "### Experiment 3: alignment"}  # fmt: skip
    seen: dict[str, None] = {}
    for name, heading in headings.items():
        rows = _table_rows(_section(page, heading), "| base | variant |")
        expected = [
            [
                b.key,
                v.key,
                f"{b.paper_overall:.2f}",
                f"{v.paper_overall:.2f}",
                f"{v.paper_overall - b.paper_overall:+.2f}",
            ]
            for b, v in experiment_pairs(name)
        ]
        assert rows == expected, f"{heading}: the table differs from the registry"
        for b, v in experiment_pairs(name):
            seen.update({b.key: None, v.key: None})

    checkpoints = _table_rows(page, "| key | hub id |")
    assert [r[0] for r in checkpoints] == list(seen), "the checkpoint table must list every experiment model once"
    for key, hub_id, params, gb, chat, exps in checkpoints:
        e = REGISTRY[key]
        assert hub_id == e.hub_id, key
        assert float(params) == pytest.approx(e.params_b), key
        assert float(gb) == pytest.approx(2 * e.params_b, abs=0.05), key  # bf16: 2 bytes per parameter
        assert chat == ("yes" if e.chat else "no"), key
        members = [n for n in headings if any(key in (b.key, v.key) for b, v in experiment_pairs(n))]
        assert exps == ", ".join(members), key

    curves = _table_rows(_section(page, "### The headline curves"), "| model | overall |")
    assert len(curves) == 2 * len(experiment_pairs("code"))
    for row in curves:
        e = REGISTRY[row[0]]
        assert row[1:] == [f"{e.paper_overall:.2f}"] + [f"{a:.2f}" for a in e.paper_by_numops], row[0]

    # The bf16 totals quoted in the text (GB, 1 decimal for experiments, TB for all).
    for name in headings:
        keys = {k for b, v in experiment_pairs(name) for k in (b.key, v.key)}
        total = round(sum(2 * REGISTRY[k].params_b for k in keys))
        assert f"{total} GB" in page, f"{name}: the page should state {total} GB of bf16 weights"
    all_tb = sum(2 * REGISTRY[k].params_b for k in seen) / 1000
    assert f"{all_tb:.2f} TB" in page
