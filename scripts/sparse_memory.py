"""Peak memory of sparse decode steps, split by what allocated it (kvtier.bench.sparse_memory).

    PYTHONPATH=src python scripts/sparse_memory.py --device cpu --layers 2 --context 65536 --dtype bfloat16
    PYTHONPATH=src python scripts/sparse_memory.py --device cuda --layers 4 --context 131072 --prefetch-blocks 4

Runs unchanged on CUDA, where it also reports torch.cuda.max_memory_allocated over the same steps.
"""

import sys

from kvtier.bench.sparse_memory import main

if __name__ == "__main__":
    sys.exit(main())
