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
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
# pytest exit code 5 means "no tests collected": that is a failure here.
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
exit "$rc"
