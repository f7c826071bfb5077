"""A protocol's real architectures with random weights, run once: the figures of ``python -m jobs.smoke_protocols``.

* :func:`load`: the config with random weights for its models (``models.*.uri`` null,
  ``models.*.random_weights`` true; none for a denoiser it does not have), then the overrides.
* :func:`forward_pass`: one denoise-and-classify pass in this process (seconds per sample, peak memory).
* :func:`certify_end_to_end`: two synthetic images certified through the real pipeline, every
  (image, sigma) pair checked to be written exactly once (the job's docstring has the details).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from pipeline.config import Config, config_from_dict, read_yaml
from pipeline.models.factory import create_denoise_classify

RANDOM_DENOISER = ("models.denoiser.uri=null", "models.denoiser.random_weights=true")
RANDOM_CLASSIFIER = ("models.classifier.uri=null", "models.classifier.per_sigma=null",
                     "models.classifier.pretrained=false", "models.classifier.random_weights=true")
SYNTHETIC_IMAGES = 2
SYNTHETIC_SCALE = (300 / 256, 260 / 256)  # (width, height) / the resize side: 300 x 260 at ImageNet's 256
N0, N = 1, 2  # samples per (image, sigma) of the end-to-end run: selection, estimation


def load(path: str, overrides: Sequence[str]) -> Config:
    """The config with random weights for its models (none for a denoiser it does not have), then ``overrides``."""
    raw = read_yaml(path)
    no_denoiser = isinstance(raw.get("models"), dict) and "denoiser" in raw["models"] and raw["models"]["denoiser"] is None
    return config_from_dict(raw, [*(() if no_denoiser else RANDOM_DENOISER), *RANDOM_CLASSIFIER, *overrides])


def smoke(cfg: Config, end_to_end: bool = False) -> dict[str, Any]:
    """:func:`forward_pass`'s figures, with :func:`certify_end_to_end`'s under ``end_to_end`` when asked."""
    summary = forward_pass(cfg)
    if end_to_end:
        summary["end_to_end"] = certify_end_to_end(cfg)
    return summary


def forward_pass(cfg: Config) -> dict[str, Any]:
    """One forward pass of the config's models in this process (module docstring)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    torch.manual_seed(0)
    model = create_denoise_classify(cfg.models["denoiser"], cfg.models["classifier"], cfg.models["cache_dir"],
                                    resolution=cfg.data["resolution"]).to(device)
    built = time.perf_counter() - started
    side, count = cfg.data["resolution"], cfg.compute["images_per_call"]
    unet_sides: list[int | None] = []
    if model.denoiser is not None:
        model.denoiser.unet.register_forward_hook(lambda module, args, out: unet_sides.append(args[0].shape[-1]))
    x = torch.rand(count, 3, side, side, generator=torch.Generator().manual_seed(0)).to(device)
    sigma = torch.tensor(max(cfg.smoothing["sigmas"]), device=device)
    with torch.inference_mode():
        started = time.perf_counter()
        logits = model((x + sigma * torch.randn_like(x)), sigma)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _max_rss_bytes()
    return {"config": cfg.output["run_id"], "device": str(device), "torch_threads": torch.get_num_threads(),
            "resolution": side, "unet_input_side": unet_sides[0] if unet_sides else None, "logits_shape": list(logits.shape),
            "build_seconds": round(built, 2), "seconds_per_sample": round(seconds / count, 3),
            "peak_memory_gib": round(peak / 2**30, 2)}


def _max_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def synthetic_size(data: dict) -> tuple[int, int]:
    """(width, height) of the synthetic images: :data:`SYNTHETIC_SCALE` times the resize side
    (``data.resize``, else ``data.resolution``), rounded up: both larger than that side."""
    side = data["resize"] or data["resolution"]
    return math.ceil(side * SYNTHETIC_SCALE[0]), math.ceil(side * SYNTHETIC_SCALE[1])


def write_synthetic_shards(data: dict, root: Path) -> tuple[str, list[str]]:
    """:data:`SYNTHETIC_IMAGES` uniform-noise RGB images (seed 0, label 0, :func:`synthetic_size`) as
    PNGs under ``root/images``, then Parquet shards of one image under ``root/shards``; returns the
    shards' ``file://`` URI and the image ids."""
    from pipeline.digits import write_image_folder
    from pipeline.shard_writer import list_images, make_shards

    width, height = synthetic_size(data)
    images = np.random.default_rng(0).integers(0, 256, (SYNTHETIC_IMAGES, height, width, 3), dtype=np.uint8)
    folder = str(write_image_folder(images, np.zeros(SYNTHETIC_IMAGES, dtype=np.int64), root / "images", prefix="smoke"))
    uri = (root / "shards").resolve().as_uri()
    make_shards(folder, uri, fmt="parquet", shard_size=1)
    return uri, [image.image_id for image in list_images(folder)]


def end_to_end_overrides(cfg: Config, shards_uri: str, runs_uri: str) -> list[str]:
    """The overrides of the end-to-end run (module docstring): the synthetic shards, every image and
    sigma with :data:`N0` and :data:`N`, one small actor, the device settings fixed and the batch
    the run's samples, the output in ``runs_uri``."""
    from pipeline.device_settings import CPU_DEFAULT, explicit_settings

    samples = SYNTHETIC_IMAGES * len(cfg.smoothing["sigmas"]) * (N0 + N)
    settings = CPU_DEFAULT | explicit_settings(cfg.compute) | {"batch_size": samples}
    threads = cfg.compute["torch_threads"] or torch.get_num_threads()  # as the forward pass ran
    fixed = {"data.uri": shards_uri, "data.format": "parquet", "data.columns": None, "data.selection": None,
             "data.expected_shards": None, "smoothing.mode": "full", "smoothing.sampling": "fixed",
             "smoothing.n0": N0, "smoothing.n": N, "compute.actors": 1, "compute.cpus_per_actor": 1,
             "compute.gpus_per_actor": 1 if torch.cuda.is_available() else 0, "compute.cpus_per_task": 0.5,
             "compute.images_per_call": SYNTHETIC_IMAGES, "compute.torch_threads": threads,
             **{f"compute.{key}": value for key, value in settings.items()}, "output.uri": runs_uri}
    return [f"{key}={json.dumps(value)}" for key, value in fixed.items()]


def certify_end_to_end(cfg: Config) -> dict[str, Any]:
    """Certify :data:`SYNTHETIC_IMAGES` synthetic images with ``cfg`` through the real pipeline and
    check its counts (module docstring); returns the ``end_to_end`` figures."""
    from pipeline.certify_actor import CertifyActor
    from pipeline.certify_run import run_certification

    with tempfile.TemporaryDirectory(prefix="smoke-protocols-") as tmp:
        root = Path(tmp)
        shards_uri, image_ids = write_synthetic_shards(cfg.data, root)
        run_cfg = config_from_dict(cfg.to_dict(), end_to_end_overrides(cfg, shards_uri, (root / "runs").resolve().as_uri()))
        peak = PeakRss(CertifyActor.__name__)
        local = not os.environ.get("RAY_ADDRESS")  # an existing cluster's workers do not descend from this process
        started = time.perf_counter()
        with peak if local else contextlib.nullcontext():
            summary = run_certification(run_cfg)
        seconds = time.perf_counter() - started
        rows, samples, sampling_seconds = read_checked_counts(summary["run"], image_ids, run_cfg.smoothing["sigmas"])
    return {"images": len(image_ids), "image_size": list(synthetic_size(cfg.data)), "rows": rows,
            "pairs": len(image_ids) * len(run_cfg.smoothing["sigmas"]), "samples": samples,
            "dtype": run_cfg.compute["dtype"], "seconds": round(seconds, 2),
            "seconds_per_sample": round(seconds / samples, 3),
            "sampling_seconds_per_sample": round(sampling_seconds / samples, 3),
            "actor_peak_memory_gib": round(peak.peak / 2**30, 2) if peak.peak is not None else None}


def read_checked_counts(run_uri: str, image_ids: Sequence[str], sigmas: Sequence[float]) -> tuple[int, int, float]:
    """(rows, samples drawn: the sum of n0 + n, the rows' summed ``seconds``) of the run at
    ``run_uri``, once every (image, sigma) pair of ``image_ids`` x ``sigmas`` has exactly one row and
    no other row is there (RuntimeError naming the pairs otherwise) and the rows meet the counts
    contract (CountsError otherwise)."""
    from analysis.counts import read_counts, validate_counts
    from analysis.io import read_tables, resolve_run

    files = resolve_run(run_uri)
    table = read_counts(files)
    found = Counter(zip(table["image_id"].to_pylist(), table["sigma"].to_pylist()))
    expected = {(image, float(sigma)) for image in image_ids for sigma in sigmas}
    wrong = sorted((pair, found[pair]) for pair in expected | set(found) if found[pair] != int(pair in expected))
    if wrong:
        raise RuntimeError(f"{run_uri}: (image_id, sigma) pairs not written exactly once (pair, rows): {wrong[:6]}")
    counts = validate_counts(table)
    samples = int(counts.table["n0"].to_numpy().sum() + counts.table["n"].to_numpy().sum())
    seconds = sum(float(np.sum(t["seconds"].to_numpy())) for t in read_tables(files.fs, files.counts, ["seconds"]))
    return table.num_rows, samples, seconds


class PeakRss:
    """The largest resident set size (bytes) of any process descending from this one whose command
    line contains ``name``, over polls every ``interval`` seconds while the ``with`` block runs
    (``peak``: None when no poll found one, or outside a ``with`` block). A peak shorter than the
    interval can be missed.

    A local Ray's workers descend from the driver and Ray titles an actor's process with its class
    (``ray::MapWorker(MapBatches(CertifyActor))...``); the workers of an existing cluster do not
    descend from it, hence None there."""

    def __init__(self, name: str, interval: float = 0.5):
        self.name, self.interval, self.peak = name, interval, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import ray  # noqa: F401 - puts Ray's bundled psutil (ray/thirdparty_files) on sys.path
        import psutil

        me = psutil.Process()
        while True:
            for process in me.children(recursive=True):
                try:
                    if self.name in " ".join(process.cmdline()):
                        self.peak = max(self.peak or 0, process.memory_info().rss)
                except psutil.Error:  # ended between the listing and the reading
                    continue
            if self._stop.wait(self.interval):
                return
