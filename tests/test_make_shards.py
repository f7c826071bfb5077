"""pipeline.shard_writer and its command line ``python -m jobs.make_shards``: folder -> Parquet/WebDataset
shards (local and S3), read back by pipeline.shards."""
from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.shard_writer import list_images, make_shards
from pipeline.errors import StorageError
from pipeline.images import resize_image
from pipeline.shards import list_shards, scan_image_ids, select_ids
from pipeline.storage import url_to_fs

CLASSES = ("n02", "n01", "n03")  # not sorted on purpose


def write_image(path, seed: int, size=(20, 14), fmt="JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, format=fmt)
    return path.read_bytes()


@pytest.fixture
def imagenet_folder(tmp_path):
    """3 class folders x 3 images (one PNG), file names unique across classes."""
    root = tmp_path / "train"
    for c, cls in enumerate(CLASSES):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            png = c == 1 and i == 2
            write_image(root / cls / f"img_{cls}_{i}.{'png' if png else 'JPEG'}", 10 * c + i, fmt="PNG" if png else "JPEG")
    (root / "n01" / "notes.txt").write_text("not an image")
    return root


def expected_order(index: dict[str, int]) -> list[tuple[str, int]]:
    return [(f"img_{cls}_{i}", index[cls]) for cls in sorted(CLASSES) for i in range(3)]


def read_parquet_shards(uris):
    rows = []
    for uri in uris:
        fs, path = url_to_fs(uri)
        with fs.open(path, "rb") as f:
            rows += pq.read_table(f).to_pylist()
    return rows


def read_tar_shards(uris):
    members = []
    for uri in uris:
        fs, path = url_to_fs(uri)
        with fs.open(path, "rb") as f, tarfile.open(fileobj=io.BytesIO(f.read())) as tar:
            members += [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    return members


def test_parquet_shards_default_class_index(imagenet_folder, tmp_path):
    uris = make_shards(str(imagenet_folder), f"file://{tmp_path}/out", "parquet", shard_size=4)
    assert [u.rsplit("/", 1)[-1] for u in uris] == ["shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    rows = read_parquet_shards(uris)
    index = {cls: i for i, cls in enumerate(sorted(CLASSES))}
    assert [(r["image_id"], r["label"]) for r in rows] == expected_order(index)
    for r in rows:  # bytes copied unchanged
        cls = r["image_id"].split("_")[1]
        original = next((imagenet_folder / cls).glob(r["image_id"] + ".*")).read_bytes()
        assert r["image"] == original
    assert [len(pq.read_table(url_to_fs(u)[1])) for u in uris] == [4, 4, 1]


def test_command_line(imagenet_folder, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "jobs.make_shards", str(imagenet_folder), str(tmp_path / "out"),
                           "--format", "webdataset", "--shard-size", "4", "--prefix", "val"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"wrote 3 shards to {tmp_path / 'out'}"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["_index.parquet", "val-00000.tar", "val-00001.tar",
                                                                    "val-00002.tar"]  # the tars and their id index
    uris = sorted(str(p) for p in (tmp_path / "out").glob("*.tar"))
    index = {cls: i for i, cls in enumerate(sorted(CLASSES))}
    labels = [int(data) for name, data in read_tar_shards(uris) if name.endswith(".cls")]
    assert labels == [label for _, label in expected_order(index)]


@pytest.mark.parametrize("style", ["torchvision", "flat"])
def test_class_index_json(imagenet_folder, tmp_path, style):
    index = {"n01": 7, "n02": 3, "n03": 0}
    raw = {str(v): [k, f"name{v}"] for k, v in index.items()} if style == "torchvision" else index
    (tmp_path / "index.json").write_text(json.dumps(raw))
    files = list_images(str(imagenet_folder), class_index=str(tmp_path / "index.json"))
    assert [(f.image_id, f.label) for f in files] == expected_order(index)


def test_webdataset_shards_on_s3_are_deterministic(imagenet_folder, s3_bucket):
    out = f"s3://{s3_bucket}/wds"
    uris = make_shards(str(imagenet_folder), out, "webdataset", shard_size=5)
    first = read_tar_shards(uris)
    assert make_shards(str(imagenet_folder), out, "webdataset", shard_size=5) == uris
    assert read_tar_shards(uris) == first  # byte-identical rewrite
    names = [n for n, _ in first]
    index = {cls: i for i, cls in enumerate(sorted(CLASSES))}
    expected = []
    for image_id, label in expected_order(index):
        expected += [f"{image_id}.{'png' if image_id == 'img_n01_2' else 'jpg'}", f"{image_id}.cls"]
    assert names == expected
    assert [int(d) for n, d in first if n.endswith(".cls")] == [label for _, label in expected_order(index)]
    fs, shards = list_shards(f"{out}/shard-*.tar", "webdataset")
    assert scan_image_ids(fs, shards, "webdataset") == [i for i, _ in expected_order(index)]


def test_labels_csv_flat_folder(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ("b.jpg", "a.png", "c.jpeg"):
        write_image(flat / name, len(name), fmt="PNG" if name.endswith("png") else "JPEG")
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([["filename", "label"], ["c.jpeg", "2"], ["a.png", ""], ["b.jpg", "0"]])
    uris = make_shards(str(flat), str(tmp_path / "out"), "parquet", labels_csv=str(tmp_path / "labels.csv"))
    assert [(r["image_id"], r["label"]) for r in read_parquet_shards(uris)] == [("c", 2), ("a", -1), ("b", 0)]


def test_duplicate_image_ids_rejected(imagenet_folder):
    write_image(imagenet_folder / "n03" / "img_n01_0.jpg", 99)
    with pytest.raises(ValueError, match="img_n01_0"):
        list_images(str(imagenet_folder))


def test_list_shards_errors(tmp_path, s3_server):
    with pytest.raises(StorageError, match="no parquet shards found"):
        list_shards(f"{tmp_path}/*.parquet", "parquet")
    with pytest.raises(StorageError, match="data.uri s3://no-such-bucket-x/.*cannot list shards"):
        list_shards("s3://no-such-bucket-x/shards/", "parquet")


def test_select_ids():
    ids = [f"i{k}" for k in range(10)]
    sel = {"every": 1, "offset": 0, "limit": None, "image_ids": None}
    assert select_ids(ids, sel) is None
    assert select_ids(ids, {**sel, "every": 3, "offset": 1}) == {"i1", "i4", "i7"}
    assert select_ids(ids, {**sel, "every": 3, "offset": 1, "limit": 2}) == {"i1", "i4"}
    assert select_ids(None, {**sel, "image_ids": ["i2", "x"]}) == {"i2", "x"}


def test_resize_image_center_crop_matches_pil(tmp_path):
    data = write_image(tmp_path / "x.png", 3, size=(40, 20), fmt="PNG")
    out = resize_image(data, 16, 18, "center", "bilinear")
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    ref = Image.open(io.BytesIO(data)).convert("RGB").resize((36, 18), Image.Resampling.BILINEAR)
    np.testing.assert_array_equal(out, np.asarray(ref)[1:17, 10:26])
    squashed = resize_image(data, 16, None, "none", "nearest")
    np.testing.assert_array_equal(squashed, np.asarray(Image.open(io.BytesIO(data)).resize((16, 16), Image.Resampling.NEAREST)))
