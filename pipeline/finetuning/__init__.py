"""Calibration fine-tuning of the diffusion denoiser for multi-scale smoothing (Ray Train).

The modules, one concern each: :mod:`.config` (schema, loading), :mod:`.loss` (the calibration
loss), :mod:`.data` (the hash train/held-out split, decoding), :mod:`.trainer` (one worker's
model, optimizer, EMA and step), :mod:`.train_loop` (Ray Train, checkpoints, export, resume
policy). ``jobs.finetune`` is the command line; the guarantees are listed in its docstring.
"""
from pipeline.finetuning.config import FinetuneConfig, finetune_config_from_dict, load_finetune_config
from pipeline.finetuning.data import is_holdout
from pipeline.finetuning.train_loop import run_finetuning
from pipeline.finetuning.trainer import Finetuner, stat_names

__all__ = ["FinetuneConfig", "Finetuner", "finetune_config_from_dict", "is_holdout", "load_finetune_config",
           "run_finetuning", "stat_names"]
