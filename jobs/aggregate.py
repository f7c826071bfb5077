"""Aggregate a run's counts and/or legacy logs into certified-accuracy results, tables and a plot.

    python -m jobs.aggregate [RESULTS_URI] --out DIR [--sigmas S ...] [--cascade S,S,... ...]
        [--no-cascade] [--p0 P] [--alpha A] [--schedule bonferroni|bonferroni-fallthrough|paper] [--radii R ...]
        [--legacy NAME=PATH ...]

RESULTS_URI is a run directory ``{output}/{run_id}`` (counts/, errors/, manifest.json), a
counts directory or a Parquet file, on any fsspec URI (local, file://, s3:// with the
endpoint from AWS_ENDPOINT_URL). p0 / alpha / schedule default to the run manifest's
``smoothing`` section when there is one (so a cascade-mode run is re-traced with the
settings it sampled with), else to 0.5 / 0.001 / bonferroni. Without RESULTS_URI the
``--legacy`` logs are tabulated alone (published baselines by themselves; the counts options
then do not apply).

Writes results.parquet (per image), summary.csv, summary.md, summary.tex and
certified_accuracy.png into DIR and prints the markdown table (analysis.report). Everything
is computed and validated first; locally DIR is then replaced whole (all or nothing: bad input
or a failed write leaves DIR as it was). DIR may also be an fsspec URI (s3://...).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from analysis.report import render_report, write_report
from analysis.summary import DEFAULT_RADII
from pipeline.errors import MsdsmoothError
from pipeline.schedules import SCHEDULES


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.aggregate", description=__doc__.split("\n\n")[0])
    parser.add_argument("results_uri", nargs="?", help="run directory, counts directory or Parquet file (any fsspec "
                        "URI); optional with --legacy")
    parser.add_argument("--out", required=True, help="output directory: local path or any fsspec URI (s3://...)")
    parser.add_argument("--sigmas", type=float, nargs="+", help="single sigmas to certify (default: all present)")
    parser.add_argument("--cascade", action="append", default=None, metavar="S,S,...",
                        help="sigmas of a cascade; repeatable (default: one over --sigmas)")
    parser.add_argument("--no-cascade", action="store_true", help="single sigmas only")
    parser.add_argument("--p0", type=float, help="cascade threshold (default: manifest, else 0.5)")
    parser.add_argument("--alpha", type=float, help="failure probability (default: manifest, else 0.001)")
    parser.add_argument("--schedule", choices=SCHEDULES, help="cascade schedule (default: manifest, else bonferroni)")
    parser.add_argument("--radii", type=float, nargs="+",
                        help=f"radii of the table (default: a sequential run's grid, else {' '.join(map(str, DEFAULT_RADII))})")
    parser.add_argument("--legacy", action="append", default=[], metavar="NAME=PATH",
                        help="add a legacy per-image log (Cohen et al.'s 'idx label predict radius correct time' or "
                             "Jeong & Shin's 10-column format) as method NAME (no '=' in it); repeatable")
    args = parser.parse_args(argv)
    if args.results_uri is None and not args.legacy:
        parser.error("give RESULTS_URI (a counts run), --legacy NAME=PATH, or both")
    if args.cascade and args.no_cascade:
        parser.error("--cascade and --no-cascade exclude each other")
    try:
        args.cascade = None if args.cascade is None else [[float(s) for s in c.split(",")] for c in args.cascade]
    except ValueError:
        parser.error(f"--cascade takes comma-separated sigmas, got {args.cascade}")
    for item in args.legacy:
        if "=" not in item or not item.split("=", 1)[0]:
            parser.error(f"--legacy takes NAME=PATH, got {item!r}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = render_report(args.results_uri, args.sigmas, [] if args.no_cascade else args.cascade,
                               args.p0, args.alpha, args.schedule, args.radii,
                               [tuple(item.split("=", 1)) for item in args.legacy])
        write_report(args.out, report.files)
    except (MsdsmoothError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report.markdown, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
