"""Diffusion calibration loss for multi-scale smoothing (a reconstruction; run by jobs.finetune).

For a batch (x, y) and a noise scale sigma, m one-shot denoisings of x + sigma*eps_i are
classified by the frozen classifier: q_i = softmax(f(D(x + sigma*eps_i))), q_bar = mean_i q_i.

- *recoverable* images (the pipeline is right at this sigma: argmax q_bar == y, without
  gradient) get the consistency term, the Brier score mean_i ||q_i - e_y||^2: it is minimal
  when every denoising is classified y with certainty, which raises p_A at this level;
- the others get the diversity term ||q_bar||^2, the probability that two independent
  denoisings are assigned the same class: it is minimal when the outputs spread over classes,
  so that this level's smoothed classifier stays below p0 and the cascade falls through.

loss = mean(recoverable * Brier + lam * (1 - recoverable) * ||q_bar||^2) + mu * eps-MSE,
the last term being the usual diffusion training loss that keeps D a denoiser
(:func:`denoising_mse`, at timesteps uniform over the schedule). The mean runs over the
images and the sigmas of the batch (:func:`batch_loss`). The weights lam and mu are
configuration, not results from the paper (its exact loss is not public).

Everything here is device-side and differentiable where stated; nothing syncs with the host.
:class:`CalibrationLoss` is the trainable unit (what data parallelism wraps).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from pipeline.diffusion import diffusion_input
from pipeline.models.denoiser import Denoiser
from pipeline.models.factory import DenoiseAndClassify


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


def sample_probs(model: DenoiseAndClassify, x01: torch.Tensor, sigmas: torch.Tensor, m: int,
                 generator: torch.Generator) -> torch.Tensor:
    """Class probabilities [S, B, m, C] of m one-shot denoisings of x01 + sigma*eps per sigma.

    One forward pass over all S*B*m noisy copies (differentiable through the denoiser); the
    noise comes from ``generator`` on x01's device, probabilities are float32.
    """
    s, (b, *shape) = sigmas.numel(), x01.shape
    sigma = sigmas.to(x01.device, x01.dtype).repeat_interleave(b * m)
    clean = x01.repeat_interleave(m, 0).repeat(s, *([1] * len(shape)))
    noise = torch.randn(clean.shape, generator=generator, device=x01.device, dtype=x01.dtype)
    noisy = clean + sigma.view(-1, *([1] * len(shape))) * noise
    return model(noisy, sigma).float().softmax(-1).view(s, b, m, -1)


def denoising_mse(denoiser: Denoiser, x01: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per-image diffusion training loss [B] at timesteps uniform over the whole schedule.

    x_t = sqrt(acp_t) x0 + sqrt(1 - acp_t) eps in model space; the UNet's output (the first
    C channels for learned-variance models) is regressed on the target of the denoiser's
    prediction type: eps (epsilon), sqrt(acp) eps - sqrt(1-acp) x0 (v_prediction), x0 (sample).
    """
    acp_all = denoiser.alphas_cumprod
    t = torch.randint(0, acp_all.numel(), (x01.shape[0],), generator=generator, device=x01.device)
    acp = acp_all[t].to(x01.dtype).view(-1, *([1] * (x01.dim() - 1)))
    eps = torch.randn(x01.shape, generator=generator, device=x01.device, dtype=x01.dtype)
    x0 = diffusion_input(x01, torch.ones((), device=x01.device))  # 2x - 1: model space
    x_t = diffusion_input(x01, acp.sqrt().flatten()) + (1.0 - acp).sqrt() * eps
    out = denoiser.unet(x_t, t.to(x01.dtype) * denoiser.timestep_scale).sample[:, : x01.shape[1]]
    targets = {"epsilon": lambda: eps, "sample": lambda: x0,
               "v_prediction": lambda: acp.sqrt() * eps - (1.0 - acp).sqrt() * x0}
    return ((out.float() - targets[denoiser.prediction_type]().float()) ** 2).flatten(1).mean(1)


@dataclass(frozen=True)
class BatchLoss:
    """The full fine-tuning loss of one batch and its parts (all tensors, no host sync).

    ``per_sigma`` maps each statistic to a [S] tensor over the batch's sigmas: the fraction
    recoverable, the mean Brier score of recoverable images and the mean collision
    probability ||q_bar||^2 of unrecoverable ones (nan where the subset is empty).
    """

    loss: torch.Tensor
    calibration: torch.Tensor
    mse: torch.Tensor
    per_sigma: dict[str, torch.Tensor]


def _subset_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` [S, B] over the images with weight 1, per row (nan for none)."""
    return (values * weights).sum(-1) / weights.sum(-1)


def batch_loss(model: DenoiseAndClassify, x01: torch.Tensor, labels: torch.Tensor, sigmas: torch.Tensor,
               m: int, lam: float, mu: float, generator: torch.Generator) -> BatchLoss:
    """loss = mean over sigmas and images of the calibration objective + mu * mean eps-MSE."""
    probs = sample_probs(model, x01, sigmas, m, generator)
    s, b = probs.shape[:2]
    terms = calibration_terms(probs.flatten(0, 1), labels.repeat(s))
    objective = calibration_objective(terms, lam).view(s, b)
    mse = denoising_mse(model.denoiser, x01, generator).mean()
    calibration = objective.mean()
    r = terms.recoverable.view(s, b)
    per_sigma = {
        "recoverable": r.mean(-1),
        "brier": _subset_mean(terms.brier.detach().view(s, b), r),
        "collision": _subset_mean(terms.collision.detach().view(s, b), 1.0 - r),
    }
    return BatchLoss(calibration + mu * mse, calibration.detach(), mse.detach(), per_sigma)


def holdout_statistics(model: DenoiseAndClassify, x01: torch.Tensor, labels: torch.Tensor,
                       sigmas: torch.Tensor, m: int, generator: torch.Generator) -> torch.Tensor:
    """Sums [S, 4] over the batch, per sigma: recoverable count, top-class frequency summed over
    recoverable images, unrecoverable count, top-class frequency summed over unrecoverable ones.

    Sums (not means) so that batches and workers add up; no gradient.
    """
    with torch.no_grad():
        probs = sample_probs(model, x01, sigmas, m, generator)
        s, b = probs.shape[:2]
        terms = calibration_terms(probs.flatten(0, 1), labels.repeat(s))
        r, freq = terms.recoverable.view(s, b), terms.top_frequency.view(s, b)
        return torch.stack([r.sum(-1), (r * freq).sum(-1), (1 - r).sum(-1), ((1 - r) * freq).sum(-1)], dim=-1)


class CalibrationLoss(torch.nn.Module):
    """The trainable unit (the thing DDP wraps): forward = :func:`batch_loss` of a batch."""

    def __init__(self, model: DenoiseAndClassify, loss_cfg: Mapping[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.m, self.lam, self.mu = loss_cfg["m"], loss_cfg["lam"], loss_cfg["mu"]

    def forward(self, x01: torch.Tensor, labels: torch.Tensor, sigmas: torch.Tensor,
                generator: torch.Generator) -> BatchLoss:
        return batch_loss(self.model, x01, labels, sigmas, self.m, self.lam, self.mu, generator)
