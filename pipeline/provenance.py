"""A run's provenance: the manifest (config, code version, model weights, model checksums) and the
checks made before any model work.

Guarantees:
* :func:`check_model_uris` and :func:`open_run` fail with :class:`StorageError` naming the config
  key and the cause when storage cannot be reached, read or written.
* :func:`weights_identity` names the bytes behind each model URI: for local files the sha256 of
  their content (``basis: content``; a folder hashes every file's relative path and sha256); for
  remote URIs, where hashing would mean downloading gigabytes on the driver, the sha256 of the
  objects' listing metadata (relative path, size, ETag / md5 / crc32c / generation / modification
  time, whatever the store reports: ``basis: object metadata``), which changes whenever an object
  is rewritten.
* :func:`open_run` refuses (``ConfigError`` naming ``output.run_id`` and every differing key) to
  resume a run whose manifest records different data/models/smoothing settings, or other weights
  behind the same model URIs (naming ``models.denoiser.uri`` / ``models.classifier.uri`` /
  ``models.classifier.per_sigma.<sigma>`` and both sha256 prefixes); the recorded identity is never replaced. A manifest written before weights
  were recorded gets them recorded at the first resume.
* :class:`ModelLoadError` is what the run raises (one line: the key, the URI, the cause) when the
  actors could not load a model (:func:`pipeline.certify_actor.probe_models`), before any data flows.
* :func:`record_checksums` records the sha256 of the weights the actors loaded, and fails if two
  actors loaded different weights.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import time
from typing import Any, Mapping

from pipeline.config import Config, ConfigError, changed_keys, model_uris, refuse_changed
from pipeline.errors import MsdsmoothError, StorageError, describe
from pipeline.run_dir import RunDirectory
from pipeline.storage import is_local, object_stamp, sha256_file, url_to_fs

log = logging.getLogger(__name__)

class ModelLoadError(MsdsmoothError, RuntimeError):
    """A model cannot be loaded (missing file, refused pickle, keys that do not fit); names the key."""


def code_version() -> str:
    """``git describe`` of the working tree when available, else the package version."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=here,
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except OSError:
        pass
    from importlib.metadata import PackageNotFoundError, version
    try:
        return f"msdsmooth {version('msdsmooth')}"
    except PackageNotFoundError:
        return "unknown"


def check_model_uris(cfg: Config) -> dict[str, dict[str, str]]:
    """Every model URI in the config (:func:`pipeline.config.model_uris`: the denoiser's, the
    classifier's or each per-sigma classifier's) exists; returns their :func:`weights_identity` by
    config key."""
    identities = {}
    for key, uri in model_uris(cfg.models):
        try:
            fs, path = url_to_fs(uri)
            exists = fs.exists(path)
            if exists:
                identities[key] = weights_identity(fs, path, uri)
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"{key} {uri}: cannot reach storage: {describe(exc)}") from exc
        if not exists:
            raise StorageError(f"{key} {uri}: not found")
    return identities


def weights_identity(fs: Any, path: str, uri: str) -> dict[str, str]:
    """{"uri", "sha256", "basis"} of the file or folder at ``path`` (see module doc)."""
    files = sorted(fs.find(path, detail=True).items()) if fs.isdir(path) else [(path, fs.info(path))]
    base = path.rstrip("/")
    entries = []
    for name, info in files:
        relative = os.path.relpath(name, base) if name != base else os.path.basename(base)
        if is_local(fs):
            entries.append([relative, sha256_file(name)])
        else:
            entries.append([relative, object_stamp(info)])
    if is_local(fs) and len(entries) == 1 and not fs.isdir(path):
        digest = entries[0][1]  # a single file: its own sha256, as `sha256sum` prints it
    else:
        digest = hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()
    return {"uri": uri, "sha256": digest, "basis": "content" if is_local(fs) else "object metadata"}


def refuse_other_weights(run_id: str, previous: dict[str, dict[str, str]], current: dict[str, dict[str, str]]) -> None:
    """ConfigError naming each model URI whose weights differ from what the run recorded."""
    before = {k: v["sha256"] for k, v in previous.items()}
    now = {k: v["sha256"] for k, v in current.items()}
    diff = changed_keys(before, now)
    if diff:
        detail = "; ".join(f"{k} differ: sha256 {str(before.get(k))[:12]}... then, {str(now.get(k))[:12]}... now"
                           for k in diff)
        raise ConfigError(f"output.run_id: {run_id} exists with other model weights ({detail}); "
                          "use a new run_id or the original weights")


def open_run(cfg: Config, weights: dict[str, dict[str, str]]) -> RunDirectory:
    """The run directory, checked writable and consistent with an earlier attempt's manifest (config
    and ``weights``, see :func:`check_model_uris`), whose manifest now records this config and code
    version; stale temporary files of crashed writers are removed."""
    out = cfg.output
    try:
        store = RunDirectory(out["uri"], out["run_id"])
        previous = store.read_manifest()
    except Exception as exc:  # noqa: BLE001
        raise StorageError(f"output.uri {out['uri']}: cannot reach storage: {describe(exc)}") from exc
    if previous is not None:
        refuse_changed("output.run_id", out["run_id"], previous["config_content"], cfg.content_key())
        if previous.get("weights") is not None:
            refuse_other_weights(out["run_id"], previous["weights"], weights)
    manifest = previous or {}
    manifest.update(run_id=out["run_id"], config=cfg.to_dict(), config_content=cfg.content_key(),
                    code_version=code_version())
    if cfg.smoothing["sampling"] == "sequential":
        from pipeline.sequential import sequential_plan  # imports scipy, which only a sequential run needs

        manifest["sequential_plan"] = sequential_plan(cfg.smoothing).to_dict()
    manifest.setdefault("weights", weights)
    manifest.setdefault("model_checksums", None)
    manifest.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    try:
        store.write_manifest(manifest)
    except Exception as exc:  # noqa: BLE001
        raise StorageError(f"output.uri {out['uri']}: cannot write the run: {describe(exc)}") from exc
    store.remove_stale_temporaries()
    return store


def recorded_device_settings(store: RunDirectory, compute: Mapping[str, Any]) -> dict | None:
    """The device settings an earlier attempt of the run sampled with (manifest
    ``device_settings``), which a resume keeps: the function certified is the model run in that
    precision. None for a new run. A ``compute`` value set explicitly (not ``auto``) that differs
    from the recorded one is refused (ConfigError naming the key)."""
    recorded = (store.read_manifest() or {}).get("device_settings")
    if recorded is None:
        return None
    differ = [f"compute.{k}" for k in ("dtype", "channels_last", "compile", "batch_size")
              if compute.get(k, "auto") != "auto" and compute[k] != recorded[k]]
    if differ:
        raise ConfigError(f"{', '.join(differ)}: the run sampled with {recorded['reason']!r}; a resume keeps those "
                          "settings (set them to auto or to the recorded values, or use a new output.run_id)")
    return recorded


def record_device_settings(store: RunDirectory, settings: Mapping[str, Any]) -> None:
    """Put the run's device settings (and why they were chosen) into the manifest and the log."""
    log.info("device settings: %s", settings["reason"])
    manifest = store.read_manifest()
    if manifest.get("device_settings") != settings:
        manifest["device_settings"] = dict(settings)
        store.write_manifest(manifest)


def record_checksums(store: RunDirectory, reported: set[str]) -> None:
    """Put the weights' sha256 that the actors loaded (JSON strings) into the manifest; all must agree."""
    if not reported:
        return
    if len(reported) > 1:
        raise RuntimeError(f"actors loaded different model weights: {sorted(reported)}")
    manifest = store.read_manifest()
    manifest["model_checksums"] = json.loads(next(iter(reported)))
    store.write_manifest(manifest)
