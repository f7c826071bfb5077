"""pipeline.storage: fetch-once cache over a real S3 server, safe weight reading, strict loading."""
from __future__ import annotations

import hashlib
import os
import pickle
from concurrent.futures import ThreadPoolExecutor

import boto3
import pytest
import safetensors.torch
import torch

from pipeline.storage import (default_cache_dir, fetch_to_cache, load_state_dict_strict, read_state_dict,
                              sha256_file, url_to_fs)


def put(endpoint: str, bucket: str, key: str, body: bytes) -> None:
    boto3.client("s3", endpoint_url=endpoint).put_object(Bucket=bucket, Key=key, Body=body)


def delete_all(endpoint: str, bucket: str) -> None:
    client = boto3.client("s3", endpoint_url=endpoint)
    for obj in client.list_objects_v2(Bucket=bucket).get("Contents", []):
        client.delete_object(Bucket=bucket, Key=obj["Key"])


def test_local_paths_are_used_in_place(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"x")
    assert fetch_to_cache(str(f)) == str(f)
    assert fetch_to_cache(f"file://{f}") == str(f)
    with pytest.raises(FileNotFoundError):
        fetch_to_cache(str(tmp_path / "missing"))


def test_s3_endpoint_comes_from_the_environment(s3_server, s3_bucket):
    # Only AWS_ENDPOINT_URL (set by the fixture) points s3fs at the local server.
    put(s3_server, s3_bucket, "a/b.txt", b"hello")
    fs, path = url_to_fs(f"s3://{s3_bucket}/a/b.txt")
    assert path == f"{s3_bucket}/a/b.txt"
    assert fs.cat(path) == b"hello"


def test_s3_file_fetched_once(s3_server, s3_bucket, tmp_path):
    uri = f"s3://{s3_bucket}/models/w.safetensors"
    put(s3_server, s3_bucket, "models/w.safetensors", b"weights")
    cache = tmp_path / "cache"
    local = fetch_to_cache(uri, str(cache))
    assert open(local, "rb").read() == b"weights"
    assert local == str(cache / hashlib.sha256(uri.encode()).hexdigest()[:24] / "w.safetensors")
    delete_all(s3_server, s3_bucket)  # a second fetch must not need the server
    assert fetch_to_cache(uri, str(cache)) == local
    assert sorted(os.listdir(cache)) == [os.path.basename(os.path.dirname(local))]  # no temporaries left


def test_concurrent_fetchers_share_one_complete_copy(s3_server, s3_bucket, tmp_path):
    body = os.urandom(1 << 20)
    put(s3_server, s3_bucket, "big.bin", body)
    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda _: fetch_to_cache(f"s3://{s3_bucket}/big.bin", str(tmp_path)), range(4)))
    assert len(set(paths)) == 1 and open(paths[0], "rb").read() == body
    assert len(os.listdir(tmp_path)) == 1  # the losers' temporaries are gone


def test_s3_folder_fetched_recursively(s3_server, s3_bucket, tmp_path):
    files = {"unet/config.json": b"{}", "unet/w.safetensors": b"w", "scheduler/scheduler_config.json": b"{}"}
    for key, body in files.items():
        put(s3_server, s3_bucket, f"den/{key}", body)
    local = fetch_to_cache(f"s3://{s3_bucket}/den/", str(tmp_path))
    got = {os.path.relpath(os.path.join(r, n), local): open(os.path.join(r, n), "rb").read()
           for r, _, names in os.walk(local) for n in names}
    assert got == files


def test_missing_remote_object(s3_server, s3_bucket, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        fetch_to_cache(f"s3://{s3_bucket}/nothing-here.pt", str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_default_cache_dir(monkeypatch):
    monkeypatch.setenv("MSDSMOOTH_CACHE", "/somewhere/cache")
    assert default_cache_dir() == "/somewhere/cache"
    monkeypatch.delenv("MSDSMOOTH_CACHE")
    assert default_cache_dir() == os.path.expanduser("~/.cache/msdsmooth")


def test_read_state_dict_formats(tmp_path):
    state = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.int64)}
    safetensors.torch.save_file(state, tmp_path / "w.safetensors")
    torch.save(state, tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        got = read_state_dict(str(tmp_path / name))
        assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)


class Payload:
    """Unpickling this would run code (create a folder); weights_only loading must refuse it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (self.path,))


def test_read_state_dict_never_unpickles_objects(tmp_path):
    target = tmp_path / "pwned"
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"w": Payload(str(target))}, f, protocol=2)
    with pytest.raises(ValueError, match="evil.pt: refused: .*never arbitrary pickled code"):
        read_state_dict(str(tmp_path / "evil.pt"))
    assert not target.exists()
    torch.save({"model": {"w": torch.zeros(1)}}, tmp_path / "nested.pt")
    with pytest.raises(ValueError, match="flat state dict"):
        read_state_dict(str(tmp_path / "nested.pt"))


def test_load_state_dict_strict_names_keys():
    module = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    good = {k: torch.full_like(v, 0.5) for k, v in module.state_dict().items()}
    bad = dict(good)
    del bad["0.bias"]
    bad["2.weight"] = torch.zeros(1)
    bad["1.weight"] = torch.zeros(4, 3)
    with pytest.raises(ValueError) as err:
        load_state_dict_strict(module, bad, "ckpt.pt")
    message = str(err.value)
    assert "ckpt.pt" in message and "missing (1): 0.bias" in message and "unexpected (1): 2.weight" in message
    assert "1.weight: checkpoint (4, 3) vs model (1, 3)" in message
    load_state_dict_strict(module, good, "ckpt.pt")
    assert all(torch.equal(v, torch.full_like(v, 0.5)) for v in module.state_dict().values())


def test_sha256_file(tmp_path):
    f = tmp_path / "x"
    f.write_bytes(b"abc" * 3_000_000)
    assert sha256_file(str(f)) == hashlib.sha256(b"abc" * 3_000_000).hexdigest()
