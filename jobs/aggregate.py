"""Aggregate a run's counts into certified-accuracy results, tables and a plot.

    python -m jobs.aggregate RESULTS_URI --out DIR [--sigmas S ...] [--cascade S,S,... ...]
        [--no-cascade] [--p0 P] [--alpha A] [--schedule bonferroni|paper] [--radii R ...]
        [--legacy NAME=PATH ...]

RESULTS_URI is a run directory ``{output}/{run_id}`` (counts/, errors/, manifest.json), a
counts directory or a Parquet file, on any fsspec URI (local, file://, s3:// with the
endpoint from AWS_ENDPOINT_URL). p0 / alpha / schedule default to the run manifest's
``smoothing`` section when there is one (so a cascade-mode run is re-traced with the
settings it sampled with), else to 0.5 / 0.001 / bonferroni.

Writes results.parquet (per image), summary.csv, summary.md, summary.tex and
certified_accuracy.png into DIR and prints the markdown table. Everything is computed and
validated first; the files are then written to a temporary sibling directory and moved
into DIR, so bad input leaves DIR untouched. DIR may also be an fsspec URI (s3://...).
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import uuid
from collections.abc import Mapping, Sequence

import fsspec
from fsspec.implementations.local import LocalFileSystem

from analysis import (
    DEFAULT_RADII,
    certify_table,
    concat_results,
    plot_certified_accuracy,
    read_counts,
    read_legacy_log,
    resolve_run,
    skipped_images,
    summarize,
    to_latex,
    to_markdown,
    validate_counts,
)

DEFAULTS = {"p0": 0.5, "alpha": 0.001, "schedule": "bonferroni"}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.aggregate", description=__doc__.split("\n\n")[0])
    parser.add_argument("results_uri", help="run directory, counts directory or Parquet file (any fsspec URI)")
    parser.add_argument("--out", required=True, help="output directory: local path or any fsspec URI (s3://...)")
    parser.add_argument("--sigmas", type=float, nargs="+", help="single sigmas to certify (default: all present)")
    parser.add_argument("--cascade", action="append", default=None, metavar="S,S,...",
                        help="sigmas of a cascade; repeatable (default: one over --sigmas)")
    parser.add_argument("--no-cascade", action="store_true", help="single sigmas only")
    parser.add_argument("--p0", type=float, help="cascade threshold (default: manifest, else 0.5)")
    parser.add_argument("--alpha", type=float, help="failure probability (default: manifest, else 0.001)")
    parser.add_argument("--schedule", choices=("bonferroni", "paper"), help="cascade alpha schedule")
    parser.add_argument("--radii", type=float, nargs="+", default=list(DEFAULT_RADII), help="radii of the table")
    parser.add_argument("--legacy", action="append", default=[], metavar="NAME=PATH",
                        help="add a legacy per-image log (idx label predict radius correct time) as method NAME (no '=' in it); repeatable")
    args = parser.parse_args(argv)
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


def render(args: argparse.Namespace) -> tuple[dict[str, bytes], str]:
    """Every output file's bytes, and the markdown table (raises before anything is written)."""
    run = resolve_run(args.results_uri)
    counts = validate_counts(read_counts(run))
    manifest = run.read_manifest()
    run_settings = manifest.get("config", manifest).get("smoothing") or {}
    settings = {k: getattr(args, k) if getattr(args, k) is not None else run_settings.get(k, v)
                for k, v in DEFAULTS.items()}
    results = certify_table(counts, args.sigmas, [] if args.no_cascade else args.cascade, **settings)
    legacy = [read_legacy_log(path, name) for name, path in (item.split("=", 1) for item in args.legacy)]
    results = concat_results([results, *legacy])
    summary = summarize(results, args.radii)
    skipped = skipped_images(run, counts.image_ids) if run.errors else None
    markdown = to_markdown(summary, args.radii, skipped)
    parquet = io.BytesIO()
    results.to_parquet(parquet, index=False)
    settings_line = (f"{args.results_uri} ({counts.sigma.size} counts rows, {counts.image_ids.size} images); "
                     + ", ".join(f"{k}={v}" for k, v in settings.items()))
    files = {
        "results.parquet": parquet.getvalue(),
        "summary.csv": summary.to_csv(index=False).encode(),
        "summary.md": f"Settings: {settings_line}\n\n{markdown}".encode(),
        "summary.tex": f"% Settings: {settings_line}\n{to_latex(summary, args.radii, skipped)}".encode(),
        "certified_accuracy.png": plot_certified_accuracy(results),
    }
    return files, markdown


def write_outputs(out: str, files: Mapping[str, bytes]) -> None:
    """Write ``files`` into ``out``, a local directory or any fsspec URI (e.g. s3://).

    Locally via a temporary sibling directory (no partial output); on object storage each
    file is one atomic put. Either way nothing is written before every file is rendered.
    """
    fs, path = fsspec.core.url_to_fs(out)
    if not isinstance(fs, LocalFileSystem):
        fs.makedirs(path, exist_ok=True)
        for name, data in files.items():
            fs.pipe_file(f"{path.rstrip('/')}/{name}", data)
        return
    out = os.path.abspath(path)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{os.path.basename(out)}.tmp-{uuid.uuid4().hex}")
    os.makedirs(staging)
    try:
        for name, data in files.items():
            with open(os.path.join(staging, name), "wb") as f:
                f.write(data)
        if not os.path.exists(out):
            os.rename(staging, out)
            return
        for name in files:
            os.replace(os.path.join(staging, name), os.path.join(out, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        files, markdown = render(args)
    except (ValueError, FileNotFoundError) as exc:  # CountsError, LegacyLogError are ValueErrors
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_outputs(args.out, files)
    print(markdown, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
