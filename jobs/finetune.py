"""Calibration fine-tuning of the diffusion denoiser for multi-scale smoothing (Ray Train).

    python -m jobs.finetune --config configs/finetune-demo.yaml [--set training.steps=500 ...]

and the same line after ``ray job submit --working-dir . --`` (the Ray of
:func:`pipeline.ray_runtime.ray_session`: that cluster, asking it for no resources; else an
embedded local one). The code is :mod:`pipeline.finetuning`; the loss is the reconstruction in
:mod:`pipeline.finetuning.loss` (every weight is configuration). Guarantees:
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

import sys
from typing import Sequence

from jobs.cli import run_config_job
from pipeline.finetuning import load_finetune_config, run_finetuning


def main(argv: Sequence[str] | None = None) -> int:
    return run_config_job(argv, __doc__.split("\n")[0], "training.steps=500", load_finetune_config, run_finetuning)


if __name__ == "__main__":
    sys.exit(main())
