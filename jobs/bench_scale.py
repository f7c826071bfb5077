"""Scale benchmark: N images -> wall, images/s, counts files, driver RSS, no-op re-run, 10% resume, aggregation.

    python -m jobs.bench_scale [--sizes 1000 5000 20000] [--num-cpus 2] [--work-dir DIR] [--set key=value ...]

Synthetic 16x16 images in 1,000-image Parquet shards, the demo's models, one sigma, n0 = n = 1,
through the real pipeline (pipeline.scale_bench) on one Ray session (an embedded local one, or
the cluster of ``ray job submit``). One line per size, then the figures as JSON.
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path
from typing import Sequence

from pipeline.ray_runtime import ray_session
from pipeline.scale_bench import ScaleResult, measure_scale


def main(argv: Sequence[str] | None = None) -> list[ScaleResult]:
    p = argparse.ArgumentParser(prog="python -m jobs.bench_scale", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000])
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the embedded Ray (not used on a cluster)")
    p.add_argument("--work-dir", default=None, help="folder for shards and runs (default: a temp dir)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp, ray_session(args.num_cpus, log_to_driver=False):
        work = Path(args.work_dir or tmp).resolve()
        for size in args.sizes:
            results.append(measure_scale(work, size, args.set))
            print(results[-1].line(), flush=True)
    print(json.dumps([r.record() for r in results]))
    return results


if __name__ == "__main__":
    main()
