"""Smoke test of a protocol's real architectures with random weights: one denoise-and-classify pass
in this process and, with ``--end-to-end``, a whole certification of two synthetic images.

    python -m jobs.smoke_protocols --config configs/protocols/carlini-imagenet.yaml [--end-to-end] [--set key=value]

Builds the config's denoiser (if it has one) and classifier with random weights (``models.*.uri``
null, ``models.*.random_weights`` true; per-sigma classifiers, ``models.classifier.per_sigma``,
become one random classifier: the pass at one sigma runs one of them, and each other one adds its
weights to the memory) for the config's ``data.resolution`` (the factory checks the denoiser
placement), runs one forward pass on ``compute.images_per_call`` uniform images (one noisy sample
each, sigma = the config's largest) on the GPU when there is one, and prints as JSON: the seconds
to build, the seconds per sample of that pass, the logits' shape, the UNet's input side (null
without a denoiser) and the peak memory (the process's max RSS; the CUDA allocator's peak on a
GPU). Run one protocol per process: max RSS only grows.

``--end-to-end`` then certifies through the real pipeline (:func:`pipeline.certify_run.run_certification`
on the Ray of :func:`pipeline.ray_runtime.ray_session`: a local one unless ``RAY_ADDRESS`` is set),
in a temporary folder removed afterwards: two RGB images of uniform noise (seed 0), 300 x 260 for
``data.resize`` 256 (:func:`pipeline.protocol_smoke.synthetic_size`: larger than the resize side on both axes, so the
protocol's resize and crop both act), written as Parquet shards by :mod:`pipeline.shard_writer`,
certified with the same config (random weights, ``--set`` included) and :func:`pipeline.protocol_smoke.end_to_end_overrides`:
every image, every sigma (``smoothing.mode: full``, fixed sampling, n0 = 1, n = 2: 18 samples with
three sigmas), one actor of one CPU (GPU when there is one) with this process's torch threads,
decode tasks of half a CPU, device settings fixed (the config's dtype, memory format and compile,
``auto`` ones as float32, contiguous, eager: a measuring sweep would cost more than the run) and
the batch the run's samples (the sampler runs whole batches: the config's batch of 400 or 1,000
would draw that many samples).
It reads the counts back and raises RuntimeError unless every (image, sigma) pair has exactly one
row (and the rows meet the counts contract, :func:`analysis.counts.validate_counts`), and adds
``end_to_end`` to the JSON: the rows and pairs, the samples drawn (the rows' n0 + n), the wall
seconds of the run (Ray start, model loading in the probe task and the actor, decoding, sampling)
and per sample, the sampler's own seconds per sample (the rows' ``seconds``, the clean prediction
included) and the certify actor's peak memory (:class:`pipeline.protocol_smoke.PeakRss`; null against an existing cluster).
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from jobs.cli import run_config_job
from pipeline.protocol_smoke import load, smoke


def main(argv: Sequence[str] | None = None) -> int:
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--end-to-end", action="store_true")
    known, rest = flags.parse_known_args(argv)
    return run_config_job(rest, "Build a protocol's models with random weights and time one forward pass; "
                                "--end-to-end: also certify two synthetic images through the real pipeline "
                                "(n0 = 1, n = 2, one local actor) and check the counts.",
                          "compute.images_per_call=1", load, lambda cfg: smoke(cfg, known.end_to_end))


if __name__ == "__main__":
    sys.exit(main())
