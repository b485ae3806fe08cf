"""argparse's own usage errors come out as one ``error: ...`` line with exit status 2, like every other error."""

from __future__ import annotations

import pytest

from entitylens.cli import main


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["probe", "--bogus"], "unrecognized arguments: --bogus"),
        (["nosuch"], "invalid choice: 'nosuch'"),
        (["demo", "--stages", "eval", "patch"], "unrecognized arguments: patch"),
        (["patch", "das", "--k", "x"], "'x' must be comma-separated integers"),
        (["probe", "--estimator", "lasso"], "invalid choice: 'lasso'"),
    ],
)
def test_usage_errors_are_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: entitylens") and err.count("\n") == 1
    assert message in err and "--help`" in err
    assert "usage:" not in err
