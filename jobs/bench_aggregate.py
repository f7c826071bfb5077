"""Benchmark of the aggregation step at ImageNet scale (prints seconds and row counts).

    python -m jobs.bench_aggregate [--images 50000] [--sigmas 0.25 0.5 1.0] [--classes 1000] [--dir DIR]

Synthesises a realistic sparse counts table (a dominant class plus 5-30 other nonzero
classes per row, n0 = 100, n = 10,000), writes it as Parquet, then times, end to end,
reading + validation, CERTIFY at every sigma plus one cascade over all sigmas, and the
summary. Target: under 15 s for 50,000 images x 3 sigmas on 2 cores.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Sequence

import pyarrow.parquet as pq

from analysis import certify_table, read_counts, resolve_run, summarize, validate_counts
from analysis.synthetic import synthetic_counts
from pipeline.schedules import SCHEDULES


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench_aggregate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--schedule", choices=SCHEDULES, default="bonferroni")
    parser.add_argument("--dir", help="where to write the Parquet table (default: a temporary directory)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        root = args.dir or scratch
        os.makedirs(f"{root}/counts", exist_ok=True)
        start = time.perf_counter()
        table = synthetic_counts(args.images, args.sigmas, args.classes)
        pq.write_table(table, f"{root}/counts/part-0.parquet")
        print(f"synthesised {table.num_rows} rows ({args.images} images x {len(args.sigmas)} sigmas, "
              f"C={args.classes}, {len(table['counts_classes'].combine_chunks().values)} nonzero counts) "
              f"in {time.perf_counter() - start:.1f} s")
        del table
        times = {}
        start = time.perf_counter()
        run = resolve_run(root)
        raw = read_counts(run)
        times["read"] = time.perf_counter() - start
        counts = validate_counts(raw)
        times["validate"] = time.perf_counter() - start - sum(times.values())
        results = certify_table(counts, schedule=args.schedule)
        times["certify"] = time.perf_counter() - start - sum(times.values())
        summary = summarize(results)
        times["summarize"] = time.perf_counter() - start - sum(times.values())
        total = time.perf_counter() - start
    print(" ".join(f"{k}={v:.2f}s" for k, v in times.items()))
    print(f"total {total:.2f} s: {raw.num_rows} counts rows -> {len(results)} result rows, "
          f"{len(summary)} methods ({', '.join(summary['method'])})")


if __name__ == "__main__":
    main()
