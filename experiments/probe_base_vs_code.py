#!/usr/bin/env python
"""Probing study for a (base, code) model pair: linear probes by layer on both models, side by side.

Caches both models' residual streams on the same prompts (OUT/cache/base, OUT/cache/variant; resumable),
probes every layer of each (OUT/probe/base, OUT/probe/variant), and writes the comparison figure
OUT/compare/probe_compare.png, the per-layer differences OUT/compare/probe_diff.csv and the best layer
per model and role OUT/summary.csv. For large models a GPU-time estimate is printed first.

Examples::

    python experiments/probe_base_vs_code.py --device cuda --dtype bfloat16 --yes          # llama2-7b vs codellama-7b
    python experiments/probe_base_vs_code.py --base testbed:base --variant testbed:code --states 240
    python experiments/probe_base_vs_code.py --base testbed:base --variant testbed:code --random-control

The same as `entitylens study probe ...` (src/entitylens/pipelines/probe_study.py, which documents OUT).
"""

import sys

from entitylens.cli import main

if __name__ == "__main__":
    sys.exit(main(["study", "probe", *sys.argv[1:]]))
