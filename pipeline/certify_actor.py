"""The callable class that Ray Data's ``map_batches`` runs on each (GPU or CPU) actor.

One replica of denoiser + classifier per actor. Per batch of images it draws the Monte Carlo
samples, writes the counts rows itself (one content-named file per batch, see
:mod:`pipeline.run_dir`) and returns a small summary (rows per image, weight checksums). In
``cascade`` mode it walks the cascade (:func:`pipeline.certification.walk_cascade`): the highest
sigma first, the next lower sigma only for the images that fell through.
"""
from __future__ import annotations

import json
import os
import socket
import time
from typing import Any, Mapping, NamedTuple

import numpy as np
import pyarrow as pa
import torch

from pipeline.certification import SparseCounts, cascade_stage_outcome, walk_cascade
from pipeline.counts_schema import COUNTS_SCHEMA
from pipeline.images import to_float_chw
from pipeline.models.factory import create_denoise_classify, model_checksums
from pipeline.run_dir import RunDirectory
from pipeline.sampling import MonteCarloSampler, SampleCounts


class Part(NamedTuple):
    """One sampler call: images ``rows`` of the batch at ``sigmas``."""
    rows: np.ndarray
    sigmas: list[float]
    counts: SampleCounts
    seconds: float  # wall time per (image, sigma)


class CertifyActor:
    """``map_batches`` UDF: {image_id, label, image uint8 [B,H,W,3], todo bool [B,S]} -> summary."""

    def __init__(self, config: Mapping[str, Any]):
        compute, models = config["compute"], config["models"]
        gpu = compute["gpus_per_actor"] > 0
        torch.set_num_threads(compute["torch_threads"] or max(1, int(compute["cpus_per_actor"])))
        model = create_denoise_classify(models["denoiser"], models["classifier"], models["cache_dir"])
        self.checksums = json.dumps(model_checksums(model), sort_keys=True)
        self.sampler = MonteCarloSampler(model, compute["batch_size"], compute["dtype"],
                                         "cuda" if gpu else "cpu", compute["compile"])
        self.smoothing = config["smoothing"]
        self.store = RunDirectory(config["output"]["uri"], config["output"]["run_id"])
        self.meta = {"run_id": config["output"]["run_id"], "num_classes": self.sampler.num_classes,
                     "seed": self.smoothing["seed"], "n0": self.smoothing["n0"], "n": self.smoothing["n"],
                     "denoiser_id": models["denoiser"]["uri"], "classifier_id": models["classifier"]["name"],
                     "worker": f"{socket.gethostname()}:{os.getpid()}"}

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

    def _sample(self, images: torch.Tensor, ids: np.ndarray, rows: np.ndarray, sigmas: list[float]) -> Part:
        start = time.perf_counter()
        s = self.smoothing
        index = torch.from_numpy(rows).to(images.device)
        out = self.sampler.sample(images.index_select(0, index), list(ids[rows]), sigmas, s["n0"], s["n"], s["seed"])
        return Part(rows, sigmas, out, (time.perf_counter() - start) / (len(rows) * len(sigmas)))

    def _full(self, images: torch.Tensor, ids: np.ndarray, todo: np.ndarray) -> list[Part]:
        """Every remaining sigma of every image; images grouped by which sigmas remain."""
        sigmas = np.asarray(self.smoothing["sigmas"])
        patterns, group = np.unique(todo, axis=0, return_inverse=True)
        return [self._sample(images, ids, np.flatnonzero(group.ravel() == g), sigmas[p].tolist())
                for g, p in enumerate(patterns) if p.any()]

    def _cascade(self, images: torch.Tensor, ids: np.ndarray, todo: np.ndarray) -> list[Part]:
        """Highest sigma first; a lower sigma only for the images that fell through."""
        s = self.smoothing
        levels = sorted(s["sigmas"], reverse=True)
        parts = []

        def sample_stage(stage: int, active: np.ndarray) -> np.ndarray:
            part = self._sample(images, ids, active, [levels[stage]])
            parts.append(part)
            return cascade_stage_outcome(stage, len(levels), SparseCounts.from_dense(part.counts.counts0[:, 0]),
                                         SparseCounts.from_dense(part.counts.counts[:, 0]),
                                         s["alpha"], s["p0"], s["schedule"])

        walk_cascade(len(ids), len(levels), sample_stage)
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
            "timestep": pa.array(np.tile(out.timesteps, num).astype(np.int64)),
            "seconds": pa.array(np.full(total, part.seconds)),
        }
        columns.update({k: pa.array([v] * total, COUNTS_SCHEMA.field(k).type) for k, v in self.meta.items()})
        return pa.table({f.name: columns[f.name] for f in COUNTS_SCHEMA}, schema=COUNTS_SCHEMA)
