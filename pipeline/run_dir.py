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
* :meth:`RunDirectory.scan` lists counts/ and errors/ once and reads each file's keys once (one GET
  per file on an object store); a later scan given the earlier one reads only files it has not
  seen (a name is its key set). Resume, compaction and the run's summary all use one scan.
* :meth:`RunDirectory.compact` leaves every key in exactly one file and at most one file with fewer
  than ``COMPACT_ROWS`` rows: files sharing keys and every file under ``COMPACT_ROWS`` rows are
  merged, their rows sorted by (image_id, sigma) and cut into ``COMPACT_ROWS``-row files. It writes
  the merged files before removing anything, and removes only files it listed and whose every key
  it has just written, so a crash or a second driver doing the same leaves at worst duplicate rows
  (the next compaction, and the aggregation's dedupe, remove them), never a lost row; run again on
  its own result it does nothing.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import time
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import pyarrow.compute as pc

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.counts_schema import COUNTS_SCHEMA, ERRORS_SCHEMA
from pipeline.errors import MsdsmoothError, describe
from pipeline.storage import is_local, url_to_fs

Key = tuple[str, float]
TEMPORARY_PREFIX = ".tmp-"
STALE_TEMPORARY_S = 3600.0
COMPACT_ROWS = 10_000  # rows per counts file once a run finishes (a few MB at ImageNet's class counts)


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
        path = self._counts_path(keys)
        self.put(path, _table_bytes(table.cast(COUNTS_SCHEMA)))
        return path

    def _counts_path(self, keys: Iterable[Key]) -> str:
        return f"{self.counts_dir}/part-{keys_digest(keys)}.parquet"

    def write_error(self, image_id: str, source: str, error: str) -> str:
        """Record one image that could not be decoded (idempotent: one file per image_id)."""
        table = pa.table({"run_id": [self.run_id], "image_id": [image_id], "source": [source], "error": [error]},
                         schema=ERRORS_SCHEMA)
        path = f"{self.errors_dir}/err-{keys_digest([(image_id, 0.0)])}.parquet"
        self.put(path, _table_bytes(table))
        return path

    def _files(self, directory: str, prefix: str) -> list[str]:
        """The data files ``{prefix}*.parquet`` of ``directory``, sorted (one listing); hidden names
        skipped; RunDirectoryError naming anything else."""
        self.fs.invalidate_cache(directory)  # other processes write here: never trust a cached listing
        try:
            entries = self.fs.ls(directory, detail=True)
        except FileNotFoundError:
            return []
        files = []
        for entry in entries:
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

    def _read(self, path: str, columns: list[str] | None = None) -> tuple[pa.Table, bytes]:
        """(the table, the file's bytes): one whole-file read (a single GET on an object store)."""
        data = self.fs.cat_file(path)
        try:
            return pq.read_table(pa.BufferReader(data), columns=columns), data
        except pa.ArrowInvalid as exc:  # the file's bytes, not the storage: name it
            raise unreadable_file(self.uri(path), exc) from exc

    def _read_many(self, paths: list[str], columns: list[str]) -> list[tuple[pa.Table, bytes]]:
        with ThreadPoolExecutor(max_workers=16) as pool:
            return list(pool.map(lambda path: self._read(path, columns), paths))

    def remove_stale_temporaries(self, older_than_s: float = STALE_TEMPORARY_S) -> int:
        """Remove ``.tmp-*`` files older than ``older_than_s`` in the run, counts/ and errors/
        (see module doc for why that is safe); returns how many were removed."""
        removed, now = 0, time.time()
        for directory in (self.root, self.counts_dir, self.errors_dir):
            self.fs.invalidate_cache(directory)
            try:
                listing = self.fs.ls(directory, detail=False)
            except FileNotFoundError:
                continue
            for path in listing:
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

    def scan(self, previous: "RunScan | None" = None) -> "RunScan":
        """The run's data files now: one listing of counts/ and errors/, and one read of every file
        that ``previous`` (an earlier scan of this run) does not hold."""
        known = previous or RunScan({}, {})
        counts, small = self._counts_keys(known)
        return RunScan(counts, self._error_ids(known.errors), small)

    def _counts_keys(self, known: "RunScan") -> tuple[dict[str, tuple[Key, ...]], dict[str, bytes]]:
        """(keys of every counts file, bytes of those under COMPACT_ROWS rows), reading only new files."""
        paths = self.counts_files()
        new = [p for p in paths if p not in known.counts]
        counts = {p: known.counts[p] for p in paths if p in known.counts}
        small = {p: known.small[p] for p in paths if p in known.small}
        for path, (table, data) in zip(new, self._read_many(new, ["image_id", "sigma"])):
            counts[path] = tuple(zip(table.column("image_id").to_pylist(), table.column("sigma").to_pylist()))
            if len(counts[path]) < COMPACT_ROWS:
                small[path] = data
        return dict(sorted(counts.items())), small

    def _error_ids(self, known: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        """The image_ids of every error record, reading only files not in ``known``."""
        paths = self.error_files()
        new = [p for p in paths if p not in known]
        errors = {p: known[p] for p in paths if p in known}
        for path, (table, _) in zip(new, self._read_many(new, ["image_id"])):
            errors[path] = tuple(table.column("image_id").to_pylist())
        return dict(sorted(errors.items()))

    def file_keys(self) -> dict[str, tuple[Key, ...]]:
        """(image_id, sigma) keys of every finished counts file."""
        return self._counts_keys(RunScan({}, {}))[0]

    def done_keys(self) -> set[Key]:
        """Every (image_id, sigma) row written."""
        return {k for keys in self.file_keys().values() for k in keys}

    def error_ids(self) -> set[str]:
        """Every image recorded as undecodable."""
        return {i for ids in self._error_ids({}).values() for i in ids}

    def read_manifest(self) -> dict | None:
        self.fs.invalidate_cache(self.root)
        if not self.fs.exists(self.manifest_path):
            return None
        with self.fs.open(self.manifest_path, "rb") as f:
            return json.load(f)

    def write_manifest(self, manifest: dict) -> None:
        self.put(self.manifest_path, json.dumps(manifest, indent=2, sort_keys=True).encode())

    def forget(self, image_ids: Iterable[str]) -> int:
        """Remove the counts rows of ``image_ids`` (every sigma), so that a resume recomputes them;
        returns the number of rows removed. Each file holding one is rewritten without them (the new
        file first, then the old one removed: a crash in between leaves both, i.e. nothing lost)."""
        forgotten, removed = set(image_ids), 0
        for path, keys in self.file_keys().items():
            if not any(i in forgotten for i, _ in keys):
                continue
            table = self._read(path)[0]
            keep = pa.array([i not in forgotten for i in table.column("image_id").to_pylist()])
            kept = table.filter(keep)
            if kept.num_rows:
                self.write_counts(kept)
            self.fs.rm(path)
            removed += table.num_rows - kept.num_rows
        return removed

    def compact(self, scan: "RunScan | None" = None, target_rows: int = COMPACT_ROWS) -> tuple["RunScan", int]:
        """Leave every key in one file and at most one file under ``target_rows`` rows (module doc);
        returns (the scan of the result, how many files were merged away or into others).

        ``scan`` is a scan of this run (taken now if None); files written after it are not touched.
        """
        scan = scan or self.scan()
        pool = compaction_pool(scan.counts, target_rows)
        if not pool:
            return scan, 0
        tables = [pq.read_table(pa.BufferReader(scan.small[p])) if p in scan.small else self._read(p)[0]
                  for p in pool]
        merged = _sorted_first_per_key(pa.concat_tables([t.cast(COUNTS_SCHEMA) for t in tables]))
        written: dict[str, tuple[Key, ...]] = {}
        small: dict[str, bytes] = {}
        for start in range(0, merged.num_rows, target_rows):
            chunk = merged.slice(start, target_rows)
            keys = tuple(zip(chunk.column("image_id").to_pylist(), chunk.column("sigma").to_pylist()))
            path = self._counts_path(keys)
            data = scan.small.get(path) or _table_bytes(chunk)
            if path not in scan.counts:
                self.put(path, data)
            written[path] = keys
            if len(keys) < target_rows:
                small[path] = data
        if not set(written) <= set(self.counts_files()):
            # another driver's compaction removed a file this one relies on (its rows are in that
            # driver's output): remove nothing, the next compaction merges the duplicates
            return self.scan(scan), 0
        for path in pool:
            if path not in written:
                try:
                    self.fs.rm(path)
                except FileNotFoundError:
                    pass  # another driver's compaction removed it after writing its rows
        counts = {p: k for p, k in scan.counts.items() if p not in pool} | written
        kept_small = {p: d for p, d in scan.small.items() if p in counts and p not in written} | small
        return RunScan(dict(sorted(counts.items())), scan.errors, kept_small), len(pool)


@dataclass(frozen=True)
class RunScan:
    """A run directory's data files at one listing: each counts file's (image_id, sigma) keys, each
    error record's image_ids, and the bytes of the counts files under ``COMPACT_ROWS`` rows (what a
    compaction merges, kept so that it reads nothing twice)."""

    counts: dict[str, tuple[Key, ...]]
    errors: dict[str, tuple[str, ...]]
    small: dict[str, bytes] = field(default_factory=dict, repr=False)

    @property
    def done(self) -> set[Key]:
        """Every (image_id, sigma) row written."""
        return {k for keys in self.counts.values() for k in keys}

    @property
    def error_ids(self) -> set[str]:
        """Every image recorded as undecodable."""
        return {i for ids in self.errors.values() for i in ids}


def compaction_pool(files: dict[str, tuple[Key, ...]], target_rows: int) -> list[str]:
    """The counts files a compaction merges, sorted: every file sharing a key with another and every
    file under ``target_rows`` rows; none when that is a single file holding no shared key (the
    result of an earlier compaction), so compacting a compacted run does nothing."""
    shared = {p for group in _overlap_groups(files) if len(group) > 1 for p in group}
    small = {p for p, keys in files.items() if len(keys) < target_rows}
    pool = shared | small
    return sorted(pool) if shared or len(pool) > 1 else []


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


def _sorted_first_per_key(table: pa.Table) -> pa.Table:
    """The rows sorted by (image_id, sigma), keeping the first (in ``table``'s order) of each key."""
    table = table.take(pc.sort_indices(table, sort_keys=[("image_id", "ascending"), ("sigma", "ascending")]))
    ids = table.column("image_id").to_numpy(zero_copy_only=False)
    sigmas = table.column("sigma").to_numpy()
    first = np.ones(len(ids), dtype=bool)
    first[1:] = (ids[1:] != ids[:-1]) | (sigmas[1:] != sigmas[:-1])
    return table.filter(pa.array(first))
