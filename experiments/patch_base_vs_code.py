#!/usr/bin/env python
"""Patching study for a (base, code) model pair: activation patching grids of both models, side by side.

Builds clean/corrupted pairs (OUT/pairs.jsonl), patches every (layer x role) cell of both models
(OUT/patch/base, OUT/patch/variant: patch.csv, heatmap, safetensors, run.json; reused when unchanged),
and draws both heatmaps side by side on one colour scale (OUT/compare/compare_<component>.png, with the
numbers in OUT/compare/compare.csv). With --attribution, attribution patching runs too and its agreement
with exact patching is reported (agreement.json; OUT/compare-attribution). For large models a GPU-time
estimate is printed first.

Examples::

    python experiments/patch_base_vs_code.py --device cuda --dtype bfloat16 --pairs 50 --yes
    python experiments/patch_base_vs_code.py --base testbed:base --variant testbed:code --attribution

The same as `entitylens study patch ...` (src/entitylens/pipelines/patch_study.py, which documents OUT).
"""

import sys

from entitylens.cli import main

if __name__ == "__main__":
    sys.exit(main(["study", "patch", *sys.argv[1:]]))
