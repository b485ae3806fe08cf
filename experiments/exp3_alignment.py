#!/usr/bin/env python
"""KST24 experiment 3: base models vs their chat/instruct versions on the boxes task (the paper's protocol).

Default pairs (registry): Llama-2 7B/13B/70B, Code Llama 7B/13B/70B, Gemma 2B/7B, CodeGemma 7B, DeepSeek-LLM 7B
and DeepSeek-Coder 7B v1.5, each vs its chat/instruct model (prompted through its chat template). Writes OUT
(default runs/exp3_alignment): the `entitylens eval` run directory plus paper_table.csv / paper_table.md and
estimate.json.

Examples::

    python experiments/exp3_alignment.py --device cuda --dtype bfloat16
    python experiments/exp3_alignment.py --estimate-only          # GPU time and memory, loads nothing

The same as `entitylens experiment alignment ...` (src/entitylens/pipelines/experiment.py); see experiments/README.md.
"""

import sys

from entitylens.cli import main

if __name__ == "__main__":
    sys.exit(main(["experiment", "alignment", *sys.argv[1:]]))
