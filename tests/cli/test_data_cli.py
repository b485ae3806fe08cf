"""``entitylens data generate`` / ``data stats`` through the real CLI entry point."""

from __future__ import annotations

import json

import pytest

import entitylens.cli as cli
from entitylens.task.io import read_ks_jsonl


@pytest.fixture
def run(monkeypatch, capsys):
    # only the data commands: keeps this test independent of the other areas' CLI modules
    monkeypatch.setattr(cli, "_COMMAND_MODULES", ("data",))

    def _run(*argv: str):
        rc = cli.main(list(argv))
        out, err = capsys.readouterr()
        return rc, out, err

    return _run


def test_data_is_registered():
    assert "data" in cli._COMMAND_MODULES


def test_generate_then_stats(run, tmp_path):
    out = tmp_path / "d.jsonl"
    rc, stdout, _ = run("data", "generate", "--seed", "3", "--out", str(out), "--states", "26", "--form", "t5")
    assert rc == 0 and f"wrote 182 rows (26 states, 26 scenarios) to {out}" in stdout  # one state per scenario
    states = read_ks_jsonl(out)
    assert len(states) == 26 and states[0].extra["form"] == "t5"
    rc, stdout, _ = run("data", "stats", str(out))
    assert rc == 0
    lines = stdout.splitlines()
    assert "rows       182" in lines and "states     26" in lines and "scenarios  26" in lines
    header = next(line for line in lines if line.startswith("numops"))
    counts = next(line for line in lines if line.startswith("rows ") and len(line.split()) == 9)
    assert header.split()[1:] == ["0", "1", "2", "3", "4", "5", "6", "7+"]
    # the histogram equals a recount of the numops field
    recount = [0] * 8
    for line in out.read_text().splitlines():
        recount[min(json.loads(line)["numops"], 7)] += 1
    assert [int(x) for x in counts.split()[1:]] == recount
    rc, stdout, _ = run("data", "stats", str(out), "--json")
    st = json.loads(stdout)
    assert st["rows"] == 182 and st["states"] == 26 and sum(st["numops_histogram"]) == 182
    assert set(st["by_op"]) == {"move", "remove", "put"}


def test_all_prefixes_takes_every_prefix_of_few_scenarios(run, tmp_path):
    out = tmp_path / "p.jsonl"
    rc, stdout, _ = run("data", "generate", "--seed", "3", "--out", str(out), "--states", "26", "--all-prefixes")
    assert rc == 0 and "(26 states, 2 scenarios)" in stdout
    states = read_ks_jsonl(out)
    assert [s.num_operations for s in states[:13]] == list(range(13))


def test_distinct_states_come_from_distinct_scenarios_at_spread_prefixes(run, tmp_path):
    out = tmp_path / "d.jsonl"
    assert run("data", "generate", "--seed", "5", "--out", str(out), "--states", "60")[0] == 0
    states = read_ks_jsonl(out)
    assert len({s.sample_id for s in states}) == 60
    ops = [s.num_operations for s in states]
    assert min(ops) <= 1 and max(ops) >= 11 and len(set(ops)) >= 10  # prefixes drawn uniformly from 0..12


def test_paper_profile_from_the_cli(run, tmp_path):
    out = tmp_path / "paper.jsonl"
    rc, stdout, _ = run("data", "generate", "--seed", "0", "--out", str(out), "--profile", "paper")
    assert rc == 0 and "wrote 5012 rows (716 states" in stdout
    rc, stdout, _ = run("data", "stats", str(out))
    assert "rows        1303 1410 1083  651  288  142  106   29" in stdout.splitlines()


def test_variants_and_options(run, tmp_path):
    out = tmp_path / "alt.jsonl"
    args = ["--variant", "altforms", "--vocab", "disjoint", "--max-prefix-ops", "2", "--split", "train"]
    rc, _, _ = run("data", "generate", "--seed", "1", "--out", str(out), "--states", "12", *args)
    assert rc == 0
    states = read_ks_jsonl(out)
    assert all(s.variant == "altforms" and s.num_operations <= 2 for s in states)
    assert '"sentence_masked": "The ' in out.read_text() or '"sentence_masked": "There ' in out.read_text()
    rc, _, _ = run("data", "generate", "--seed", "1", "--out", str(tmp_path / "o.jsonl"), "--train-ops", "1")
    assert rc == 0 and max(s.num_operations for s in read_ks_jsonl(tmp_path / "o.jsonl")) == 1


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--variant", "fancy"], "unknown variant 'fancy'"),
        (["--vocab", "wiki"], "unknown vocabulary 'wiki'"),
        (["--states", "0"], "num_states"),
        (["--profile", "paper", "--states", "9"], "exactly 716 states"),
        (["--split-fractions", "0.8,x,0.1"], "--split-fractions"),
        (["--ops", "3", "--max-prefix-ops", "5"], "max_prefix_ops"),
    ],
)
def test_generate_errors_exit_2_and_keep_existing_file(run, tmp_path, extra, fragment):
    out = tmp_path / "keep.jsonl"
    out.write_text("old\n")
    rc, stdout, stderr = run("data", "generate", "--seed", "0", "--out", str(out), *extra)
    assert rc == 2 and stdout == ""
    assert stderr.startswith("error: ") and fragment in stderr and stderr.count("\n") == 1
    assert out.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.jsonl"]


def test_stats_errors(run, tmp_path):
    rc, _, stderr = run("data", "stats", str(tmp_path / "missing.jsonl"))
    assert rc == 2 and "does not exist" in stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"sentence": "x"}\n')
    rc, _, stderr = run("data", "stats", str(bad))
    assert rc == 2 and f"{bad} line 1: missing field 'sentence_masked'" in stderr and stderr.count("\n") == 1
