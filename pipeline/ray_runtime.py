"""The one place a job gets its Ray: the running one, the cluster it was submitted to, or a local one.

Guarantees of :func:`ray_session`:
* Ray already initialised in this process (a test's cluster, a caller's): used as it is, and
  left running.
* ``RAY_ADDRESS`` set (``ray job submit`` sets it for the driver): ``ray.init()`` connects to
  that cluster and asks for no resources (a cluster's resources are its own); the connection is
  closed on exit, the cluster keeps running.
* Otherwise: a new local Ray (``address="local"``, never another session's cluster on the same
  machine) with ``num_cpus`` CPUs (None: all of them) and ``RAY_AUTH_MODE=disabled`` unless the
  environment says otherwise; shut down on exit. Its dashboard, which serves Ray's state API, runs
  only when ``dashboard`` is set: Ray Train's placement-group cleaner polls that API to see whether
  the training controller still lives (without it, it logs a warning at every poll and could not
  release the workers' placement group after a lost driver); certification needs no dashboard,
  and its process would only take CPU from the actors.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def ray_session(num_cpus: int | None = None, log_to_driver: bool = True, dashboard: bool = False) -> Iterator[None]:
    """Ray for the ``with`` block (see the module docstring); shuts down only what it started."""
    import ray

    if ray.is_initialized():
        yield
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=log_to_driver)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard, log_to_driver=log_to_driver)
    try:
        yield
    finally:
        ray.shutdown()
