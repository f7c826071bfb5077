"""Find the Parquet files of a run on any fsspec URI (local path, file://, s3://) and read them.

A URI names one of:

* a *run directory* ``{output}/{run_id}`` (it has a ``counts/`` folder), or a run's counts
  folder itself (any folder named ``counts``): its files are exactly those :class:`pipeline.run_dir.RunDirectory` lists for
  resume and compaction (``counts/part-*.parquet``, ``errors/err-*.parquet``; hidden in-progress
  names skipped; any other file there is a ``RunDirectoryError`` naming it), plus the manifest;
* any other folder of Parquet files (searched recursively; names starting with ``.`` or ``_``,
  in any folder below the URI, and names ending in ``.tmp`` are in-progress or bookkeeping
  files and never read);
* a single Parquet file.
"""
from __future__ import annotations

import json
import posixpath
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.run_dir import RunDirectory, unreadable_file


@dataclass(frozen=True)
class RunFiles:
    """The files of one run: counts (never empty), error records (maybe empty), manifest (maybe None)."""

    fs: fsspec.AbstractFileSystem
    counts: tuple[str, ...]
    errors: tuple[str, ...] = ()
    manifest: str | None = None

    def read_manifest(self) -> dict:
        """The run's manifest.json ({} when there is none)."""
        if self.manifest is None:
            return {}
        with self.fs.open(self.manifest, "rb") as f:
            return json.load(f)


def _is_temporary(relative: str) -> bool:
    parts = relative.split("/")
    return any(p.startswith((".", "_")) for p in parts) or relative.endswith(".tmp")


def _folder_parquet(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """Sorted ``.parquet`` files under a folder that is not a run's (recursively), skipping temporary ones."""
    found = [f for f in fs.find(path) if f.endswith(".parquet")]
    return sorted(f for f in found if not _is_temporary(posixpath.relpath(f, path)))


def resolve_run(uri: str) -> RunFiles:
    """The counts and error files that ``uri`` (run dir, counts dir or file) refers to (see module doc).

    Raises FileNotFoundError when there is no counts file to read.
    """
    fs, path = fsspec.core.url_to_fs(uri)
    path = path.rstrip("/")
    if not fs.exists(path):
        raise FileNotFoundError(f"{uri}: no such file or directory")
    if fs.isfile(path):
        return RunFiles(fs, (path,))
    if path.rsplit("/", 1)[-1] == "counts":  # a run's counts folder: the run directory's own listing
        run = RunDirectory.at(uri.rstrip("/").rpartition("/")[0])
        return RunFiles(run.fs, _require(run.counts_files(), uri))
    if not fs.isdir(f"{path}/counts"):
        if fs.isdir(f"{path}/errors") or fs.isfile(f"{path}/manifest.json"):
            raise FileNotFoundError(f"{uri}: a run directory with no counts/ folder: no image was certified yet "
                                    f"({len(RunDirectory.at(uri).error_files())} error records in errors/); "
                                    "resume the run, or read its errors/")
        return RunFiles(fs, _require(_folder_parquet(fs, path), uri))
    run = RunDirectory.at(uri)
    return RunFiles(run.fs, _require(run.counts_files(), uri), tuple(run.error_files()),
                    run.manifest_path if run.fs.isfile(run.manifest_path) else None)


def _require(counts: list[str], uri: str) -> tuple[str, ...]:
    if not counts:
        raise FileNotFoundError(f"{uri}: no counts Parquet files found")
    return tuple(counts)


def read_tables(fs: fsspec.AbstractFileSystem, files: Sequence[str], columns: Sequence[str]) -> list[pa.Table]:
    """Each file's table, with those of ``columns`` that the file has (files read concurrently).

    A file that is not readable Parquet (truncated, corrupt) raises RunDirectoryError naming it."""

    def read(path: str) -> pa.Table:
        try:
            with pq.ParquetFile(path, filesystem=fs) as parquet:
                return parquet.read(columns=[c for c in columns if c in parquet.schema_arrow.names])
        except pa.ArrowInvalid as exc:
            raise unreadable_file(fs.unstrip_protocol(path), exc) from exc

    with ThreadPoolExecutor(max_workers=min(16, max(1, len(files)))) as pool:
        return list(pool.map(read, files))
