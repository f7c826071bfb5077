"""Scale benchmark: what the pipeline itself costs as the number of images grows, with tiny work.

For each N: N synthetic 16x16 images (seeded noise, PNG) in Parquet shards of ``SHARD_ROWS``
rows; the demo's models (configs/demo/models: the project's smallest trained denoiser and
classifier) at one sigma with n0 = n = 1, so sampling is a small part of the time and what grows
is the pipeline's own work. Measured through the real pipeline on the Ray of the caller's
:func:`pipeline.ray_runtime.ray_session` (started once, outside the timings):

* ``wall_s``: :func:`pipeline.certify_run.run_certification` of a new run, call to return;
* ``images_per_s``: N / wall_s;
* ``counts_files``: counts files once it returned (compacted: one per 10,000 rows);
* ``driver_rss_mb``: the driver's peak resident memory so far (ru_maxrss; it only grows);
* ``noop_s``: the same run again (nothing left to do);
* ``resume_s``: the run again after deleting 10 % of its rows (the last image_ids: the counts are
  rewritten without them);
* ``aggregate_s``: reading the counts back and :func:`analysis.results.certify_table`.
"""
from __future__ import annotations

import io
import logging
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.config import Config, load_config
from pipeline.digits import DEMO_CONFIG, DEMO_MODELS

log = logging.getLogger(__name__)
SHARD_ROWS = 1000
SIZE = 16


def write_synthetic_shards(folder: Path, count: int, seed: int = 0) -> str:
    """``count`` seeded-noise 16x16 RGB PNGs as Parquet shards of SHARD_ROWS rows (image_id,
    label, image: pipeline.shard_writer's columns); returns the folder's file:// URI."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for shard, start in enumerate(range(0, count, SHARD_ROWS)):
        rows = range(start, min(count, start + SHARD_ROWS))
        payloads = []
        for _ in rows:
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(buffer, format="PNG")
            payloads.append(buffer.getvalue())
        table = pa.table({"image_id": pa.array([f"syn{i:06d}" for i in rows], pa.string()),
                          "label": pa.array([i % 10 for i in rows], pa.int64()),
                          "image": pa.array(payloads, pa.binary())})
        pq.write_table(table, folder / f"shard-{shard:05d}.parquet")
    return folder.resolve().as_uri()


def scale_config(work_dir: Path, count: int, overrides: list[str] = ()) -> Config:
    """The demo's config on ``count`` synthetic images, one sigma, n0 = n = 1."""
    data = write_synthetic_shards(work_dir / f"shards-{count}", count)
    return load_config(str(DEMO_CONFIG), [
        f"data.uri={data}/", "data.selection.every=1", f"models.denoiser.uri={DEMO_MODELS / 'denoiser'}",
        f"models.classifier.uri={DEMO_MODELS / 'classifier.safetensors'}",
        f"output.uri={(work_dir / 'runs').as_uri()}", f"output.run_id=scale-{count}",
        "smoothing.sigmas=[0.5]", "smoothing.n0=1", "smoothing.n=1", f"compute.log_every={max(1, count // 10)}",
        *overrides])


@dataclass
class ScaleResult:
    images: int
    wall_s: float
    images_per_s: float
    counts_files: int
    driver_rss_mb: float
    noop_s: float
    resume_s: float
    aggregate_s: float

    def line(self) -> str:
        return (f"N={self.images:>6}: wall {self.wall_s:7.1f} s, {self.images_per_s:7.1f} images/s, "
                f"{self.counts_files:5d} counts files, driver RSS {self.driver_rss_mb:6.0f} MB, no-op re-run "
                f"{self.noop_s:5.1f} s, 10% resume {self.resume_s:6.1f} s, aggregation {self.aggregate_s:5.1f} s")

    def record(self) -> dict:
        return asdict(self)


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def measure_scale(work_dir: Path, count: int, overrides: list[str] = ()) -> ScaleResult:
    """One size (module docstring); call inside a Ray session."""
    from analysis.counts import load_counts
    from analysis.results import certify_table
    from pipeline.certify_run import run_certification
    from pipeline.run_dir import RunDirectory

    cfg = scale_config(work_dir, count, list(overrides))
    wall, summary = _timed(lambda: run_certification(cfg))
    store = RunDirectory(cfg.output["uri"], cfg.output["run_id"])
    files = store.counts_files()
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    noop, _ = _timed(lambda: run_certification(cfg))
    store.forget(sorted({i for keys in store.file_keys().values() for i, _ in keys})[-max(1, count // 10):])
    resume, _ = _timed(lambda: run_certification(cfg))
    s = cfg.smoothing
    aggregate, _ = _timed(lambda: certify_table(load_counts(summary["run"]), alpha=s["alpha"]))
    return ScaleResult(count, wall, count / wall, len(files), rss_mb, noop, resume, aggregate)
