"""RunDirectory: content-named atomic files, resume listing, duplicate compaction, the one definition
of a run's data files (local and S3)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from analysis.counts import load_counts
from analysis.io import resolve_run
from pipeline.certification import SparseCounts
from pipeline.counts_schema import COUNTS_SCHEMA
from pipeline.run_dir import RunDirectory, RunDirectoryError, keys_digest


def rows(keys, n=5) -> pa.Table:
    """Counts rows for (image_id, sigma) keys, with counts derived from the key."""
    dense = np.array([[hash((i, s)) % 3, n - hash((i, s)) % 3, 0] for i, s in keys], dtype=np.int64)
    cls, val = SparseCounts.from_dense(dense).to_arrow_lists()
    k = len(keys)
    return pa.table({
        "run_id": ["r"] * k, "image_id": [i for i, _ in keys], "label": [1] * k, "sigma": [s for _, s in keys],
        "n0": [n] * k, "n": [n] * k, "counts0_classes": cls, "counts0_values": val, "counts_classes": cls,
        "counts_values": val, "num_classes": [3] * k, "pred_clean": [0] * k, "timestep": [1] * k, "seed": [0] * k,
        "denoiser_id": ["d"] * k, "classifier_id": ["c"] * k, "worker": ["w"] * k, "seconds": [0.1] * k, "look": [None] * k,
    }, schema=COUNTS_SCHEMA)


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return RunDirectory(f"file://{tmp_path}/runs", "r")
    bucket = request.getfixturevalue("s3_bucket")
    return RunDirectory(f"s3://{bucket}/runs", "r")


def test_arrow_lists_match_dense():
    dense = np.array([[0, 3, 0, 1], [0, 0, 0, 0], [5, 0, 0, 0]])
    cls, val = SparseCounts.from_dense(dense).to_arrow_lists()
    assert cls.to_pylist() == [[1, 3], [], [0]] and val.to_pylist() == [[3, 1], [], [5]]
    assert cls.type == pa.list_(pa.int32()) and val.type == pa.list_(pa.int64())


def test_name_is_content_and_rewrite_is_idempotent(store):
    keys = [("a", 0.25), ("b", 0.25), ("a", 0.5)]
    path = store.write_counts(rows(keys))
    assert path.endswith(f"part-{keys_digest(reversed(keys))}.parquet")
    assert store.write_counts(rows(list(reversed(keys)))) == path  # a retried batch lands on the same file
    assert store.counts_files() == [path]
    assert store.done_keys() == set(keys)


def test_in_progress_files_are_not_data(store):
    store.write_counts(rows([("a", 0.5)]))
    store.put(f"{store.counts_dir}/.tmp-0123", b"PAR1 partial")
    store.put(f"{store.errors_dir}/.tmp-4567", b"PAR1 partial")
    assert store.done_keys() == {("a", 0.5)} and store.error_ids() == set()
    assert list(resolve_run(store.uri()).counts) == store.counts_files()


@pytest.mark.parametrize("stray", ["notes.txt", "part-x.parquet.tmp", "_part-x.parquet", "nested/part-x.parquet"])
def test_a_stray_file_in_counts_is_an_error_naming_it_everywhere(store, stray):
    """A stray (or nested) Parquet file must not be aggregated while resume and compaction ignore it."""
    store.write_counts(rows([("a", 0.5)]))
    store.put(f"{store.counts_dir}/{stray}", pq_bytes(rows([("b", 0.5)])))
    named = f"{store.uri()}/counts/{stray.split('/')[0]}"
    for listing in (store.done_keys, store.compact, lambda: resolve_run(store.uri()),
                    lambda: resolve_run(f"{store.uri()}/counts")):
        with pytest.raises(RunDirectoryError, match=named):
            listing()


def test_a_stray_file_in_errors_is_an_error_naming_it(store):
    store.write_error("x", "shard-0.tar", "bad")
    store.put(f"{store.errors_dir}/x.parquet", b"PAR1")
    with pytest.raises(RunDirectoryError, match="errors/x.parquet"):
        store.error_ids()


def pq_bytes(table: pa.Table) -> bytes:
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    return buf.getvalue().to_pybytes()


def test_errors_one_file_per_image(store):
    store.write_error("x", "shard-0.tar", "bad")
    store.write_error("x", "shard-0.tar", "bad")
    store.write_error("y", "shard-1.tar", "bad")
    assert store.error_ids() == {"x", "y"} and len(store.error_files()) == 2


def test_compact_leaves_each_key_once_in_sorted_files_of_target_rows(store):
    a = store.write_counts(rows([("a", 0.25), ("b", 0.25)]))
    b = store.write_counts(rows([("b", 0.25), ("c", 0.25)]))  # overlaps a on one key
    c = store.write_counts(rows([("d", 0.25)]))  # exactly the last 1-row file of the result: kept as it is
    e = store.write_counts(rows([("a", 0.25)]))  # contained in a
    scan, merged = store.compact(target_rows=3)
    assert merged == 4
    per_file = store.file_keys()
    assert per_file == scan.counts and c in per_file and a not in per_file and b not in per_file and e not in per_file
    all_keys = [k for keys in per_file.values() for k in keys]
    assert sorted(all_keys) == [("a", 0.25), ("b", 0.25), ("c", 0.25), ("d", 0.25)]
    merged = [p for p in per_file if p != c][0]
    with store.fs.open(merged, "rb") as f:
        table = pq.read_table(f)
    expected = rows([("a", 0.25), ("b", 0.25), ("c", 0.25)])
    assert table.to_pylist() == expected.to_pylist()  # rows sorted by (image_id, sigma)
    assert store.compact(target_rows=3)[1] == 0


def test_manifest_round_trip(store):
    assert store.read_manifest() is None
    store.write_manifest({"run_id": "r", "x": [1, 2]})
    assert store.read_manifest() == {"run_id": "r", "x": [1, 2]}
    assert store.uri().endswith("/runs/r")


def test_at_names_the_same_directory(store):
    same = RunDirectory.at(store.uri())
    assert (same.root, same.run_id, same.uri()) == (store.root, store.run_id, store.uri())


def test_names_of_different_key_sets_never_collide(store):
    """Ids may hold tabs and newlines: the digest's encoding must still be unambiguous (issue 11, item 8)."""
    first, second = [("x", 0.25), ("y", 0.5)], [("x\t0.25\ny", 0.5)]
    assert keys_digest(first) != keys_digest(second)
    assert keys_digest([("a", 0.25)]) != keys_digest([("a", 0.250000001)])
    store.write_counts(rows(first))
    store.write_counts(rows(second))
    assert store.done_keys() == set(first) | set(second) and len(store.counts_files()) == 2
    scan, merged = store.compact()  # two small files sharing no key: merged into one, every row kept
    assert merged == 2 and sorted(scan.done) == sorted(first + second) and len(store.counts_files()) == 1


def test_an_unreadable_counts_or_error_file_is_named_with_what_to_do(store):
    store.write_counts(rows([("a", 0.25)]))
    path = store.write_counts(rows([("b", 0.25)]))
    data = store.fs.cat_file(path)
    store.fs.pipe_file(path, data[: len(data) // 2])  # truncated
    with pytest.raises(RunDirectoryError, match=rf"{path.rsplit('/', 1)[-1]} is unreadable .*delete it and re-run"):
        store.done_keys()
    with pytest.raises(RunDirectoryError, match=rf"{path.rsplit('/', 1)[-1]} is unreadable"):
        load_counts(store.uri())
    error = store.write_error("x", "s.tar", "bad")
    store.fs.pipe_file(error, b"PAR1")
    with pytest.raises(RunDirectoryError, match=rf"{error.rsplit('/', 1)[-1]} is unreadable .*decoded again"):
        store.error_ids()


def test_stale_temporary_files_are_removed_fresh_ones_kept(tmp_path):
    """A .tmp-* is renamed within seconds of its creation: one older than an hour is a crash's leftover."""
    import os
    import time

    store = RunDirectory(f"file://{tmp_path}/runs", "r")
    store.write_counts(rows([("a", 0.5)]))
    store.write_error("x", "s.tar", "bad")
    stale = [f"{store.counts_dir}/.tmp-old", f"{store.errors_dir}/.tmp-old", f"{store.root}/.tmp-old"]
    fresh = [f"{store.counts_dir}/.tmp-new", f"{store.errors_dir}/.tmp-new"]
    for path in stale + fresh:
        store.put(path, b"partial")
    for path in stale:
        os.utime(path, (time.time() - 7200, time.time() - 7200))
    assert store.remove_stale_temporaries() == 3
    assert not any(os.path.exists(p) for p in stale) and all(os.path.exists(p) for p in fresh)
    assert store.done_keys() == {("a", 0.5)} and store.error_ids() == {"x"}


def test_forget_removes_only_those_images_rows(store):
    """forget: the rows of the named images go (every sigma), every other row stays exactly once."""
    store.write_counts(rows([("a", 0.25), ("a", 0.5), ("b", 0.25)]))
    store.write_counts(rows([("b", 0.5), ("c", 0.25)]))
    store.write_counts(rows([("d", 0.25)]))
    before = store.done_keys()
    assert store.forget({"b", "zz"}) == 2
    assert store.done_keys() == before - {("b", 0.25), ("b", 0.5)}
    assert sum(len(k) for k in store.file_keys().values()) == 4  # nothing duplicated
    assert store.forget(["a", "c", "d"]) == 4 and store.done_keys() == set() and store.counts_files() == []
