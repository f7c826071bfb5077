"""Files and passes (issue 12): counts compacted when a run finishes (every row exactly once, a
crash in between, two drivers at once), one read of each counts file per start and per finish
(S3 requests counted), a no-op re-run without torch, the WebDataset id index, typed empty batches."""
from __future__ import annotations

import io
import json
import logging
import os
import resource
import subprocess
import sys
import tarfile
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REPO
from analysis.counts import load_counts
from pipeline.config import load_config
from pipeline.digits import DEMO_CONFIG, DEMO_MODELS
from pipeline.run_dir import RunDirectory, compaction_pool
from pipeline.shard_writer import make_shards, write_wds_index
from pipeline.shards import WDS_INDEX, list_shards, scan_image_ids
from tests.test_make_shards import imagenet_folder  # noqa: F401 (fixture)
from tests.test_run_dir import rows, store  # noqa: F401 (fixture)

SIGMAS = (0.25, 0.5)


def ids(count: int, start: int = 0) -> list[str]:
    return [f"img{n:05d}" for n in range(start, start + count)]


def write_parts(store: RunDirectory, image_ids: list[str], per_file: int) -> list[tuple[str, float]]:
    """Counts files of ``per_file`` images x SIGMAS each (one per actor call); returns every key."""
    keys = []
    for start in range(0, len(image_ids), per_file):
        part = [(i, s) for i in image_ids[start:start + per_file] for s in SIGMAS]
        store.write_counts(rows(part))
        keys += part
    return keys


def all_keys(store: RunDirectory) -> list[tuple[str, float]]:
    return sorted(k for keys in store.file_keys().values() for k in keys)


def test_compaction_pool():
    files = {"a": (("x", 1.0),), "b": (("y", 1.0), ("z", 1.0)), "c": (("x", 1.0), ("w", 1.0)), "d": (("v", 1.0),) * 3}
    assert compaction_pool(files, target_rows=3) == ["a", "b", "c"]  # a, c share a key; b is small; d is full
    assert compaction_pool({"b": files["b"], "d": files["d"]}, target_rows=3) == []  # one small file: done
    assert compaction_pool({"b": files["b"], "d": files["d"]}, target_rows=2) == []


def test_compaction_leaves_every_row_once_in_one_file_per_target_rows(store):
    expected = write_parts(store, ids(300), per_file=2)  # 150 files of 4 rows, as actors write them
    scan, merged = store.compact(target_rows=250)
    assert merged == 150
    files = store.file_keys()
    assert files == scan.counts and sorted(len(k) for k in files.values()) == [100, 250, 250]
    assert all_keys(store) == sorted(expected)
    assert [k for p in sorted(files, key=lambda p: files[p][0]) for k in files[p]] == sorted(expected)  # key ranges
    assert store.compact(target_rows=250)[1] == 0  # compacting the result does nothing

    lost = sorted(files, key=lambda p: files[p][0])[1]  # a resume: one full file lost, its rows rewritten in parts
    store.fs.rm(lost)
    write_parts(store, sorted({i for i, _ in files[lost]}), per_file=4)
    store.compact(target_rows=250)
    assert all_keys(store) == sorted(expected) and len(store.counts_files()) == 3


class Crash(Exception):
    pass


def test_a_crash_between_writing_and_removing_loses_nothing_and_the_next_compaction_finishes(store, monkeypatch):
    expected = write_parts(store, ids(40), per_file=2)  # 20 files, 80 rows
    removed = []

    def crash(path, *args, **kwargs):
        if removed:
            raise Crash(path)
        removed.append(path)
        original(path, *args, **kwargs)

    original = store.fs.rm
    monkeypatch.setattr(store.fs, "rm", crash)
    with pytest.raises(Crash):
        store.compact(target_rows=30)
    monkeypatch.undo()
    assert len(store.counts_files()) == 20 - 1 + 3  # the merged files first, one part removed
    assert sorted(set(all_keys(store))) == sorted(expected)  # duplicates, nothing lost
    table = load_counts(store.uri())  # the aggregation's dedupe keeps one row per key
    assert table.num_rows == len(expected)
    store.compact(target_rows=30)
    assert all_keys(store) == sorted(expected) and len(store.counts_files()) == 3
    assert store.compact(target_rows=30)[1] == 0


def test_two_drivers_compacting_one_run_while_a_third_writes_lose_no_row(tmp_path):
    uri = f"file://{tmp_path}/runs"
    first, second, writer = (RunDirectory(uri, "r") for _ in range(3))
    expected = set(write_parts(first, ids(200), per_file=2))
    for round_ in range(4):
        new = ids(40, start=200 + 40 * round_)
        threads = [threading.Thread(target=lambda: first.compact(target_rows=64)),
                   threading.Thread(target=lambda: second.compact(target_rows=64)),
                   threading.Thread(target=lambda: write_parts(writer, new, per_file=1))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        expected |= {(i, s) for i in new for s in SIGMAS}
        assert set(all_keys(first)) == expected  # maybe duplicates, never a lost row
    first.compact(target_rows=64)
    assert all_keys(first) == sorted(expected)
    assert len(first.counts_files()) == -(-len(expected) // 64)


def finished_run(tmp_path: Path, output_uri: str, count: int, per_file: int, run_id: str = "done"):
    """A config of ``count`` images (Parquet shards of 500 ids) whose every row is already written,
    in counts files of ``per_file`` images; no model work."""
    data = tmp_path / "shards"
    data.mkdir()
    all_ids = ids(count)
    for shard, start in enumerate(range(0, count, 500)):
        part = all_ids[start:start + 500]
        pq.write_table(pa.table({"image_id": part, "label": pa.array([0] * len(part), pa.int64()),
                                 "image": [b"unused"] * len(part)}), data / f"shard-{shard:05d}.parquet")
    sets = [f"data.uri={data.as_uri()}/", "data.selection.every=1", f"models.denoiser.uri={DEMO_MODELS / 'denoiser'}",
            f"models.classifier.uri={DEMO_MODELS / 'classifier.safetensors'}", f"output.uri={output_uri}",
            f"output.run_id={run_id}", f"smoothing.sigmas=[{', '.join(map(str, SIGMAS))}]"]
    write_parts(RunDirectory(output_uri, run_id), all_ids, per_file)
    return load_config(str(DEMO_CONFIG), sets), sets


@pytest.fixture
def s3_requests(monkeypatch):
    """Counter of the S3 API calls made through s3fs, by operation."""
    import s3fs

    calls: Counter = Counter()
    original = s3fs.S3FileSystem._call_s3

    async def counted(self, method, *args, **kwargs):
        calls[method] += 1
        return await original(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", counted)
    return calls


def test_a_no_op_rerun_reads_each_counts_file_once_on_s3(tmp_path, s3_bucket, s3_requests):
    """250 counts files: the start reads each once, the finish only lists (it compacts them into one
    file from what the start read); the next no-op re-run reads that one file."""
    from pipeline.certify_run import run_certification

    cfg, _ = finished_run(tmp_path, f"s3://{s3_bucket}/runs", 250, per_file=1)
    s3_requests.clear()
    summary = run_certification(cfg)
    first = dict(s3_requests)
    assert (summary["images"], summary["rows_total"], summary["counts_files"]) == (0, 500, 1)
    s3_requests.clear()
    assert run_certification(cfg)["rows_total"] == 500
    second = dict(s3_requests)
    print(f"S3 requests of a no-op re-run over 250 counts files: {first}; once compacted: {second}")
    assert first["get_object"] == 250 and first["put_object"] == 2  # (a new manifest) the manifest, the merged file
    assert second["get_object"] == 2 and second.get("delete_objects", 0) == 0  # the manifest, the one counts file


def test_a_no_op_rerun_decides_without_torch_ray_or_the_models(tmp_path):
    """jobs.certify on a finished run (a subprocess) imports no torch, diffusers, timm or Ray, nor
    scipy (a fixed-sampling run has no sequential plan to build), and spends under 3 s of CPU (CPU
    time, not wall: the test machine is shared)."""
    output = (tmp_path / "runs").as_uri()
    _, sets = finished_run(tmp_path, output, 1000, per_file=4)
    argv = [sys.executable, "-X", "importtime", "-m", "jobs.certify", "--config", str(DEMO_CONFIG),
            *(x for s in sets for x in ("--set", s))]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "RAY_ADDRESS": ""})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert (summary["images"], summary["rows_total"], summary["counts_files"]) == (0, 2000, 1)
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert not imported & {"torch", "diffusers", "timm", "ray", "scipy"}
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    print(f"no-op re-run: {cpu:.2f} s CPU")
    assert cpu < 3.0


def test_webdataset_ids_come_from_the_index_and_a_stale_index_is_not_trusted(imagenet_folder, tmp_path,  # noqa: F811
                                                                            monkeypatch, caplog):
    out = tmp_path / "wds"
    uris = make_shards(str(imagenet_folder), str(out), "webdataset", shard_size=4)
    assert (out / WDS_INDEX).exists()
    fs, shards = list_shards(str(out), "webdataset")
    assert [s.rsplit("/", 1)[-1] for s in shards] == [u.rsplit("/", 1)[-1] for u in uris]  # the index is no shard
    expected = scan_image_ids(fs, shards, "webdataset")
    opened = []  # tars opened
    original = fs.open
    monkeypatch.setattr(fs, "open", lambda path, *a, **k: (opened.append(path) if str(path).endswith(".tar") else None)
                        or original(path, *a, **k))
    with caplog.at_level(logging.WARNING, logger="pipeline.shards"):
        assert scan_image_ids(fs, shards, "webdataset") == expected
    assert opened == [] and not caplog.records  # no tar read: every id from the index

    # a shard rewritten (other samples) after the index was written: its headers are read, with a warning
    victim = Path(shards[1])
    with tarfile.open(victim, "w") as tar:
        for name in ("renamed-a.png", "renamed-b.png"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    with caplog.at_level(logging.WARNING, logger="pipeline.shards"):
        found = scan_image_ids(fs, shards, "webdataset")
    assert opened == [str(victim)] and "does not match 1 shards" in caplog.text and victim.name in caplog.text
    assert found[4:6] == ["renamed-a", "renamed-b"] and len(found) == len(expected) - 4 + 2
    assert write_wds_index(str(out)) == len(shards)  # rewritten from the headers: trusted again
    opened.clear()
    assert scan_image_ids(fs, shards, "webdataset") == found and opened == []


def test_webdataset_index_on_s3(imagenet_folder, s3_bucket, s3_requests):  # noqa: F811
    out = f"s3://{s3_bucket}/wds"
    make_shards(str(imagenet_folder), out, "webdataset", shard_size=5)
    fs, shards = list_shards(out, "webdataset")
    s3_requests.clear()
    found = scan_image_ids(fs, shards, "webdataset")
    assert len(found) == len(set(found)) > 0
    assert s3_requests["get_object"] == 1  # the index, no tar


def test_an_empty_decode_batch_keeps_its_column_types():
    """Ray 2.60 pickles a zero-length image column (with a warning): the typed batch keeps tensors."""
    from ray.data.block import BlockAccessor

    from pipeline.resume import typed_batch

    empty = {"image_id": np.array([], dtype=object), "label": np.array([], dtype=np.int64),
             "image": np.zeros((0, 16, 16, 3), dtype=np.uint8), "todo": np.zeros((0, 2), dtype=bool)}
    full = {"image_id": np.array(["a"], dtype=object), "label": np.array([1]),
            "image": np.zeros((1, 16, 16, 3), dtype=np.uint8), "todo": np.ones((1, 2), dtype=bool)}
    block = BlockAccessor.batch_to_block(typed_batch(empty))
    assert block.schema == BlockAccessor.batch_to_block(typed_batch(full)).schema
    back = BlockAccessor.for_block(block).to_numpy()
    assert back["image"].shape == (0, 16, 16, 3) and back["image"].dtype == np.uint8
    assert back["todo"].shape == (0, 2) and back["todo"].dtype == bool
