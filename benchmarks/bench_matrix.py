"""The benchmark matrix: ``vllm-medusa bench`` (see :mod:`vllm_medusa.bench`).

python benchmarks/bench_matrix.py [--mode server|offline] [--concurrency 1 4 16 64]
    [--configs ngram vllm-chain tree-full tree-auto [...+preload]] [--quick]
"""

import sys

from vllm_medusa.bench import main

if __name__ == "__main__":
    sys.exit(main())
