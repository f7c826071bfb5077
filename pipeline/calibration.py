"""Diffusion calibration loss for multi-scale smoothing (a reconstruction; see jobs/finetune.py).

For a batch (x, y) and a noise scale sigma, m one-shot denoisings of x + sigma*eps_i are
classified by the frozen classifier: q_i = softmax(f(D(x + sigma*eps_i))), q_bar = mean_i q_i.

- *recoverable* images (the pipeline is right at this sigma: argmax q_bar == y, without
  gradient) get the consistency term, the Brier score mean_i ||q_i - e_y||^2: it is minimal
  when every denoising is classified y with certainty, which raises p_A at this level;
- the others get the diversity term ||q_bar||^2, the probability that two independent
  denoisings are assigned the same class: it is minimal when the outputs spread over classes,
  so that this level's smoothed classifier stays below p0 and the cascade falls through.

loss = mean(recoverable * Brier + lam * (1 - recoverable) * ||q_bar||^2) + mu * eps-MSE,
the last term being the usual diffusion training loss that keeps D a denoiser. The weights
lam and mu are configuration, not results from the paper (its exact loss is not public).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class CalibrationTerms:
    """Per-image terms for one sigma; every tensor has shape [B]."""

    brier: torch.Tensor
    collision: torch.Tensor
    recoverable: torch.Tensor  # float 0/1, no gradient
    top_frequency: torch.Tensor  # fraction of the m samples predicting the modal class, no gradient


def calibration_terms(probs: torch.Tensor, labels: torch.Tensor) -> CalibrationTerms:
    """Terms of the calibration loss from class probabilities ``probs`` [B, m, C] and labels [B]."""
    if probs.dim() != 3 or probs.shape[1] < 2:
        raise ValueError(f"probs must be [B, m >= 2, C], got {tuple(probs.shape)}")
    one_hot = F.one_hot(labels, probs.shape[-1]).to(probs.dtype)
    brier = ((probs - one_hot[:, None, :]) ** 2).sum(-1).mean(1)
    mean_probs = probs.mean(1)
    collision = (mean_probs**2).sum(-1)
    with torch.no_grad():
        recoverable = (mean_probs.argmax(-1) == labels).to(probs.dtype)
        votes = F.one_hot(probs.argmax(-1), probs.shape[-1]).sum(1)
        top_frequency = votes.max(-1).values.to(probs.dtype) / probs.shape[1]
    return CalibrationTerms(brier, collision, recoverable, top_frequency)


def calibration_objective(terms: CalibrationTerms, lam: float) -> torch.Tensor:
    """Per-image objective recoverable * Brier + lam * (1 - recoverable) * ||q_bar||^2, shape [B]."""
    r = terms.recoverable
    return r * terms.brier + lam * (1.0 - r) * terms.collision
