"""``entitylens patch pairs|run|compare|cross`` end to end on tiny models, checked against direct engine calls."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import entitylens.cli as cli
from entitylens.activations.roles import find_roles, span_to_token, tokenize_with_offsets
from entitylens.patching import (
    PatchPair,
    PatchResult,
    agreement,
    attribution_grid,
    build_pairs,
    cross_model_patch,
    patch_grid,
    read_pairs,
    run_attribution,
    run_patching,
    to_patch_pairs,
    write_patch_outputs,
)
from entitylens.task.generate import GeneratorConfig, generate_dataset, generate_states

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def main(*argv: str) -> int:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "_COMMAND_MODULES", ("patch",))  # independent of the other areas' CLI modules
        return cli.main(["--quiet", *argv])


@pytest.fixture(scope="module")
def w(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One dataset, one pairs file and every CLI run the tests below inspect."""
    root = tmp_path_factory.mktemp("patch_cli")
    p = {k: root / k for k in ("run_a", "run_b", "cross", "cmp")}
    p["data"] = root / "d.jsonl"
    p["pairs"] = root / "pairs.jsonl"
    generate_dataset(GeneratorConfig(seed=0, num_states=30), p["data"])
    assert main("patch", "pairs", "--data", str(p["data"]), "--kind", "op_object", "--max-pairs", "5",
                "--out", str(p["pairs"])) == 0  # fmt: skip
    common = ("--pairs", str(p["pairs"]))
    assert main("patch", "run", "--model", "tiny:llama", *common, "--component", "resid_pre", "--attribution",
                "--k", "4", "--out", str(p["run_a"])) == 0  # fmt: skip
    assert main("patch", "run", "--model", "tiny:llama", *common, "--component", "head_z", "--out",
                str(p["run_a"])) == 0  # fmt: skip
    assert main("patch", "run", "--model", "tiny:llama?seed=1", *common, "--component", "resid_pre", "--out",
                str(p["run_b"])) == 0  # fmt: skip
    assert main("patch", "cross", "--source", "tiny:llama?seed=1", "--target", "tiny:llama", *common,
                "--component", "resid_post", "--out", str(p["cross"])) == 0  # fmt: skip
    assert main("patch", "compare", str(p["run_a"]), str(p["run_b"]), "--out", str(p["cmp"]),
                "--labels", "base,code") == 0  # fmt: skip
    return p


@pytest.fixture(scope="module")
def by_hand(tiny_model: Any, w: dict[str, Path]) -> list[PatchPair]:
    """The same pairs tokenised without entitylens.patching.pairs: from_texts + roles from find_roles."""
    tok = tiny_model.tokenizer
    out = []
    for line in w["pairs"].read_text().splitlines():
        rec = json.loads(line)
        roles = {}
        for side in ("clean", "corrupted"):
            text = rec[f"{side}_prompt"]
            _, offsets = tokenize_with_offsets(tok, text, prepend_bos=True)
            found = find_roles(text, offsets, ["query_box_desc", "query_box", "query_contains"])
            span = rec["role_spans"]["changed_object"][0 if side == "clean" else 1]
            roles[side] = {"query_box_desc": found["query_box_desc"],
                           "changed_object": span_to_token(offsets, tuple(span), "last"),
                           "query_box": found["query_box"], "query_contains": found["query_contains"]}  # fmt: skip
        out.append(
            PatchPair.from_texts(
                tok,
                rec["clean_prompt"],
                rec["corrupted_prompt"],
                rec["clean_answer"],
                rec["corrupted_answer"],
                clean_roles=roles["clean"],
                corrupted_roles=roles["corrupted"],
                bos=True,
            )  # fmt: skip
        )
    return out


def rows(path: Path, **where: str) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if all(r[k] == v for k, v in where.items())]


def num(x: str) -> float:
    return float("nan") if x == "" else float(x)


ROLES = ["query_box_desc", "changed_object", "query_box", "query_contains", "last"]


# ------------------------------------------------------------------------------------------- patch run


def test_patch_csv_equals_patch_grid_called_directly(tiny_model: Any, w: dict[str, Path], by_hand: list) -> None:
    manifest = json.loads((w["run_a"] / "run.json").read_text())
    entry = manifest["results"]["patch/resid_pre"]
    assert entry["cells"] == ROLES and entry["roles"] == ROLES[:-1] + ["last"]
    fast = patch_grid(tiny_model, by_hand, "resid_pre", roles=ROLES)
    hooks = patch_grid(tiny_model, by_hand, "resid_pre", roles=ROLES, method="hooks")
    mean = rows(w["run_a"] / "patch.csv", kind="activation", component="resid_pre", pair="mean")
    assert len(mean) == 2 * len(ROLES)
    for r in mean:
        li, ci = int(r["layer"]), ROLES.index(r["cell"])
        assert num(r["normalised"]) == pytest.approx(float(fast.mean()[li, ci]), abs=2e-6)
        assert num(r["logit_diff"]) == pytest.approx(float(fast.logit_diff[:, li, ci].mean()), abs=2e-6)
        assert num(r["prob"]) == pytest.approx(float(fast.prob[:, li, ci].mean()), abs=2e-6)
        assert num(r["top1"]) == pytest.approx(float(fast.top1[:, li, ci].float().mean()), abs=2e-6)
    per_pair = rows(w["run_a"] / "patch.csv", kind="activation", component="resid_pre")
    per_pair = [r for r in per_pair if r["pair"] != "mean"]
    assert len(per_pair) == 5 * 2 * len(ROLES)
    for r in per_pair:
        pi, li, ci = int(r["pair"]), int(r["layer"]), ROLES.index(r["cell"])
        # the reference engine (bridge hooks, eager attention) agrees on the raw metric
        assert num(r["logit_diff"]) == pytest.approx(float(hooks.logit_diff[pi, li, ci]), abs=1e-4)
        assert num(r["source_logit_diff"]) == pytest.approx(float(hooks.source_logit_diff[pi]), abs=1e-4)
        assert num(r["target_logit_diff"]) == pytest.approx(float(hooks.target_logit_diff[pi]), abs=1e-4)
    # stored result = the same numbers
    saved = PatchResult.load(w["run_a"] / "result_resid_pre.safetensors")
    torch.testing.assert_close(saved.normalised, fast.normalised, atol=1e-6, rtol=0, equal_nan=True)
    assert saved.pair_names == tuple(p.name for p in read_pairs(w["pairs"]))


def test_mean_rows_are_means_with_95_intervals(w: dict[str, Path]) -> None:
    table = rows(w["run_a"] / "patch.csv", kind="activation", component="resid_pre")
    for r in (r for r in table if r["pair"] == "mean"):
        vals = [num(x["normalised"]) for x in table
                if x["pair"] != "mean" and x["layer"] == r["layer"] and x["cell"] == r["cell"]]  # fmt: skip
        vals = [v for v in vals if math.isfinite(v)]
        assert int(r["n_pairs"]) == len(vals)
        m = statistics.fmean(vals)
        half = 1.96 * statistics.stdev(vals) / math.sqrt(len(vals))
        assert num(r["normalised"]) == pytest.approx(m, abs=1e-5)
        assert num(r["ci_low"]) == pytest.approx(m - half, abs=1e-4)
        assert num(r["ci_high"]) == pytest.approx(m + half, abs=1e-4)


def test_heatmaps_and_determinism(w: dict[str, Path], tmp_path: Path) -> None:
    import matplotlib.image as mpimg

    for name in ("patch_resid_pre.png", "attribution_resid_pre.png", "patch_head_z.png"):
        data = (w["run_a"] / name).read_bytes()
        assert data.startswith(PNG_MAGIC)
        assert mpimg.imread(w["run_a"] / name).shape[0] > 100
    # the same command into a fresh directory gives byte-identical outputs
    again = tmp_path / "again"
    assert main("patch", "run", "--model", "tiny:llama", "--pairs", str(w["pairs"]), "--component", "resid_pre",
                "--attribution", "--k", "4", "--out", str(again)) == 0  # fmt: skip
    for name in ("patch_resid_pre.png", "attribution_resid_pre.png", "agreement.json", "pairs_tokens.jsonl",
                 "result_resid_pre.safetensors"):  # fmt: skip
        assert (again / name).read_bytes() == (w["run_a"] / name).read_bytes(), name
    # run_a's patch.csv also holds the head_z rows merged in by the later run
    lines = (w["run_a"] / "patch.csv").read_text().splitlines()
    assert (again / "patch.csv").read_text().splitlines() == [x for x in lines if ",head_z," not in x]


def test_attribution_and_agreement(tiny_model: Any, w: dict[str, Path], by_hand: list) -> None:
    exact = PatchResult.load(w["run_a"] / "result_resid_pre.safetensors")
    approx = PatchResult.load(w["run_a"] / "attribution_resid_pre.safetensors")
    direct = attribution_grid(tiny_model, by_hand, "resid_pre", roles=ROLES)
    torch.testing.assert_close(approx.normalised, direct.normalised, atol=1e-5, rtol=1e-5, equal_nan=True)
    stored = json.loads((w["run_a"] / "agreement.json").read_text())["resid_pre"]
    want = agreement(exact, approx, k=4)
    assert stored["pair_mean"]["reasons"] == want.pop("reasons")
    assert {k: v for k, v in stored["pair_mean"].items() if k != "reasons"} == pytest.approx(want, nan_ok=True)
    # independent Pearson (numpy) over the finite pair-averaged cells
    a, b = exact.mean().flatten().numpy(), approx.mean().flatten().numpy()
    ok = np.isfinite(a) & np.isfinite(b)
    assert stored["pair_mean"]["pearson"] == pytest.approx(float(np.corrcoef(a[ok], b[ok])[0, 1]), abs=1e-6)
    assert stored["pair_mean"]["n_cells"] == int(ok.sum())
    attr_rows = rows(w["run_a"] / "patch.csv", kind="attribution", component="resid_pre", pair="mean")
    assert len(attr_rows) == 2 * len(ROLES) and all(r["prob"] == "" for r in attr_rows)


def test_head_grid_rows_merge_with_earlier_components(tiny_model: Any, w: dict[str, Path], by_hand: list) -> None:
    table = rows(w["run_a"] / "patch.csv")
    assert {r["component"] for r in table} == {"resid_pre", "head_z"}
    entry = json.loads((w["run_a"] / "run.json").read_text())["results"]["patch/head_z"]
    n_heads = int(tiny_model.cfg.n_heads)
    assert entry["cells"] == [f"H{h}" for h in range(n_heads)]
    roles = None if entry["roles"] == "all positions" else entry["roles"]
    direct = patch_grid(tiny_model, by_hand, "head_z", "layer_head", roles=roles)
    for r in rows(w["run_a"] / "patch.csv", component="head_z", pair="mean"):
        li, hi = int(r["layer"]), int(r["cell"][1:])
        assert num(r["normalised"]) == pytest.approx(float(direct.mean()[li, hi]), abs=2e-6)


def test_compare_draws_both_runs(w: dict[str, Path]) -> None:
    assert (w["cmp"] / "compare_resid_pre.png").read_bytes().startswith(PNG_MAGIC)
    a = PatchResult.load(w["run_a"] / "result_resid_pre.safetensors").mean()
    b = PatchResult.load(w["run_b"] / "result_resid_pre.safetensors").mean()
    assert not torch.allclose(a, b, equal_nan=True)  # two different models
    table = rows(w["cmp"] / "compare.csv", component="resid_pre")
    assert len(table) == a.numel()
    for r in table:
        li, ci = int(r["layer"]), ROLES.index(r["cell"])
        assert num(r["a"]) == pytest.approx(float(a[li, ci]), abs=2e-6)
        assert num(r["b"]) == pytest.approx(float(b[li, ci]), abs=2e-6)
        assert num(r["b_minus_a"]) == pytest.approx(float(b[li, ci] - a[li, ci]), abs=4e-6)


def test_cross_equals_cross_model_patch(tiny_model: Any, w: dict[str, Path], by_hand: list) -> None:
    from entitylens.models import load_model

    source = load_model("tiny:llama?seed=1")
    direct = cross_model_patch(source, tiny_model, by_hand, "resid_post", roles=ROLES)
    assert (w["cross"] / "cross_resid_post.png").read_bytes().startswith(PNG_MAGIC)
    table = rows(w["cross"] / "cross.csv", kind="cross_model", pair="mean")
    assert len(table) == 2 * len(ROLES)
    for r in table:
        li, ci = int(r["layer"]), ROLES.index(r["cell"])
        assert num(r["normalised"]) == pytest.approx(float(direct.mean()[li, ci]), abs=2e-6, nan_ok=True)
        assert num(r["source_logit_diff"]) == pytest.approx(float(direct.source_logit_diff.mean()), abs=2e-6)
    ident = json.loads((w["cross"] / "run.json").read_text())["identity"]
    assert ident["source_fingerprint"] != ident["target_fingerprint"]


# ---------------------------------------------------------------------------------------------- errors


def cli_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    capsys.readouterr()
    rc = main(*argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_cli_errors(w: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pairs = str(w["pairs"])
    before = (w["run_a"] / "patch.csv").read_bytes()
    msg = cli_error(capsys, "patch", "run", "--model", "tiny:llama", "--pairs", pairs, "--component", "resid",
                    "--out", str(tmp_path / "x"))  # fmt: skip
    assert "unknown component 'resid'" in msg
    msg = cli_error(capsys, "patch", "run", "--model", "tiny:llama", "--pairs", pairs, "--component", "head_z",
                    "--grid", "layer_role", "--out", str(tmp_path / "x"))  # fmt: skip
    assert "does not go with grid" in msg
    msg = cli_error(capsys, "patch", "pairs", "--data", str(w["data"]), "--kind", "swap", "--out",
                    str(tmp_path / "p.jsonl"))  # fmt: skip
    assert "unknown pair kind 'swap'" in msg
    msg = cli_error(capsys, "patch", "run", "--model", "tiny:llama?seed=1", "--pairs", pairs, "--component",
                    "resid_pre", "--out", str(w["run_a"]))  # fmt: skip
    assert "holds a patch run of other inputs" in msg and "--overwrite" in msg
    assert (w["run_a"] / "patch.csv").read_bytes() == before  # nothing already written is lost
    msg = cli_error(capsys, "patch", "run", "--model", "tiny:llama", "--pairs", pairs, "--component", "resid_pre",
                    "--roles", "query_box,op11_dest", "--out", str(tmp_path / "x"))  # fmt: skip
    assert "role 'op11_dest' is missing" in msg
    # pre-tokenised pairs of another tokenizer
    forged = tmp_path / "forged.jsonl"
    recs = [json.loads(x) for x in (w["run_a"] / "pairs_tokens.jsonl").read_text().splitlines()]
    for r in recs:
        r["tokenizer_fingerprint"] = "f" * 64
    forged.write_text("".join(json.dumps(r) + "\n" for r in recs))
    msg = cli_error(capsys, "patch", "run", "--model", "tiny:llama", "--pairs", str(forged), "--component",
                    "resid_pre", "--out", str(tmp_path / "x"))  # fmt: skip
    assert "another tokenizer" in msg
    # a pairs file whose answers are equal
    bad = tmp_path / "bad.jsonl"
    rec = json.loads(w["pairs"].read_text().splitlines()[0])
    rec["corrupted_answer"] = rec["clean_answer"]
    bad.write_text(json.dumps(rec) + "\n")
    msg = cli_error(capsys, "patch", "run", "--model", "tiny:llama", "--pairs", str(bad), "--component",
                    "resid_pre", "--out", str(tmp_path / "x"))  # fmt: skip
    assert "bad.jsonl line 1" in msg and "answers are both" in msg
    msg = cli_error(capsys, "patch", "compare", str(w["run_a"]), str(w["cross"]), "--out", str(tmp_path / "c"))
    assert "no activation result for a common component" in msg
    assert not (tmp_path / "x").exists()


def test_pre_tokenised_pairs_run_and_overwrite(w: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "tok"
    assert main("patch", "run", "--model", "tiny:llama", "--pairs", str(w["run_a"] / "pairs_tokens.jsonl"),
                "--component", "resid_pre", "--out", str(out)) == 0  # fmt: skip
    a = PatchResult.load(out / "result_resid_pre.safetensors")
    b = PatchResult.load(w["run_a"] / "result_resid_pre.safetensors")
    torch.testing.assert_close(a.normalised, b.normalised, atol=0, rtol=0, equal_nan=True)
    assert main("patch", "run", "--model", "tiny:llama?seed=1", "--pairs", str(w["pairs"]), "--component",
                "mlp_out", "--out", str(out), "--overwrite") == 0  # fmt: skip
    assert not (out / "result_resid_pre.safetensors").exists()  # the other model's files were replaced
    assert {r["component"] for r in rows(out / "patch.csv")} == {"mlp_out"}


def test_pairs_cli_is_deterministic(w: dict[str, Path], tmp_path: Path) -> None:
    again = tmp_path / "again.jsonl"
    assert main("patch", "pairs", "--data", str(w["data"]), "--kind", "op_object", "--max-pairs", "5",
                "--out", str(again)) == 0  # fmt: skip
    assert again.read_bytes() == w["pairs"].read_bytes()
    gen = tmp_path / "p24.jsonl"
    assert main("patch", "pairs", "--kind", "p24", "--max-pairs", "3", "--out", str(gen)) == 0
    assert [p.kind for p in read_pairs(gen)] == ["p24"] * 3


# ----------------------------------------------------------------------------------------------- SmolLM2


def test_smollm2_exact_attribution_and_outputs(smollm2: Any, tmp_path: Path) -> None:
    states = generate_states(GeneratorConfig(seed=1, num_states=12))
    pairs = build_pairs(states, "op_object", seed=0, max_pairs=2)
    last = int(smollm2.cfg.n_layers) - 1
    roles = ["changed_object", "query_box", "last"]
    pp = to_patch_pairs(smollm2, pairs, roles=roles)
    for tp, p in zip(pairs, pp):  # SmolLM2's bridge prepends no BOS: the prompt ids are to_tokens' ids
        ref = smollm2.to_tokens(tp.clean_prompt)[0]
        assert torch.equal(p.clean_tokens[: len(ref)], ref)
    exact = run_patching(smollm2, pp, "resid_post", roles=roles, layers=[0, last])
    # the last layer's residual at the scored position decides the logits: patching it restores the clean run
    torch.testing.assert_close(exact.normalised[:, 1, 2], torch.ones(2), atol=1e-3, rtol=0)
    approx = run_attribution(smollm2, pp, "resid_post", roles=roles, layers=[0, last])
    files = write_patch_outputs(tmp_path, exact, attribution=approx, k=3, label="smollm2")
    assert files["heatmap"].read_bytes().startswith(PNG_MAGIC)
    agree = json.loads(files["agreement"].read_text())["resid_post"]["pair_mean"]
    assert agree["n_cells"] == 6 and -1 <= agree["pearson"] <= 1
    # the first-order estimate of that cell (exactly 1) is only bent by the final RMSNorm: it points the same way
    assert float(approx.mean()[1, 2]) > 0.5


def test_compare_kinds_are_those_of_patch_csv(w: dict[str, Path], tmp_path: Path) -> None:
    kinds = {r["kind"] for r in rows(w["run_a"] / "patch.csv")}
    assert kinds == {"activation", "attribution"}
    for kind in (*sorted(kinds), "patch"):  # every kind patch.csv names works, and the short alias
        out = tmp_path / f"cmp-{kind}"
        assert main("--quiet", "patch", "compare", str(w["run_a"]), str(w["run_a"]), "--out", str(out),
                    "--kind", kind, "--component", "resid_pre") == 0  # fmt: skip
        assert {r["kind"] for r in rows(out / "compare.csv")} == {
            "attribution" if kind == "attribution" else "activation"
        }
    cross = {r["kind"] for r in rows(w["cross"] / "cross.csv")}
    out = tmp_path / "cmp-cross"
    assert main("--quiet", "patch", "compare", str(w["cross"]), str(w["cross"]), "--out", str(out), "--kind",
                cross.pop()) == 0  # fmt: skip
