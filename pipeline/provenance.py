"""A run's provenance: the manifest (config, code version, model checksums) and the storage checks
made before any model is loaded.

Guarantees:
* :func:`check_model_uris` and :func:`open_run` fail with :class:`StorageError` naming the config
  key and the cause when storage cannot be reached, read or written.
* :func:`open_run` refuses (``ConfigError`` naming ``output.run_id`` and every differing key) to
  resume a run whose manifest records different data/models/smoothing settings.
* :func:`record_checksums` records the sha256 of the weights the actors loaded, and fails if two
  actors loaded different weights.
"""
from __future__ import annotations

import json
import os
import subprocess
import time

from pipeline.config import Config, refuse_changed
from pipeline.errors import StorageError, describe
from pipeline.run_dir import RunDirectory
from pipeline.storage import url_to_fs


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


def check_model_uris(cfg: Config) -> None:
    """Every model URI in the config exists (no download)."""
    for key, spec in (("models.denoiser.uri", cfg.models["denoiser"]), ("models.classifier.uri", cfg.models["classifier"])):
        uri = spec.get("uri")
        if uri is None:
            continue
        try:
            fs, path = url_to_fs(uri)
            exists = fs.exists(path)
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"{key} {uri}: cannot reach storage: {describe(exc)}") from exc
        if not exists:
            raise StorageError(f"{key} {uri}: not found")


def open_run(cfg: Config) -> RunDirectory:
    """The run directory, checked writable and consistent with an earlier attempt's manifest,
    whose manifest now records this config and code version."""
    out = cfg.output
    try:
        store = RunDirectory(out["uri"], out["run_id"])
        previous = store.read_manifest()
    except Exception as exc:  # noqa: BLE001
        raise StorageError(f"output.uri {out['uri']}: cannot reach storage: {describe(exc)}") from exc
    if previous is not None:
        refuse_changed("output.run_id", out["run_id"], previous["config_content"], cfg.content_key())
    manifest = previous or {}
    manifest.update(run_id=out["run_id"], config=cfg.to_dict(), config_content=cfg.content_key(),
                    code_version=code_version())
    manifest.setdefault("model_checksums", None)
    manifest.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    try:
        store.write_manifest(manifest)
    except Exception as exc:  # noqa: BLE001
        raise StorageError(f"output.uri {out['uri']}: cannot write the run: {describe(exc)}") from exc
    return store


def record_checksums(store: RunDirectory, reported: set[str]) -> None:
    """Put the weights' sha256 that the actors loaded (JSON strings) into the manifest; all must agree."""
    if not reported:
        return
    if len(reported) > 1:
        raise RuntimeError(f"actors loaded different model weights: {sorted(reported)}")
    manifest = store.read_manifest()
    manifest["model_checksums"] = json.loads(next(iter(reported)))
    store.write_manifest(manifest)
