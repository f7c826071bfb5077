"""Robustness scenarios of issue 11 through the real certification command line, in a temporary
folder with tiny random-weight models, printed as one table (see :mod:`pipeline.robustness`).

    python -m jobs.robustness_check [--keep DIR]
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from jobs.cli import run_config_job
from pipeline.certify_run import run_certification
from pipeline.config import load_config
from pipeline.robustness import run_scenarios, to_table


def certify(argv: Sequence[str]) -> int:
    """``python -m jobs.certify ARGV``, in this process (same CLI, same exit codes)."""
    return run_config_job(argv, "certify", "smoothing.n0=100", load_config, run_certification)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep", help="run in this (new) folder and keep it, instead of a temporary one")
    args = parser.parse_args(argv)
    logging.disable(logging.INFO)  # the table is the output
    if args.keep:
        outcomes = run_scenarios(Path(args.keep), certify)
    else:
        with tempfile.TemporaryDirectory(prefix="msdsmooth-robustness-") as tmp:
            outcomes = run_scenarios(Path(tmp), certify)
    print(to_table(outcomes))
    bad = [o for o in outcomes if o.lost > 0 or o.duplicated > 0]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
