"""Training data: certification's shard readers, split by a hash of the image_id.

Guarantees:
* Every image goes to the training split or to the held-out split by a seeded hash of its
  image_id (:func:`is_holdout`): the same split on every run, worker count and shard order.
* Images are decoded and resized exactly as for certification (:func:`pipeline.shards.decode_batch`,
  an undecodable image is logged and skipped) and reach the device as
  :func:`pipeline.images.to_float_chw` makes them: float32 [B, 3, R, R] in [0, 1].
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from pipeline.finetuning.config import FinetuneConfig
from pipeline.images import to_float_chw
from pipeline.shards import decode_batch, list_shards, read_shards


def is_holdout(image_id: str, fraction: float, seed: int) -> bool:
    """Whether ``image_id`` is held out: its seeded sha256 as a number in [0, 1) is below ``fraction``."""
    digest = hashlib.sha256(f"{seed}:{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


@dataclass(frozen=True)
class HoldoutSplit:
    """``decode_batch``'s keep-filter for one side of a hash split of the image_ids."""
    fraction: float
    seed: int
    holdout: bool

    def __call__(self, image_id: str) -> np.ndarray | None:
        return np.ones(1, dtype=bool) if is_holdout(image_id, self.fraction, self.seed) == self.holdout else None


def _log_decode_error(image_id: str, source: str, message: str) -> None:
    logging.getLogger(__name__).warning("skipping %s (%s): %s", image_id, source, message)


def _decode_for_training(batch: dict, **kwargs: Any) -> dict:
    """decode_batch, keeping only the tensor columns: image uint8 [B, R, R, 3], label."""
    out = decode_batch(batch, on_error=_log_decode_error, sigmas=(1.0,), **kwargs)  # todo mask unused
    return {"image": out["image"], "label": out["label"]}


def build_datasets(cfg: FinetuneConfig) -> dict:
    """{"train", "holdout"}: Ray Datasets of decoded images from the configured shards."""
    d, t = cfg.data, cfg.training
    fs, shards = list_shards(d["uri"], d["format"])
    out = {}
    for name, holdout in (("train", False), ("holdout", True)):
        ds = read_shards(fs, shards, d["format"], d["columns"]).map_batches(
            _decode_for_training, batch_format="numpy", num_cpus=cfg.compute["cpus_per_task"],
            fn_kwargs=dict(fmt=d["format"], columns=d["columns"], data_cfg=d,
                           keep=HoldoutSplit(t["holdout_fraction"], t["seed"], holdout)))
        out[name] = ds.limit(t["holdout_limit"]) if holdout and t["holdout_limit"] else ds
    return out


def on_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(x in [0,1] float32 [B, 3, R, R], labels int64 [B]) of a decoded batch, on ``device``."""
    return to_float_chw(batch["image"], device), batch["label"].to(device)
