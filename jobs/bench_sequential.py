"""Simulated benchmark: sequential against fixed certification, same n_max and alpha (prints figures).

    python -m jobs.bench_sequential [--counts RUN] [--images 40000] [--n-max 10000] [--alpha 0.001]
                                    [--compare-methods] [--seed 0]
    python -m jobs.bench_sequential --real [--real-images 8] [--n-max 10000] [--set key=value ...]

``--real``: the demo's models on real digits (pipeline.time_to_table.fixed_vs_sequential), fixed
against sequential sampling in full and cascade mode: samples per (image, sigma) per sigma, wall
time and both certified tables. Otherwise a simulation:

From per-(image, sigma) true probabilities of the selected class it draws binomial counts and
runs, on the same draws, the fixed protocol (n = n_max, Clopper-Pearson at alpha) and the
sequential ones (the issue's plain rule and the project's plan, :class:`pipeline.sequential.
SequentialPlan.geometric`; with ``--compare-methods`` also a mixture confidence sequence):
mean samples per (image, sigma) per sigma, the ratio, and certified accuracy at every grid
radius. Sources: the ImageNet protocol (sigmas 0.25, 0.5, 1.0, grid 0, 0.5, ..., 3.0) from
``analysis.sequential_sim.imagenet_like``; with ``--counts``, also a counts run (e.g. the demo's
digits, grid 0, 0.25, ..., 2.0) with each row's empirical top-class frequency as p.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

from analysis import read_counts, resolve_run, validate_counts
from analysis.sequential_sim import (DIGITS_RADII, IMAGENET_RADII, compare_rules, format_comparison,
                                     imagenet_like, pairs_from_counts)
from pipeline.sequential import SequentialPlan


def _report(title: str, pairs, radii, args) -> None:
    plan = SequentialPlan.geometric(args.n_max, args.alpha, radii, sorted(pairs))
    start = time.perf_counter()
    results = compare_rules(pairs, plan, methods=args.compare_methods, seed=args.seed)
    print(f"### {title}: n_max = {args.n_max}, alpha = {args.alpha}, looks {list(plan.looks)}")
    for name, comparisons in results.items():
        print(format_comparison(name, radii, comparisons))
    print(f"(simulated in {time.perf_counter() - start:.1f} s)\n")


def run_real(args) -> None:
    import logging
    import tempfile
    from pathlib import Path

    from pipeline.time_to_table import fixed_vs_sequential, sampling_lines

    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench-sequential-") as tmp:
        runs = fixed_vs_sequential(Path(tmp), args.real_images, args.n0, args.n_max,
                                   overrides=[f"smoothing.alpha={args.alpha}", *args.set])
    print(f"### demo models, real digits: n0 = {args.n0}, n_max = {args.n_max}, alpha = {args.alpha}")
    for line in sampling_lines(runs):
        print(line)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench_sequential", description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", help="a counts run (directory, counts folder or file) to take probabilities from")
    parser.add_argument("--images", type=int, default=40_000, help="simulated ImageNet images")
    parser.add_argument("--n-max", type=int, default=10_000)
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--compare-methods", action="store_true",
                        help="also simulate a mixture confidence sequence (the choice of method)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--real", action="store_true", help="certify real digits with the demo's models instead")
    parser.add_argument("--real-images", type=int, default=8, help="--real: digits of the demo's selection")
    parser.add_argument("--n0", type=int, default=100, help="--real: selection samples")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="--real: override a configs/demo.yaml value (every run)")
    args = parser.parse_args(argv)
    if args.real:
        return run_real(args)
    _report(f"ImageNet protocol, {args.images} simulated images", imagenet_like(args.images, args.seed),
            IMAGENET_RADII, args)
    if args.counts:
        table = validate_counts(read_counts(resolve_run(args.counts)))
        _report(f"counts run {args.counts}", pairs_from_counts(table), DIGITS_RADII, args)


if __name__ == "__main__":
    main()
