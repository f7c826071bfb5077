"""Whether the run's resource requests can ever be met on the Ray cluster, decided before any work.

Ray queues a task or actor whose resources no node can hold and waits forever (one warning in the
log). :func:`check_resources` compares each request of a certification run (one actor and the
probe task: ``compute.cpus_per_actor`` CPUs with ``compute.gpus_per_actor`` GPUs on one node; one
decode task: ``compute.cpus_per_task`` CPUs) with the nodes of the cluster:

* Some alive node can hold the request (even if it is busy now): fine, the run goes on.
* No alive node can, and an autoscaler can add a node that does: a WARNING says what the run waits
  for (the keys, the amounts), and the run goes on waiting for the autoscaler.
* Otherwise: :class:`pipeline.config.ConfigError` naming the ``compute.*`` keys, the request and
  the largest node, before any model is loaded (``jobs.*`` print it as ``error: ...``, exit 2).

The same three outcomes for the run as a whole (:func:`pool_unmet`): the ``compute.actors``
actors and one task beside them must fit in the cluster's total CPUs and GPUs at once. That task
is a decode task (``compute.cpus_per_task`` CPUs) or one of Ray Data's own tasks that list, read
and repartition the shards, which take Ray Data's default of 1 CPU (:data:`RAY_DATA_TASK_CPUS`;
no config key sets it). The actor pool starts first, so without that room the read never runs
and the run waits until Ray Data's no-progress timeout (30 minutes). Per node the same holds
after a node is lost: a node's restarted actors must leave it room for the tasks they must redo,
so size nodes to hold their actors plus one such task (the README's cluster section).

Whether an autoscaler can add nodes is the environment's ``MSDSMOOTH_AUTOSCALER`` (a property of
the cluster, not of the run; for ``ray job submit``, set it on the head or in the runtime env):

* ``auto`` (default): the cluster config that Ray's autoscaler (v2, e.g. KubeRay with autoscaler
  v2) publishes in the GCS, the signal Ray Data itself reads: the node groups it may still start
  (``max_count`` > 0 or unlimited), each with its per-node resources. No such config: no autoscaler.
* ``true``: an autoscaler that publishes no node groups (autoscaler v1: ``ray up``, KubeRay's
  in-tree autoscaler without v2) can add nodes of any shape: never refused, the run waits.
* ``false``: no autoscaler, whatever Ray says.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from pipeline.config import ConfigError

log = logging.getLogger(__name__)

AUTOSCALER_ENV = "MSDSMOOTH_AUTOSCALER"
ANY_SHAPE = None  # an autoscaler whose node shapes are unknown (MSDSMOOTH_AUTOSCALER=true)
# CPUs of each of Ray Data's tasks that list, read and repartition the shards: Ray Data's default for
# a map task that asks for none (ray/data/_internal/execution/operators/map_operator.py), and its
# listing task takes no resource arguments.
RAY_DATA_TASK_CPUS = 1.0


class Request(NamedTuple):
    """Resources one task or actor (``what``) needs on a single node, and the config keys asking for them."""
    what: str
    keys: dict[str, float]  # config key -> its value
    resources: dict[str, float]


def run_requests(compute: Mapping[str, Any]) -> list[Request]:
    """The single-node requests of a certification run: an actor (and the probe task), a decode task."""
    actor = {"CPU": compute["cpus_per_actor"], "GPU": compute["gpus_per_actor"]}
    task = {"CPU": compute["cpus_per_task"]}
    return [Request("actor", {f"compute.{k}": compute[k] for k in ("cpus_per_actor", "gpus_per_actor")},
                    {k: v for k, v in actor.items() if v > 0}),
            Request("decode task", {"compute.cpus_per_task": compute["cpus_per_task"]},
                    {k: v for k, v in task.items() if v > 0})]


def fits(request: Mapping[str, float], node: Mapping[str, float]) -> bool:
    """Whether one node with total resources ``node`` can hold ``request``."""
    return all(node.get(name, 0.0) >= amount for name, amount in request.items())


def unmet(requests: Iterable[Request], nodes: list[Mapping[str, float]],
          scalable: list[Mapping[str, float]] | None) -> tuple[list[str], list[str]]:
    """(refusals, waits): one message per request that no alive node (``nodes``: their total
    resources) can hold; a wait when a node shape the autoscaler can add holds it (``scalable``:
    those shapes, [] without an autoscaler, :data:`ANY_SHAPE` when they are unknown), else a refusal."""
    refusals, waits = [], []
    for what, keys, need in requests:
        if any(fits(need, node) for node in nodes):
            continue
        asked = ", ".join(f"{key}={value:g}" for key, value in keys.items())
        if scalable is ANY_SHAPE or any(fits(need, shape) for shape in scalable):
            waits.append(f"{asked}: no node holds {_describe(need)} yet; waiting for the autoscaler to add one")
            continue
        largest = max(nodes, key=lambda n: tuple(n.get(k, 0.0) for k in need), default={})
        refusals.append(f"{asked}: one {what} needs {_describe(need)} on a "
                        f"single node, and no node can ever hold it (largest node: {_describe(largest, need)}; "
                        f"{len(nodes)} node(s), {'no node type the autoscaler can add holds it' if scalable else 'no autoscaler'}); "
                        f"lower {' / '.join(k for k, v in keys.items() if v > 0)} or run on a cluster with larger nodes "
                        f"({AUTOSCALER_ENV}=true if an autoscaler can add them)")
    return refusals, waits


def pool_unmet(compute: Mapping[str, Any], nodes: list[Mapping[str, float]],
               scalable: list[Mapping[str, float]] | None) -> tuple[list[str], list[str]]:
    """(refusals, waits) for the run as a whole: the actor pool (``compute.actors`` actors, all
    started at once) and one task beside it (a decode task, or one of Ray Data's listing, read and
    repartition tasks of :data:`RAY_DATA_TASK_CPUS`) must fit in the cluster's total resources
    together, else the actors hold every CPU (or GPU) and the tasks that feed them never run. A
    wait when an autoscaler can add nodes (``scalable`` not []), else a refusal naming the keys."""
    actors = compute["actors"]
    need = {"CPU": actors * compute["cpus_per_actor"] + max(compute["cpus_per_task"], RAY_DATA_TASK_CPUS),
            "GPU": actors * compute["gpus_per_actor"]}
    total = {name: sum(node.get(name, 0.0) for node in nodes) for name in need}
    short = [name for name, amount in need.items() if amount > 0 and total[name] < amount]
    if not short:
        return [], []
    asked = (f"compute.actors={actors:g} x (compute.cpus_per_actor={compute['cpus_per_actor']:g}, "
             f"compute.gpus_per_actor={compute['gpus_per_actor']:g}) + compute.cpus_per_task={compute['cpus_per_task']:g}")
    what = ", ".join(f"{need[n]:g} {n}" for n in short)
    beside = (f"(a decode task: {compute['cpus_per_task']:g} CPU; Ray Data's listing, read and repartition "
              f"tasks: {RAY_DATA_TASK_CPUS:g} CPU each)")
    if scalable is ANY_SHAPE or scalable:
        return [], [f"{asked}: the actor pool and one task beside it {beside} need {what} at once, the cluster has "
                    f"{_describe(total, short)} now; waiting for the autoscaler to add nodes"]
    return [f"{asked}: the actor pool and one task beside it {beside} need {what} at once, and the cluster has "
            f"{_describe(total, short)} ({len(nodes)} node(s), no autoscaler): the actors would hold every "
            f"{' and every '.join(short)} and starve the tasks that feed them; lower compute.actors (or the "
            f"per-actor amounts) or add nodes"], []


def check_resources(compute: Mapping[str, Any]) -> None:
    """Refuse (ConfigError) a request that can never be met on the connected Ray cluster; log a
    WARNING for one that waits for the autoscaler (see the module docstring). Needs ``ray.init``."""
    import ray

    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    scalable = autoscaler_node_shapes()
    refusals, waits = unmet(run_requests(compute), nodes, scalable)
    if not refusals:
        refusals, waits = pool_unmet(compute, nodes, scalable)
    if refusals:
        raise ConfigError("; ".join(refusals))
    for line in waits:
        log.warning(line)


def autoscaler_node_shapes() -> list[dict[str, float]] | None:
    """Per-node resources of the nodes an autoscaler may still add ([] none, :data:`ANY_SHAPE`
    unknown shapes), from ``MSDSMOOTH_AUTOSCALER`` and Ray's published cluster config."""
    setting = os.environ.get(AUTOSCALER_ENV, "auto").strip().lower()
    if setting not in ("auto", "true", "false"):
        raise ConfigError(f"{AUTOSCALER_ENV}: must be auto, true or false, got {setting!r}")
    if setting != "auto":
        return ANY_SHAPE if setting == "true" else []
    import ray._private.state

    config = ray._private.state.state.get_cluster_config()
    if config is None:
        return []
    return [dict(group.resources) for group in config.node_group_configs if group.max_count != 0]  # -1: unlimited


def _describe(resources: Mapping[str, float], only: Iterable[str] | None = None) -> str:
    """``4 CPU, 1 GPU``: the amounts of ``only`` (default: every resource) in ``resources``."""
    names = list(only) if only is not None else sorted(resources)
    return ", ".join(f"{resources.get(name, 0.0):g} {name}" for name in names) or "nothing"
