"""Find the Parquet files of a run on any fsspec URI (local path, file://, s3://) and read them.

A *run directory* ``{output}/{run_id}`` holds ``counts/*.parquet``, possibly
``errors/*.parquet`` and ``manifest.json``. A URI may also name a counts directory or a
single Parquet file. Files whose name (or any folder below the URI) starts with ``.`` or
``_``, or that end in ``.tmp``, are in-progress or bookkeeping files and are never read.
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


def list_parquet(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """Sorted ``.parquet`` files under ``path`` (recursively), skipping temporary ones."""
    root = path.rstrip("/")
    found = [f for f in fs.find(root) if f.endswith(".parquet")]
    return sorted(f for f in found if not _is_temporary(posixpath.relpath(f, root)))


def resolve_run(uri: str) -> RunFiles:
    """The counts and error files that ``uri`` (run dir, counts dir or file) refers to.

    Raises FileNotFoundError when there is no counts file to read.
    """
    fs, path = fsspec.core.url_to_fs(uri)
    path = path.rstrip("/")
    if not fs.exists(path):
        raise FileNotFoundError(f"{uri}: no such file or directory")
    if fs.isfile(path):
        return RunFiles(fs, (path,))
    if not fs.isdir(f"{path}/counts"):
        return RunFiles(fs, _require(list_parquet(fs, path), uri))
    errors = list_parquet(fs, f"{path}/errors") if fs.isdir(f"{path}/errors") else []
    manifest = f"{path}/manifest.json"
    return RunFiles(fs, _require(list_parquet(fs, f"{path}/counts"), uri), tuple(errors),
                    manifest if fs.isfile(manifest) else None)


def _require(counts: list[str], uri: str) -> tuple[str, ...]:
    if not counts:
        raise FileNotFoundError(f"{uri}: no counts Parquet files found")
    return tuple(counts)


def read_tables(fs: fsspec.AbstractFileSystem, files: Sequence[str], columns: Sequence[str]) -> list[pa.Table]:
    """Each file's table, with those of ``columns`` that the file has (files read concurrently)."""

    def read(path: str) -> pa.Table:
        with pq.ParquetFile(path, filesystem=fs) as parquet:
            return parquet.read(columns=[c for c in columns if c in parquet.schema_arrow.names])

    with ThreadPoolExecutor(max_workers=min(16, max(1, len(files)))) as pool:
        return list(pool.map(read, files))
