"""Inference-time mitigation measured on a lab model (issue 14): the same as ``memaudit lab mitigation --json``
(the logic is :mod:`audit.lab.mitigation`), writing the JSON to a file.

Usage: python benchmarks/mitigation_lab.py --model LAB_MODEL_DIR --prompts LAB_PROMPTS.parquet [--json OUT]
       [--c1 1.1 --c1 1.25 --c1 1.5] [--guidance 7.5] [--split test] [--limit N] [--no-mask-summary]
"""

from audit.lab.mitigation import main

if __name__ == "__main__":
    main()
