"""`from entitylens.behavior import evaluate` is the function, even after its submodule was imported."""

import subprocess
import sys


def test_evaluate_is_the_function_in_a_fresh_interpreter() -> None:
    code = (
        "import importlib, inspect\n"
        "importlib.import_module('entitylens.behavior.evaluate')\n"  # submodule imported first
        "from entitylens.behavior import evaluate, EvalConfig, run_eval\n"
        "from entitylens.behavior.evaluate import evaluate as direct\n"
        "assert inspect.isfunction(evaluate) and evaluate is direct, evaluate\n"
        "import entitylens.behavior as pkg\n"
        "assert pkg.evaluate is direct and pkg.EvalConfig is EvalConfig\n"
        "import sys; assert inspect.ismodule(sys.modules['entitylens.behavior.evaluate'])\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_readme_example_imports() -> None:
    code = (
        "from entitylens.behavior import EvalConfig, evaluate, compare\n"
        "from entitylens.task import GeneratorConfig, generate_states\n"
        "states = generate_states(GeneratorConfig(seed=0, num_states=3))\n"
        "a, b = evaluate('nothing', states), evaluate('initial', states)\n"
        "assert len(a.predictions) == 21 and len(compare([a, b])) > 0\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_evaluate_creates_a_missing_run_dir_and_refuses_a_file(tmp_path) -> None:
    import pytest

    from entitylens.behavior import evaluate
    from entitylens.errors import EntitylensError
    from entitylens.task import GeneratorConfig, generate_states

    states = generate_states(GeneratorConfig(seed=0, num_states=2))
    evaluate("nothing", states, run_dir=tmp_path / "new" / "run")
    assert len((tmp_path / "new" / "run" / "predictions.jsonl").read_text().splitlines()) == 14
    (tmp_path / "file").write_text("keep me")
    with pytest.raises(EntitylensError, match="is a file"):
        evaluate("nothing", states, run_dir=tmp_path / "file")
    assert (tmp_path / "file").read_text() == "keep me"
