"""The fine-tuning configuration: schema, validation and loading.

Guarantee: :func:`load_finetune_config` and :func:`finetune_config_from_dict` either return a
fully resolved :class:`FinetuneConfig` or raise :class:`~pipeline.config.ConfigError` whose
message starts with the dotted key that is wrong. ``data`` and ``models`` are certification's
sections (the same shard reader and model loader); every check is a shared validator of
:mod:`pipeline.config`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from pipeline import config as cfglib
from pipeline.config import REQUIRED, section

SCHEMA: dict[str, cfglib.Check] = {
    "data": cfglib.SCHEMA["data"],          # the training shards, read like certification's
    "models": cfglib.SCHEMA["models"],      # the denoiser to fine-tune and the frozen classifier
    "loss": section({
        "sigmas": (REQUIRED, cfglib.sigmas),
        "per_step": ("all", cfglib.choice("all", "sample")),   # every sigma each step, or one drawn per step
        "m": (4, cfglib.int_at_least(2)),                    # noises per image and sigma
        "lam": (1.0, cfglib.nonneg_number),                  # weight of the diversity term
        "mu": (1.0, cfglib.nonneg_number),                   # weight of the eps-MSE diffusion term
    }),
    "training": section({
        "steps": (REQUIRED, cfglib.positive_int),            # optimizer steps in total (a resume continues to it)
        "batch_size": (32, cfglib.positive_int),             # images per worker per step
        "lr": (1e-4, cfglib.positive_number),
        "weight_decay": (0.0, cfglib.nonneg_number),
        "warmup_steps": (0, cfglib.nonneg_int),              # linear warm-up, then cosine decay to zero
        "grad_clip": (1.0, cfglib.positive_number),
        "ema_decay": (0.999, cfglib.zero_to_one),
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
        "max_failures": (3, cfglib.int_at_least(-1)),        # worker-group restarts (-1: unlimited)
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
    """Validate a raw mapping; errors are :class:`ConfigError` naming the dotted key.

    Fine-tuning needs what certification may leave out: a denoiser to train and one classifier.
    """
    sections = cfglib.validate_sections(raw, SCHEMA, require_all=False)
    if sections["models"]["denoiser"] is None:
        raise cfglib.ConfigError("models.denoiser: required for fine-tuning (it is the model trained)")
    if sections["models"]["classifier"]["per_sigma"] is not None:
        raise cfglib.ConfigError("models.classifier.per_sigma: fine-tuning uses one frozen classifier; set "
                                 "models.classifier.uri")
    return FinetuneConfig(**sections)


def finetune_config_from_dict(raw: Mapping, overrides: Sequence[str] = ()) -> FinetuneConfig:
    """Apply ``key=value`` overrides to a raw mapping, validate."""
    return validate(cfglib.with_overrides(raw, overrides))


def load_finetune_config(path: str, overrides: Sequence[str] = ()) -> FinetuneConfig:
    """Read a YAML file (local path or fsspec URI), apply ``key=value`` overrides, validate."""
    return validate(cfglib.read_yaml(path, overrides))
