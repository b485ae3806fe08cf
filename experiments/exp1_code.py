#!/usr/bin/env python
"""KST24 experiment 1: base vs code-trained models on the boxes task (the paper's protocol).

Default pairs (registry): Llama-2 7B/13B/70B -> Code Llama, DeepSeek-LLM-7B -> DeepSeek-Coder-7B-v1.5,
Gemma-7B -> CodeGemma-7B. Writes OUT (default runs/exp1_code): the `entitylens eval` run directory plus
paper_table.csv / paper_table.md (our numbers beside the paper's) and estimate.json.

Examples::

    python experiments/exp1_code.py --device cuda --dtype bfloat16                    # all pairs, GPU box
    python experiments/exp1_code.py --shard 0/4 --out runs/exp1_code-0                # one of 4 machines
    python experiments/exp1_code.py --merge runs/exp1_code-{0,1,2,3} --out runs/exp1_code
    python experiments/exp1_code.py --models tiny:llama 'tiny:llama?seed=1' --device cpu --dtype float32 --limit 3

The same as `entitylens experiment code ...` (src/entitylens/pipelines/experiment.py); see experiments/README.md.
"""

import sys

from entitylens.cli import main

if __name__ == "__main__":
    sys.exit(main(["experiment", "code", *sys.argv[1:]]))
