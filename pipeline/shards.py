"""Shards on object storage -> Ray Dataset of decoded, resized images.

Guarantees:
* :func:`list_shards` returns every shard the URI names (file, folder or glob), sorted, and
  fails with :class:`StorageError` (naming the URI and the cause) when storage is unreachable,
  credentials are missing or nothing matches. :func:`read_shards` hands Ray that explicit list
  with missing paths an error, and checks the number of files Ray reports where it reports it.
* :func:`decode_batch` turns image bytes into uint8 [H, W, 3] arrays at the certification
  resolution; an image that cannot be decoded becomes one error record (written at once,
  idempotently) and is dropped from the batch, so the run goes on.
"""
from __future__ import annotations

import tarfile
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import pyarrow.parquet as pq

from pipeline.errors import StorageError, describe
from pipeline.images import resize_image
from pipeline.storage import url_to_fs

SHARD_SUFFIX = {"parquet": ".parquet", "webdataset": ".tar"}
WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def list_shards(uri: str, fmt: str) -> tuple[Any, list[str]]:
    """(filesystem, sorted shard paths) for a file, folder or glob URI."""
    try:
        fs, path = url_to_fs(uri)
        fs.invalidate_cache()  # list what is there now, not what this process saw before
        if any(c in path for c in "*?["):
            paths = fs.glob(path)
        elif fs.isdir(path):
            paths = [p for p in fs.find(path) if p.endswith(SHARD_SUFFIX[fmt])]
        elif fs.exists(path):
            paths = [path]
        else:
            raise FileNotFoundError(path)
    except Exception as exc:  # noqa: BLE001 - any backend error becomes one clear message
        raise StorageError(f"data.uri {uri}: cannot list shards: {describe(exc)}") from exc
    paths = sorted(p for p in paths if not p.rsplit("/", 1)[-1].startswith("."))
    if not paths:
        raise StorageError(f"data.uri {uri}: no {fmt} shards found")
    return fs, paths


def scan_image_ids(fs: Any, shards: list[str], fmt: str, id_column: str = "image_id") -> list[str]:
    """Every image_id in dataset order (shard order, then row order); reads ids only."""
    ids: list[str] = []
    for shard in shards:
        with fs.open(shard, "rb") as f:
            if fmt == "parquet":
                ids.extend(pq.read_table(f, columns=[id_column]).column(id_column).to_pylist())
            else:
                ids.extend(_tar_keys(f))
    return ids


def _tar_keys(f: Any) -> Iterable[str]:
    seen: dict[str, None] = {}
    with tarfile.open(fileobj=f, mode="r:") as tar:
        for member in tar:
            if member.isfile():
                seen.setdefault(_wds_key(member.name), None)
    return seen


def _wds_key(name: str) -> str:
    """WebDataset key: the path up to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem = base.split(".", 1)[0]
    return f"{folder}/{stem}" if folder else stem


def select_ids(all_ids: list[str] | None, selection: Mapping[str, Any]) -> set[str] | None:
    """The selected image_ids (None = all): explicit ids, or every k-th from an offset, then a limit."""
    if selection["image_ids"] is not None:
        return set(selection["image_ids"])
    if selection["every"] == 1 and selection["offset"] == 0 and selection["limit"] is None:
        return None
    assert all_ids is not None, "every/offset/limit need the ordered image_ids"
    chosen = all_ids[selection["offset"]::selection["every"]]
    return set(chosen[: selection["limit"]] if selection["limit"] is not None else chosen)


def needs_scan(selection: Mapping[str, Any]) -> bool:
    return selection["image_ids"] is None and (
        selection["every"] != 1 or selection["offset"] != 0 or selection["limit"] is not None)


def read_shards(fs: Any, shards: list[str], fmt: str, columns: Mapping[str, str]):
    """A Ray Dataset of the raw shard records (plus each record's shard path) over exactly ``shards``."""
    import ray.data
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    pafs = PyFileSystem(FSSpecHandler(fs))
    if fmt == "parquet":
        ds = ray.data.read_parquet(shards, filesystem=pafs, include_paths=True, file_extensions=None,
                                   ignore_missing_paths=False)
        ds = ds.select_columns([columns["image_id"], columns["image"], columns["label"], "path"])
    else:
        ds = ray.data.read_webdataset(shards, filesystem=pafs, decoder=None, include_paths=True)
    found = ds.input_files()  # empty where the datasource does not report it (Parquet in Ray 2.60)
    if found and len(found) != len(shards):
        raise StorageError(f"Ray found {len(found)} shards, expected {len(shards)}: some paths did not resolve")
    return ds


def _image_bytes(value: Any) -> bytes | None:
    """Image bytes from a binary cell or a {bytes, path} struct (common Parquet exports)."""
    if isinstance(value, Mapping):
        value = value.get("bytes")
    return value


def _rows(batch: Mapping[str, np.ndarray], fmt: str, columns: Mapping[str, str]) -> Iterable[tuple]:
    """(image_id, label, image bytes or None, source) per row of a raw shard batch."""
    n = len(batch["path"] if fmt == "parquet" else batch["__key__"])
    for i in range(n):
        if fmt == "parquet":
            yield (str(batch[columns["image_id"]][i]), batch[columns["label"]][i],
                   _image_bytes(batch[columns["image"]][i]), str(batch["path"][i]))
        else:
            data = next((batch[k][i] for k in WDS_IMAGE_KEYS if k in batch and batch[k][i] is not None), None)
            cls = batch["cls"][i] if "cls" in batch else None
            yield str(batch["__key__"][i]), cls, data, str(batch["__url__"][i])


def _label(value: Any) -> int:
    if value is None:
        return -1
    if isinstance(value, (bytes, bytearray)):
        value = value.decode().strip()
    return int(value)


def decode_batch(batch: Mapping[str, np.ndarray], *, fmt: str, columns: Mapping[str, str], data_cfg: Mapping,
                 sigmas: tuple[float, ...], keep: Callable[[str], np.ndarray | None],
                 on_error: Callable[[str, str, str], None]) -> dict[str, np.ndarray]:
    """Raw shard rows -> image_id, label, image uint8 [B, R, R, 3], todo bool [B, S].

    ``keep(image_id)`` returns the bool mask of sigmas still to do for the image, or None to
    drop it (not selected, or already done). Undecodable images go to ``on_error``.
    """
    res = data_cfg["resolution"]
    ids, labels, images, todo = [], [], [], []
    for image_id, label, data, source in _rows(batch, fmt, columns):
        mask = keep(image_id)
        if mask is None:
            continue
        try:
            if data is None:
                raise ValueError("no image data in the record")
            image = resize_image(data, res, data_cfg["resize"], data_cfg["crop"], data_cfg["interpolation"])
            label = _label(label)
        except Exception as exc:  # noqa: BLE001 - any decode failure is an error record
            on_error(image_id, source, f"{type(exc).__name__}: {exc}")
            continue
        ids.append(image_id)
        labels.append(label)
        images.append(image)
        todo.append(mask)
    return {
        "image_id": np.array(ids, dtype=object),
        "label": np.array(labels, dtype=np.int64),
        "image": np.stack(images) if images else np.zeros((0, res, res, 3), dtype=np.uint8),
        "todo": np.stack(todo) if todo else np.zeros((0, len(sigmas)), dtype=bool),
    }
