"""Image folder -> Parquet or WebDataset shards on any fsspec URI (what ``python -m jobs.make_shards`` runs).

Sources: ImageNet layout (one sub-folder per class; labels from a class-index JSON, either
``{"0": ["n01440764", "tench"], ...}`` or ``{"n01440764": 0, ...}``, else sorted folder names),
or a flat folder of files plus a CSV with columns ``filename,label`` (``label`` may be empty: -1).
Guarantees: deterministic order (class folders sorted, files sorted within; CSV row order),
image_id = file name without extension (unique, else an error), image bytes copied unchanged,
shards ``{prefix}-00000.{parquet|tar}``, ... each holding ``shard_size`` images (the last fewer).
Parquet columns: image_id (string), label (int64), image (binary). WebDataset members:
``{image_id}.{jpg|png|webp}`` and ``{image_id}.cls`` (the label as decimal text), and beside the
tars an id index ``_index.parquet`` (:data:`pipeline.shards.WDS_INDEX`: each shard's name, its
:func:`pipeline.shards.shard_stamp` as stored, its sample keys), written after every shard, so that
selecting images reads no tar on the driver; :func:`write_wds_index` (re)writes it for existing tars.
"""
from __future__ import annotations

import csv
import io
import json
import tarfile
from collections import Counter
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.shards import WDS_INDEX, WDS_INDEX_SCHEMA, list_shards, shard_stamp, tar_sample_keys, wds_sample_keys
from pipeline.storage import url_to_fs

IMAGE_EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}


class ImageFile(NamedTuple):
    image_id: str
    label: int
    path: str
    kind: str  # jpg | png | webp


def _split(name: str) -> tuple[str, str | None]:
    base = name.rsplit("/", 1)[-1]
    stem, dot, ext = base.rpartition(".")
    return (stem, IMAGE_EXTENSIONS.get(f".{ext.lower()}")) if dot else (base, None)


def _class_index(fs: Any, uri: str | None, folders: list[str]) -> dict[str, int]:
    if uri is None:
        return {name: i for i, name in enumerate(folders)}
    ifs, path = url_to_fs(uri)
    with ifs.open(path, "r") as f:
        raw = json.load(f)
    if all(isinstance(v, list) for v in raw.values()):  # {"0": ["n01440764", "tench"]}
        return {v[0]: int(k) for k, v in raw.items()}
    return {k: int(v) for k, v in raw.items()}


def list_images(source: str, labels_csv: str | None = None, class_index: str | None = None) -> list[ImageFile]:
    """The images of ``source`` in shard order, with labels."""
    fs, root = url_to_fs(source)
    root = root.rstrip("/")
    if labels_csv is not None:
        cfs, cpath = url_to_fs(labels_csv)
        with cfs.open(cpath, "r") as f:
            rows = list(csv.DictReader(f))
        files = []
        for row in rows:
            stem, kind = _split(row["filename"])
            if kind is None:
                raise ValueError(f"{labels_csv}: {row['filename']} is not a jpg/png/webp image")
            label = row.get("label")
            files.append(ImageFile(stem, int(label) if label not in (None, "") else -1, f"{root}/{row['filename']}", kind))
    else:
        folders = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False) if fs.isdir(p))
        if not folders:
            raise ValueError(f"{source}: no class sub-folders (use --labels-csv for a flat folder)")
        index = _class_index(fs, class_index, folders)
        missing = [f for f in folders if f not in index]
        if missing:
            raise ValueError(f"{class_index}: no class index for folders {missing[:5]}")
        files = []
        for folder in folders:
            for path in sorted(fs.find(f"{root}/{folder}")):
                stem, kind = _split(path)
                if kind is not None:
                    files.append(ImageFile(stem, index[folder], path, kind))
    dups = [i for i, k in Counter(f.image_id for f in files).items() if k > 1]
    if dups:
        raise ValueError(f"{source}: image_id {dups[0]!r} occurs more than once (file names must be unique)")
    return files


def _parquet_shard(images: list[ImageFile], payloads: list[bytes]) -> bytes:
    table = pa.table({"image_id": pa.array([i.image_id for i in images], pa.string()),
                      "label": pa.array([i.label for i in images], pa.int64()),
                      "image": pa.array(payloads, pa.binary())})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _tar_shard(images: list[ImageFile], payloads: list[bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for image, data in zip(images, payloads):
            for name, member in ((f"{image.image_id}.{image.kind}", data), (f"{image.image_id}.cls", str(image.label).encode())):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(member), 0, 0o644
                tar.addfile(info, io.BytesIO(member))
    return buf.getvalue()


def make_shards(source: str, out_uri: str, fmt: str = "parquet", shard_size: int = 1000,
                labels_csv: str | None = None, class_index: str | None = None, prefix: str = "shard") -> list[str]:
    """Write the shards; returns their URIs in order."""
    if fmt not in ("parquet", "webdataset"):
        raise ValueError(f"format must be parquet or webdataset, got {fmt!r}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    images = list_images(source, labels_csv, class_index)
    if not images:
        raise ValueError(f"{source}: no images found")
    src_fs, _ = url_to_fs(source)
    out_fs, out_root = url_to_fs(out_uri)
    out_fs.makedirs(out_root, exist_ok=True)
    write, ext = (_parquet_shard, "parquet") if fmt == "parquet" else (_tar_shard, "tar")
    uris, index = [], {}
    for number, start in enumerate(range(0, len(images), shard_size)):
        chunk = images[start:start + shard_size]
        name = f"{prefix}-{number:05d}.{ext}"
        out_fs.pipe_file(f"{out_root.rstrip('/')}/{name}", write(chunk, [src_fs.cat_file(i.path) for i in chunk]))
        uris.append(f"{out_uri.rstrip('/')}/{name}")
        index[name] = wds_sample_keys(f"{i.image_id}.{i.kind}" for i in chunk)
    if fmt == "webdataset":
        _write_index(out_fs, out_root, index)
    return uris


def write_wds_index(uri: str) -> int:
    """(Re)write the ``_index.parquet`` of the WebDataset tars in the folder ``uri`` from their
    headers; returns how many shards it lists."""
    fs, shards = list_shards(uri, "webdataset")
    root = url_to_fs(uri)[1].rstrip("/")
    outside = [s for s in shards if s.rpartition("/")[0] != root]
    if outside:
        raise ValueError(f"{uri}: an index lists the tars directly in its folder; {outside[0]} is not")
    _write_index(fs, root, {s.rpartition("/")[2]: tar_sample_keys(fs, s) for s in shards})
    return len(shards)


def _write_index(fs: Any, root: str, keys: dict[str, list[str]]) -> None:
    """The index of the tars ``keys`` names (file name -> sample keys) in ``root``, stamped as they are now."""
    root = root.rstrip("/")
    table = pa.table({"shard": list(keys), "stamp": [shard_stamp(fs.info(f"{root}/{name}")) for name in keys],
                      "keys": list(keys.values())}, schema=WDS_INDEX_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    fs.pipe_file(f"{root}/{WDS_INDEX}", buf.getvalue())
