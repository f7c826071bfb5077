"""Work spreads over the actor pool and the cluster (issue 12), with real parts: tiny models,
shards from pipeline.shard_writer in a single file (far under Ray's 128 MiB read-task size, so it
used to be one block: one decode task, one actor, one progress line), local files and the moto S3
server, a local Ray and a 2-node Ray cluster on this machine.

* 2 actors both write counts; progress/ETA lines arrive every ``log_every`` images while calls
  are still to be written.
* A SIGKILLed actor redoes at most its call in flight: the rows written before the kill are kept
  as they were (same worker, same timing) except at most ``images_per_call`` images, and every
  (image, sigma) is written exactly once.
* ``ray job submit`` to a head plus a second node: actors on both nodes write counts; killing the
  second node's raylet mid-run leaves every (image, sigma) exactly once after the job (re-run if
  it failed).
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from conftest import REPO, create_bucket, submit_ray_job
from pipeline.certify_run import run_certification
from pipeline.config import config_from_dict
from pipeline.models.small import write_small_models
from pipeline.run_dir import RunDirectory
from pipeline.shard_writer import make_shards

pytestmark = pytest.mark.slow
IMAGES = 24
PER_CALL = 2
# 2 actors and the decode tasks on a 2-CPU Ray: fractions, so that neither starves the other
POOL = ["compute.actors=2", "compute.cpus_per_actor=0.5", "compute.cpus_per_task=0.5",
        f"compute.images_per_call={PER_CALL}"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_small_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """IMAGES random JPEGs in 2 class folders."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(3)
    for i in range(IMAGES):
        (root / f"c{i % 2}").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / f"c{i % 2}" / f"im{i:03d}.jpg")
    return root


@pytest.fixture(scope="module")
def local_shards(image_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_shards(str(image_dir), f"file://{root}/shards", "parquet", shard_size=IMAGES)  # one file
    return f"file://{root}"


@pytest.fixture(scope="module")
def s3_shards(image_dir, s3_server):
    bucket = create_bucket(s3_server, "spread")
    make_shards(str(image_dir), f"s3://{bucket}/shards", "parquet", shard_size=IMAGES)
    return f"s3://{bucket}"


def make_config(models, root: str, run_id: str, *overrides):
    denoiser, classifier = models
    with open(os.path.join(REPO, "configs", "small.yaml")) as f:
        raw = yaml.safe_load(f)
    return config_from_dict(raw, [f"data.uri={root}/shards/", f"models.denoiser.uri={denoiser}",
                                  f"models.classifier.uri={classifier}", f"output.uri={root}/runs",
                                  f"output.run_id={run_id}", *overrides])


def counts_files(store: RunDirectory) -> dict[str, bytes]:
    """Every counts file of the run: path -> bytes."""
    return {p: store.fs.cat_file(p) for p in store.counts_files()} if store.fs.exists(store.counts_dir) else {}


def table_of(files: dict[str, bytes]) -> pa.Table:
    return pa.concat_tables([pq.read_table(pa.BufferReader(b)) for b in files.values()])


def assert_exactly_once(table: pa.Table, sigmas) -> None:
    keys = list(zip(table.column("image_id").to_pylist(), table.column("sigma").to_pylist()))
    assert len(keys) == len(set(keys)), "duplicate (image_id, sigma) rows"
    assert sorted(keys) == sorted((f"im{i:03d}", s) for i in range(IMAGES) for s in sigmas)


def pid(worker: str) -> int:
    """The process id in a ``worker`` value ``host@node:pid``."""
    return int(worker.rsplit(":", 1)[1])


def node(worker: str) -> str:
    """The (8-hex) node id in a ``worker`` value ``host@node:pid``."""
    return worker.rsplit(":", 1)[0].rsplit("@", 1)[1]


class FilesAtEachLine(logging.Handler):
    """How many counts files the run directory holds when each progress line is logged."""

    def __init__(self, store: RunDirectory):
        super().__init__(logging.INFO)
        self.store, self.files = store, []

    def emit(self, record: logging.LogRecord) -> None:
        self.files.append(len(self.store.counts_files()) if self.store.fs.exists(self.store.counts_dir) else 0)


def test_two_actors_share_the_work_and_progress_is_logged_during_the_run(ray_local, models, local_shards, caplog):
    caplog.set_level(logging.INFO, logger="pipeline.progress")
    cfg = make_config(models, local_shards, "spread", *POOL, "compute.log_every=4", "smoothing.n=64")
    store = RunDirectory(cfg.output["uri"], "spread")
    files_at = FilesAtEachLine(store)
    logging.getLogger("pipeline.progress").addHandler(files_at)
    try:
        summary = run_certification(cfg)
    finally:
        logging.getLogger("pipeline.progress").removeHandler(files_at)
    table = table_of(counts_files(store))
    assert_exactly_once(table, cfg.smoothing["sigmas"])
    assert summary["images"] == IMAGES
    workers = set(table.column("worker").to_pylist())
    assert len(workers) == 2, f"counts from {workers}: the work did not spread over both actors"

    lines = [r.getMessage() for r in caplog.records if r.name == "pipeline.progress"]
    assert len(lines) >= IMAGES // 4 - 1, lines  # every log_every images, not once at the end
    assert all("ETA" in line for line in lines) and lines[0].startswith(f"4/{IMAGES} images"), lines
    # during the run: the first line came while calls were still to be written (one file per call)
    assert files_at.files[0] < IMAGES // PER_CALL, f"counts files at each progress line: {files_at.files}"


def rows_by_key(table: pa.Table) -> dict[tuple[str, float], tuple[str, float]]:
    """(image_id, sigma) -> (worker, seconds): who computed the row, and when it was measured."""
    cols = [table.column(c).to_pylist() for c in ("image_id", "sigma", "worker", "seconds")]
    return {(i, s): (w, t) for i, s, w, t in zip(*cols)}


def test_killed_actor_redoes_at_most_its_call(ray_local, models, s3_shards):
    cfg = make_config(models, s3_shards, "killed", *POOL, "smoothing.n=128")
    store = RunDirectory(cfg.output["uri"], "killed")
    result = {}
    thread = threading.Thread(target=lambda: result.update(run_certification(cfg)))
    thread.start()
    deadline, victim, before = time.time() + 400, None, {}
    while victim is None and time.time() < deadline and thread.is_alive():
        files = counts_files(store)
        per_worker: dict[str, int] = {}
        for b in files.values():
            w = pq.read_table(pa.BufferReader(b), columns=["worker"]).column("worker")[0].as_py()
            per_worker[w] = per_worker.get(w, 0) + 1
        busy = [w for w, k in per_worker.items() if k >= 2]  # an actor with 2 calls done: a whole-block redo would show
        if busy:
            victim = pid(busy[0])
            os.kill(victim, signal.SIGKILL)
            before = rows_by_key(table_of(files))
        time.sleep(0.05)
    thread.join(timeout=600)
    assert victim is not None, "the run ended before an actor had written 2 files"
    assert result, "the run did not finish"
    after = table_of(counts_files(store))
    assert_exactly_once(after, cfg.smoothing["sigmas"])
    final = rows_by_key(after)
    # rows written before the kill are kept as they were, except at most the call in flight (killed
    # between writing its file and returning): never the whole block or the actor's earlier calls
    redone = {key for key, row in before.items() if final[key] != row}
    assert len({image for image, _ in redone}) <= PER_CALL, f"{len(redone)} of {len(before)} rows recomputed"
    workers = {pid(w) for w in after.column("worker").to_pylist()}
    assert victim in workers and len(workers - {victim}) >= 1


def test_two_node_cluster_spreads_work_and_survives_losing_a_node(ray_two_nodes, models, s3_shards):
    """``ray job submit`` on a head + a second node (2 CPUs each): one actor per node; work lands on
    both (the second node writes counts, then its raylet is SIGKILLed); every (image, sigma) once
    after the job (or its re-run, if the lost node failed it). The final table need not keep the
    second node's rows: a call in flight when it died, or one whose output was still in its object
    store, is re-executed on the head under the same file name (pipeline.run_dir)."""
    head, second = ray_two_nodes
    denoiser, classifier = models
    store = RunDirectory(f"{s3_shards}/runs", "cluster")
    args = ["python", "-m", "jobs.certify", "--config", "configs/small.yaml",
            "--set", f"data.uri={s3_shards}/shards/", "--set", f"models.denoiser.uri={denoiser}",
            "--set", f"models.classifier.uri={classifier}", "--set", f"output.uri={s3_shards}/runs",
            "--set", "output.run_id=cluster", "--set", "compute.actors=2", "--set", "compute.cpus_per_actor=1",
            "--set", "compute.cpus_per_task=0.5", "--set", f"compute.images_per_call={PER_CALL}",
            "--set", "smoothing.n=128"]
    submitted = {}
    thread = threading.Thread(target=lambda: submitted.update(
        out=submit_ray_job(head.dashboard, head.env, args, REPO, timeout=600)))
    thread.start()
    deadline, killed, nodes_seen = time.time() + 500, False, set()
    while not killed and time.time() < deadline and thread.is_alive():
        files = counts_files(store)
        nodes_seen = {node(pq.read_table(pa.BufferReader(b), columns=["worker"]).column("worker")[0].as_py())
                      for b in files.values()}
        if second.node_id[:8] in nodes_seen:
            os.kill(second.raylet(), signal.SIGKILL)
            killed = True
        time.sleep(0.1)
    thread.join(timeout=600)
    assert killed, f"the second node wrote no counts before the job ended (nodes seen: {nodes_seen})"
    out = submitted["out"]
    if out.returncode != 0:  # the lost node may fail the job: its re-run resumes
        out = submit_ray_job(head.dashboard, head.env, args, REPO, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    table = table_of(counts_files(store))
    assert_exactly_once(table, (0.25, 0.5))
    nodes = {node(w) for w in table.column("worker").to_pylist()}
    assert head.node_id[:8] in nodes and nodes <= {head.node_id[:8], second.node_id[:8]}, f"counts from nodes {nodes}"
