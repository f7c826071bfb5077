"""Weights from storage: fsspec URIs, a local fetch-once cache, and safe state-dict loading.

S3 endpoints: s3fs goes through botocore, which reads ``AWS_ENDPOINT_URL`` (and the other
``AWS_*`` variables) from the environment itself, so an S3-compatible server (MinIO, moto,
Ceph) needs no extra configuration here; tests/test_storage.py checks it.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Mapping

from typing import TYPE_CHECKING, Any

import fsspec

if TYPE_CHECKING:  # torch is imported where weights are read, not by every user of this module
    import torch

CHUNK = 1 << 22
MAX_KEYS_SHOWN = 20


def url_to_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path) for any fsspec URI or local path."""
    return fsspec.core.url_to_fs(uri)


# Fields of fsspec's info() that identify an object's content (S3, GCS, Azure, HTTP) or version,
# and, where a store reports none of those, its modification time.
CONTENT_FIELDS = ("ETag", "etag", "md5Hash", "crc32c", "generation", "content_md5", "VersionId", "version_id")
MTIME_FIELDS = ("mtime", "LastModified", "last_modified", "updated")


def object_stamp(info: Mapping[str, Any]) -> dict[str, Any]:
    """What changes when an object is rewritten, from fsspec's ``info()``: its size and the content
    hash or version its store reports, else its modification time (JSON-serialisable)."""
    fields = [k for k in CONTENT_FIELDS if info.get(k) is not None] or \
        [k for k in MTIME_FIELDS if info.get(k) is not None][:1]
    return {"size": int(info["size"]), **{k: str(info[k]) for k in fields}}


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether ``fs`` is the local filesystem (where an atomic rename exists)."""
    protocol = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return bool({"file", "local"} & set(protocol))


def default_cache_dir() -> str:
    """$MSDSMOOTH_CACHE, else ~/.cache/msdsmooth."""
    return os.environ.get("MSDSMOOTH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "msdsmooth")


def fetch_to_cache(uri: str, cache_dir: str | None = None) -> str:
    """Local path of ``uri`` (a file or a folder).

    Local paths and file:// URIs are returned as they are. Anything else is downloaded once into
    ``cache_dir/<sha256(uri)[:24]>/<basename>`` and reused afterwards (keyed by the URI string,
    so a changed remote object needs a new URI or a cleared cache). The download goes to a
    temporary folder that is renamed into place, so concurrent fetchers (actors sharing a disk)
    never see a partial copy.
    """
    fs, path = url_to_fs(uri)
    if is_local(fs):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{uri} does not exist")
        return path
    root = cache_dir or default_cache_dir()
    name = os.path.basename(path.rstrip("/")) or "object"
    entry = os.path.join(root, hashlib.sha256(uri.encode()).hexdigest()[:24])
    local = os.path.join(entry, name)
    if os.path.exists(local):
        return local
    os.makedirs(root, exist_ok=True)
    tmp = os.path.join(root, f".tmp-{uuid.uuid4().hex}")
    try:
        _download(fs, path, os.path.join(tmp, name))
        try:
            os.rename(tmp, entry)
        except OSError:
            if not os.path.exists(local):  # not a lost race with another fetcher
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return local


def _download(fs: fsspec.AbstractFileSystem, path: str, dest: str) -> None:
    if not fs.exists(path):
        raise FileNotFoundError(f"{fs.unstrip_protocol(path)} does not exist")
    if not fs.isdir(path):
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        fs.get_file(path, dest)
        return
    base = path.rstrip("/")
    for remote in fs.find(base):
        target = os.path.join(dest, os.path.relpath(remote, base))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fs.get_file(remote, target)


def load_torch_checkpoint(path: str) -> Any:
    """What ``torch.save`` wrote to ``path``, read on the CPU with ``torch.load(weights_only=True)``:
    tensors, plain containers and ``argparse.Namespace`` (training scripts save their ``args``
    beside the weights; a Namespace is an attribute bag, rebuilt without running its code), never
    an arbitrary pickled object. ValueError naming the file and the object it refused."""
    import argparse
    import pickle
    import re

    import torch

    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"WeightsUnpickler error: ([^\n]*?)\.(?:\s|$)", str(exc))
        cause = found[1] if found else " ".join(str(exc).split())[:300]
        raise ValueError(f"{path}: refused: the checkpoint holds objects that torch.load(weights_only=True) does not "
                         f"read (only tensors, plain containers and argparse.Namespace are loaded, never arbitrary "
                         f"pickled code): {cause}. Save the state dict alone, or as .safetensors, where you trust "
                         f"the file") from exc


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, or of a torch.save'd flat state dict (read by
    :func:`load_torch_checkpoint`: no arbitrary unpickling), on the CPU."""
    import safetensors.torch
    import torch

    if path.endswith(".safetensors"):
        return safetensors.torch.load_file(path)
    state = load_torch_checkpoint(path)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a flat state dict of tensors")
    return dict(state)


def load_state_dict_strict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str,
                           assign: bool = False) -> None:
    """Load ``state_dict`` into ``module`` or raise ValueError naming every missing,
    unexpected and shape-mismatched key. ``assign``: take the tensors as they are (for a
    module built on the meta device)."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = sorted(f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
                    for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape)
    if missing or unexpected or shapes:
        parts = [f"{label} ({len(keys)}): {_first(keys)}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes))
                 if keys]
        raise ValueError(f"{source} does not fit {type(module).__name__}: " + "; ".join(parts))
    module.load_state_dict(state_dict, strict=True, assign=assign)


def _first(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_KEYS_SHOWN])
    return shown + (f", ... and {len(keys) - MAX_KEYS_SHOWN} more" if len(keys) > MAX_KEYS_SHOWN else "")


def sha256_file(path: str) -> str:
    """Hex sha256 of a local file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
