"""Data parallelism for ``entitylens eval``: N worker processes, one shard each, merged into one run.

``entitylens eval ... --data-parallel-size N`` starts N copies of the same evaluation, worker ``k`` on shard
``k/N`` of the dataset (``--shard k/N``) with its own devices (``CUDA_VISIBLE_DEVICES``: ``k``'s group of
``--tensor-parallel-size`` GPUs, when that many are visible), writing to ``<out>.dp<N>/shard-<k>``; when
all have finished, :func:`~entitylens.behavior.combine.merge_runs` combines them into ``--out``. The
workers are ordinary resumable runs, so rerunning the same command after a crash finishes only what is
missing. Works with either engine (vLLM's own offline data parallelism needs one process per rank too);
across nodes, run the shards as a job array and merge (docs/reproduce-the-paper.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from entitylens.behavior.combine import merge_runs
from entitylens.behavior.evaluate import EvalResult
from entitylens.errors import EntitylensError

__all__ = ["shard_dirs", "run_data_parallel"]


def shard_dirs(out: Path, n: int) -> list[Path]:
    """The workers' run directories of ``--out out --data-parallel-size n``: ``<out>.dp<n>/shard-<k>``."""
    return [out.parent / f"{out.name}.dp{n}" / f"shard-{k}" for k in range(n)]


def _visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip()]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except ImportError:  # pragma: no cover
        return []


def run_data_parallel(eval_args: Sequence[str], n: int, out: Path, gpus_per_worker: int = 1) -> list[EvalResult]:
    """Run ``entitylens eval <eval_args>`` as ``n`` shard workers in parallel, then merge them into ``out``.

    Args:
        eval_args: The ``eval`` arguments of one worker, without ``--shard``, ``--out`` and
            ``--data-parallel-size``.
        n: Number of workers.
        out: The merged run directory.
        gpus_per_worker: GPUs each worker gets (its tensor-parallel size) when enough are visible.

    Returns:
        The merged results, one per model.

    Raises:
        EntitylensError: A worker failed (its log named; rerun the same command to resume).
    """
    if n < 1:
        raise EntitylensError(f"--data-parallel-size must be >= 1, got {n}")
    dirs = shard_dirs(out, n)
    gpus = _visible_gpus()
    procs = []
    for k, d in enumerate(dirs):
        d.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        if len(gpus) >= n * gpus_per_worker:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[k * gpus_per_worker:(k + 1) * gpus_per_worker])
        cmd = [sys.executable, "-m", "entitylens", "--quiet", "eval", *eval_args, "--shard", f"{k}/{n}",
               "--out", str(d)]
        log = open(d.parent / f"shard-{k}.log", "ab")  # noqa: SIM115  # closed below, after the wait
        procs.append((k, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    failed = []
    for k, p, log in procs:
        rc = p.wait()
        log.close()
        if rc != 0:
            failed.append(f"worker {k} (exit {rc}; log {dirs[k].parent / f'shard-{k}.log'})")
    if failed:
        raise EntitylensError(f"data-parallel {', '.join(failed)} failed; read its log, fix, and rerun the same "
                              "command (finished states are kept)")
    return merge_runs(dirs, out)
