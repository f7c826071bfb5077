"""The reference implementations' certification loop, faithfully: Cohen et al.'s ``core.py``
(``Smooth._sample_noise`` / ``_count_arr``) around Carlini et al.'s ``DiffusionRobustModel``
(``DRM.py``: ``q_sample`` then improved-diffusion's ``p_sample``, whose ``pred_xstart`` is classified),
run on this project's denoiser and classifier modules.

Per (image, sigma), as their ``certify.py`` does:

* the timestep is their search: the first t >= 1 with sqrt(1 - abar_t) / sqrt(abar_t) >= 2 sigma;
* ``n0`` then ``n`` samples in batches of ``batch_size`` (theirs: 1,000): ``x.repeat((this_batch_size,
  1, 1, 1))``; ``q_sample`` with ``torch.randn_like`` noise: x_t = sqrt(abar_t) (2x - 1) + sqrt(1 - abar_t) eps;
  ``p_sample``: the UNet, the x0 prediction (clamped), the posterior mean, the (learned-range or fixed-large)
  log-variance, a second ``torch.randn_like`` and the sample they discard, every schedule constant gathered
  from a float64 host array per call (improved-diffusion's ``_extract_into_tensor``); the classifier on
  (x0 + 1) / 2; the argmax copied to the host every batch and counted with their Python loop
  (``for idx in predictions: counts[idx] += 1``);
* float32, ``torch.no_grad``; noise from torch's global generator.

The function smoothed differs from :class:`pipeline.models.factory.DenoiseAndClassify` at sigma only
through the timestep's rounding: their noise has the std of level t, sigma_t = sqrt(1 - abar_t) /
(2 sqrt(abar_t)) >= sigma in [0, 1] pixel units (within a step of the schedule: well under 1 % at the
demo's sigmas), where this project adds exactly sigma. Certification is CERTIFY
(:func:`pipeline.certification.certify`, Clopper-Pearson as their ``proportion_confint(..., method="beta")``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.diffusion import predict_x0

REFERENCE_BATCH_SIZE = 1000   # their certify.py's --batch_size default


class ReferenceDiffusionSchedule:
    """improved-diffusion's ``GaussianDiffusion`` constants (float64 numpy, as theirs) for a Denoiser."""

    def __init__(self, alphas_cumprod: np.ndarray) -> None:
        acp = np.asarray(alphas_cumprod, dtype=np.float64)
        acp_prev = np.append(1.0, acp[:-1])
        self.betas = 1.0 - acp / acp_prev
        self.sqrt_alphas_cumprod = np.sqrt(acp)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - acp)
        self.alphas_cumprod = acp
        self.posterior_variance = self.betas * (1.0 - acp_prev) / (1.0 - acp)
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = self.betas * np.sqrt(acp_prev) / (1.0 - acp)
        self.posterior_mean_coef2 = (1.0 - acp_prev) * np.sqrt(1.0 - self.betas) / (1.0 - acp)

    def timestep(self, sigma: float) -> int:
        """Their certify.py's search: the first t >= 1 whose noise level reaches 2 sigma (model space)."""
        target, real, t = sigma * 2, 0.0, 0
        while real < target and t < len(self.alphas_cumprod) - 1:
            t += 1
            real = self.sqrt_one_minus_alphas_cumprod[t] / self.sqrt_alphas_cumprod[t]
        return t


def _extract(arr: np.ndarray, timesteps: torch.Tensor, broadcast_shape: torch.Size) -> torch.Tensor:
    """improved-diffusion's ``_extract_into_tensor``: the host array to the device, gathered, float32, broadcast."""
    res = torch.from_numpy(arr).to(device=timesteps.device)[timesteps].float()
    while len(res.shape) < len(broadcast_shape):
        res = res[..., None]
    return res.expand(broadcast_shape)


class ReferenceDenoiseClassify(torch.nn.Module):
    """Carlini et al.'s ``DiffusionRobustModel`` on this project's Denoiser (its UNet, schedule and input
    placement) and Classifier: ``forward(x, t)`` takes clean images in [0, 1] and adds the noise itself."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.denoiser, self.classifier = model.denoiser, model.classifier
        self.num_classes = model.num_classes
        self.diffusion = ReferenceDiffusionSchedule(model.denoiser.alphas_cumprod.cpu().numpy())

    def forward(self, x: torch.Tensor, t: int) -> torch.Tensor:
        x_in = x * 2 - 1
        imgs = self.denoise(x_in, t)
        return self.classifier((imgs + 1) / 2)

    def denoise(self, x_start: torch.Tensor, t: int) -> torch.Tensor:
        t_batch = torch.tensor([t] * len(x_start), device=x_start.device)
        noise = torch.randn_like(x_start)
        x_t_start = self.q_sample(x_start, t_batch, noise)
        return self.p_sample(x_t_start, t_batch)["pred_xstart"]

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        d = self.diffusion
        return (_extract(d.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + _extract(d.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

    def p_sample(self, x: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """improved-diffusion's ``p_sample`` (clip_denoised=True): mean, log-variance, a fresh noise draw."""
        out = self.p_mean_variance(x, t)
        noise = torch.randn_like(x)
        nonzero_mask = (t != 0).float().view(-1, *([1] * (len(x.shape) - 1)))
        sample = out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_mean_variance(self, x: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        d, channels = self.diffusion, x.shape[1]
        model_output = self._unet(x, t)
        if model_output.shape[1] == 2 * channels:  # learned range (their CIFAR-10 / ImageNet models)
            model_var_values = model_output[:, channels:]
            min_log = _extract(d.posterior_log_variance_clipped, t, x.shape)
            max_log = _extract(np.log(d.betas), t, x.shape)
            frac = (model_var_values + 1) / 2
            model_log_variance = frac * max_log + (1 - frac) * min_log
        else:  # fixed large (sigma_small=False)
            model_log_variance = _extract(np.log(np.append(d.posterior_variance[1], d.betas[1:])), t, x.shape)
        acp = _extract(d.alphas_cumprod, t, x.shape[:1])
        pred_xstart = predict_x0(x, model_output, acp, self.denoiser.prediction_type)  # clamped to [-1, 1]
        model_mean = (_extract(d.posterior_mean_coef1, t, x.shape) * pred_xstart
                      + _extract(d.posterior_mean_coef2, t, x.shape) * x)
        return {"mean": model_mean, "log_variance": model_log_variance, "pred_xstart": pred_xstart}

    def _unet(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The UNet's output at x_t, with the Denoiser's input placement (reflect padding) and timestep scale."""
        height, width = x_t.shape[-2:]
        pad = self.denoiser.check_resolution(int(height))
        unet_in = F.pad(x_t, (pad, pad, pad, pad), mode="reflect") if pad else x_t
        out = self.denoiser.unet(unet_in, t.to(torch.float32) * self.denoiser.timestep_scale).sample
        return out[..., pad:pad + height, pad:pad + width] if pad else out


def count_arr(arr: np.ndarray, length: int) -> np.ndarray:
    """Their ``_count_arr``: a Python loop over every prediction."""
    counts = np.zeros(length, dtype=int)
    for idx in arr:
        counts[idx] += 1
    return counts


def sample_noise(model: ReferenceDenoiseClassify, x: torch.Tensor, t: int, num: int, batch_size: int) -> np.ndarray:
    """Their ``Smooth._sample_noise``: class counts of ``num`` samples of the one image ``x`` ([3, H, W])."""
    with torch.no_grad():
        counts = np.zeros(model.num_classes, dtype=int)
        for _ in range(math.ceil(num / batch_size)):
            this_batch_size = min(batch_size, num)
            num -= this_batch_size
            batch = x.repeat((this_batch_size, 1, 1, 1))
            predictions = model(batch, t).argmax(1)
            counts += count_arr(predictions.cpu().numpy(), model.num_classes)
        return counts


def reference_counts(model: ReferenceDenoiseClassify, images: torch.Tensor, sigmas: Sequence[float], n0: int, n: int,
                     batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(counts0, counts), int64 [N, S, C]: every image, one at a time, every sigma, the n0 then the n samples."""
    shape = (len(images), len(sigmas), model.num_classes)
    counts0, counts = np.zeros(shape, dtype=np.int64), np.zeros(shape, dtype=np.int64)
    model.eval()
    for s, sigma in enumerate(sigmas):
        t = model.diffusion.timestep(float(sigma))
        for i, x in enumerate(images):
            counts0[i, s] = sample_noise(model, x, t, n0, batch_size)
            counts[i, s] = sample_noise(model, x, t, n, batch_size)
    return counts0, counts
