"""Impossible resource requests fail fast naming the compute.* keys; possible ones (or ones an
autoscaler can meet) go on. Pure decisions on node lists, then the job against a 2-CPU local Ray."""
from __future__ import annotations

import datetime
import os
import subprocess
import sys
import time

import pytest
from PIL import Image
from conftest import REPO
from pipeline.config import ConfigError
from pipeline.models.small import write_small_models
from pipeline.resources import ANY_SHAPE, AUTOSCALER_ENV, autoscaler_node_shapes, pool_unmet, run_requests, unmet
from pipeline.shard_writer import make_shards

COMPUTE = {"cpus_per_actor": 4.0, "gpus_per_actor": 0.0, "cpus_per_task": 1.0}
TWO_CPUS = [{"CPU": 2.0, "memory": 1e9}]


def test_request_no_node_holds_is_refused_naming_the_keys():
    refusals, waits = unmet(run_requests(COMPUTE), TWO_CPUS, [])
    assert waits == [] and len(refusals) == 1
    assert refusals[0].startswith("compute.cpus_per_actor=4, compute.gpus_per_actor=0: one actor needs 4 CPU")
    assert "largest node: 2 CPU" in refusals[0] and "no autoscaler" in refusals[0]


def test_gpu_and_task_requests():
    compute = {"cpus_per_actor": 1.0, "gpus_per_actor": 1.0, "cpus_per_task": 8.0}
    refusals, _ = unmet(run_requests(compute), [{"CPU": 4.0}, {"CPU": 1.0, "GPU": 0.5}], [])
    assert [r.split(":")[0] for r in refusals] == ["compute.cpus_per_actor=1, compute.gpus_per_actor=1",
                                                   "compute.cpus_per_task=8"]
    # the CPUs and the GPU must be on the same node: 2 nodes that hold them together only in sum do not
    assert unmet(run_requests(compute | {"cpus_per_task": 1.0}), [{"CPU": 4.0}, {"CPU": 0.5, "GPU": 1.0}], [])[0]
    assert unmet(run_requests(compute | {"cpus_per_task": 1.0}), [{"CPU": 4.0}, {"CPU": 1.0, "GPU": 1.0}], []) == ([], [])


def test_actor_pool_and_one_task_beside_it_must_fit_the_cluster_at_once():
    pool = {"actors": 2, "cpus_per_actor": 1.0, "gpus_per_actor": 0.0, "cpus_per_task": 0.5}
    assert unmet(run_requests(pool), TWO_CPUS, []) == ([], [])  # each request alone fits a node
    refusals, waits = pool_unmet(pool, TWO_CPUS, [])
    assert waits == [] and len(refusals) == 1
    assert refusals[0].startswith("compute.actors=2 x (compute.cpus_per_actor=1, compute.gpus_per_actor=0) + "
                                  "compute.cpus_per_task=0.5: the actor pool and one task beside it (a decode task: "
                                  "0.5 CPU; Ray Data's listing, read and repartition tasks: 1 CPU each) need 3 CPU "
                                  "at once")
    assert "the cluster has 2 CPU (1 node(s), no autoscaler)" in refusals[0]
    assert pool_unmet(pool, TWO_CPUS + [{"CPU": 1.0}], []) == ([], [])  # summed over nodes
    # room for the decode task but not for Ray Data's 1-CPU listing task: the read would never run
    assert "need 2.5 CPU at once" in pool_unmet(pool | {"cpus_per_actor": 0.75}, TWO_CPUS, [])[0][0]
    assert pool_unmet(pool | {"cpus_per_actor": 0.5}, TWO_CPUS, []) == ([], [])  # exactly one CPU left
    assert pool_unmet(pool | {"cpus_per_actor": 0.5, "cpus_per_task": 1.5}, TWO_CPUS, [])[0]  # a larger decode task
    gpus = pool | {"gpus_per_actor": 1.0}
    assert pool_unmet(gpus, [{"CPU": 8.0, "GPU": 1.0}], [])[0][0].split(") need ")[1].startswith("2 GPU at once")
    refusals, waits = pool_unmet(pool, TWO_CPUS, ANY_SHAPE)
    assert refusals == [] and "waiting for the autoscaler" in waits[0]


def test_busy_but_large_enough_node_is_fine():
    assert unmet(run_requests(COMPUTE), [{"CPU": 2.0}, {"CPU": 4.0}], []) == ([], [])


def test_autoscaler_decides_wait_or_refuse():
    refusals, waits = unmet(run_requests(COMPUTE), TWO_CPUS, [{"CPU": 8.0}])
    assert refusals == [] and len(waits) == 1 and "waiting for the autoscaler" in waits[0]
    assert "compute.cpus_per_actor=4" in waits[0]
    refusals, _ = unmet(run_requests(COMPUTE), TWO_CPUS, [{"CPU": 2.0, "GPU": 1.0}])  # no node type holds 4 CPUs
    assert len(refusals) == 1 and "no node type the autoscaler can add holds it" in refusals[0]
    assert unmet(run_requests(COMPUTE), TWO_CPUS, ANY_SHAPE)[0] == []


def test_autoscaler_setting(monkeypatch):
    monkeypatch.setenv(AUTOSCALER_ENV, "true")
    assert autoscaler_node_shapes() is ANY_SHAPE
    monkeypatch.setenv(AUTOSCALER_ENV, "false")
    assert autoscaler_node_shapes() == []
    monkeypatch.setenv(AUTOSCALER_ENV, "sometimes")
    with pytest.raises(ConfigError, match=AUTOSCALER_ENV):
        autoscaler_node_shapes()


@pytest.mark.slow
@pytest.mark.parametrize("overrides,error", [
    (["compute.cpus_per_actor=4"],
     "error: compute.cpus_per_actor=4, compute.gpus_per_actor=0: one actor needs 4 CPU on a single node, and no "
     "node can ever hold it (largest node: 2 CPU"),
    # the actors leave 0.5 CPU, enough for a decode task of 0.25 but not for Ray Data's 1-CPU listing
    # task: this run used to hang (Ray Data gives up after 30 minutes without progress)
    (["compute.actors=2", "compute.cpus_per_actor=0.75", "compute.cpus_per_task=0.25"],
     "error: compute.actors=2 x (compute.cpus_per_actor=0.75, compute.gpus_per_actor=0) + compute.cpus_per_task=0.25: "
     "the actor pool and one task beside it"),
], ids=["one-actor-too-large", "pool-leaves-no-cpu-for-ray-data-tasks"])
def test_job_on_two_cpus_that_can_never_run_fails_within_a_minute(ray_local, tmp_path, overrides, error):
    """``python -m jobs.certify`` on a running 2-CPU Ray (RAY_ADDRESS, as after ``ray job submit``),
    no autoscaler: exit 2 and an ``error:`` line naming the compute.* keys, within a minute."""
    denoiser, classifier = write_small_models(tmp_path / "models")
    images = tmp_path / "images" / "c0"
    images.mkdir(parents=True)
    Image.new("RGB", (40, 40)).save(images / "a.jpg")
    make_shards(str(images.parent), f"file://{tmp_path}/shards", "parquet", shard_size=4)
    args = ["--config", "configs/small.yaml", "--set", f"data.uri=file://{tmp_path}/shards/",
            "--set", f"models.denoiser.uri={denoiser}", "--set", f"models.classifier.uri={classifier}",
            "--set", f"output.uri=file://{tmp_path}/runs", *(a for o in overrides for a in ("--set", o))]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, AUTOSCALER_ENV: "auto"}
    out = subprocess.run([sys.executable, "-m", "jobs.certify", *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)  # a hang fails here
    ended = time.time()
    assert out.returncode == 2, (out.stdout + out.stderr)[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(error), last
    # from the run's first log line (imports done, shards listed) to the exit: well within the minute
    # (the imports alone take 20 s on a loaded 2-core machine, 3 s idle)
    started = next(line for line in out.stderr.splitlines() if "images to do" in line)
    seconds = ended - datetime.datetime.strptime(started[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    assert seconds < 30, f"{seconds:.0f} s from the run's start to the error"
