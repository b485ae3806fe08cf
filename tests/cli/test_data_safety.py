"""Nothing already written is lost or silently corrupted: outputs that are inputs, runs of other configs,
merged records, non-finite activations, context lengths, and runs that fail before their first result."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from entitylens._io import sha256_json
from entitylens.cli import main
from entitylens.task import GeneratorConfig, generate_dataset


def snapshot(d: Path) -> dict[str, str]:
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()
    }


def one_line_error(capsys: pytest.CaptureFixture[str], *fragments: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and err[-1].startswith("error: ")
    for f in fragments:
        assert f in err[-1], err[-1]
    return err[-1]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "d.jsonl"
    generate_dataset(GeneratorConfig(seed=3, num_states=12, num_operations=3), path)
    return path


def test_merge_refuses_other_runs_and_its_own_shards_and_records_the_merge(tmp_path, data, capsys):
    shards = []
    for i in range(2):
        out = tmp_path / f"s{i}"
        assert main(["--quiet", "eval", "--models", "random", "nothing", "--data", str(data), "--out", str(out),
                     "--shard", f"{i}/2"]) == 0  # fmt: skip
        shards.append(out)
    other = tmp_path / "other"
    assert main(["--quiet", "eval", "--models", "initial", "--data", str(data), "--out", str(other)]) == 0
    before = {d: snapshot(d) for d in (*shards, other)}
    capsys.readouterr()
    assert main(["merge", *map(str, shards), "--out", str(other)]) == 2
    one_line_error(capsys, "holds another run", "nothing in it was changed")
    assert main(["merge", *map(str, shards), "--out", str(shards[0])]) == 2
    one_line_error(capsys, "is the input shard")
    assert {d: snapshot(d) for d in (*shards, other)} == before
    merged = tmp_path / "merged"
    assert main(["--quiet", "merge", *map(str, shards), "--out", str(merged)]) == 0
    rec = json.loads((merged / "run.json").read_text())
    rows = [json.loads(x) for x in (merged / "predictions.jsonl").read_text().splitlines()]
    ids = list(dict.fromkeys(r["state_id"] for r in rows if r["model"] == "random"))
    assert rec["dataset"]["num_states"] == 12 and rec["dataset"]["states_sha256"] == sha256_json(ids)
    full = tmp_path / "full"
    assert main(["--quiet", "eval", "--models", "random", "nothing", "--data", str(data), "--out", str(full)]) == 0
    assert json.loads((full / "run.json").read_text())["dataset"] == rec["dataset"]
    # merging the same shards again into the merged run is a no-op rerun, not a refusal
    assert main(["--quiet", "merge", *map(str, shards), "--out", str(merged)]) == 0


def test_compare_combines_finished_runs_of_different_models(tmp_path, data, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["--quiet", "eval", "--models", "random", "--data", str(data), "--out", str(a)]) == 0
    assert main(["--quiet", "eval", "--models", "initial", "--data", str(data), "--out", str(b)]) == 0
    both = tmp_path / "both"
    assert main(["--quiet", "compare", str(a), str(b), "--out", str(both)]) == 0
    comp = (both / "comparison.csv").read_text().splitlines()
    assert comp[1].startswith("random,initial,")
    # the same as evaluating both models in one run
    one = tmp_path / "one"
    assert main(["--quiet", "eval", "--models", "random", "initial", "--data", str(data), "--out", str(one)]) == 0
    assert (one / "comparison.csv").read_bytes() == (both / "comparison.csv").read_bytes()
    assert (one / "predictions.jsonl").read_bytes() == (both / "predictions.jsonl").read_bytes()
    capsys.readouterr()
    # another dataset is refused
    data2 = tmp_path / "d2.jsonl"
    generate_dataset(GeneratorConfig(seed=4, num_states=12, num_operations=3), data2)
    c = tmp_path / "c"
    assert main(["--quiet", "eval", "--models", "nothing", "--data", str(data2), "--out", str(c)]) == 0
    capsys.readouterr()
    assert main(["compare", str(a), str(c), "--out", str(tmp_path / "x")]) == 2
    one_line_error(capsys, "other states")
    # rows of a model the run does not list (files concatenated by hand) are refused on reading
    with open(a / "predictions.jsonl", "a") as f:
        f.write((b / "predictions.jsonl").read_text())
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "y")]) == 2
    one_line_error(capsys, "does not list", "entitylens compare")


def _cache(tmp_path: Path, data: Path, name: str = "cache") -> Path:
    out = tmp_path / name
    assert main(["--quiet", "cache", "--model", "tiny:llama", "--data", str(data), "--hooks", "resid_post",
                 "--roles", "query_box,last", "--out", str(out)]) == 0  # fmt: skip
    return out


def test_probe_never_writes_over_its_inputs_or_another_probe(tmp_path, data, capsys):
    cache = _cache(tmp_path, data)
    before = snapshot(cache)
    capsys.readouterr()
    assert main(["probe", "--cache", str(cache), "--out", str(cache), "--bootstrap", "0"]) == 2
    one_line_error(capsys, "is the input --cache")
    assert main(["probe", "--cache", str(cache), "--out", str(tmp_path), "--bootstrap", "0"]) == 2
    one_line_error(capsys, "contains the input --cache")
    assert snapshot(cache) == before
    out = tmp_path / "probe"
    assert main(["--quiet", "probe", "--cache", str(cache), "--out", str(out), "--bootstrap", "0"]) == 0
    assert main(["--quiet", "probe", "--cache", str(cache), "--out", str(out), "--bootstrap", "0"]) == 0  # rerun
    first = snapshot(out)
    capsys.readouterr()
    assert main(["probe", "--cache", str(cache), "--out", str(out), "--bootstrap", "0", "--seed", "1"]) == 2
    one_line_error(capsys, "holds a probe run of other inputs", "--overwrite")
    assert snapshot(out) == first
    assert main(["--quiet", "probe", "--cache", str(cache), "--out", str(out), "--bootstrap", "0", "--seed", "1",
                 "--overwrite"]) == 0  # fmt: skip
    # an output directory holding something else (here: another cache) is refused
    other = _cache(tmp_path, data, "other-cache")
    capsys.readouterr()
    assert main(["probe", "--cache", str(cache), "--out", str(other), "--bootstrap", "0"]) == 2
    one_line_error(capsys, "not a probe run")


def test_probe_refuses_non_finite_activations_naming_shard_and_rows(tmp_path, data, capsys):
    cache = _cache(tmp_path, data)
    shard = next(cache.glob("shard_*.safetensors"))
    tensors = load_file(shard)
    key = next(k for k in tensors if k.startswith("resid_post/query_box"))
    tensors[key][0, 3, 0] = float("nan")
    tensors[key][1, 5, 2] = float("inf")
    save_file(tensors, shard)
    meta = json.loads((cache / "meta.json").read_text())
    meta["shards"][shard.name]["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()  # checksums pass
    (cache / "meta.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert main(["probe", "--cache", str(cache), "--out", str(tmp_path / "p"), "--bootstrap", "0"]) == 2
    msg = one_line_error(capsys, shard.name, "NaN or infinite", "2 row(s)", "--overwrite")
    rows = json.loads((cache / "rows.json").read_text())["row_ids"]
    assert rows[3] in msg and rows[5] in msg
    assert not torch.isfinite(load_file(shard)[key]).all()


def test_pairs_out_cannot_be_the_dataset(tmp_path, data, capsys):
    before = data.read_bytes()
    assert main(["patch", "pairs", "--data", str(data), "--kind", "drop_op", "--out", str(data)]) == 2
    one_line_error(capsys, "is the input --data")
    assert data.read_bytes() == before


def test_patch_run_checks_the_context_length(tmp_path, data, capsys):
    pairs = tmp_path / "pairs.jsonl"
    assert main(["--quiet", "patch", "pairs", "--data", str(data), "--kind", "drop_op", "--out", str(pairs)]) == 0
    capsys.readouterr()
    for cmd in (["run", "--model", "tiny:llama?n_ctx=32"], ["cross", "--source", "tiny:llama?n_ctx=32&seed=1",
                                                            "--target", "tiny:llama?n_ctx=32"]):  # fmt: skip
        out = tmp_path / cmd[0]
        assert main(["patch", *cmd, "--pairs", str(pairs), "--component", "resid_pre", "--out", str(out)]) == 2
        one_line_error(capsys, "more than the model's context of 32")
        assert not out.exists()


def test_eval_that_fails_before_its_first_result_keeps_no_config(tmp_path, data, capsys):
    out = tmp_path / "run"
    # llama2-7b resolves (a registry key) but is not in the offline cache: loading fails after run.json
    assert main(["eval", "--models", "llama2-7b", "--data", str(data), "--out", str(out)]) == 2
    one_line_error(capsys, "not in the local Hugging Face cache")
    assert not (out / "run.json").exists()
    assert main(["--quiet", "eval", "--models", "tiny:llama", "--data", str(data), "--out", str(out),
                 "--limit", "1"]) == 0  # fmt: skip


def test_reruns_give_byte_identical_artifacts_timings_apart(tmp_path, data):
    import time

    pairs = tmp_path / "pairs.jsonl"
    assert main(["--quiet", "patch", "pairs", "--data", str(data), "--kind", "drop_op", "--max-pairs", "3",
                 "--out", str(pairs)]) == 0  # fmt: skip
    outs = []
    for k in range(2):
        e, p = tmp_path / f"eval{k}", tmp_path / f"patch{k}"
        assert main(["--quiet", "eval", "--models", "random", "initial", "--data", str(data), "--out", str(e)]) == 0
        assert main(["--quiet", "patch", "run", "--model", "tiny:llama", "--pairs", str(pairs), "--component",
                     "resid_pre", "--out", str(p)]) == 0  # fmt: skip
        outs.append((e, p))
        time.sleep(1.1)  # a PDF CreationDate or a wall-clock field would now differ
    for a, b in zip(outs[0], outs[1]):
        sa, sb = snapshot(a), snapshot(b)
        assert "accuracy_by_numops.pdf" in sa or "patch.csv" in sa
        sa.pop("timing.json", None), sb.pop("timing.json", None)
        assert sa == sb
    assert json.loads((outs[0][1] / "timing.json").read_text())["patch/resid_pre"]["seconds"] > 0
