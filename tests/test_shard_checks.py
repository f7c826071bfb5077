"""Shard reading without Ray: what counts as a missing value, a label, an image's own fault, a
duplicate id and an unreadable shard (issue 11, items 1, 3, 5, 10)."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import pipeline.shards as shards
from pipeline.shards import ShardError, decode_batch, list_shards, scan_image_ids

DATA_CFG = {"resolution": 8, "resize": 8, "crop": "center", "interpolation": "bicubic"}
COLUMNS = {"image_id": "image_id", "image": "image", "label": "label"}


def encoded(fmt: str, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def decode(batch, fmt="webdataset"):
    errors = []
    out = decode_batch(batch, fmt=fmt, columns=COLUMNS, data_cfg=DATA_CFG, sigmas=(0.25,),
                       keep=lambda _: np.array([True]), on_error=lambda *e: errors.append(e))
    return out, errors


def column(*values) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def test_webdataset_missing_columns_of_any_kind_are_missing():
    """Ray fills a key that a sample lacks with NaN or None: the other key's image is decoded."""
    batch = {"__key__": column("a", "b", "c", "d"), "__url__": column(*["s.tar"] * 4),
             "png": column(encoded("PNG"), np.nan, None, float("nan")),
             "jpg": column(np.nan, encoded("JPEG"), None, np.float64("nan")),
             "cls": column(b"1", np.nan, None, b"2")}
    out, errors = decode(batch)
    assert out["image_id"].tolist() == ["a", "b"] and out["label"].tolist() == [1, -1]
    assert [(e[0], e[2]) for e in errors] == [("c", "ValueError: no image data in the record"),
                                              ("d", "ValueError: no image data in the record")]


@pytest.mark.parametrize("label", [None, np.nan, float("nan"), "", b"", b" \n"])
def test_a_missing_label_is_minus_one(label):
    batch = {"image_id": column("a"), "image": column(encoded("PNG")), "label": column(label), "path": column("p")}
    out, errors = decode(batch, fmt="parquet")
    assert errors == [] and out["label"].tolist() == [-1]


def test_a_float_label_column_with_nan():
    batch = {"image_id": column("a", "b"), "image": column(encoded("PNG"), encoded("PNG", 1)),
             "label": np.array([np.nan, 3.0]), "path": column("p", "p")}
    out, errors = decode(batch, fmt="parquet")
    assert errors == [] and out["label"].tolist() == [-1, 3]


def test_only_the_images_own_fault_is_an_error_record(monkeypatch):
    batch = {"image_id": column("bad", "empty"), "image": column(b"not an image", None),
             "label": column(1, 1), "path": column("p", "p")}
    out, errors = decode(batch, fmt="parquet")
    assert len(out["image_id"]) == 0 and [e[0] for e in errors] == ["bad", "empty"]

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in our code")

    monkeypatch.setattr(shards, "resize_image", broken)
    good = {"image_id": column("a"), "image": column(encoded("PNG")), "label": column(1), "path": column("p")}
    with pytest.raises(RuntimeError, match="a bug in our code"):  # raised: Ray retries, the run fails loudly
        decode(good, fmt="parquet")


def write_parquet(path, ids):
    pq.write_table(pa.table({"image_id": ids, "label": [0] * len(ids), "image": [b"x"] * len(ids)}), path)


def write_tar(path, names):
    with tarfile.open(path, "w") as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            data = b"x" * 700
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_duplicate_ids_across_parquet_shards_are_refused(tmp_path):
    write_parquet(tmp_path / "a.parquet", ["x1", "x2", "x3"])
    write_parquet(tmp_path / "b.parquet", ["x3", "x4", "x2"])
    fs, paths = list_shards(str(tmp_path), "parquet")
    with pytest.raises(ShardError, match=r"data.uri: 2 image_ids .*'x2' in .*a.parquet.*b.parquet"):
        scan_image_ids(fs, paths, "parquet")


def test_duplicate_ids_in_webdataset_are_refused(tmp_path):
    write_tar(tmp_path / "a.tar", ["x1.png", "x1.cls", "x2.jpg"])
    write_tar(tmp_path / "b.tar", ["x3.png", "x2.png", "x2.cls"])
    write_tar(tmp_path / "c.tar", ["y.png", "z.png", "y.cls"])  # y twice in one shard: two samples
    fs, paths = list_shards(str(tmp_path), "webdataset")
    with pytest.raises(ShardError, match=r"'x2' in .*a.tar.*b.tar"):
        scan_image_ids(fs, paths[:2], "webdataset")
    with pytest.raises(ShardError, match=r"'y' in .*c.tar"):
        scan_image_ids(fs, paths[2:], "webdataset")
    assert scan_image_ids(fs, paths[:1], "webdataset") == ["x1", "x2"]


def test_unreadable_shards_are_named(tmp_path):
    write_parquet(tmp_path / "a.parquet", ["x1"])
    data = (tmp_path / "a.parquet").read_bytes()
    (tmp_path / "b.parquet").write_bytes(data[: len(data) // 2])
    fs, paths = list_shards(str(tmp_path), "parquet")
    with pytest.raises(ShardError, match=r"data.uri: shard .*b.parquet is unreadable .*ArrowInvalid"):
        scan_image_ids(fs, paths, "parquet")
    write_tar(tmp_path / "t.tar", ["x1.png", "x2.png"])
    data = (tmp_path / "t.tar").read_bytes()
    (tmp_path / "t.tar").write_bytes(data[:1100])  # the second member's data cut short
    fs, paths = list_shards(str(tmp_path / "t.tar"), "webdataset")
    with pytest.raises(ShardError, match=r"data.uri: shard .*t.tar is unreadable .*truncated"):
        scan_image_ids(fs, paths, "webdataset")
