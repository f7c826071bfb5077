"""Synthetic counts tables with realistic sparse counts, for the benchmark and the tests.

Each (image, sigma) row draws its n0 and n samples from a multinomial over a dominant class
(the label for most images) and ``others`` other classes; the dominant class's share falls
as sigma grows, so some rows fire, some abstain and some fall through in a cascade.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from pipeline.counts_schema import REQUIRED_COLUMNS


def _list_column(offsets: np.ndarray, values: np.ndarray, dtype: pa.DataType) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, dtype.value_type))


def _sparse_lists(dense: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR (offsets, classes ascending, values) of the nonzero entries of ``dense`` [R, K] at ``classes`` [R, K]."""
    rows, slots = np.nonzero(dense)
    order = np.lexsort((classes[rows, slots], rows))
    rows, slots = rows[order], slots[order]
    offsets = np.zeros(dense.shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=dense.shape[0]), out=offsets[1:])
    return offsets, classes[rows, slots], dense[rows, slots]


def synthetic_counts(
    num_images: int,
    sigmas: Sequence[float] = (0.25, 0.5, 1.0),
    num_classes: int = 1000,
    n0: int = 100,
    n: int = 10_000,
    others: tuple[int, int] = (5, 30),
    seed: int = 0,
    run_id: str = "synthetic",
) -> pa.Table:
    """A counts table (the ``REQUIRED_COLUMNS``), one row per (image, sigma), image-major."""
    rng = np.random.default_rng(seed)
    num_sigmas = len(sigmas)
    rows = num_images * num_sigmas
    label = rng.integers(0, num_classes, num_images)
    dominant = np.where(rng.random(num_images) < 0.8, label, rng.integers(0, num_classes, num_images))
    pred_clean = np.where(rng.random(num_images) < 0.85, label, rng.integers(0, num_classes, num_images))
    sigma = np.tile(np.asarray(sigmas, dtype=np.float64), num_images)
    # logit of the dominant share: per-image base and sensitivity to noise, plus per-row jitter
    base, slope = rng.normal(3.0, 1.5, num_images), rng.uniform(1.0, 9.0, num_images)
    strength = np.repeat(base, num_sigmas) - np.repeat(slope, num_sigmas) * sigma + rng.normal(0, 0.3, rows)
    share = 1 / (1 + np.exp(-strength))
    max_others = min(others[1], num_classes - 1)
    k = rng.integers(min(others[0], max_others), max_others + 1, rows)
    step = max(1, (num_classes - 1) // max_others)
    offsets = np.cumsum(rng.integers(1, step + 1, (rows, max_others)), axis=1)
    slot_classes = np.concatenate([np.repeat(dominant, num_sigmas)[:, None], offsets], axis=1)
    slot_classes[:, 1:] += slot_classes[:, :1]
    slot_classes %= num_classes
    weights = rng.exponential(1.0, (rows, max_others)) * (np.arange(max_others) < k[:, None])
    weights /= weights.sum(axis=1, keepdims=True)
    probs = np.concatenate([share[:, None], (1 - share)[:, None] * weights], axis=1)
    columns: dict[str, pa.Array] = {
        "run_id": pa.array(np.full(rows, run_id)),
        "image_id": pa.array(np.repeat(np.char.add("img", np.arange(num_images).astype(str)), num_sigmas)),
        "label": pa.array(np.repeat(label, num_sigmas)),
        "sigma": pa.array(sigma),
        "n0": pa.array(np.full(rows, n0, dtype=np.int64)),
        "n": pa.array(np.full(rows, n, dtype=np.int64)),
        "num_classes": pa.array(np.full(rows, num_classes, dtype=np.int64)),
        "pred_clean": pa.array(np.repeat(pred_clean, num_sigmas)),
    }
    for prefix, total in (("counts0", n0), ("counts", n)):
        row_offsets, classes, values = _sparse_lists(rng.multinomial(total, probs), slot_classes)
        columns[f"{prefix}_classes"] = _list_column(row_offsets, classes, REQUIRED_COLUMNS[f"{prefix}_classes"])
        columns[f"{prefix}_values"] = _list_column(row_offsets, values, REQUIRED_COLUMNS[f"{prefix}_values"])
    return pa.table({name: columns[name].cast(dtype) for name, dtype in REQUIRED_COLUMNS.items()})
