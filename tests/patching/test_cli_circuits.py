"""``entitylens patch path`` / ``patch sites`` end to end on the tiny model, checked against direct calls."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch

import entitylens.cli as cli
from entitylens.patching.pair_io import read_any_pairs
from entitylens.patching.paths import path_patch
from entitylens.patching.run import prepare_pairs
from entitylens.patching.sites import Site, patch_sites
from entitylens.task.generate import GeneratorConfig, generate_dataset

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def main(*argv: str) -> int:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "_COMMAND_MODULES", ("patch",))
        return cli.main(["--quiet", *argv])


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("circuits")
    generate_dataset(GeneratorConfig(seed=0, num_states=30), root / "d.jsonl")
    assert main("patch", "pairs", "--data", str(root / "d.jsonl"), "--kind", "op_object", "--max-pairs", "3",
                "--out", str(root / "pairs.jsonl")) == 0
    return root / "pairs.jsonl"


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_path_cli_equals_direct_call_and_is_deterministic(tiny_model: Any, pairs_file: Path, tmp_path: Path) -> None:
    argv = ("patch", "path", "--model", "tiny:llama", "--pairs", str(pairs_file), "--senders", "head:0.*@query_box",
            "--receivers", "resid_pre:1@last,q:1.0@last,k:1.*")
    assert main(*argv, "--out", str(tmp_path / "a")) == 0
    assert main(*argv, "--out", str(tmp_path / "b")) == 0
    for f in ("path.csv", "path_summary.csv", "meta.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert (tmp_path / "a" / "path.png").read_bytes()[:8] == PNG_MAGIC
    pairs, _ = prepare_pairs(tiny_model, read_any_pairs(pairs_file, tiny_model.tokenizer), "layer_role",
                             ["last", "query_box"])
    senders = [Site("head", 0, h, "query_box") for h in range(4)]
    receivers = [Site("resid_pre", 1, None, "last"), Site("q", 1, 0, "last"), Site("k", 1, 0), Site("k", 1, 1)]
    direct = path_patch(tiny_model, pairs, senders, receivers)
    rows = _rows(tmp_path / "a" / "path.csv")
    assert len(rows) == 3 * 4 * 4
    got = torch.tensor([float(r["normalised"]) for r in rows]).view(4, 4, 3).permute(2, 0, 1)
    torch.testing.assert_close(got, direct.normalised, atol=1e-5, rtol=0)
    summary = _rows(tmp_path / "a" / "path_summary.csv")
    s0 = summary[0]
    assert (s0["sender"], s0["receiver"]) == ("head:0.0@query_box", "resid_pre:1@last")
    assert abs(float(s0["effect"]) - float(direct.normalised[:, 0, 0].mean())) < 1e-5
    assert float(s0["ci_low"]) <= float(s0["effect"]) <= float(s0["ci_high"])


def test_sites_cli_summary(tiny_model: Any, pairs_file: Path, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main("patch", "sites", "--model", "tiny:llama", "--pairs", str(pairs_file), "--circuit",
                "head:1.*@last", "--circuit", "head:1.0@last,mlp_out:1@last", "--freeze", "mlp_out:0@last",
                "--out", str(tmp_path / "s")) == 0
    assert "| circuit" in capsys.readouterr().out
    table = _rows(tmp_path / "s" / "sites_summary.csv")
    assert [r["circuit"] for r in table] == ["head:1.0@last+head:1.1@last+head:1.2@last+head:1.3@last",
                                             "head:1.0@last+mlp_out:1@last"]
    pairs, _ = prepare_pairs(tiny_model, read_any_pairs(pairs_file, tiny_model.tokenizer), "layer_role", ["last"])
    direct = patch_sites(tiny_model, pairs, [[Site("head", 1, h, "last") for h in range(4)]],
                         freeze=[Site("mlp_out", 0, None, "last")])
    assert abs(float(table[0]["effect"]) - float(direct.normalised[:, 0].mean())) < 1e-5
    assert json.loads((tmp_path / "s" / "meta.json").read_text())["kind"] == "entitylens.sites"


@pytest.mark.parametrize(("args", "needle"), [
    (("--senders", "head:1.0@last", "--receivers", "resid_pre:1@last"), "later layer"),
    (("--senders", "head:0.9@last", "--receivers", "resid_pre:1@last"), "use a head in 0-3"),
    (("--senders", "head 0.1", "--receivers", "resid_pre:1@last"), "cannot parse site"),
    (("--senders", "head:0.0@nowhere", "--receivers", "resid_pre:1@last"), "unknown role"),
])
def test_path_cli_errors_are_one_line(pairs_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      args: tuple[str, ...], needle: str) -> None:
    capsys.readouterr()
    rc = main("patch", "path", "--model", "tiny:llama", "--pairs", str(pairs_file), *args, "--out",
              str(tmp_path / "x"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "x" / "path.csv").exists()


def test_das_cli_train_cross_model_and_compare(pairs_file: Path, tmp_path: Path) -> None:
    from entitylens.pipelines.circuits import read_subspaces

    six = tmp_path / "six.jsonl"
    assert main("patch", "pairs", "--data", str(pairs_file.parent / "d.jsonl"), "--kind", "op_object",
                "--max-pairs", "6", "--out", str(six)) == 0
    common = ("--pairs", str(six), "--role", "last", "--layers", "0,1", "--steps", "3", "--batch", "2",
              "--test-fraction", "0.5", "--all-pairs")
    assert main("patch", "das", "--model", "tiny:llama", *common, "--out", str(tmp_path / "a")) == 0
    assert main("patch", "das", "--model", "tiny:llama", *common, "--out", str(tmp_path / "a2")) == 0
    for f in ("das.csv", "das_subspaces.safetensors"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "a2" / f).read_bytes(), f
    assert (tmp_path / "a" / "das.png").read_bytes()[:8] == PNG_MAGIC
    rows = _rows(tmp_path / "a" / "das.csv")
    assert [r["layer"] for r in rows] == ["0", "1"] and all(r["source"] == "learned" for r in rows)
    role, bases = read_subspaces(tmp_path / "a")
    assert role == "last" and sorted(bases) == [0, 1] and bases[0].shape == (64, 1)
    # the subspaces learned on one model, scored on its pair model (same shapes)
    assert main("patch", "das", "--model", "tiny:llama?seed=1", *common, "--subspaces", str(tmp_path / "a"),
                "--out", str(tmp_path / "b")) == 0
    rows_b = _rows(tmp_path / "b" / "das.csv")
    assert all(r["source"] == "given" and r["n_test"] == "6" for r in rows_b)
    assert main("patch", "das", "--compare", str(tmp_path / "a"), str(tmp_path / "b"), "--labels", "base,code",
                "--out", str(tmp_path / "c")) == 0
    assert (tmp_path / "c" / "das_compare.png").read_bytes()[:8] == PNG_MAGIC
    assert main("patch", "das", "--model", "tiny:llama", *common, "--basis", "pca", "--out", str(tmp_path / "p")) == 0
    assert {r["source"] for r in _rows(tmp_path / "p" / "das.csv")} == {"pca"}


def test_das_cli_whole_site_and_probe_bases(pairs_file: Path, tmp_path: Path, tiny_model: Any) -> None:
    """--basis full / probe score fixed bases on DAS's split, against each pair's causal-model answer."""
    from safetensors.torch import save_file

    from entitylens.patching.das import DASConfig, das_split, interchange_iia

    cross = tmp_path / "cross.jsonl"
    assert main("patch", "pairs", "--data", str(pairs_file.parent / "d.jsonl"), "--kind", "op_object",
                "--max-pairs", "6", "--cross-query", "--out", str(cross)) == 0
    common = ("--model", "tiny:llama", "--pairs", str(cross), "--role", "last", "--layers", "1",
              "--test-fraction", "0.5", "--all-pairs")
    assert main("patch", "das", *common, "--basis", "full", "--out", str(tmp_path / "f")) == 0
    (row,) = _rows(tmp_path / "f" / "das.csv")
    assert (row["source"], row["k"], row["n_train"], row["n_test"]) == ("full", "64", "3", "3")
    pairs, _ = prepare_pairs(tiny_model, read_any_pairs(cross, tiny_model.tokenizer), "layer_role", ["last"])
    hit = interchange_iia(tiny_model, pairs, 1, "last", torch.eye(64))
    _, test = das_split(6, DASConfig(test_fraction=0.5))
    assert float(row["test_iia"]) == pytest.approx(float(hit[test].double().mean()))
    probe = tmp_path / "probe"
    probe.mkdir()
    meta = {"format": "entitylens.probe_weights/1", "target": "t", "hook": "resid_post", "layers": "[0]",
            "columns": '["a", "b"]', "roles": '["last"]'}
    coef = torch.randn(1, 64, 2, generator=torch.Generator().manual_seed(0))
    save_file({"last/coef": coef, "last/intercept": torch.zeros(1, 2)}, str(probe / "probe_weights.safetensors"),
              metadata=meta)
    assert main("patch", "das", *common, "--basis", "probe", "--probe", str(probe), "--probe-columns", "b",
                "--out", str(tmp_path / "pr")) == 0
    (row,) = _rows(tmp_path / "pr" / "das.csv")
    assert (row["source"], row["k"]) == ("probe", "1")
    q = coef[0, :, 1:] / coef[0, :, 1:].norm()
    hit = interchange_iia(tiny_model, pairs, 1, "last", q)
    assert float(row["test_iia"]) == pytest.approx(float(hit[test].double().mean()))


def test_das_cli_refuses_pairs_without_a_causal_answer(pairs_file: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    old = tmp_path / "old.jsonl"
    recs = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    old.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "counterfactual_answer"}) + "\n"
                           for r in recs))
    for extra, needle in ((("--basis", "full"), "have no causal-model answer"),
                          ((), "have no causal-model answer"),
                          (("--basis", "probe"), "--basis probe goes with --probe DIR")):
        capsys.readouterr()
        rc = main("patch", "das", "--model", "tiny:llama", "--pairs", str(old), "--layers", "1", *extra,
                  "--out", str(tmp_path / "x"))
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and needle in err[0], err
        assert not (tmp_path / "x" / "das.csv").exists()


def test_das_cli_sweeps_k(pairs_file: Path, tmp_path: Path, tiny_model: Any) -> None:
    from entitylens.patching.das import DASConfig, train_das
    from entitylens.pipelines.circuits import read_subspaces

    six = tmp_path / "six.jsonl"
    assert main("patch", "pairs", "--data", str(pairs_file.parent / "d.jsonl"), "--kind", "op_object",
                "--max-pairs", "6", "--out", str(six)) == 0
    common = ("--model", "tiny:llama", "--pairs", str(six), "--role", "last", "--layers", "0,1", "--steps", "3",
              "--batch", "2", "--test-fraction", "0.5", "--all-pairs")
    assert main("patch", "das", *common, "--k", "2,1", "--out", str(tmp_path / "s")) == 0
    rows = _rows(tmp_path / "s" / "das.csv")
    assert [(r["k"], r["layer"]) for r in rows] == [("1", "0"), ("1", "1"), ("2", "0"), ("2", "1")]
    for k in (1, 2):  # each k's rows and subspaces are the single-k run's
        _, bases = read_subspaces(tmp_path / "s" / f"das_subspaces_k{k}.safetensors")
        pairs, _ = prepare_pairs(tiny_model, read_any_pairs(six, tiny_model.tokenizer), "layer_role", ["last"])
        ref = train_das(tiny_model, pairs, [0, 1], "last", DASConfig(k=k, steps=3, batch=2, test_fraction=0.5,
                                                                     behaving_only=False))
        for r in ref:
            torch.testing.assert_close(bases[r.layer], r.basis)
            (row,) = [x for x in rows if x["k"] == str(k) and x["layer"] == str(r.layer)]
            assert float(row["test_iia"]) == pytest.approx(r.test_iia)
    assert (tmp_path / "s" / "das.png").read_bytes()[:8] == PNG_MAGIC
    assert main("patch", "das", *common, "--k", "1,3", "--basis", "pca", "--out", str(tmp_path / "p")) == 0
    assert sorted({r["k"] for r in _rows(tmp_path / "p" / "das.csv")}) == ["1", "3"]
