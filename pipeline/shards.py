"""Shards on object storage -> Ray Dataset of decoded, resized images.

Guarantees:
* :func:`list_shards` returns every shard the URI names (file, folder or glob), sorted, never a
  name starting with ``.`` or ``_`` (in-progress writes, ``_index.parquet``), and fails with
  :class:`StorageError` (naming the URI and the cause) when storage is unreachable, credentials
  are missing or nothing matches. :func:`read_shards` hands Ray that explicit list
  with missing paths an error, and checks the number of files Ray reports where it reports it.
* :func:`scan_image_ids` reads every shard's ids (Parquet: the footer and the id column; tar: the
  keys recorded in the ``_index.parquet`` beside it when the index matches the shard's current
  size and content stamp (:func:`shard_stamp`), else the member headers only, seeking past the
  data, with a warning naming the shards whose index entry is stale or missing) and raises
  :class:`ShardError` naming ``data.uri`` and the shard when a shard is unreadable or truncated,
  or naming examples of ids that are in more than one record (with the shards holding them): duplicates would make two rows per key that no
  resume could repair, so they are refused before any model work.
* :func:`decode_batch` turns image bytes into uint8 [H, W, 3] arrays at the certification
  resolution. A missing value of any kind (None, NaN: what Ray puts in a WebDataset column that a
  sample lacks) is missing: the image is the sample's own image key, whatever its extension; a
  missing or empty label is -1. Only the record's own fault (no image, bytes PIL cannot decode, a
  label that is not an integer) becomes one error record (written at once, idempotently) and is
  dropped from the batch; any other exception (a bug, a failing worker) propagates, so Ray retries
  the task or the run fails loudly, never a permanent error record.
"""
from __future__ import annotations

import json
import logging
import math
import tarfile
from collections import defaultdict
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import MsdsmoothError, StorageError, describe
from pipeline.images import resize_image
from pipeline.storage import object_stamp, url_to_fs

SHARD_SUFFIX = {"parquet": ".parquet", "webdataset": ".tar"}
WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
DUPLICATES_SHOWN = 5
WDS_INDEX = "_index.parquet"  # beside WebDataset shards: each shard's name, stamp and sample keys
WDS_INDEX_SCHEMA = pa.schema([("shard", pa.string()), ("stamp", pa.string()), ("keys", pa.list_(pa.string()))])
# fields of fsspec's info() that name a file's content (object stores); else its modification time
log = logging.getLogger(__name__)


class ShardError(MsdsmoothError, ValueError):
    """The shards break what a dataset must be (readable files, unique image_ids); names data.uri and the shard."""


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
    paths = sorted(p for p in paths if not p.rsplit("/", 1)[-1].startswith((".", "_")))
    if not paths:
        raise StorageError(f"data.uri {uri}: no {fmt} shards found")
    return fs, paths


def scan_image_ids(fs: Any, shards: list[str], fmt: str, id_column: str = "image_id") -> list[str]:
    """Every image_id in dataset order (shard order, then row order); reads ids only.

    ShardError naming the shard for an unreadable one, and examples of duplicate ids (see module doc).
    """
    ids: list[str] = []
    holders: dict[str, list[str]] = defaultdict(list)  # image_id -> shards holding it (one entry per record)
    indexed = _indexed_keys(fs, shards) if fmt == "webdataset" else {}
    for shard in shards:
        try:
            if shard in indexed:
                found = indexed[shard]
            elif fmt == "webdataset":
                found = tar_sample_keys(fs, shard)
            else:
                with fs.open(shard, "rb") as f:
                    found = pq.read_table(f, columns=[id_column]).column(id_column).to_pylist()
        except Exception as exc:  # noqa: BLE001 - storage or format: named with the shard either way
            raise ShardError(f"data.uri: shard {fs.unstrip_protocol(shard)} is unreadable ({describe(exc)}); "
                             "replace or remove it") from exc
        for image_id in found:
            holders[image_id].append(shard)
        ids.extend(found)
    if len(holders) != len(ids):
        _refuse_duplicates(fs, holders)
    return ids


def _refuse_duplicates(fs: Any, holders: Mapping[str, list[str]]) -> None:
    repeated = [(i, s) for i, s in holders.items() if len(s) > 1]
    shown = "; ".join(f"{i!r} in {', '.join(fs.unstrip_protocol(p) for p in s)}" for i, s in repeated[:DUPLICATES_SHOWN])
    more = f"; ... and {len(repeated) - DUPLICATES_SHOWN} more" if len(repeated) > DUPLICATES_SHOWN else ""
    raise ShardError(f"data.uri: {len(repeated)} image_ids are in more than one record ({shown}{more}); "
                     "image_ids must be unique across all shards: rename or remove the duplicates")


def shard_stamp(info: Mapping[str, Any]) -> str:
    """What changes when a shard is rewritten, from fsspec's ``info()``: its size and the content
    hash its store reports (ETag, md5, crc32c, generation), else its modification time."""
    return json.dumps(object_stamp(info), sort_keys=True)


def _indexed_keys(fs: Any, shards: list[str]) -> dict[str, list[str]]:
    """Sample keys of the shards whose entry in the ``WDS_INDEX`` of their folder matches their
    current :func:`shard_stamp`; a warning names the shards of an indexed folder left out."""
    folders: dict[str, list[str]] = defaultdict(list)
    for shard in shards:
        folders[shard.rpartition("/")[0]].append(shard)
    found: dict[str, list[str]] = {}
    for folder, members in folders.items():
        index_path = f"{folder}/{WDS_INDEX}"
        try:
            table = pq.read_table(pa.BufferReader(fs.cat_file(index_path)), columns=WDS_INDEX_SCHEMA.names)
        except FileNotFoundError:
            continue
        except Exception as exc:  # noqa: BLE001 - an unreadable index is not trusted, and said so
            log.warning("data.uri: %s is unreadable (%s): reading the tar headers of its %d shards instead",
                        fs.unstrip_protocol(index_path), describe(exc), len(members))
            continue
        entries = {row["shard"]: row for row in table.to_pylist()}
        stale = []
        for shard in members:
            entry = entries.get(shard.rpartition("/")[2])
            if entry is not None and entry["stamp"] == shard_stamp(fs.info(shard)):
                found[shard] = entry["keys"]
            else:
                stale.append(shard.rpartition("/")[2])
        if stale:
            log.warning("data.uri: %s does not match %d shards (rewritten or added since it was written: %s): "
                        "reading their tar headers instead; rewrite it with python -m jobs.make_shards --index-only %s",
                        fs.unstrip_protocol(index_path), len(stale), ", ".join(stale[:DUPLICATES_SHOWN]),
                        fs.unstrip_protocol(folder))
    return found


def wds_sample_keys(member_names: Iterable[str]) -> list[str]:
    """The WebDataset sample keys of a tar's file members, in order. Like Ray's reader, consecutive
    members with one key are one sample; a key that comes back after another key is a second
    sample (a duplicate)."""
    keys: list[str] = []
    for name in member_names:
        if not keys or keys[-1] != _wds_key(name):
            keys.append(_wds_key(name))
    return keys


def tar_sample_keys(fs: Any, shard: str) -> list[str]:
    """:func:`wds_sample_keys` of the tar at ``shard``, from its headers alone."""
    with fs.open(shard, "rb") as f:
        return _tar_keys(f, fs.size(shard))


def _tar_keys(f: Any, size: int) -> list[str]:
    """:func:`wds_sample_keys` of a tar from its headers alone; a member whose data would end past
    the end of the file means a truncated shard (OSError)."""
    def file_members():
        with tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                if member.offset_data + member.size > size:
                    raise OSError(f"truncated: member {member.name} ends at byte {member.offset_data + member.size} "
                                  f"of a {size}-byte file")
                if member.isfile():
                    yield member.name
    return wds_sample_keys(file_members())


def _wds_key(name: str) -> str:
    """WebDataset key: the path up to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem = base.split(".", 1)[0]
    return f"{folder}/{stem}" if folder else stem


def select_ids(all_ids: list[str], selection: Mapping[str, Any]) -> set[str] | None:
    """The selected image_ids (None = all): explicit ids, or every k-th from an offset, then a limit."""
    if selection["image_ids"] is not None:
        return set(selection["image_ids"])
    if selection["every"] == 1 and selection["offset"] == 0 and selection["limit"] is None:
        return None
    chosen = all_ids[selection["offset"]::selection["every"]]
    return set(chosen[: selection["limit"]] if selection["limit"] is not None else chosen)


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


def is_missing(value: Any) -> bool:
    """None, or a float NaN (numpy or Python, also inside object arrays): what Ray puts in a missing cell."""
    return value is None or (isinstance(value, (float, np.floating)) and math.isnan(value))


def _image_bytes(value: Any) -> bytes | None:
    """Image bytes from a binary cell or a {bytes, path} struct (common Parquet exports); None when missing."""
    if isinstance(value, Mapping):
        value = value.get("bytes")
    return None if is_missing(value) else value


def _rows(batch: Mapping[str, np.ndarray], fmt: str, columns: Mapping[str, str]) -> Iterable[tuple]:
    """(image_id, label, image bytes or None, source) per row of a raw shard batch."""
    n = len(batch["path"] if fmt == "parquet" else batch["__key__"])
    for i in range(n):
        if fmt == "parquet":
            yield (str(batch[columns["image_id"]][i]), batch[columns["label"]][i],
                   _image_bytes(batch[columns["image"]][i]), str(batch["path"][i]))
        else:
            data = next((batch[k][i] for k in WDS_IMAGE_KEYS if k in batch and not is_missing(batch[k][i])), None)
            cls = batch["cls"][i] if "cls" in batch else None
            yield str(batch["__key__"][i]), cls, data, str(batch["__url__"][i])


def _label(value: Any) -> int:
    """The class index; -1 when missing (None, NaN, empty text)."""
    if isinstance(value, (bytes, bytearray)):
        value = value.decode()
    if isinstance(value, str):
        value = value.strip() or None
    return -1 if is_missing(value) else int(value)


class _RecordFault(Exception):
    """The record itself is bad: no image, undecodable bytes, a label that is not an integer."""


def _decode_record(data: bytes | None, label: Any, data_cfg: Mapping) -> tuple[np.ndarray, int]:
    from PIL import Image, UnidentifiedImageError

    if data is None:
        raise _RecordFault("ValueError: no image data in the record")
    try:
        image = resize_image(data, data_cfg["resolution"], data_cfg["resize"], data_cfg["crop"],
                             data_cfg["interpolation"])
    except (UnidentifiedImageError, Image.DecompressionBombError, SyntaxError, EOFError, OSError, ValueError) as exc:
        # What PIL raises for bytes it cannot decode (and resize_image for images it refuses); it reads
        # no storage, so an OSError here is the bytes' fault. A bug (TypeError, RuntimeError...) propagates.
        raise _RecordFault(f"{type(exc).__name__}: {exc}") from exc
    try:
        return image, _label(label)
    except ValueError as exc:
        raise _RecordFault(f"ValueError: label {label!r} is not an integer") from exc


def decode_batch(batch: Mapping[str, np.ndarray], *, fmt: str, columns: Mapping[str, str], data_cfg: Mapping,
                 sigmas: tuple[float, ...], keep: Callable[[str], np.ndarray | None],
                 on_error: Callable[[str, str, str], None]) -> dict[str, np.ndarray]:
    """Raw shard rows -> image_id, label, image uint8 [B, R, R, 3], todo bool [B, S].

    ``keep(image_id)`` returns the bool mask of sigmas still to do for the image, or None to
    drop it (not selected, or already done). Records at fault go to ``on_error`` (see module doc).
    """
    res = data_cfg["resolution"]
    ids, labels, images, todo = [], [], [], []
    for image_id, label, data, source in _rows(batch, fmt, columns):
        mask = keep(image_id)
        if mask is None:
            continue
        try:
            image, label = _decode_record(data, label, data_cfg)
        except _RecordFault as fault:
            on_error(image_id, source, str(fault))
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
