"""Sequential certification (issue 14) through the real run on a local Ray, tiny random-weight
models (configs/small.yaml) and moto S3 shards: what must not depend on how the work was run.

Checks that can fail:
* Actor count: the same sequential run with 1 actor x 4 images per call and 2 actors x 1 image
  per call (both actors write rows) writes identical rows per (image_id, sigma) (counts0, counts,
  n, look, pred_clean, timestep, ids, ...; all but run_id, worker and seconds), in full and cascade
  mode (cascade: every stage row the same, so every image stops at the same stage, look and counts).
* Resume after a kill: a ``python -m jobs.certify`` driver on the same Ray is SIGKILLed once it
  has written counts and before it has finished; re-running the run_id in process, with 2 actors
  and 2 images per call (compute settings a resume may change), completes it.
  The rows written before the kill are kept as they were (same worker, same timing: not
  recomputed), the resume computes only images that had no rows, every (image_id, sigma) row is
  in exactly one file (full: every image x sigma; cascade: every image's stages), the rows equal
  the uninterrupted run's, and the aggregation (``certify_table`` with the run's plan) accepts the
  run and gives the uninterrupted run's table.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pytest
import ray

from conftest import REPO
from analysis.counts import load_counts
from analysis.results import certify_table
from pipeline.certify_run import run_certification
from pipeline.config import config_from_dict
from pipeline.run_dir import RunDirectory
from pipeline.sequential import SequentialPlan
from tests.test_certify_job import bucket, images, make_config, models, read_dir, shards  # noqa: F401 (fixtures)
from tests.test_distribution import POOL
from tests.test_sequential_job import SEQUENTIAL

pytestmark = pytest.mark.slow
UNTIMED = ("run_id", "worker", "seconds")  # the only columns allowed to differ between runs of the same work
IMAGES = 6  # SEQUENTIAL's data.selection.limit
# the run's settings by mode; cascade: a p0 at which the random models' images both stop at the top
# stage and fall through to the next
MODES = {"full": ["smoothing.mode=full"], "cascade": ["smoothing.mode=cascade", "smoothing.p0=0.6"]}


def rows_of(store: RunDirectory) -> pa.Table:
    """Every counts row of the run as written (no de-duplication), sorted by (image_id, sigma)."""
    return read_dir(store, store.counts_dir).sort_by([("image_id", "ascending"), ("sigma", "ascending")])


def comparable(table: pa.Table) -> list[dict]:
    return table.drop_columns(list(UNTIMED)).to_pylist()


def assert_each_key_once(table: pa.Table) -> None:
    keys = list(zip(table.column("image_id").to_pylist(), table.column("sigma").to_pylist()))
    assert len(keys) == len(set(keys)), "duplicate (image_id, sigma) rows"


def aggregate(store: RunDirectory):
    """certify_table of the run's de-duplicated counts with the plan from its manifest, in a fixed order."""
    plan = SequentialPlan.from_dict(store.read_manifest()["sequential_plan"])
    results = certify_table(load_counts(store.uri()), plan=plan)
    return results.sort_values(["method", "image_id"]).reset_index(drop=True)


@pytest.fixture(scope="module", params=list(MODES))
def uninterrupted(request, ray_local, models, bucket, shards):
    """The reference run of each mode: 1 actor, configs/small.yaml's 4 images per call, no fault."""
    mode = request.param
    cfg = make_config(models, bucket, f"reference-{mode}", *SEQUENTIAL, *MODES[mode])
    run_certification(cfg)
    store = RunDirectory(cfg.output["uri"], cfg.output["run_id"])
    rows = rows_of(store)
    assert_each_key_once(rows)
    assert len(set(rows.column("image_id").to_pylist())) == IMAGES
    assert len(set(rows.column("n").to_pylist())) > 1, "every pair stopped at the same look: stopping not exercised"
    if mode == "full":
        assert rows.num_rows == IMAGES * len(cfg.smoothing["sigmas"])
    else:  # the cascade is exercised: some image stops at the top stage, some goes on
        assert IMAGES < rows.num_rows < IMAGES * len(cfg.smoothing["sigmas"]), rows.num_rows
    return mode, store, rows


def test_rows_are_invariant_to_actor_count_and_images_per_call(uninterrupted, models, bucket, monkeypatch):
    mode, reference, expected = uninterrupted
    # both actors up before the first call is dispatched (Ray Data starts them asynchronously): both get calls
    monkeypatch.setattr(ray.data.DataContext.get_current(), "wait_for_min_actors_s", 300)
    cfg = make_config(models, bucket, f"two-actors-{mode}", *SEQUENTIAL, *MODES[mode], *POOL,
                      "compute.images_per_call=1")
    run_certification(cfg)
    store = RunDirectory(cfg.output["uri"], cfg.output["run_id"])
    rows = rows_of(store)
    assert len(set(rows.column("worker").to_pylist())) == 2, "the work did not spread over both actors"
    assert_each_key_once(rows)
    assert comparable(rows) == comparable(expected)
    assert aggregate(store).equals(aggregate(reference))


def test_resume_after_a_killed_job_loses_duplicates_and_changes_nothing(uninterrupted, models, bucket, tmp_path):
    mode, reference, expected = uninterrupted
    cfg = make_config(models, bucket, f"killed-{mode}", *SEQUENTIAL, *MODES[mode],
                      "compute.images_per_call=1")
    store = RunDirectory(cfg.output["uri"], cfg.output["run_id"])
    config_file = tmp_path / "config.yaml"
    config_file.write_text(json.dumps(cfg.to_dict()))  # JSON is YAML: the very config, resolved
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}  # a driver on the test's Ray
    log = tmp_path / "driver.log"
    with open(log, "wb") as out:
        driver = subprocess.Popen([sys.executable, "-m", "jobs.certify", "--config", str(config_file)], cwd=REPO,
                                  env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while not store.counts_files() and driver.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        if driver.poll() is None:
            os.kill(driver.pid, signal.SIGKILL)  # the driver dies: Ray ends its job, actor included
    finally:
        driver.kill()
        driver.wait(timeout=60)
    assert driver.returncode == -signal.SIGKILL, f"the job ended before it was killed:\n{log.read_text()[-3000:]}"
    before = rows_of(store)
    done = set(before.column("image_id").to_pylist())
    assert 0 < len(done) < IMAGES, f"killed with {len(done)} of {IMAGES} images written: not mid-run"

    summary = run_certification(config_from_dict(cfg.to_dict(), POOL))  # the resume, on more actors
    assert 0 < summary["images"] <= IMAGES - len(done), summary  # done images are not redone
    after = rows_of(store)
    assert_each_key_once(after)
    assert summary["rows"] <= after.num_rows - before.num_rows and summary["rows_total"] == after.num_rows, summary
    assert comparable(after) == comparable(expected)
    kept = {(r["image_id"], r["sigma"]): r for r in after.to_pylist()}
    for row in before.to_pylist():  # written before the kill: kept, not recomputed (same worker and timing)
        assert kept[(row["image_id"], row["sigma"])] == row
    assert aggregate(store).equals(aggregate(reference))
