#!/usr/bin/env python
"""Memory one rank's kNN monitor (pipeline/evaluation/knn.py, KNNMonitor) holds, from its sizes: computed, not
measured. The defaults are ImageNet's train bank and validation queries with ResNet-50 features on 8 ranks.

    python tools/knn_memory.py                                   # ImageNet, 8 ranks
    python tools/knn_memory.py --world 1 --bank 50000 --queries 10000 --dim 512

Two moments compete for the peak: the bank share's per-batch pieces being concatenated (twice the share), and the
search (the share, the queries, one chunk's similarity matrix and every rank's top-k candidates for the chunk). The
features a batch yields (float32, micro batch x dim) and the encoder's activations come on top; the former gathered
float32 bank is printed for comparison.
"""

from __future__ import annotations

import argparse
import math

from pipeline.arg_types import positive_int
from pipeline.evaluation.knn import KNNMonitor

LABEL, SCORE = 8, 4  # bytes of an int64 label and of a float32 candidate similarity


def budget(bank: int, queries: int, dim: int, world: int, k: int, chunk_size: int, item: int) -> dict[str, float]:
    share, local_queries, rows = math.ceil(bank / world), math.ceil(queries / world), world * chunk_size
    parts = {
        "bank share": share * (dim * item + LABEL),
        "local queries": local_queries * (dim * item + LABEL),
        "gathered query chunk": rows * dim * item,
        "similarity matrix": rows * share * item,
        # this rank's top-k for the chunk, and every rank's, gathered (padded copy and received list)
        "top-k candidates": (1 + 2 * world) * rows * k * (SCORE + LABEL),
    }
    concat = 2 * parts["bank share"] + parts["local queries"]
    search = sum(parts.values())
    return {**parts, "peak while concatenating the share": concat, "peak while searching": search,
            "peak": max(concat, search), "gathered fp32 bank (before)": bank * (dim * 4 + LABEL)}


def main(argv=None) -> None:
    defaults = KNNMonitor(num_classes=1)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bank", type=positive_int, default=1_281_167, help="bank rows, all ranks (ImageNet train)")
    p.add_argument("--queries", type=positive_int, default=50_000, help="query rows, all ranks (ImageNet val)")
    p.add_argument("--dim", type=positive_int, default=2048, help="feature dimension (ResNet-50)")
    p.add_argument("--world", type=positive_int, default=8)
    p.add_argument("--k", type=positive_int, default=defaults.k)
    p.add_argument("--chunk-size", type=positive_int, default=defaults.chunk_size, help="queries per rank per round")
    args = p.parse_args(argv)
    sizes = budget(args.bank, args.queries, args.dim, args.world, args.k, args.chunk_size,
                   defaults.bank_dtype.itemsize)
    print(f"kNN monitor, one of {args.world} ranks: bank {args.bank:,} x {args.dim} in {defaults.bank_dtype}, "
          f"{args.queries:,} queries, k={args.k}, chunk {args.chunk_size} per rank")
    for name, size in sizes.items():
        print(f"  {name:<36} {size / 1e9:8.3f} GB")


if __name__ == "__main__":
    main()
