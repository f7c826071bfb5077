"""What remains to do on a resume, and the decode step that drops what is done.

Guarantee: an image reaches the actors only with the sigmas that have no counts row yet; an image
not selected, recorded as an error, or complete (in cascade mode: with any row, since a cascade
writes an image's rows together) never does. A batch with nothing left goes to Ray with the column
types of any other batch (:func:`typed_batch`), never as pickled objects.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import pyarrow as pa

from pipeline.run_dir import RunDirectory
from pipeline.shards import decode_batch


@dataclass
class RemainingWork:
    """Which sigmas of an image remain: a bool mask over ``sigmas``, or None when nothing does."""

    sigmas: tuple[float, ...]
    cascade: bool
    selected: set[str] | None  # None: every image
    done: set[tuple[str, float]]  # (image_id, sigma) rows already written
    errors: set[str] = field(default_factory=set)  # images recorded as undecodable

    def __call__(self, image_id: str) -> np.ndarray | None:
        if (self.selected is not None and image_id not in self.selected) or image_id in self.errors:
            return None
        mask = np.array([(image_id, s) not in self.done for s in self.sigmas])
        if not mask.any() or (self.cascade and not mask.all()):
            return None
        return mask

    def images(self, image_ids: Iterable[str]) -> int:
        """How many of ``image_ids`` have work left."""
        return sum(self(i) is not None for i in image_ids)


_FETCHED: dict[str, RemainingWork] = {}  # per worker process: the run's RemainingWork, fetched once


def decode_remaining(batch: dict, *, work_ref: list, store: RunDirectory, **kwargs: Any) -> dict:
    """Ray Data UDF: :func:`pipeline.shards.decode_batch` keeping the remaining (image, sigma) work.

    ``work_ref`` is ``[ObjectRef of a RemainingWork]`` (in a list, so Ray hands over the reference,
    not a copy per task); the object is fetched once per worker process. Undecodable images are
    recorded in ``store``.
    """
    import ray

    key = work_ref[0].hex()
    if key not in _FETCHED:
        _FETCHED.clear()
        _FETCHED[key] = ray.get(work_ref[0])
    return typed_batch(decode_batch(batch, keep=_FETCHED[key], on_error=store.write_error, **kwargs))


def typed_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray] | pa.Table:
    """``batch`` in a form Ray keeps typed: as it is, or when it has no rows an Arrow table whose
    columns have the types Ray gives a non-empty one (string ids, tensor columns of the same
    shapes). Ray 2.60 converts a multi-dimensional column to its tensor type only when it has a
    row, and otherwise pickles it, with a warning."""
    if len(batch["image_id"]):
        return batch
    from ray.data.extensions import ArrowTensorArray

    return pa.table({name: ArrowTensorArray.from_numpy(column) if column.ndim > 1
                     else pa.array(column, pa.string() if column.dtype == object else None)
                     for name, column in batch.items()})
