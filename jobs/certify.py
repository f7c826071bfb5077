"""Certification job: shards -> decode/resize (CPU tasks) -> Monte Carlo counts (actor pool) -> Parquet.

    python -m jobs.certify --config configs/imagenet.yaml [--set smoothing.n=1000 ...]

and the same line after ``ray job submit --working-dir . --``. Guarantees:
* Storage problems (unreachable endpoint, missing bucket or object, missing credentials) fail
  before any model is loaded, with a message naming the config key and the cause.
* Re-running a run_id skips the (image_id, sigma) rows already written (and images already
  recorded as errors); a run_id can only be resumed with the same data/models/smoothing config.
* When the job returns, every selected (image, sigma) row is in exactly one counts file.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from jobs.cli import run_config_job
from pipeline.config import Config, load_config
from pipeline.run_dir import RunDirectory
from pipeline.errors import StorageError, describe
from pipeline.shards import (decode_batch, list_shards, needs_scan, read_shards,
                           scan_image_ids, select_ids)
from pipeline.storage import url_to_fs

log = logging.getLogger("jobs.certify")


@dataclass
class TodoFilter:
    """Which sigmas of an image remain: None if not selected or already complete."""
    sigmas: tuple[float, ...]
    cascade: bool
    selected: set[str] | None
    done: set[tuple[str, float]]
    errors: set[str] = field(default_factory=set)

    def __call__(self, image_id: str) -> np.ndarray | None:
        if (self.selected is not None and image_id not in self.selected) or image_id in self.errors:
            return None
        mask = np.array([(image_id, s) not in self.done for s in self.sigmas])
        # Cascade rows of an image are written together: any row means the image is finished.
        if not mask.any() or (self.cascade and not mask.all()):
            return None
        return mask

    def remaining(self, image_ids: Iterable[str]) -> int:
        return sum(self(i) is not None for i in image_ids)


_FILTERS: dict[str, TodoFilter] = {}


def _decode(batch: dict, *, filter_ref: list, store: RunDirectory, **kwargs: Any) -> dict:
    """Ray Data UDF: the shared TodoFilter is fetched once per worker process."""
    import ray

    key = filter_ref[0].hex()
    if key not in _FILTERS:
        _FILTERS.clear()
        _FILTERS[key] = ray.get(filter_ref[0])
    return decode_batch(batch, keep=_FILTERS[key], on_error=store.write_error, **kwargs)


def code_version() -> str:
    """``git describe`` of the working tree when available, else the package version."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=here,
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except OSError:
        pass
    from importlib.metadata import PackageNotFoundError, version
    try:
        return f"msdsmooth {version('msdsmooth')}"
    except PackageNotFoundError:
        return "unknown"


def check_model_uris(cfg: Config) -> None:
    """Every model URI in the config exists (no download)."""
    for key, spec in (("models.denoiser.uri", cfg.models["denoiser"]), ("models.classifier.uri", cfg.models["classifier"])):
        uri = spec.get("uri")
        if uri is None:
            continue
        try:
            fs, path = url_to_fs(uri)
            exists = fs.exists(path)
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"{key} {uri}: cannot reach storage: {describe(exc)}") from exc
        if not exists:
            raise StorageError(f"{key} {uri}: not found")


def open_run(cfg: Config) -> RunDirectory:
    """The run directory, checked writable and consistent with an earlier attempt's manifest."""
    out = cfg.output
    try:
        store = RunDirectory(out["uri"], out["run_id"])
        previous = store.read_manifest()
    except Exception as exc:  # noqa: BLE001
        raise StorageError(f"output.uri {out['uri']}: cannot reach storage: {describe(exc)}") from exc
    if previous is not None and previous["config_content"] != cfg.content_key():
        diff = sorted(k for k in cfg.content_key() if previous["config_content"].get(k) != cfg.content_key()[k])
        raise StorageError(f"output.run_id {out['run_id']}: exists with a different config ({', '.join(diff)} "
                           "differ); use a new run_id")
    manifest = previous or {}
    manifest.update(run_id=out["run_id"], config=cfg.to_dict(), config_content=cfg.content_key(),
                    code_version=code_version())
    manifest.setdefault("model_checksums", None)
    manifest.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    try:
        store.write_manifest(manifest)
    except Exception as exc:  # noqa: BLE001
        raise StorageError(f"output.uri {out['uri']}: cannot write the run: {describe(exc)}") from exc
    return store


def record_checksums(store: RunDirectory, reported: set[str]) -> None:
    """Put the weights' sha256 that the actors loaded into the manifest; all actors must agree."""
    if not reported:
        return
    if len(reported) > 1:
        raise RuntimeError(f"actors loaded different model weights: {sorted(reported)}")
    manifest = store.read_manifest()
    manifest["model_checksums"] = json.loads(next(iter(reported)))
    store.write_manifest(manifest)


class Progress:
    """Logs images done, images/s and an ETA every ``every`` images."""

    def __init__(self, total: int | None, every: int):
        self.total, self.every, self.done, self.rows = total, every, 0, 0
        self.start, self._next = time.perf_counter(), every

    def update(self, images: int, rows: int) -> None:
        self.done += images
        self.rows += rows
        if self.done >= self._next:
            self._next = (self.done // self.every + 1) * self.every
            log.info(self.line())

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        text = f"{self.done} images, {self.rows} rows, {rate:.2f} images/s"
        if self.total:
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            text = f"{self.done}/{self.total} images ({100 * self.done / self.total:.1f}%), " \
                   f"{self.rows} rows, {rate:.2f} images/s, ETA {eta / 60:.1f} min"
        return text


def run(cfg: Config) -> dict:
    """Run (or resume) the certification described by ``cfg``; returns a summary."""
    import ray

    from pipeline.certify_actor import CertifyActor

    d, s, c = cfg.data, cfg.smoothing, cfg.compute
    fs, shards = list_shards(d["uri"], d["format"])
    if d["expected_shards"] is not None and len(shards) != d["expected_shards"]:
        raise StorageError(f"data.expected_shards: found {len(shards)} shards at {d['uri']}")
    check_model_uris(cfg)
    store = open_run(cfg)
    # Parquet ids are cheap to list (one column); tar shards are scanned only when the selection needs it.
    scan = d["format"] == "parquet" or needs_scan(d["selection"])
    all_ids = scan_image_ids(fs, shards, d["format"], d["columns"]["image_id"]) if scan else None
    selected = select_ids(all_ids, d["selection"])
    todo = TodoFilter(s["sigmas"], s["mode"] == "cascade", selected, store.done_keys(), store.error_ids())
    listed = selected if selected is not None else all_ids
    total = todo.remaining(listed) if listed is not None else None
    log.info("run %s: %d shards, %s images to do, output %s", cfg.output["run_id"], len(shards),
             "?" if total is None else total, store.uri())

    if total == 0:
        log.info("nothing to do: every selected (image, sigma) row is already written")
        return finish(store, Progress(total, c["log_every"]), set())
    if not ray.is_initialized():
        ray.init()
    ctx = ray.data.DataContext.get_current()
    ctx.max_errored_blocks = 0
    ds = read_shards(fs, shards, d["format"], d["columns"])
    ds = ds.map_batches(_decode, batch_size=max(c["images_per_call"], 16), batch_format="numpy",
                        num_cpus=c["cpus_per_task"],
                        fn_kwargs=dict(filter_ref=[ray.put(todo)], store=store, fmt=d["format"],
                                       columns=d["columns"], data_cfg=d, sigmas=s["sigmas"]))
    ds = ds.map_batches(CertifyActor, fn_constructor_kwargs={"config": cfg.to_dict()},
                        batch_size=c["images_per_call"], batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=c["actors"]),
                        num_gpus=c["gpus_per_actor"], num_cpus=c["cpus_per_actor"])
    progress, checksums = Progress(total, c["log_every"]), set()
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        progress.update(len(batch["image_id"]), int(batch["rows"].sum()))
        checksums.update(batch["model_checksums"].tolist())
    return finish(store, progress, checksums)


def finish(store: RunDirectory, progress: Progress, checksums: set[str]) -> dict:
    """Record checksums, leave every row in exactly one file, summarise."""
    record_checksums(store, checksums)
    merged = store.compact_duplicates()
    summary = {"run": store.uri(), "images": progress.done, "rows": progress.rows,
               "rows_total": len(store.done_keys()), "errors": len(store.error_ids()),
               "merged_files": merged, "seconds": round(time.perf_counter() - progress.start, 3)}
    log.info("finished: %s", json.dumps(summary))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    return run_config_job(argv, __doc__.split("\n")[0], "smoothing.n0=100", load_config, run)


if __name__ == "__main__":
    sys.exit(main())
