"""The reference implementations' sampling loop (Cohen et al.'s ``core.py``, Carlini et al.'s
denoised smoothing): the baseline the throughput benchmark compares MonteCarloSampler against.

One image and one sigma at a time, ``x.repeat(batch)``, ``torch.randn`` noise per batch, the
argmax copied to the host every batch, float32. It draws exactly ``num`` samples per call; its
noise is torch's global generator's, so its counts agree with the sampler's in distribution (and
exactly when the noise cannot change the prediction), not sample by sample.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch


def reference_counts(model: torch.nn.Module, x: torch.Tensor, sigma: float, num: int, batch_size: int) -> np.ndarray:
    """Class counts of ``num`` noisy samples of the one image ``x`` ([1, 3, H, W] in [0, 1]) at ``sigma``."""
    counts = np.zeros(model.num_classes, dtype=np.int64)
    sigma_batch = torch.full((batch_size,), sigma, device=x.device)
    with torch.no_grad():
        for _ in range(math.ceil(num / batch_size)):
            this_batch = min(batch_size, num)
            num -= this_batch
            batch = x.repeat((this_batch, 1, 1, 1))
            noise = torch.randn_like(batch) * sigma
            predictions = model(batch + noise, sigma_batch[:this_batch]).argmax(1)
            counts += np.bincount(predictions.cpu().numpy(), minlength=model.num_classes)
    return counts


def reference_loop(model: torch.nn.Module, images: torch.Tensor, sigmas: Sequence[float], n0: int, n: int,
                   batch_size: int) -> None:
    """The reference loop over a workload: every image, every sigma, the n0 then the n samples."""
    for x in images:
        for sigma in sigmas:
            for num in (n0, n):
                reference_counts(model, x[None], sigma, num, batch_size)
