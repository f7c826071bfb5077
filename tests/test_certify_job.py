"""The certification run end to end with real parts: moto S3 shards made by make_shards, a local
Ray, tiny diffusers/timm models with random weights, then jobs.aggregate on the output; and
``python -m jobs.certify`` after ``ray job submit``.

Counts are checked against an independent in-process computation (MonteCarloSampler on the
same decoded images); faults: a corrupt JPEG, a SIGKILLed actor, an interrupted run resumed.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
import torch
import yaml
from PIL import Image

from conftest import REPO, create_bucket, submit_ray_job
from pipeline.certification import FALL_THROUGH, FIRE, UNDECIDED, SparseCounts, cascade_stage_outcome
from pipeline.certify_run import run_certification
from pipeline.config import ConfigError, config_from_dict
from pipeline.counts_schema import COUNTS_SCHEMA, ERRORS_SCHEMA
from pipeline.errors import StorageError
from pipeline.images import resize_image
from pipeline.models.factory import create_denoise_classify
from pipeline.models.small import write_small_models
from pipeline.run_dir import RunDirectory
from pipeline.sampling import MonteCarloSampler
from pipeline.schedules import FALLTHROUGH
from pipeline.shard_writer import make_shards

pytestmark = pytest.mark.slow
PER_CLASS = 5


@pytest.fixture(scope="module")
def bucket(s3_server):
    return create_bucket(s3_server, "certify")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """configs/small.yaml's tiny UNet2DModel folder and tiny timm ViT, random weights."""
    root = tmp_path_factory.mktemp("models")
    write_small_models(root)
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """ImageNet layout: 2 classes x PER_CLASS JPEGs of assorted sizes, plus one corrupt JPEG."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(1)
    for c in ("n0", "n1"):
        (root / c).mkdir()
        for i in range(PER_CLASS):
            h, w = rng.integers(32, 60, size=2)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / c / f"{c}_{i}.jpg", quality=90)
    (root / "n1" / "n1_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    return root


@pytest.fixture(scope="module")
def shards(images, bucket):
    return {fmt: make_shards(str(images), f"s3://{bucket}/shards/{fmt}", fmt, shard_size=4)
            for fmt in ("parquet", "webdataset")}


def make_config(models, bucket, run_id, *overrides, fmt="parquet"):
    with open(os.path.join(REPO, "configs", "small.yaml")) as f:
        raw = yaml.safe_load(f)
    return config_from_dict(raw, [
        f"data.uri=s3://{bucket}/shards/{fmt}/", f"data.format={fmt}",
        f"models.denoiser.uri={models / 'denoiser'}", f"models.classifier.uri={models / 'classifier.safetensors'}",
        f"output.uri=s3://{bucket}/runs", f"output.run_id={run_id}", *overrides])


def read_dir(store: RunDirectory, directory: str) -> pa.Table | None:
    store.fs.invalidate_cache(directory)
    paths = [p for p in store.fs.ls(directory, detail=False) if not p.rsplit("/", 1)[1].startswith(".")] \
        if store.fs.exists(directory) else []
    if not paths:
        return None
    tables = []
    for p in paths:
        with store.fs.open(p, "rb") as f:
            tables.append(pq.read_table(f))
    return pa.concat_tables(tables)


def counts_of(store: RunDirectory) -> pa.Table:
    return read_dir(store, store.counts_dir).sort_by([("image_id", "ascending"), ("sigma", "ascending")])


def good_ids() -> list[str]:
    return sorted(f"{c}_{i}" for c in ("n0", "n1") for i in range(PER_CLASS))


def assert_exactly_once(table: pa.Table, sigmas) -> None:
    keys = list(zip(table.column("image_id").to_pylist(), table.column("sigma").to_pylist()))
    assert len(keys) == len(set(keys)), "duplicate (image_id, sigma) rows"
    assert sorted(keys) == sorted((i, s) for i in good_ids() for s in sigmas)


def dense(classes, values, num_classes=10) -> np.ndarray:
    out = np.zeros(num_classes, dtype=np.int64)
    out[np.asarray(classes, dtype=np.int64)] = values
    return out


@pytest.fixture(scope="module")
def full_run(ray_local, models, bucket, shards):
    cfg = make_config(models, bucket, "full")
    summary = run_certification(cfg)
    return cfg, summary, RunDirectory(cfg.output["uri"], "full")


def test_full_run_matches_in_process_sampler(full_run, images, models):
    cfg, summary, store = full_run
    table = counts_of(store)
    assert table.schema.equals(COUNTS_SCHEMA)
    assert_exactly_once(table, cfg.smoothing["sigmas"])
    assert (summary["images"], summary["rows"], summary["errors"]) == (10, 20, 1)
    assert table.column("label").to_pylist() == [0 if i.startswith("n0") else 1 for i in table.column("image_id").to_pylist()]

    # Independent computation: decode the original files, sample in process, same seed.
    ids = good_ids()
    x = np.stack([resize_image((images / i[:2] / f"{i}.jpg").read_bytes(), 32, 32, "center", "bicubic") for i in ids])
    model = create_denoise_classify(cfg.models["denoiser"], cfg.models["classifier"])
    s = cfg.smoothing
    ref = MonteCarloSampler(model, batch_size=32, device="cpu").sample(
        torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255, ids, list(s["sigmas"]), s["n0"], s["n"], s["seed"])
    rows = table.to_pylist()
    for r in rows:
        i, k = ids.index(r["image_id"]), list(s["sigmas"]).index(r["sigma"])
        np.testing.assert_array_equal(dense(r["counts0_classes"], r["counts0_values"]), ref.counts0[i, k])
        np.testing.assert_array_equal(dense(r["counts_classes"], r["counts_values"]), ref.counts[i, k])
        assert r["pred_clean"] == ref.pred_clean[i] and r["timestep"] == ref.timesteps[k]
        assert sum(r["counts0_values"]) == s["n0"] and sum(r["counts_values"]) == s["n"]
        assert r["counts_classes"] == sorted(r["counts_classes"]) and min(r["counts_values"]) > 0

    errors = read_dir(store, store.errors_dir)
    assert errors.schema.equals(ERRORS_SCHEMA)
    assert errors.column("image_id").to_pylist() == ["n1_corrupt"]
    assert errors.column("source").to_pylist()[0].endswith(".parquet")

    manifest = store.read_manifest()
    assert manifest["config"] == cfg.to_dict()
    assert set(manifest["model_checksums"]) == {"denoiser", "classifier"}
    sha = manifest["model_checksums"]["classifier"][str(models / "classifier.safetensors")]
    assert len(sha) == 64 and manifest["code_version"]
    text = store.fs.cat_file(store.manifest_path).decode()
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in text and "AWS_" not in text


def test_aggregate_reads_the_run(full_run, tmp_path):
    _, _, store = full_run
    out = subprocess.run([sys.executable, "-m", "jobs.aggregate", store.uri(), "--out", str(tmp_path / "agg")],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    results = pq.read_table(tmp_path / "agg" / "results.parquet")
    assert set(results.column("image_id").to_pylist()) == set(good_ids())


def test_resume_after_interruption_writes_only_missing_rows(full_run, ray_local):
    cfg, _, store = full_run
    before = counts_of(store)
    lost_images = set(good_ids()[::2])
    assert store.forget(lost_images) == 2 * len(lost_images)
    store.fs.pipe_file(f"{store.counts_dir}/.tmp-{uuid.uuid4().hex}", b"PAR1 half written")  # a crash leftover
    summary = run_certification(cfg)
    assert summary["images"] == len(lost_images) and summary["rows"] == 2 * len(lost_images)
    after = counts_of(store)
    keep = [c for c in COUNTS_SCHEMA.names if c not in ("worker", "seconds")]
    assert after.select(keep).to_pylist() == before.select(keep).to_pylist()
    again = run_certification(cfg)  # nothing left: no actor work at all
    assert (again["images"], again["rows_total"]) == (0, 20)


def test_config_change_refuses_resume(full_run):
    cfg, _, _ = full_run
    changed = config_from_dict(cfg.to_dict(), ["smoothing.n=17"])
    with pytest.raises(ConfigError, match=r"output\.run_id: full exists .*\(smoothing\.n differ\)"):
        run_certification(changed)


def test_killed_actor_loses_and_duplicates_nothing(ray_local, models, bucket, shards):
    cfg = make_config(models, bucket, "killed", "smoothing.n=256", "compute.images_per_call=1")
    store = RunDirectory(cfg.output["uri"], "killed")
    result = {}
    thread = threading.Thread(target=lambda: result.update(run_certification(cfg)))
    thread.start()
    deadline, victim = time.time() + 240, None
    while victim is None and time.time() < deadline and thread.is_alive():
        files = store.counts_files() if store.fs.exists(store.counts_dir) else []
        if files:
            with store.fs.open(files[0], "rb") as f:
                victim = int(pq.read_table(f, columns=["worker"]).column("worker")[0].as_py().rsplit(":", 1)[1])
            os.kill(victim, signal.SIGKILL)
        time.sleep(0.05)
    thread.join(timeout=300)
    assert victim is not None, "the run ended before an actor could be killed"
    assert result, "the run did not finish"
    table = counts_of(store)
    assert_exactly_once(table, cfg.smoothing["sigmas"])
    workers = {w.rsplit(":", 1)[1] for w in table.column("worker").to_pylist()}
    assert workers - {str(victim)}, "a restarted actor finished the work"  # retried tasks rewrite their files


@pytest.mark.parametrize("schedule", ["bonferroni", FALLTHROUGH])
def test_cascade_mode_webdataset(ray_local, models, bucket, shards, schedule):
    run_id = f"cascade-{schedule}"
    cfg = make_config(models, bucket, run_id, "smoothing.mode=cascade", "smoothing.sigmas=[0.12, 0.25, 0.5]",
                      "smoothing.p0=0.6", "smoothing.alpha=0.2", "smoothing.n=64", f"smoothing.schedule={schedule}",
                      fmt="webdataset")
    summary = run_certification(cfg)
    store = RunDirectory(cfg.output["uri"], run_id)
    rows = counts_of(store).to_pylist()
    s = cfg.smoothing
    levels = sorted(s["sigmas"], reverse=True)
    by_image: dict[str, dict[float, dict]] = {}
    for r in rows:
        by_image.setdefault(r["image_id"], {})[r["sigma"]] = r
    assert sorted(by_image) == good_ids() and summary["errors"] == 1
    outcomes = []
    for image_id, per_sigma in by_image.items():
        # Re-trace the cascade from the stored rows: a lower level exists iff the walk passed the higher one.
        for stage, sigma in enumerate(levels):
            assert sigma in per_sigma, f"{image_id}: stage {stage} missing"
            r = per_sigma[sigma]
            c0 = SparseCounts.from_lists([r["counts0_classes"]], [r["counts0_values"]])
            c = SparseCounts.from_lists([r["counts_classes"]], [r["counts_values"]])
            outcome = int(cascade_stage_outcome(stage, len(levels), c0, c, s["alpha"], s["p0"], s["schedule"])[0])
            outcomes.append(outcome if stage < len(levels) - 1 else f"last {outcome}")
            if outcome == FIRE or (outcome == UNDECIDED and schedule == "bonferroni"):
                assert set(per_sigma) == set(levels[: stage + 1]), f"{image_id}: rows below a decided level"
                break
    exercised = {FALL_THROUGH, UNDECIDED} <= set(outcomes) and {FIRE, f"last {FIRE}"} & set(outcomes)
    assert exercised, f"cascade not exercised (undecided above the last level, and a fire): {outcomes}"


@pytest.fixture
def fresh_s3_clients():
    """s3fs caches clients per process: start and end with none, so changed credentials count."""
    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()


def test_fails_fast_on_storage_problems(models, bucket, shards, monkeypatch, tmp_path, fresh_s3_clients):
    with pytest.raises(StorageError, match=r"data.uri s3://no-such-bucket-[0-9a-f]+/x/: cannot list shards"):
        run_certification(config_from_dict(make_config(models, bucket, "ff").to_dict(),
                             [f"data.uri=s3://no-such-bucket-{uuid.uuid4().hex[:8]}/x/"]))
    with pytest.raises(StorageError, match=r"data.uri .*: no parquet shards found"):
        run_certification(config_from_dict(make_config(models, bucket, "ff").to_dict(), [f"data.uri=s3://{bucket}/nothing/*.parquet"]))
    with pytest.raises(StorageError, match=r"output.uri s3://no-such-out-bucket.*cannot write the run"):
        run_certification(config_from_dict(make_config(models, bucket, "ff").to_dict(), ["output.uri=s3://no-such-out-bucket/runs"]))
    with pytest.raises(StorageError, match=r"models.denoiser.uri .*: not found"):
        run_certification(config_from_dict(make_config(models, bucket, "ff").to_dict(), [f"models.denoiser.uri={tmp_path}/none"]))
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3fs.S3FileSystem.clear_instance_cache()  # a fresh process would hold no cached client
    with pytest.raises(StorageError, match=r"data.uri .*credentials"):
        run_certification(make_config(models, bucket, "ff"))
    monkeypatch.undo()


def test_ray_job_submit(ray_head, models, bucket, shards):
    address, env = ray_head
    args = ["--config", "configs/small.yaml", "--set", f"data.uri=s3://{bucket}/shards/parquet/",
            "--set", f"models.denoiser.uri={models / 'denoiser'}",
            "--set", f"models.classifier.uri={models / 'classifier.safetensors'}",
            "--set", f"output.uri=s3://{bucket}/runs", "--set", "output.run_id=submitted"]
    out = submit_ray_job(address, env, ["python", "-m", "jobs.certify", *args], cwd=REPO)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    store = RunDirectory(f"s3://{bucket}/runs", "submitted")
    table = counts_of(store)
    assert_exactly_once(table, (0.25, 0.5))
    assert '"errors": 1' in out.stdout and "images/s" in out.stdout
