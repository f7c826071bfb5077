"""RunDirectory: content-named atomic files, resume listing, duplicate compaction (local and S3)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.certify_actor import sparse_lists
from pipeline.run_dir import RunDirectory, keys_digest
from pipeline.counts_schema import COUNTS_SCHEMA


def rows(keys, n=5) -> pa.Table:
    """Counts rows for (image_id, sigma) keys, with counts derived from the key."""
    dense = np.array([[hash((i, s)) % 3, n - hash((i, s)) % 3, 0] for i, s in keys], dtype=np.int64)
    cls, val = sparse_lists(dense, pa.int64())
    k = len(keys)
    return pa.table({
        "run_id": ["r"] * k, "image_id": [i for i, _ in keys], "label": [1] * k, "sigma": [s for _, s in keys],
        "n0": [n] * k, "n": [n] * k, "counts0_classes": cls, "counts0_values": val, "counts_classes": cls,
        "counts_values": val, "num_classes": [3] * k, "pred_clean": [0] * k, "timestep": [1] * k, "seed": [0] * k,
        "denoiser_id": ["d"] * k, "classifier_id": ["c"] * k, "worker": ["w"] * k, "seconds": [0.1] * k,
    }, schema=COUNTS_SCHEMA)


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return RunDirectory(f"file://{tmp_path}/runs", "r")
    bucket = request.getfixturevalue("s3_bucket")
    return RunDirectory(f"s3://{bucket}/runs", "r")


def test_sparse_lists_match_dense():
    dense = np.array([[0, 3, 0, 1], [0, 0, 0, 0], [5, 0, 0, 0]])
    cls, val = sparse_lists(dense, pa.int64())
    assert cls.to_pylist() == [[1, 3], [], [0]] and val.to_pylist() == [[3, 1], [], [5]]
    assert cls.type == pa.list_(pa.int32()) and val.type == pa.list_(pa.int64())


def test_name_is_content_and_rewrite_is_idempotent(store):
    keys = [("a", 0.25), ("b", 0.25), ("a", 0.5)]
    path = store.write_counts(rows(keys))
    assert path.endswith(f"part-{keys_digest(reversed(keys))}.parquet")
    assert store.write_counts(rows(list(reversed(keys)))) == path  # a retried batch lands on the same file
    assert store.counts_files() == [path]
    assert store.done_keys() == set(keys)


def test_temp_and_foreign_files_are_not_data(store):
    store.write_counts(rows([("a", 0.5)]))
    store.fs.pipe_file(f"{store.counts_dir}/.tmp-0123", b"PAR1 partial")
    store.fs.pipe_file(f"{store.counts_dir}/notes.txt", b"hello")
    assert store.done_keys() == {("a", 0.5)}


def test_errors_one_file_per_image(store):
    store.write_error("x", "shard-0.tar", "bad")
    store.write_error("x", "shard-0.tar", "bad")
    store.write_error("y", "shard-1.tar", "bad")
    assert store.error_ids() == {"x", "y"} and len(store._files(store.errors_dir, "err-")) == 2


def test_compact_duplicates_leaves_each_key_once(store):
    a = store.write_counts(rows([("a", 0.25), ("b", 0.25)]))
    b = store.write_counts(rows([("b", 0.25), ("c", 0.25)]))  # overlaps a on one key
    c = store.write_counts(rows([("d", 0.25)]))
    e = store.write_counts(rows([("a", 0.25)]))  # contained in a
    assert store.compact_duplicates() == 3
    per_file = store.file_keys()
    assert c in per_file and a not in per_file and b not in per_file and e not in per_file
    all_keys = [k for keys in per_file.values() for k in keys]
    assert sorted(all_keys) == [("a", 0.25), ("b", 0.25), ("c", 0.25), ("d", 0.25)]
    merged = [p for p in per_file if p != c][0]
    with store.fs.open(merged, "rb") as f:
        table = pq.read_table(f)
    expected = rows([("a", 0.25), ("b", 0.25), ("c", 0.25)])
    assert table.sort_by("image_id").to_pylist() == expected.to_pylist()
    assert store.compact_duplicates() == 0


def test_manifest_round_trip(store):
    assert store.read_manifest() is None
    store.write_manifest({"run_id": "r", "x": [1, 2]})
    assert store.read_manifest() == {"run_id": "r", "x": [1, 2]}
    assert store.uri().endswith("/runs/r")
