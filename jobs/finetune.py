"""Calibration fine-tuning of the diffusion denoiser for multi-scale smoothing (Ray Train).

    python -m jobs.finetune --config configs/finetune-demo.yaml [--set training.steps=500 ...]

and the same line after ``ray job submit --working-dir . --``. The loss is the reconstruction
in :mod:`pipeline.calibration` (every weight is configuration). Guarantees:
* Training data come from the certification shard readers (:mod:`pipeline.shards`, Ray Data);
  each image goes by a hash of its image_id to the training split or to the held-out split
  (``training.holdout_fraction``), the same split on every run and worker count.
* Only the UNet trains: the classifier is frozen (``requires_grad`` False, eval mode) while the
  loss's gradients flow through it into the UNet.
* Checkpoints (UNet, EMA, optimizer, schedule, step, epoch) go through Ray Train to
  ``checkpoint.uri``/``checkpoint.name`` (any fsspec URI, s3:// with AWS_ENDPOINT_URL). A worker
  failure (up to ``compute.max_failures``) or a re-submitted job with the same checkpoint
  URI and name resumes from the latest one and continues the step count; a finished run
  re-exports its result and trains no further. A re-submission may raise ``training.steps``
  (the cosine decay then stretches to the new total) but not change the data, models, loss
  or other training settings: that fails, naming the keys, before any work.
* The result, written by rank 0 after the last step, is the EMA denoiser as a diffusers
  folder at ``output.uri`` (unet/ + scheduler/, what ``jobs.certify`` loads by URI) with the
  resolved fine-tuning config beside them (``finetune_config.json``).
* Logged: per step (rank 0, averaged over workers) the loss, its terms and the fraction
  recoverable per sigma; per epoch on the held-out split, per sigma, the mean top-class
  frequency over the m samples for recoverable and unrecoverable images (and once more at the
  end when the run stops mid-epoch; these final figures go into ``finetune_config.json``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from jobs.cli import run_config_job
from pipeline import config as cfglib
from pipeline.calibration import batch_loss, holdout_statistics
from pipeline.config import REQUIRED, ConfigError, section
from pipeline.shards import decode_batch, list_shards, read_shards
from pipeline.models.denoiser import Denoiser, save_denoiser
from pipeline.models.factory import DenoiseAndClassify, create_denoise_classify
from pipeline.storage import url_to_fs

log = logging.getLogger("jobs.finetune")

CHECKPOINT_FILE = "state.pt"
CONFIG_FILE = "finetune_config.json"


def _positive_number(key: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
        raise ConfigError(f"{key}: must be a positive number, got {v!r}")
    return float(v)


def _ema_decay(key: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
        raise ConfigError(f"{key}: must be a number in [0, 1), got {v!r}")
    return float(v)


def _int_at_least(low: int) -> cfglib.Check:
    def check(key: str, v: Any) -> int:
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise ConfigError(f"{key}: must be an integer >= {low}, got {v!r}")
        return v
    return check


SCHEMA: dict[str, cfglib.Check] = {
    "data": cfglib.SCHEMA["data"],          # the training shards, read like certification's
    "models": cfglib.SCHEMA["models"],      # the denoiser to fine-tune and the frozen classifier
    "loss": section({
        "sigmas": (REQUIRED, cfglib.sigmas),
        "per_step": ("all", cfglib.choice("all", "sample")),   # every sigma each step, or one drawn per step
        "m": (4, _int_at_least(2)),                          # noises per image and sigma
        "lam": (1.0, cfglib.nonneg_number),                  # weight of the diversity term
        "mu": (1.0, cfglib.nonneg_number),                   # weight of the eps-MSE diffusion term
    }),
    "training": section({
        "steps": (REQUIRED, cfglib.positive_int),            # optimizer steps in total (a resume continues to it)
        "batch_size": (32, cfglib.positive_int),             # images per worker per step
        "lr": (1e-4, _positive_number),
        "weight_decay": (0.0, cfglib.nonneg_number),
        "warmup_steps": (0, cfglib.nonneg_int),              # linear warm-up, then cosine decay to zero
        "grad_clip": (1.0, _positive_number),
        "ema_decay": (0.999, _ema_decay),
        "bf16": (True, cfglib.boolean),                      # bf16 autocast on GPU (CPU runs in float32)
        "seed": (0, cfglib.nonneg_int),
        "holdout_fraction": (0.1, cfglib.open_unit),         # share of image_ids (by hash) held out
        "holdout_limit": (None, cfglib.optional(cfglib.positive_int)),  # held-out images evaluated per epoch
        "log_every": (10, cfglib.positive_int),              # steps between metric flushes (one host sync)
        "checkpoint_every": (100, cfglib.positive_int),
    }),
    "compute": section({
        "num_workers": (1, cfglib.positive_int),
        "gpus_per_worker": (0.0, cfglib.nonneg_number),      # 0 = CPU workers
        "cpus_per_worker": (1.0, cfglib.nonneg_number),
        "cpus_per_task": (1.0, cfglib.nonneg_number),        # decode + resize tasks
        "torch_threads": (None, cfglib.optional(cfglib.positive_int)),
        "max_failures": (3, _int_at_least(-1)),              # worker-group restarts (-1: unlimited)
    }),
    "checkpoint": section({
        "uri": (REQUIRED, cfglib.string),                    # Ray Train storage_path (any fsspec URI)
        "name": (REQUIRED, cfglib.run_id),                   # the run: re-submitting the same name resumes it
        "num_to_keep": (2, cfglib.positive_int),
    }),
    "output": section({
        "uri": (REQUIRED, cfglib.string),                    # the fine-tuned diffusers folder
    }),
}


@dataclass(frozen=True)
class FinetuneConfig:
    """A validated, fully resolved fine-tuning configuration (plain, JSON-serialisable dicts)."""
    data: dict
    models: dict
    loss: dict
    training: dict
    compute: dict
    checkpoint: dict
    output: dict

    def to_dict(self) -> dict:
        return json.loads(json.dumps({name: getattr(self, name) for name in SCHEMA}))


def validate(raw: Any) -> FinetuneConfig:
    """Validate a raw mapping; errors are :class:`ConfigError` naming the dotted key."""
    return FinetuneConfig(**cfglib.validate_sections(raw, SCHEMA, require_all=False))


def config_from_dict(raw: Mapping, overrides: Sequence[str] = ()) -> FinetuneConfig:
    return validate(cfglib.with_overrides(raw, overrides))


def load_config(path: str, overrides: Sequence[str] = ()) -> FinetuneConfig:
    """Read a YAML file (local path or fsspec URI), apply ``key=value`` overrides, validate."""
    return validate(cfglib.read_yaml(path, overrides))


# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class HoldoutSplit:
    """``decode_batch``'s keep-filter for one side of a hash split of the image_ids."""
    fraction: float
    seed: int
    holdout: bool

    def __call__(self, image_id: str) -> np.ndarray | None:
        return np.ones(1, dtype=bool) if is_holdout(image_id, self.fraction, self.seed) == self.holdout else None


def is_holdout(image_id: str, fraction: float, seed: int) -> bool:
    """Whether ``image_id`` is held out: its seeded sha256 as a number in [0, 1) is below ``fraction``."""
    digest = hashlib.sha256(f"{seed}:{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


def _log_decode_error(image_id: str, source: str, message: str) -> None:
    logging.getLogger("jobs.finetune").warning("skipping %s (%s): %s", image_id, source, message)


def _decode_for_training(batch: dict, **kwargs: Any) -> dict:
    """decode_batch, keeping only the tensor columns: image uint8 [B, R, R, 3], label."""
    out = decode_batch(batch, on_error=_log_decode_error, sigmas=(1.0,), **kwargs)  # todo mask unused
    return {"image": out["image"], "label": out["label"]}


def build_datasets(cfg: FinetuneConfig) -> dict:
    """{"train", "holdout"}: Ray Datasets of decoded images from the configured shards."""
    d, t = cfg.data, cfg.training
    fs, shards = list_shards(d["uri"], d["format"])
    out = {}
    for name, holdout in (("train", False), ("holdout", True)):
        ds = read_shards(fs, shards, d["format"], d["columns"]).map_batches(
            _decode_for_training, batch_format="numpy", num_cpus=cfg.compute["cpus_per_task"],
            fn_kwargs=dict(fmt=d["format"], columns=d["columns"], data_cfg=d,
                           keep=HoldoutSplit(t["holdout_fraction"], t["seed"], holdout)))
        out[name] = ds.limit(t["holdout_limit"]) if holdout and t["holdout_limit"] else ds
    return out


def to_images(batch: Mapping[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(x in [0,1] float32 [B, 3, R, R], labels int64 [B]) on ``device``."""
    x = batch["image"].to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
    return x.contiguous(), batch["label"].to(device, non_blocking=True)


# ---------------------------------------------------------------- training


def warmup_cosine(warmup: int, steps: int) -> Callable[[int], float]:
    """LR factor: linear warm-up over ``warmup`` steps, then cosine decay to zero at ``steps``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))
    return factor


class CalibrationLoss(torch.nn.Module):
    """The trainable unit (the thing DDP wraps): forward = :func:`batch_loss` of a batch."""

    def __init__(self, model: DenoiseAndClassify, loss_cfg: Mapping[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.m, self.lam, self.mu = loss_cfg["m"], loss_cfg["lam"], loss_cfg["mu"]

    def forward(self, x01: torch.Tensor, labels: torch.Tensor, sigmas: torch.Tensor, generator: torch.Generator):
        return batch_loss(self.model, x01, labels, sigmas, self.m, self.lam, self.mu, generator)


def stat_names(sigmas: Sequence[float]) -> list[str]:
    """Names of the per-step statistics, in the order of :meth:`Finetuner.train_step`'s vector."""
    per_sigma = [f"{k}@{s:g}" for k in ("recoverable", "brier", "collision") for s in sigmas]
    return ["loss", "calibration", "mse", "grad_norm", "lr", *per_sigma]


class Finetuner:
    """Model, optimizer, LR schedule and EMA of one worker, and the step that updates them.

    ``wrap`` prepares the loss module for data parallelism (``ray.train.torch.prepare_model``
    in a Ray worker; identity alone). Nothing here syncs with the host.
    """

    def __init__(self, model: DenoiseAndClassify, cfg: Mapping[str, Any], device: torch.device,
                 wrap: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m) -> None:
        self.cfg, self.device = cfg, device
        t = cfg["training"]
        self.model = model.to(device)
        self.model.classifier.requires_grad_(False).eval()
        self.model.denoiser.train()
        self.unet = self.model.denoiser.unet
        self.ema = torch.optim.swa_utils.AveragedModel(
            self.unet, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(t["ema_decay"]), use_buffers=True)
        self.ema.update_parameters(self.unet)  # the first update copies: the EMA starts at the pretrained weights
        self.optimizer = torch.optim.AdamW(self.unet.parameters(), lr=t["lr"], weight_decay=t["weight_decay"])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(t["warmup_steps"], t["steps"]))
        self.loss = wrap(CalibrationLoss(self.model, cfg["loss"]))
        self.sigmas = torch.tensor(cfg["loss"]["sigmas"], dtype=torch.float32, device=device)
        self.step, self.epoch = 0, 0
        self.autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and t["bf16"])

    def generator(self, rank: int, purpose: int) -> torch.Generator:
        """A device generator seeded by (seed, rank, step, purpose): resumes draw the same noise."""
        seed = np.random.SeedSequence([self.cfg["training"]["seed"], rank, self.step, purpose]).generate_state(1)[0]
        return torch.Generator(self.device).manual_seed(int(seed))

    def step_sigmas(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigmas of this step, their indices): all, or one drawn from (seed, step), the same on every rank."""
        if self.cfg["loss"]["per_step"] == "all":
            index = torch.arange(self.sigmas.numel(), device=self.device)
        else:
            rng = np.random.default_rng([self.cfg["training"]["seed"], self.step])
            index = torch.tensor([int(rng.integers(self.sigmas.numel()))], device=self.device)
        return self.sigmas[index], index

    def train_step(self, x01: torch.Tensor, labels: torch.Tensor, rank: int = 0) -> torch.Tensor:
        """One optimizer step; returns the statistics vector (order: :func:`stat_names`; nan for sigmas not drawn)."""
        sigmas, index = self.step_sigmas()
        with torch.autocast(**self.autocast):
            out = self.loss(x01, labels, sigmas, self.generator(rank, 0))
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.unet.parameters(), self.cfg["training"]["grad_clip"])
        lr = torch.tensor(self.scheduler.get_last_lr()[0], device=self.device)
        self.optimizer.step()
        self.scheduler.step()
        self.ema.update_parameters(self.unet)
        self.step += 1
        per_sigma = []
        for key in ("recoverable", "brier", "collision"):
            full = torch.full_like(self.sigmas, float("nan"))
            per_sigma.append(full.index_copy(0, index, out.per_sigma[key].float()))
        head = torch.stack([out.loss.detach(), out.calibration, out.mse, grad_norm, lr]).float()
        return torch.cat([head, *per_sigma])

    def ema_model(self) -> DenoiseAndClassify:
        """The EMA denoiser with the frozen classifier (shares the classifier, not a copy)."""
        denoiser = Denoiser(self.ema.module, self.model.denoiser.schedule).to(self.device).eval()
        return DenoiseAndClassify(denoiser, self.model.classifier)

    def holdout_sums(self, batches, rank: int = 0) -> torch.Tensor:
        """Sums [S, 4] of :func:`holdout_statistics` over ``batches`` with the EMA weights."""
        model, total = self.ema_model(), torch.zeros(self.sigmas.numel(), 4, device=self.device)
        generator = self.generator(rank, 1)
        for batch in batches:
            x01, labels = to_images(batch, self.device)
            with torch.autocast(**self.autocast):
                total += holdout_statistics(model, x01, labels, self.sigmas, self.cfg["loss"]["m"], generator)
        return total

    def state_dict(self) -> dict:
        return {"unet": self.unet.state_dict(), "ema": self.ema.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "step": self.step, "epoch": self.epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.unet.load_state_dict(state["unet"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])


def holdout_report(sums: torch.Tensor, sigmas: Sequence[float]) -> dict[str, float]:
    """Per sigma: fraction recoverable and mean top-class frequency of (un)recoverable images."""
    out = {}
    for s, (n_rec, f_rec, n_un, f_un) in zip(sigmas, sums.tolist()):
        total = n_rec + n_un
        out[f"holdout_recoverable@{s:g}"] = n_rec / total if total else float("nan")
        out[f"holdout_topfreq_recoverable@{s:g}"] = f_rec / n_rec if n_rec else float("nan")
        out[f"holdout_topfreq_unrecoverable@{s:g}"] = f_un / n_un if n_un else float("nan")
    return out


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
    model = create_denoise_classify(cfg["models"]["denoiser"], cfg["models"]["classifier"], cfg["models"]["cache_dir"])
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
        for batch in train.iter_torch_batches(batch_size=t["batch_size"], drop_last=True,
                                              local_shuffle_buffer_size=4 * t["batch_size"]):
            batches += 1
            pending.append(finetuner.train_step(*to_images(batch, device), rank))
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


# ---------------------------------------------------------------- driver


def storage(uri: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for Ray Train: local paths as they are, anything
    else through fsspec (so s3:// honours AWS_ENDPOINT_URL like the rest of the pipeline)."""
    fs, path = url_to_fs(uri)
    if "file" in fs.protocol:
        return os.path.abspath(path), None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return path, PyFileSystem(FSSpecHandler(fs))


# Settings a resumed run may change: they do not alter the trajectory up to the checkpoint.
RESUMABLE_CHANGES = {"training": ("steps", "log_every", "checkpoint_every", "holdout_limit"), "models": ("cache_dir",)}
REQUEST_FILE = "finetune_request.json"


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
        previous = json.loads(fs.cat_file(request))
        diff = sorted(f"{s}.{k}" for s in key for k in set(key[s]) | set(previous.get(s, {}))
                      if key[s].get(k) != previous.get(s, {}).get(k))
        if diff:
            raise ConfigError(f"checkpoint.name: {cfg.checkpoint['name']} exists with a different config "
                              f"({', '.join(diff)} differ); use a new name")
        return
    fs.makedirs(os.path.dirname(request), exist_ok=True)
    fs.pipe_file(request, json.dumps(key, indent=2).encode())


def run(cfg: FinetuneConfig) -> dict:
    """Fine-tune (or resume, or re-export a finished run); returns a summary."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from jobs.certify import check_model_uris

    list_shards(cfg.data["uri"], cfg.data["format"])  # storage problems fail before anything is written
    check_model_uris(cfg)
    check_resumable(cfg)
    if not ray.is_initialized():
        ray.init()
    c, k = cfg.compute, cfg.checkpoint
    storage_path, storage_fs = storage(k["uri"])
    resources = {"CPU": c["cpus_per_worker"], **({"GPU": c["gpus_per_worker"]} if c["gpus_per_worker"] else {})}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=cfg.to_dict(),
        scaling_config=ScalingConfig(num_workers=c["num_workers"], use_gpu=c["gpus_per_worker"] > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=k["name"], storage_path=storage_path, storage_filesystem=storage_fs,
                             failure_config=FailureConfig(max_failures=c["max_failures"]),
                             checkpoint_config=CheckpointConfig(num_to_keep=k["num_to_keep"])),
        datasets=build_datasets(cfg),
    )
    result = trainer.fit()
    return {"output": cfg.output["uri"], "checkpoint": result.checkpoint.path if result.checkpoint else None,
            "metrics": result.metrics}


def main(argv: Sequence[str] | None = None) -> int:
    return run_config_job(argv, __doc__.split("\n")[0], "training.steps=500", load_config, run)


if __name__ == "__main__":
    sys.exit(main())
