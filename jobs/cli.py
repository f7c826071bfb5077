"""The command line shared by config-driven jobs: ``--config FILE [--set key=value ...]``."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Callable, Sequence

from pipeline.data import StorageError


def run_config_job(argv: Sequence[str] | None, description: str, example: str,
                   load: Callable[[str, Sequence[str]], Any], run: Callable[[Any], dict]) -> int:
    """Parse the arguments, load and validate the config, run; print the summary as JSON.

    A bad config or unreachable storage prints ``error: ...`` (naming the key) and returns 2.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML config (path or fsspec URI)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config value, e.g. {example} (YAML-parsed)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        summary = run(load(args.config, args.set))
    except (StorageError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, default=str))
    return 0
