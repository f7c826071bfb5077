"""Ray Train wiring of the fine-tuning: the worker loop, checkpoints, export and the resume policy.

Guarantees:
* Checkpoints (UNet, EMA, optimizer, schedule, step, epoch) go through Ray Train to
  ``checkpoint.uri``/``checkpoint.name`` (any fsspec URI). A worker failure (up to
  ``compute.max_failures``) or a re-submission with the same checkpoint URI and name resumes
  from the latest one and continues the step count; a finished run re-exports its result and
  trains no further.
* A re-submission may change only :data:`RESUMABLE_CHANGES` (e.g. raise ``training.steps``: the
  cosine decay then stretches to the new total); any other difference in data, models, loss or
  training is refused by :func:`pipeline.config.refuse_changed`, naming ``checkpoint.name`` and
  the keys, before any work.
* It runs on the Ray of :func:`pipeline.ray_runtime.ray_session`: the one already initialised in
  this process, the cluster of ``ray job submit`` (``RAY_ADDRESS``, no resources asked), or else
  an embedded local Ray for the duration of the run.
* One worker's run repeats bit for bit (same config, data and thread count): batches come in the
  shards' order (Ray Data's ``preserve_order``), shuffled with a seeded buffer, and the noise is
  seeded per step (pipeline.finetuning.trainer). With several workers, which blocks reach which
  worker depends on timing.
* Rank 0 writes the result after the last step: the EMA denoiser as a diffusers folder at
  ``output.uri`` with the resolved config and the final held-out figures (``finetune_config.json``).
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Any, Mapping

import torch

from pipeline.config import refuse_changed
from pipeline.finetuning.config import FinetuneConfig
from pipeline.finetuning.data import build_datasets, on_device
from pipeline.finetuning.trainer import Finetuner, holdout_report, stat_names
from pipeline.models.denoiser import save_denoiser
from pipeline.models.factory import create_denoise_classify
from pipeline.provenance import check_model_uris
from pipeline.ray_runtime import ray_session
from pipeline.shards import list_shards
from pipeline.storage import is_local, url_to_fs

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "state.pt"
CONFIG_FILE = "finetune_config.json"
REQUEST_FILE = "finetune_request.json"  # the resume key, beside the checkpoints
# Settings a resumed run may change: they do not alter the trajectory up to the checkpoint.
RESUMABLE_CHANGES = {"training": ("steps", "log_every", "checkpoint_every", "holdout_limit"), "models": ("cache_dir",)}


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum over the workers, in place (no-op alone)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def _save_checkpoint(finetuner: Finetuner, metrics: dict, rank: int) -> None:
    """ray.train.report with the state (rank 0 writes it; every rank reports, as Ray requires)."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(finetuner.state_dict(), os.path.join(tmp, CHECKPOINT_FILE))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"step-{finetuner.step:08d}")


def _restore(finetuner: Finetuner) -> None:
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return
    with checkpoint.as_directory() as folder:
        state = torch.load(os.path.join(folder, CHECKPOINT_FILE), map_location=finetuner.device, weights_only=True)
    finetuner.load_state_dict(state)
    log.info("resumed from %s at step %d (epoch %d)", checkpoint.path, finetuner.step, finetuner.epoch)


def export(finetuner: Finetuner, cfg: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
    """The EMA denoiser as a diffusers folder at output.uri, with the config beside it."""
    uri = cfg["output"]["uri"]
    save_denoiser(finetuner.ema_model().denoiser, uri)
    fs, path = url_to_fs(uri)
    fs.pipe_file(f"{path.rstrip('/')}/{CONFIG_FILE}", json.dumps(
        {"config": cfg, "steps": finetuner.step, "epochs": finetuner.epoch, "final_metrics": dict(metrics)},
        indent=2, default=float).encode())


def train_loop(cfg: dict) -> None:
    """Ray Train worker: restore, train to training.steps with periodic checkpoints, export."""
    import ray.train
    import ray.train.torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    t, c = cfg["training"], cfg["compute"]
    if c["torch_threads"]:
        torch.set_num_threads(c["torch_threads"])
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    model = create_denoise_classify(cfg["models"]["denoiser"], cfg["models"]["classifier"], cfg["models"]["cache_dir"],
                                    resolution=cfg["data"]["resolution"])
    finetuner = Finetuner(model, cfg, device, wrap=lambda m: ray.train.torch.prepare_model(
        m, parallel_strategy_kwargs={"broadcast_buffers": False}))
    _restore(finetuner)
    start_step = finetuner.step
    names = stat_names(cfg["loss"]["sigmas"])
    train, holdout = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("holdout")
    pending: list[torch.Tensor] = []
    metrics: dict[str, float] = {"step": finetuner.step, "epoch": finetuner.epoch, "start_step": start_step}
    while finetuner.step < t["steps"]:
        batches = 0
        # the shuffle is seeded per (seed, epoch, rank) over batches in the shards' order (run_finetuning)
        for batch in train.iter_torch_batches(batch_size=t["batch_size"], drop_last=True,
                                              local_shuffle_buffer_size=4 * t["batch_size"],
                                              local_shuffle_seed=t["seed"] + 1000 * finetuner.epoch + rank):
            batches += 1
            pending.append(finetuner.train_step(*on_device(batch, device), rank))
            done = finetuner.step >= t["steps"]
            checkpoint = done or finetuner.step % t["checkpoint_every"] == 0
            if checkpoint or finetuner.step % t["log_every"] == 0:
                metrics = {**_flush(pending, names, finetuner, rank), "start_step": start_step}
            if checkpoint:
                _save_checkpoint(finetuner, metrics, rank)
            if done:
                break
        else:  # a full pass over the training split: evaluate on the held-out split
            if batches == 0:
                raise ValueError(f"data.uri: a worker got no full batch of {t['batch_size']} training images")
            finetuner.epoch += 1
            metrics = _evaluate(finetuner, holdout, cfg, rank, {"start_step": start_step})
    if not any(k.startswith("holdout_") for k in metrics):  # ended mid-epoch: evaluate the final weights
        metrics = _evaluate(finetuner, holdout, cfg, rank, metrics)
    if rank == 0:
        export(finetuner, cfg, metrics)
        log.info("exported the EMA denoiser (step %d) to %s", finetuner.step, cfg["output"]["uri"])


def _evaluate(finetuner: Finetuner, holdout, cfg: Mapping[str, Any], rank: int, extra: dict) -> dict:
    """Held-out statistics with the EMA weights, summed over workers, reported and logged."""
    import ray.train

    sums = finetuner.holdout_sums(holdout.iter_torch_batches(batch_size=cfg["training"]["batch_size"]), rank)
    metrics = {**extra, "step": finetuner.step, "epoch": finetuner.epoch,
               **holdout_report(_all_reduce(sums), cfg["loss"]["sigmas"])}
    ray.train.report(metrics)
    if rank == 0:
        log.info("epoch %d (step %d) held-out: %s", finetuner.epoch, finetuner.step, json.dumps(metrics))
    return metrics


def _flush(pending: list[torch.Tensor], names: list[str], finetuner: Finetuner, rank: int) -> dict[str, float]:
    """Average the buffered per-step statistics over the workers that have them (nan: none),
    log each step (rank 0); one host sync."""
    values = torch.stack(pending)
    valid = ~values.isnan()
    total = _all_reduce(torch.where(valid, values, 0.0))
    rows = (total / _all_reduce(valid.to(values.dtype))).tolist()
    first = finetuner.step - len(rows) + 1
    pending.clear()
    for i, row in enumerate(rows):
        if rank == 0:
            log.info("step %d %s", first + i, " ".join(f"{n}={v:.4g}" for n, v in zip(names, row)))
    return {"step": finetuner.step, "epoch": finetuner.epoch, **dict(zip(names, rows[-1]))}


def ray_storage(uri: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for Ray Train: local paths as they are, anything
    else through fsspec (so s3:// honours AWS_ENDPOINT_URL like the rest of the pipeline)."""
    fs, path = url_to_fs(uri)
    if is_local(fs):
        return os.path.abspath(path), None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return path, PyFileSystem(FSSpecHandler(fs))


def resume_key(cfg: FinetuneConfig) -> dict:
    """The config sections a resumed run must keep (data, models, loss, training but RESUMABLE_CHANGES)."""
    d = cfg.to_dict()
    key = {name: d[name] for name in ("data", "models", "loss", "training")}
    for name, fields in RESUMABLE_CHANGES.items():
        key[name] = {k: v for k, v in key[name].items() if k not in fields}
    return key


def check_resumable(cfg: FinetuneConfig) -> None:
    """Record the config beside the checkpoints on the first submission; refuse a later one
    under the same checkpoint name whose trajectory-defining settings differ."""
    fs, path = url_to_fs(cfg.checkpoint["uri"])
    request = f"{path.rstrip('/')}/{cfg.checkpoint['name']}/{REQUEST_FILE}"
    key = resume_key(cfg)
    if fs.exists(request):
        refuse_changed("checkpoint.name", cfg.checkpoint["name"], json.loads(fs.cat_file(request)), key)
        return
    fs.makedirs(os.path.dirname(request), exist_ok=True)
    fs.pipe_file(request, json.dumps(key, indent=2).encode())


def run_finetuning(cfg: FinetuneConfig) -> dict:
    """Fine-tune (or resume, or re-export a finished run) on the Ray of
    :func:`pipeline.ray_runtime.ray_session`; returns a summary."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.constants import RAY_CHDIR_TO_TRIAL_DIR
    from ray.train.torch import TorchTrainer

    list_shards(cfg.data["uri"], cfg.data["format"])  # storage problems fail before anything is written
    check_model_uris(cfg)
    check_resumable(cfg)
    c, k = cfg.compute, cfg.checkpoint
    storage_path, storage_fs = ray_storage(k["uri"])
    resources = {"CPU": c["cpus_per_worker"], **({"GPU": c["gpus_per_worker"]} if c["gpus_per_worker"] else {})}
    # Ray Train would move each worker into its trial folder; keeping the job's working directory
    # makes a relative path in the config name the same file for the workers as for this driver.
    os.environ.setdefault(RAY_CHDIR_TO_TRIAL_DIR, "0")
    # Batches in the shards' order (Ray Data otherwise yields blocks as their decode tasks finish):
    # with one worker the data order, hence the weights, repeat run to run.
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True
    # the running Ray, the cluster of `ray job submit`, or an embedded local one with the dashboard
    # (Ray Train's placement-group cleaner reads the state API it serves)
    with ray_session(dashboard=True):
        trainer = TorchTrainer(
            train_loop,
            train_loop_config=cfg.to_dict(),
            scaling_config=ScalingConfig(num_workers=c["num_workers"], use_gpu=c["gpus_per_worker"] > 0,
                                         resources_per_worker=resources),
            run_config=RunConfig(name=k["name"], storage_path=storage_path, storage_filesystem=storage_fs,
                                 failure_config=FailureConfig(max_failures=c["max_failures"]),
                                 checkpoint_config=CheckpointConfig(num_to_keep=k["num_to_keep"])),
            datasets=build_datasets(cfg),
            dataset_config=DataConfig(execution_options=ingest),
        )
        result = trainer.fit()
    return {"output": cfg.output["uri"], "checkpoint": result.checkpoint.path if result.checkpoint else None,
            "metrics": result.metrics}
