"""The callable class that Ray Data's ``map_batches`` runs on each (GPU or CPU) actor.

One replica of denoiser + classifier per actor. Per batch of images it draws the Monte Carlo
samples, writes the counts rows itself (one content-named file per batch, see
:mod:`pipeline.run_dir`) and returns a small summary (rows per image, weight checksums). In
``cascade`` mode it walks the cascade (:func:`pipeline.certification.walk_cascade`): the highest
sigma first, the next lower sigma only for the images the walk passes on (fell through, or under
``bonferroni-fallthrough`` undecided). With sequential
sampling (``smoothing.sampling: sequential``) each (image, sigma) pair, or cascade stage, draws
estimation samples up to the plan's looks until the plan's rule stops it
(:class:`pipeline.sequential.PairStopRule`); its row records the samples drawn (``n``) and the
look it stopped at (``look``).

Every actor of a run samples with the same device settings (dtype, memory format, compile, batch
size), resolved once per run by :func:`probe_models` and recorded in the manifest: the function
being certified is the model run in that precision, the same for every row.

The rows name the weights: ``classifier_id`` is ``{timm name}@sha256:{first 16 hex}`` and
``denoiser_id`` ``{uri}@sha256:{first 16 hex}`` of the files the actor loaded (the bare name or
URI for randomly initialised weights; per-sigma classifiers: the sha256 of all their files;
``denoiser_id`` and ``timestep`` null without a denoiser). :func:`probe_models` loads every
model as an actor would, so that the driver can refuse a model that cannot load before any data
flows.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from typing import Any, Mapping, NamedTuple

import numpy as np
import pyarrow as pa
import ray
import torch

from pipeline.certification import SparseCounts, cascade_stage_outcome, walk_cascade
from pipeline.counts_schema import COUNTS_SCHEMA
from pipeline.device_settings import DeviceSettings, resolve_device_settings
from pipeline.host_allocator import retain_freed_memory
from pipeline.images import to_float_chw
from pipeline.models.factory import assemble_denoise_classify, create_denoise_classify, model_checksums, model_loaders
from pipeline.run_dir import RunDirectory
from pipeline.sampling import MonteCarloSampler, SampleCounts, SequentialCounts
from pipeline.sequential import PairStopRule, sequential_plan, sequential_stage_outcome


class Part(NamedTuple):
    """One sampler call: images ``rows`` of the batch at ``sigmas``."""
    rows: np.ndarray
    sigmas: list[float]
    counts: SampleCounts
    seconds: float  # wall time per (image, sigma)


class CertifyActor:
    """``map_batches`` UDF: {image_id, label, image uint8 [B,H,W,3], todo bool [B,S]} -> summary."""

    def __init__(self, config: Mapping[str, Any], device_settings: Mapping[str, Any]):
        compute, models, resolution = config["compute"], config["models"], config["data"]["resolution"]
        prepare_sampling_process(compute)
        model = create_denoise_classify(models["denoiser"], models["classifier"], models["cache_dir"],
                                        resolution=resolution)
        checksums = model_checksums(model)
        self.checksums = json.dumps(checksums, sort_keys=True)
        self.sampler = MonteCarloSampler.from_settings(model, DeviceSettings(**device_settings), actor_device(compute))
        self.smoothing = config["smoothing"]
        # the compile and one-time device setup at start: the first call's ``seconds`` are sampling
        self.sampler.warm_up((3, resolution, resolution), self.smoothing["sigmas"][0])
        self.plan = sequential_plan(self.smoothing)
        self.store = RunDirectory(config["output"]["uri"], config["output"]["run_id"])
        self.meta = {"run_id": config["output"]["run_id"], "num_classes": self.sampler.num_classes,
                     "seed": self.smoothing["seed"], "n0": self.smoothing["n0"],
                     "denoiser_id": (weights_tag(models["denoiser"]["uri"], checksums["denoiser"])
                                     if models["denoiser"] is not None else None),
                     "classifier_id": weights_tag(models["classifier"]["name"], checksums["classifier"]),
                     "worker": f"{socket.gethostname()}@{ray.get_runtime_context().get_node_id()[:8]}:{os.getpid()}"}

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = np.asarray(batch["image_id"], dtype=object)
        if len(ids) == 0:
            return {"image_id": ids, "rows": np.zeros(0, dtype=np.int64), "model_checksums": ids}
        images = to_float_chw(batch["image"], self.sampler.device)
        labels, todo = np.asarray(batch["label"]), np.asarray(batch["todo"], dtype=bool)
        parts = self._cascade(images, ids, todo) if self.smoothing["mode"] == "cascade" else self._full(images, ids, todo)
        table = pa.concat_tables([self._rows(ids, labels, p) for p in parts])
        self.store.write_counts(table)
        rows = np.zeros(len(ids), dtype=np.int64)
        for part in parts:
            rows[part.rows] += len(part.sigmas)
        return {"image_id": ids, "rows": rows,
                "model_checksums": np.full(len(ids), self.checksums, dtype=object)}

    def _sample(self, images: torch.Tensor, ids: np.ndarray, rows: np.ndarray, sigmas: list[float],
                earlier: list[tuple[np.ndarray, np.ndarray]] | None = None) -> Part:
        """Counts of images ``rows`` at ``sigmas``: n samples each, or sequentially under the plan
        (``earlier``: a cascade stage's higher stages, see :class:`PairStopRule`)."""
        start = time.perf_counter()
        s = self.smoothing
        x, pair_ids = images.index_select(0, torch.from_numpy(rows).to(images.device)), list(ids[rows])
        if self.plan is None:
            out = self.sampler.sample(x, pair_ids, sigmas, s["n0"], s["n"], s["seed"])
        else:
            rule = PairStopRule(self.plan, np.tile(np.asarray(sigmas, dtype=float), len(rows)), earlier or ())
            out = self.sampler.sample_sequential(x, pair_ids, sigmas, s["n0"], self.plan.looks, rule, s["seed"])
        return Part(rows, sigmas, out, (time.perf_counter() - start) / (len(rows) * len(sigmas)))

    def _full(self, images: torch.Tensor, ids: np.ndarray, todo: np.ndarray) -> list[Part]:
        """Every remaining sigma of every image; images grouped by which sigmas remain."""
        sigmas = np.asarray(self.smoothing["sigmas"])
        patterns, group = np.unique(todo, axis=0, return_inverse=True)
        return [self._sample(images, ids, np.flatnonzero(group.ravel() == g), sigmas[p].tolist())
                for g, p in enumerate(patterns) if p.any()]

    def _cascade(self, images: torch.Tensor, ids: np.ndarray, todo: np.ndarray) -> list[Part]:
        """Highest sigma first; a lower sigma only for the images the walk passes on."""
        s = self.smoothing
        levels = sorted(s["sigmas"], reverse=True)
        parts: list[Part] = []

        def sample_stage(stage: int, active: np.ndarray) -> np.ndarray:
            # sequential: the higher stages' estimation counts and looks of these images cap the radius
            earlier = [(_on_rows(p.counts.counts[:, 0], p.rows, active), _on_rows(p.counts.stopped_look[:, 0], p.rows, active))
                       for p in parts] if self.plan is not None else None
            part = self._sample(images, ids, active, [levels[stage]], earlier)
            parts.append(part)
            counts0, counts = (SparseCounts.from_dense(c[:, 0]) for c in (part.counts.counts0, part.counts.counts))
            if self.plan is not None:
                return sequential_stage_outcome(self.plan, stage, counts0, counts)
            return cascade_stage_outcome(stage, len(levels), counts0, counts, s["alpha"], s["p0"], s["schedule"])

        walk_cascade(len(ids), len(levels), sample_stage, s["schedule"])
        return parts

    def _rows(self, ids: np.ndarray, labels: np.ndarray, part: Part) -> pa.Table:
        """COUNTS_SCHEMA rows for the part's images x sigmas (image-major)."""
        rows, sigmas, out = part.rows, part.sigmas, part.counts
        num, per = len(rows), len(sigmas)
        total = num * per
        c0_cls, c0_val = SparseCounts.from_dense(out.counts0.reshape(total, -1)).to_arrow_lists()
        c_cls, c_val = SparseCounts.from_dense(out.counts.reshape(total, -1)).to_arrow_lists()
        columns = {
            "image_id": pa.array(np.repeat(ids[rows], per).tolist(), pa.string()),
            "label": pa.array(np.repeat(labels[rows], per).astype(np.int64)),
            "sigma": pa.array(np.tile(np.asarray(sigmas, dtype=np.float64), num)),
            "counts0_classes": c0_cls, "counts0_values": c0_val, "counts_classes": c_cls, "counts_values": c_val,
            "pred_clean": pa.array(np.repeat(out.pred_clean, per).astype(np.int64)),
            "n": pa.array(out.n.reshape(total) if isinstance(out, SequentialCounts) else np.full(total, self.smoothing["n"]),
                          pa.int64()),
            "look": (pa.array(out.stopped_look.reshape(total), pa.int64()) if isinstance(out, SequentialCounts)
                     else pa.nulls(total, pa.int64())),
            "timestep": pa.array(np.tile(out.timesteps, num).astype(np.int64), mask=np.tile(out.timesteps < 0, num)),
            "seconds": pa.array(np.full(total, part.seconds)),
        }
        columns.update({k: pa.array([v] * total, COUNTS_SCHEMA.field(k).type) for k, v in self.meta.items()})
        return pa.table({f.name: columns[f.name] for f in COUNTS_SCHEMA}, schema=COUNTS_SCHEMA)


def weights_tag(name: str | None, checksums: Mapping[str, str]) -> str:
    """``name@sha256:<16 hex>`` of the loaded weight files (one file: its own sha256; several: the
    sha256 of their sorted {uri: sha256}); ``name`` alone when no file was loaded."""
    if not checksums:
        return str(name)
    shas = list(checksums.values())
    digest = shas[0] if len(shas) == 1 else hashlib.sha256(json.dumps(checksums, sort_keys=True).encode()).hexdigest()
    return f"{name}@sha256:{digest[:16]}"


def probe_models(config: Mapping[str, Any], recorded: Mapping[str, Any] | None,
                 work_samples: float | None = None) -> tuple[str | None, dict | None]:
    """Load each model (:func:`pipeline.models.factory.model_loaders`: the denoiser if any, the
    classifier or each per-sigma classifier) as :class:`CertifyActor` does (same cache, run as a Ray
    task with the actor's resources) and resolve the run's device settings there.

    Returns (None, settings record) when all load: ``recorded`` (an earlier attempt's, from the
    manifest) as it is, else :func:`resolve_device_settings` on this device with the real model
    (``auto`` values measured; ``work_samples``, the samples one actor is expected to draw, decides
    whether compiled settings are worth measuring on CPU). Else (one line: the config key, the URI
    and the cause, resolution mismatches included; None)."""
    models, compute, resolution = config["models"], config["compute"], config["data"]["resolution"]
    loaded = []
    for key, source, load in model_loaders(models, resolution):
        try:
            loaded.append(load())
        except Exception as exc:  # noqa: BLE001 - reported to the driver as one line
            cause = " ".join(f"{type(exc).__name__}: {exc}".split())
            return f"{key} {source}: {cause}", None
    if recorded is not None:
        return None, dict(recorded)
    prepare_sampling_process(compute)
    model = assemble_denoise_classify(models, loaded)
    settings = resolve_device_settings(compute, actor_device(compute), model, (3, resolution, resolution), work_samples)
    return None, settings.record()


def actor_device(compute: Mapping[str, Any]) -> str:
    """The device of an actor with the ``compute`` section's resources: GPU actors use CUDA."""
    return "cuda" if compute["gpus_per_actor"] > 0 else "cpu"


def actor_threads(compute: Mapping[str, Any]) -> int:
    """torch's intra-op threads in one actor: ``compute.torch_threads``, else the actor's whole CPUs, at least 1."""
    return compute["torch_threads"] or max(1, int(compute["cpus_per_actor"]))


def prepare_sampling_process(compute: Mapping[str, Any]) -> None:
    """This process as every sampling process runs: torch's intra-op threads (:func:`actor_threads`)
    and glibc's malloc keeping freed memory for the next batch
    (:func:`pipeline.host_allocator.retain_freed_memory`)."""
    torch.set_num_threads(actor_threads(compute))
    retain_freed_memory()


def _on_rows(values: np.ndarray, part_rows: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``values`` (one entry per element of ``part_rows``, batch rows) at the batch rows ``rows``."""
    position = {int(r): i for i, r in enumerate(part_rows)}
    return values[[position[int(r)] for r in rows]]
