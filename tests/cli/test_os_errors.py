"""Operating-system failures reach the user as one ``error:`` line, exit 2, with nothing already written changed."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest

from entitylens.cli import main
from entitylens.task import GeneratorConfig, generate_dataset


def digest(d: Path) -> dict[str, str]:
    files = sorted(p for p in d.rglob("*") if p.is_file())
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def last_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    assert "Traceback" not in "\n".join(err)
    return err[-1]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "d.jsonl"
    generate_dataset(GeneratorConfig(seed=3, num_states=12, num_operations=3), path)
    return path


@pytest.fixture
def disk_full(monkeypatch: pytest.MonkeyPatch):
    """Every fsync (the last step of every write entitylens makes) fails as a full disk does."""

    def arm() -> None:
        def fsync(fd: int) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "fsync", fsync)

    return arm


def test_disk_full_in_every_command(tmp_path, data, capsys, disk_full):
    # Finished outputs of every stage first, with the disk still fine.
    runs = tmp_path / "runs"
    assert main(["--quiet", "eval", "--models", "random", "--data", str(data), "--out", str(runs / "eval")]) == 0
    assert main(["--quiet", "cache", "--model", "tiny:llama", "--data", str(data), "--hooks", "resid_post",
                 "--roles", "query_box,last", "--out", str(runs / "cache")]) == 0  # fmt: skip
    assert main(["--quiet", "patch", "pairs", "--data", str(data), "--kind", "drop_op", "--max-pairs", "2",
                 "--out", str(runs / "pairs.jsonl")]) == 0  # fmt: skip
    before = digest(runs)
    disk_full()
    commands = [
        ["data", "generate", "--seed", "1", "--states", "4", "--out", str(runs / "new.jsonl")],
        ["eval", "--models", "random", "nothing", "--data", str(data), "--out", str(runs / "eval2")],
        ["eval", "--models", "random", "--data", str(data), "--out", str(runs / "eval"), "--seed", "0"],
        ["cache", "--model", "tiny:llama", "--data", str(data), "--hooks", "resid_post", "--roles", "last",
         "--out", str(runs / "cache2")],
        ["probe", "--cache", str(runs / "cache"), "--out", str(runs / "probe"), "--bootstrap", "0"],
        ["patch", "run", "--model", "tiny:llama", "--pairs", str(runs / "pairs.jsonl"), "--component", "resid_pre",
         "--out", str(runs / "patch")],
    ]  # fmt: skip
    for cmd in commands:
        capsys.readouterr()
        rc = main(["--quiet", *cmd])  # (a finished run's rerun rewrites its outputs too: atomically, so they stay)
        assert rc == 2, cmd
        msg = last_error(capsys)
        assert "No space left on device" in msg and "free disk space" in msg, msg
    after = digest(runs)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing already written changed
    assert not [p for p in runs.rglob("*.tmp")]


def test_out_under_a_file_is_one_line(tmp_path, data, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for cmd in (
        ["cache", "--model", "tiny:llama", "--data", str(data), "--hooks", "resid_post", "--roles", "last",
         "--out", str(blocker / "cache")],
        ["eval", "--models", "random", "--data", str(data), "--out", str(blocker / "eval")],
        ["cache", "--model", "tiny:llama", "--data", str(data), "--hooks", "resid_post", "--roles", "last",
         "--out", str(blocker)],
    ):  # fmt: skip
        capsys.readouterr()
        assert main(["--quiet", *cmd]) == 2, cmd
        last_error(capsys)
    assert blocker.read_text() == "x"


def test_probe_out_under_a_file_fails_before_any_work(tmp_path, data, capsys, monkeypatch):
    import entitylens.probing.run as probe_run

    cache = tmp_path / "cache"
    assert main(["--quiet", "cache", "--model", "tiny:llama", "--data", str(data), "--hooks", "resid_post",
                 "--roles", "query_box", "--out", str(cache)]) == 0  # fmt: skip
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setattr(probe_run, "run_probes", lambda *a, **k: pytest.fail("probed before checking --out"))
    capsys.readouterr()
    assert main(["probe", "--cache", str(cache), "--out", str(blocker / "p"), "--bootstrap", "0"]) == 2
    assert "cannot write" in last_error(capsys)


def test_merge_reads_past_a_torn_last_line(tmp_path, data, capsys):
    shards = []
    for i in range(2):
        out = tmp_path / f"s{i}"
        assert main(["--quiet", "eval", "--models", "random", "--data", str(data), "--out", str(out),
                     "--shard", f"{i}/2"]) == 0  # fmt: skip
        shards.append(out)
    with open(shards[1] / "predictions.jsonl", "a") as f:
        f.write('{"model": "random", "state_id": "0:1", "bo')  # what kill -9 mid-append leaves
    assert main(["--quiet", "merge", *map(str, shards), "--out", str(tmp_path / "m")]) == 0
    full = tmp_path / "full"
    assert main(["--quiet", "eval", "--models", "random", "--data", str(data), "--out", str(full)]) == 0
    assert (tmp_path / "m" / "predictions.jsonl").read_bytes() == (full / "predictions.jsonl").read_bytes()


def test_empty_selections_say_which_option_emptied_them(tmp_path, data, capsys):
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n   \n\n")
    for cmd in (
        ["data", "stats", str(blank)],
        ["eval", "--models", "random", "--data", str(blank), "--out", str(tmp_path / "e")],
        ["cache", "--model", "tiny:llama", "--data", str(blank), "--hooks", "resid_post", "--roles", "last",
         "--out", str(tmp_path / "c")],
    ):  # fmt: skip
        capsys.readouterr()
        assert main(cmd) == 2, cmd
        assert "has no rows" in last_error(capsys)
    capsys.readouterr()
    assert main(["eval", "--models", "random", "--data", str(data), "--out", str(tmp_path / "l"), "--limit", "0"]) == 2
    assert "--limit 0 selects no state" in last_error(capsys)
    assert main(["eval", "--models", "random", "--data", str(data), "--out", str(tmp_path / "s"), "--shard",
                 "29/30"]) == 2  # fmt: skip
    assert "--shard 29/30 selects no state" in last_error(capsys) and not (tmp_path / "s").exists()


def test_a_byte_order_mark_is_not_data(tmp_path, data, capsys):
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + data.read_bytes())
    assert main(["data", "stats", str(bom)]) == 0
    assert "rows       84" in capsys.readouterr().out


def test_single_model_eval_names_only_what_it_wrote(tmp_path, data, capsys):
    out = tmp_path / "one"
    assert main(["--quiet", "eval", "--models", "random", "--data", str(data), "--out", str(out)]) == 0
    said = capsys.readouterr().out.strip().splitlines()[-1]
    assert "comparison.csv" not in said and not (out / "comparison.csv").exists()


def test_temporaries_of_killed_processes_are_cleaned_live_ones_kept(tmp_path, data):
    from entitylens._io import clean_stale_temps, temp_prefix

    cache = tmp_path / "cache"
    cache.mkdir()
    dead_file = cache / ".meta.json.pid999999999.x1.tmp"  # no such process
    dead_file.write_text("partial")
    dead_dir = tmp_path / ".stem.pid999999999.x2.tmp"
    dead_dir.mkdir()
    (dead_dir / "model.safetensors").write_bytes(b"0" * 100)
    live = cache / f"{temp_prefix('meta.json')}x3.tmp"
    live.write_text("being written")
    assert main(["--quiet", "cache", "--model", "tiny:llama", "--data", str(data), "--hooks", "resid_post",
                 "--roles", "last", "--out", str(cache), "--limit", "7"]) == 0  # fmt: skip
    assert not dead_file.exists() and live.exists()
    assert clean_stale_temps(tmp_path) == [dead_dir] and not dead_dir.exists()
