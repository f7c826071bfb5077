"""Run (or resume) one certification on Ray Data: shards -> decode/resize (CPU tasks) -> Monte
Carlo counts (actor pool, which writes the counts files) -> a summary.

Guarantees:
* Storage problems (unreachable endpoint, missing bucket or object, missing credentials) fail
  before any model is loaded, with a message naming the config key and the cause; so do
  unreadable shards and image_ids found in more than one record (every shard's ids are listed
  first: Parquet footers and id columns, tar headers), before anything is written.
* A model that cannot load fails with one line (:class:`pipeline.provenance.ModelLoadError`)
  before any data flows: a probe task with the actor's resources loads both models first.
* Re-running a run_id skips the (image_id, sigma) rows already written (and images already
  recorded as errors); a run_id can only be resumed with the same data/models/smoothing config
  and the same weights behind the model URIs (:mod:`pipeline.provenance`).
* When :func:`run_certification` returns, every selected (image, sigma) row is in exactly one
  counts file, and at most one counts file has fewer than ``COMPACT_ROWS`` (10,000) rows.
* A run with nothing left to do decides so from one listing and read of its files, without
  importing Ray, torch or the models.
* It uses the Ray of :func:`pipeline.ray_runtime.ray_session`: the one already initialised in this
  process, the cluster of ``ray job submit`` (``RAY_ADDRESS``, no resources asked), or else an
  embedded local Ray for the duration of the run.
"""
from __future__ import annotations

import json
import logging

from pipeline.config import Config
from pipeline.errors import StorageError
from pipeline.progress import Progress
from pipeline.provenance import (ModelLoadError, check_model_uris, open_run, record_checksums,
                                 record_device_settings, recorded_device_settings)
from pipeline.ray_runtime import ray_session
from pipeline.resources import check_resources
from pipeline.resume import RemainingWork, decode_remaining
from pipeline.run_dir import RunDirectory, RunScan
from pipeline.shards import list_shards, read_shards, scan_image_ids, select_ids

log = logging.getLogger(__name__)


def actor_pool(actors: int) -> "ray.data.ActorPoolStrategy":
    """``actors`` actors, each running one call at a time on its main thread. Ray Data's default
    moves a class UDF onto a helper thread (to overlap batching with the call); there the same
    sampler ran 20-25% slower on CPU (measured: jobs.bench_pipeline, issue 12's actor ratio), and
    one call at a time leaves nothing to overlap."""
    import ray

    return ray.data.ActorPoolStrategy(size=actors, enable_true_multi_threading=True)


# The share of n that sequential sampling is projected to draw, for the compile decision only: the
# demo digits drew 0.51-0.54 of it (jobs.benchmark --time-to-table, 24 and 48 images, n = 10,000);
# the simulation at the ImageNet protocol draws about 0.23 (4.4x fewer samples, jobs.bench_sequential),
# so on such data the projection leans toward compiling.
SEQUENTIAL_DRAW_SHARE = 0.5


def projected_samples_per_actor(smoothing: dict, images: int, actors: int) -> float:
    """The samples one actor is projected to draw, which decides whether a compiled setting is
    measured (pipeline.device_settings): n0 + n per (image, sigma), n scaled by
    :data:`SEQUENTIAL_DRAW_SHARE` under sequential sampling; every sigma in full mode, the top
    stage alone in cascade mode (so that a cascade whose images fire early does not pay a compile
    for samples it never draws)."""
    sigmas_drawn = 1 if smoothing["mode"] == "cascade" else len(smoothing["sigmas"])
    n = smoothing["n"] * (SEQUENTIAL_DRAW_SHARE if smoothing["sampling"] == "sequential" else 1.0)
    return images * sigmas_drawn * (smoothing["n0"] + n) / actors


def run_certification(cfg: Config) -> dict:
    """Run (or resume) the certification described by ``cfg``; returns :func:`finish`'s summary."""
    d, s, c = cfg.data, cfg.smoothing, cfg.compute
    fs, shards = list_shards(d["uri"], d["format"])
    if d["expected_shards"] is not None and len(shards) != d["expected_shards"]:
        raise StorageError(f"data.expected_shards: found {len(shards)} shards at {d['uri']}")
    weights = check_model_uris(cfg)
    all_ids = scan_image_ids(fs, shards, d["format"], d["columns"]["image_id"])  # ShardError: duplicates, corrupt
    store = open_run(cfg, weights)
    selected = select_ids(all_ids, d["selection"])
    scan = store.scan()  # the one read of the run's files at start: resume, and finish reads only new ones
    work = RemainingWork(s["sigmas"], s["mode"] == "cascade", selected, scan.done, scan.error_ids)
    total = work.images(selected if selected is not None else all_ids)
    log.info("run %s: %d shards, %d images to do, output %s", cfg.output["run_id"], len(shards), total, store.uri())
    progress, checksums = Progress(total, c["log_every"]), set()
    if total == 0:
        log.info("nothing to do: every selected (image, sigma) row is already written")
        return finish(store, scan, progress, checksums)

    import ray  # Ray, torch and the models only once there is work: a finished run decides without them

    from pipeline.certify_actor import CertifyActor, probe_models

    with ray_session():  # the running Ray, the cluster of `ray job submit`, or an embedded local one
        check_resources(c)  # a request that no node can ever hold fails now, naming the compute.* keys
        probe = ray.remote(probe_models).options(num_cpus=c["cpus_per_actor"], num_gpus=c["gpus_per_actor"])
        work_samples = projected_samples_per_actor(s, total, c["actors"])
        failure, settings = ray.get(probe.remote(cfg.to_dict(), recorded_device_settings(store, c), work_samples))
        if failure is not None:
            raise ModelLoadError(f"{failure} (checked before the run: nothing was certified)")
        record_device_settings(store, settings)
        ray.data.DataContext.get_current().max_errored_blocks = 0
        ds = read_shards(fs, shards, d["format"], d["columns"])
        # one block per actor call, whatever the shard sizes: work spreads over every actor, and a
        # failed call redoes only its own images
        ds = ds.repartition(target_num_rows_per_block=c["images_per_call"])
        ds = ds.map_batches(decode_remaining, batch_size=c["images_per_call"], batch_format="numpy",
                            num_cpus=c["cpus_per_task"],
                            fn_kwargs=dict(work_ref=[ray.put(work)], store=store, fmt=d["format"],
                                           columns=d["columns"], data_cfg=d, sigmas=s["sigmas"]))
        ds = ds.map_batches(CertifyActor, fn_constructor_kwargs={"config": cfg.to_dict(), "device_settings": settings},
                            batch_size=c["images_per_call"], batch_format="numpy",
                            compute=actor_pool(c["actors"]),
                            num_gpus=c["gpus_per_actor"], num_cpus=c["cpus_per_actor"])
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            progress.update(len(batch["image_id"]), int(batch["rows"].sum()))
            checksums.update(batch["model_checksums"].tolist())
    return finish(store, scan, progress, checksums)


def finish(store: RunDirectory, start: RunScan, progress: Progress, checksums: set[str]) -> dict:
    """Record checksums, leave every row in exactly one file and the counts in files of
    ``COMPACT_ROWS`` rows (:meth:`RunDirectory.compact`), remove stale temporaries, summarise; reads
    only the files the ``start`` scan does not hold."""
    record_checksums(store, checksums)
    final, merged = store.compact(store.scan(start))
    store.remove_stale_temporaries()
    summary = {"run": store.uri(), "images": progress.done, "rows": progress.rows,
               "rows_total": len(final.done), "errors": len(final.error_ids), "counts_files": len(final.counts),
               "merged_files": merged, "seconds": round(progress.seconds(), 3)}
    log.info("finished: %s", json.dumps(summary))
    return summary
