"""The command line shared by config-driven jobs: ``--config FILE [--set key=value ...]``."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Callable, Sequence

from pipeline.errors import MsdsmoothError


def is_ray_error(exc: BaseException) -> bool:
    """Whether ``exc`` comes from a Ray task or actor (Ray subclasses the remote error's type)."""
    return any(cls.__module__.startswith("ray.") for cls in type(exc).__mro__)


def run_config_job(argv: Sequence[str] | None, description: str, example: str,
                   load: Callable[[str, Sequence[str]], Any], run: Callable[[Any], dict]) -> int:
    """Parse the arguments, load and validate the config, run; print the summary as JSON.

    The project's own errors (a bad config, unreachable storage, bad data: :class:`MsdsmoothError`)
    print ``error: ...`` (naming the key) and return 2; anything else, including a failure inside a
    Ray task, keeps its traceback.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML config (path or fsspec URI)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config value, e.g. {example} (YAML-parsed)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        summary = run(load(args.config, args.set))
    except MsdsmoothError as exc:
        if is_ray_error(exc):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, default=str))
    return 0
