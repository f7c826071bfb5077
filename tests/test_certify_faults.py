"""Bad data, changed weights and unloadable models through the real certification run (local Ray,
local files, configs/small.yaml's tiny random-weight models): each ends in a correct result or a
one-line project error before any model work (issue 11, items 1, 2, 3, 5, 10, 12, 15)."""
from __future__ import annotations

import io
import os
import tarfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import safetensors.torch
import timm
import torch
import yaml
from PIL import Image

from conftest import REPO
from pipeline.certify_run import run_certification
from pipeline.config import ConfigError, config_from_dict
from pipeline.models.small import write_small_models
from pipeline.provenance import ModelLoadError
from pipeline.run_dir import RunDirectory
from pipeline.shards import ShardError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    write_small_models(root)
    return root


def make_config(data_uri, fmt, models, out, run_id, *overrides):
    with open(os.path.join(REPO, "configs", "small.yaml")) as f:
        raw = yaml.safe_load(f)
    return config_from_dict(raw, [
        f"data.uri={data_uri}", f"data.format={fmt}", f"models.denoiser.uri={models / 'denoiser'}",
        f"models.classifier.uri={models / 'classifier.safetensors'}", f"output.uri=file://{out}",
        f"output.run_id={run_id}", *overrides])


def encoded(fmt: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def write_tar(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def write_parquet(path, ids, labels) -> None:
    pq.write_table(pa.table({"image_id": ids, "label": pa.array(labels, pa.int64()),
                             "image": [encoded("PNG", i) for i in range(len(ids))]}), path)


def counts(store: RunDirectory) -> pa.Table:
    tables = []
    for path in store.counts_files():
        with store.fs.open(path, "rb") as f:
            tables.append(pq.read_table(f))
    return pa.concat_tables(tables).sort_by([("image_id", "ascending"), ("sigma", "ascending")])


def test_webdataset_samples_with_any_image_extension_or_no_label_are_certified(ray_local, models, tmp_path):
    """Ray fills a column that a sample lacks with NaN: each sample's own image is decoded (item 1, 5)."""
    members = [("s0.png", encoded("PNG", 0)), ("s0.cls", b"3"), ("s1.jpg", encoded("JPEG", 1)), ("s1.cls", b"1"),
               ("s2.png", encoded("PNG", 2)),  # no label: -1
               ("s3.webp", encoded("WEBP", 3)), ("s3.cls", b"2"), ("s4.jpeg", encoded("JPEG", 4)), ("s4.cls", b""),
               ("s5.cls", b"7")]  # no image at all: the record's own fault, an error record
    (tmp_path / "data").mkdir()
    write_tar(tmp_path / "data" / "mixed-00000.tar", members)
    cfg = make_config(f"file://{tmp_path}/data/", "webdataset", models, tmp_path / "runs", "mixed")
    summary = run_certification(cfg)
    store = RunDirectory(cfg.output["uri"], "mixed")
    table = counts(store)
    assert (summary["images"], summary["rows"], summary["errors"]) == (5, 10, 1)
    labels = dict(zip(table["image_id"].to_pylist(), table["label"].to_pylist()))
    assert labels == {"s0": 3, "s1": 1, "s2": -1, "s3": 2, "s4": -1}
    assert store.error_ids() == {"s5"}


def test_a_resume_with_other_weights_is_refused_naming_them(ray_local, tmp_path):
    """Null labels are -1 (item 5); the weights' identity is in the manifest and the rows (item 2); a
    stale temporary file is removed (item 15)."""
    models = tmp_path / "models"
    write_small_models(models)
    (tmp_path / "data").mkdir()
    write_parquet(tmp_path / "data" / "p-00000.parquet", ["a", "b", "c", "d"], [0, None, 1, None])
    cfg = make_config(f"file://{tmp_path}/data/", "parquet", models, tmp_path / "runs", "w")
    summary = run_certification(cfg)
    store = RunDirectory(cfg.output["uri"], "w")
    table = counts(store)
    assert (summary["rows"], summary["errors"]) == (8, 0)
    assert table["label"].to_pylist() == [0, 0, -1, -1, 1, 1, -1, -1]
    weights = store.read_manifest()["weights"]
    sha = weights["models.classifier.uri"]["sha256"]
    assert len(sha) == 64 and weights["models.classifier.uri"]["basis"] == "content"
    assert len(weights["models.denoiser.uri"]["sha256"]) == 64
    assert set(table["classifier_id"].to_pylist()) == {f"test_vit@sha256:{sha[:16]}"}

    stale, fresh = f"{store.counts_dir}/.tmp-stale", f"{store.counts_dir}/.tmp-fresh"
    for path in (stale, fresh):
        store.put(path, b"PAR1 partial")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    assert run_certification(cfg)["images"] == 0  # nothing to do
    assert not os.path.exists(stale) and os.path.exists(fresh)

    torch.manual_seed(1)  # other weights behind the same URI
    safetensors.torch.save_file(timm.create_model("test_vit", num_classes=10, img_size=32).state_dict(),
                                str(models / "classifier.safetensors"))
    for path in store.counts_files()[:1]:
        store.fs.rm(path)
    with pytest.raises(ConfigError, match=r"output\.run_id: w exists with other model weights "
                                          r"\(models\.classifier\.uri differ: sha256 [0-9a-f]{12}\.* then, "):
        run_certification(cfg)
    assert store.read_manifest()["weights"] == weights  # the record is not replaced


def test_duplicate_image_ids_are_refused_before_any_work(models, tmp_path):
    """Item 3: found by the id scan, named with the shards holding them; nothing is written."""
    (tmp_path / "data").mkdir()
    write_parquet(tmp_path / "data" / "p-00000.parquet", ["a", "b", "c"], [0, 1, 2])
    write_parquet(tmp_path / "data" / "p-00001.parquet", ["c", "d", "a"], [0, 1, 2])
    cfg = make_config(f"file://{tmp_path}/data/", "parquet", models, tmp_path / "runs", "dup")
    with pytest.raises(ShardError, match=r"data.uri: 2 image_ids are in more than one record.*'a' in "
                                         r".*p-00000.parquet.*p-00001.parquet"):
        run_certification(cfg)
    assert not (tmp_path / "runs").exists()


def test_a_corrupt_shard_is_named(models, tmp_path):
    """Item 10: the id scan reads every shard's footer; a truncated one is named with data.uri."""
    (tmp_path / "data").mkdir()
    write_parquet(tmp_path / "data" / "p-00000.parquet", ["a"], [0])
    data = (tmp_path / "data" / "p-00000.parquet").read_bytes()
    (tmp_path / "data" / "p-00001.parquet").write_bytes(data[:-20])
    cfg = make_config(f"file://{tmp_path}/data/", "parquet", models, tmp_path / "runs", "corrupt")
    with pytest.raises(ShardError, match=r"data.uri: shard file://.*p-00001.parquet is unreadable"):
        run_certification(cfg)


@pytest.mark.timeout(600)
def test_a_model_that_cannot_load_is_one_line_before_the_pipeline(ray_local, models, tmp_path):
    """Item 12: mismatched keys, a refused pickle: a project error naming the key, before data flows."""
    (tmp_path / "data").mkdir()
    write_parquet(tmp_path / "data" / "p-00000.parquet", ["a", "b"], [0, 1])
    safetensors.torch.save_file({"foo": torch.zeros(2)}, str(tmp_path / "wrong.safetensors"))
    torch.save({"weights": ModelLoadError("a pickled object")}, tmp_path / "pickled.pt")
    for name, cause in (("wrong.safetensors", "does not fit"), ("pickled.pt", "refused: the checkpoint holds objects .*pipeline.provenance.ModelLoadError")):
        cfg = make_config(f"file://{tmp_path}/data/", "parquet", models, tmp_path / "runs", name.split(".")[0],
                          f"models.classifier.uri={tmp_path / name}")
        with pytest.raises(ModelLoadError, match=rf"models.classifier.uri {tmp_path / name}: .*{cause}") as info:
            run_certification(cfg)
        assert "\n" not in str(info.value)
        assert RunDirectory(cfg.output["uri"], cfg.output["run_id"]).counts_files() == []
