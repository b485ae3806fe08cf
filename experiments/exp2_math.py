#!/usr/bin/env python
"""KST24 experiment 2: models vs their math-trained variants on the boxes task (the paper's protocol).

Default pairs (registry): Code Llama 7B/34B -> Llemma 7B/34B, DeepSeek-Coder-7B-v1.5 -> DeepSeek-Math-7B,
LLaMA-7B -> FLoat-7B, Mistral-7B -> OpenMath-Mistral-7B. Writes OUT (default runs/exp2_math): the
`entitylens eval` run directory plus paper_table.csv / paper_table.md and estimate.json.

Examples::

    python experiments/exp2_math.py --device cuda --dtype bfloat16
    python experiments/exp2_math.py --models smollm2-135m-instruct random --device cpu --dtype float32 --limit 2

The same as `entitylens experiment math ...` (src/entitylens/pipelines/experiment.py); see experiments/README.md.
"""

import sys

from entitylens.cli import main

if __name__ == "__main__":
    sys.exit(main(["experiment", "math", *sys.argv[1:]]))
