"""The run directory: counts and error Parquet files, the manifest, and what is already done.

Layout: ``{output}/{run_id}/counts/part-<hash>.parquet``, ``{output}/{run_id}/errors/err-<hash>.parquet``,
``{output}/{run_id}/manifest.json``. This module is the one owner of that layout and of which
files are data: resume, compaction and the analysis (:func:`analysis.io.resolve_run`) all list
through :meth:`RunDirectory.counts_files` / :meth:`RunDirectory.error_files`.

Guarantees:
* Every file appears whole or not at all: local files are written to a hidden temp name and
  renamed (``os.replace``); object stores get a single PUT. Readers only look at final names.
* Hidden names (``.tmp-*`` and any other starting with ``.``) in counts/ and errors/ are
  in-progress writes and never read. Anything else there that is not a data file (``part-*.parquet``
  in counts/, ``err-*.parquet`` in errors/, directly in the folder) raises
  :class:`RunDirectoryError` naming it: a stray file is reported, never silently read or skipped.
* A file's name is a hash of the (image_id, sigma) keys it holds (of their JSON encoding, so ids
  holding any character never make two key sets share a name). Noise is reproducible, so a
  retried task rewrites identical content under the same name: retries never duplicate rows.
  Resume reads keys from the files' contents, never from their names.
* A counts or error file that cannot be read (truncated, not Parquet) raises
  :class:`RunDirectoryError` naming it and what to do (delete it; its rows are recomputed).
* :meth:`RunDirectory.remove_stale_temporaries` removes ``.tmp-*`` leftovers of crashed writers
  older than ``STALE_TEMPORARY_S``. A writer renames its temporary file within seconds of
  creating it, so an hour-old one cannot belong to a live writer, even one of another driver
  sharing the run_id.
* :meth:`RunDirectory.done_keys` lists the rows already written, for resume;
  :meth:`RunDirectory.compact_duplicates` leaves every key in exactly one file.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import time
import uuid
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.counts_schema import COUNTS_SCHEMA, ERRORS_SCHEMA
from pipeline.errors import MsdsmoothError, describe
from pipeline.storage import is_local, url_to_fs

Key = tuple[str, float]
TEMPORARY_PREFIX = ".tmp-"
STALE_TEMPORARY_S = 3600.0


class RunDirectoryError(MsdsmoothError, ValueError):
    """The run directory holds something its layout does not allow; the message names it."""


def keys_digest(keys: Iterable[Key]) -> str:
    """Order-independent content name for a set of (image_id, sigma) keys: the sha256 of the JSON
    list of sorted [image_id, sigma] pairs (an unambiguous encoding, whatever the ids hold)."""
    text = json.dumps([[image_id, float(sigma)] for image_id, sigma in sorted(keys)], ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def unreadable_file(uri: str, exc: BaseException) -> RunDirectoryError:
    """The error for a run's data file that cannot be read, naming it and what to do."""
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    if name.startswith("err-"):
        what, redo = "error record", "its images will be decoded again"
    else:
        what, redo = "counts file", "its rows will be recomputed"
    return RunDirectoryError(f"{what} {uri} is unreadable (truncated or not Parquet: {describe(exc)}): "
                             f"delete it and re-run; {redo}")


def _table_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


class RunDirectory:
    """One run's directory on any fsspec filesystem (pickles to Ray workers)."""

    @classmethod
    def at(cls, uri: str) -> "RunDirectory":
        """The run directory that ``uri`` names (its last path component is the run_id)."""
        output_uri, _, run_id = uri.rstrip("/").rpartition("/")
        return cls(output_uri or ".", run_id)

    def __init__(self, output_uri: str, run_id: str):
        self.output_uri, self.run_id = output_uri, run_id
        self.fs, root = url_to_fs(output_uri)
        self.root = f"{root.rstrip('/')}/{run_id}"
        self.counts_dir = f"{self.root}/counts"
        self.errors_dir = f"{self.root}/errors"
        self.manifest_path = f"{self.root}/manifest.json"

    def uri(self, path: str = "") -> str:
        """The URI of the run directory (or a file in it), with the output's scheme."""
        sub = path[len(self.root):] if path.startswith(self.root) else ""
        return f"{self.output_uri.rstrip('/')}/{self.run_id}{sub}"

    def put(self, path: str, data: bytes) -> None:
        """Write ``data`` to ``path`` atomically (whole or not at all)."""
        directory = path.rsplit("/", 1)[0]
        if is_local(self.fs):
            os.makedirs(directory, exist_ok=True)
            tmp = f"{directory}/{TEMPORARY_PREFIX}{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, data)

    def write_counts(self, table: pa.Table) -> str:
        """Write counts rows (COUNTS_SCHEMA) under their content name; returns the path."""
        keys = zip(table.column("image_id").to_pylist(), table.column("sigma").to_pylist())
        path = f"{self.counts_dir}/part-{keys_digest(keys)}.parquet"
        self.put(path, _table_bytes(table.cast(COUNTS_SCHEMA)))
        return path

    def write_error(self, image_id: str, source: str, error: str) -> str:
        """Record one image that could not be decoded (idempotent: one file per image_id)."""
        table = pa.table({"run_id": [self.run_id], "image_id": [image_id], "source": [source], "error": [error]},
                         schema=ERRORS_SCHEMA)
        path = f"{self.errors_dir}/err-{keys_digest([(image_id, 0.0)])}.parquet"
        self.put(path, _table_bytes(table))
        return path

    def _files(self, directory: str, prefix: str) -> list[str]:
        """The data files ``{prefix}*.parquet`` of ``directory``, sorted; hidden names skipped;
        RunDirectoryError naming anything else."""
        self.fs.invalidate_cache(directory)  # other processes write here: never trust a cached listing
        if not self.fs.exists(directory):
            return []
        files = []
        for entry in self.fs.ls(directory, detail=True):
            path = entry["name"].rstrip("/")
            name = path.rsplit("/", 1)[-1]
            if name.startswith("."):
                continue  # an in-progress write (.tmp-*) or another hidden file
            if entry["type"] != "file" or not (name.startswith(prefix) and name.endswith(".parquet")):
                raise RunDirectoryError(
                    f"{self.uri(path)}: not a data file of the run directory (expected {prefix}*.parquet "
                    f"files directly in {directory.rsplit('/', 1)[-1]}/); move it out of the run directory")
            files.append(path)
        return sorted(files)

    def _read_columns(self, paths: list[str], columns: list[str]) -> list[pa.Table]:
        def read(path: str) -> pa.Table:
            with self.fs.open(path, "rb") as f:
                try:
                    return pq.read_table(f, columns=columns)
                except pa.ArrowInvalid as exc:  # the file's bytes, not the storage: name it
                    raise unreadable_file(self.uri(path), exc) from exc
        with ThreadPoolExecutor(max_workers=16) as pool:
            return list(pool.map(read, paths))

    def remove_stale_temporaries(self, older_than_s: float = STALE_TEMPORARY_S) -> int:
        """Remove ``.tmp-*`` files older than ``older_than_s`` in the run, counts/ and errors/
        (see module doc for why that is safe); returns how many were removed."""
        removed, now = 0, time.time()
        for directory in (self.root, self.counts_dir, self.errors_dir):
            self.fs.invalidate_cache(directory)
            if not self.fs.exists(directory):
                continue
            for path in self.fs.ls(directory, detail=False):
                path = path.rstrip("/")
                if not path.rsplit("/", 1)[-1].startswith(TEMPORARY_PREFIX):
                    continue
                try:
                    if now - self.fs.modified(path).timestamp() > older_than_s:
                        self.fs.rm(path)
                        removed += 1
                except FileNotFoundError:
                    pass  # renamed or removed meanwhile
        return removed

    def counts_files(self) -> list[str]:
        """Every finished counts file (paths on :attr:`fs`), sorted."""
        return self._files(self.counts_dir, "part-")

    def error_files(self) -> list[str]:
        """Every finished error-record file (paths on :attr:`fs`), sorted."""
        return self._files(self.errors_dir, "err-")

    def file_keys(self) -> dict[str, list[Key]]:
        """(image_id, sigma) keys of every finished counts file."""
        paths = self.counts_files()
        tables = self._read_columns(paths, ["image_id", "sigma"])
        return {p: list(zip(t.column("image_id").to_pylist(), t.column("sigma").to_pylist()))
                for p, t in zip(paths, tables)}

    def done_keys(self) -> set[Key]:
        return {k for keys in self.file_keys().values() for k in keys}

    def error_ids(self) -> set[str]:
        tables = self._read_columns(self.error_files(), ["image_id"])
        return {i for t in tables for i in t.column("image_id").to_pylist()}

    def read_manifest(self) -> dict | None:
        self.fs.invalidate_cache(self.root)
        if not self.fs.exists(self.manifest_path):
            return None
        with self.fs.open(self.manifest_path, "rb") as f:
            return json.load(f)

    def write_manifest(self, manifest: dict) -> None:
        self.put(self.manifest_path, json.dumps(manifest, indent=2, sort_keys=True).encode())

    def compact_duplicates(self) -> int:
        """Merge files sharing keys so each key is in one file; returns the number of files merged.

        Crash-safe and idempotent: the merged file is written before the old ones are removed.
        """
        per_file = self.file_keys()
        seen = Counter(k for keys in per_file.values() for k in set(keys))
        dup_files = sorted(p for p, keys in per_file.items() if any(seen[k] > 1 for k in keys))
        if not dup_files:
            return 0
        groups = _overlap_groups({p: per_file[p] for p in dup_files})
        for group in groups:
            tables = []
            for path in group:
                with self.fs.open(path, "rb") as f:
                    tables.append(pq.read_table(f))
            merged = _first_per_key(pa.concat_tables(tables))
            kept = self.write_counts(merged)
            for path in group:
                if path != kept:
                    self.fs.rm(path)
        return len(dup_files)


def _overlap_groups(per_file: dict[str, list[Key]]) -> list[list[str]]:
    """Connected components of files linked by a shared key."""
    parent = {p: p for p in per_file}

    def find(p: str) -> str:
        while parent[p] != p:
            parent[p] = parent[parent[p]]
            p = parent[p]
        return p

    owner: dict[Key, str] = {}
    for path, keys in per_file.items():
        for k in keys:
            if k in owner:
                parent[find(path)] = find(owner[k])
            else:
                owner[k] = path
    groups: dict[str, list[str]] = defaultdict(list)
    for p in per_file:
        groups[find(p)].append(p)
    return list(groups.values())


def _first_per_key(table: pa.Table) -> pa.Table:
    """The first row of each (image_id, sigma) key."""
    seen: set[Key] = set()
    rows = []
    for i, key in enumerate(zip(table.column("image_id").to_pylist(), table.column("sigma").to_pylist())):
        if key not in seen:
            seen.add(key)
            rows.append(i)
    return table.take(pa.array(rows, type=pa.int64()))
