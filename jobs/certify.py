"""Certification job: shards -> decode/resize (CPU tasks) -> Monte Carlo counts (actor pool) -> Parquet.

    python -m jobs.certify --config configs/imagenet.yaml [--set smoothing.n=1000 ...]

and the same line after ``ray job submit --working-dir . --``. The run and its guarantees
(fail-fast storage checks, resume, every row exactly once) are
:func:`pipeline.certify_run.run_certification`'s.
"""
from __future__ import annotations

import sys
from typing import Sequence

from jobs.cli import run_config_job
from pipeline.certify_run import run_certification
from pipeline.config import load_config


def main(argv: Sequence[str] | None = None) -> int:
    return run_config_job(argv, __doc__.split("\n")[0], "smoothing.n0=100", load_config, run_certification)


if __name__ == "__main__":
    sys.exit(main())
