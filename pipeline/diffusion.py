"""One-shot diffusion denoising maths (DESIGN.md section 3), pure torch.

Pixel space is [0, 1]; the diffusion model sees 2x - 1, so a Gaussian perturbation of std
sigma in pixel space is noise of std 2*sigma in model space. This module is the only place
that does that conversion.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass(frozen=True)
class NoiseSchedule:
    """The training noise schedule of a diffusion model and how it reads its inputs.

    ``beta_start``/``beta_end`` (linear schedules only) default to :func:`adm_beta_range`.
    ``rescale_timesteps``: the model sees t * 1000 / num_train_timesteps (improved-diffusion).
    """

    beta_schedule: str
    num_train_timesteps: int
    prediction_type: str = "epsilon"
    rescale_timesteps: bool = False
    beta_start: float | None = None
    beta_end: float | None = None

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
        if self.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be positive, got {self.num_train_timesteps}")
        start, end = adm_beta_range(self.num_train_timesteps)
        object.__setattr__(self, "beta_start", start if self.beta_start is None else float(self.beta_start))
        object.__setattr__(self, "beta_end", end if self.beta_end is None else float(self.beta_end))

    def alphas_cumprod(self) -> torch.Tensor:
        """float64 [T] cumulative products of (1 - beta_t)."""
        return alphas_cumprod_for(self.beta_schedule, self.num_train_timesteps, self.beta_start, self.beta_end)

    @property
    def timestep_scale(self) -> float:
        """Factor from the timestep index to the value the model takes as input."""
        return 1000.0 / self.num_train_timesteps if self.rescale_timesteps else 1.0


def adm_beta_range(num_train_timesteps: int) -> tuple[float, float]:
    """guided/improved-diffusion's linear schedule ends: (0.0001, 0.02) scaled by 1000/T."""
    scale = 1000.0 / num_train_timesteps
    return 0.0001 * scale, 0.02 * scale


def alphas_cumprod_for(beta_schedule: str, num_train_timesteps: int,
                       beta_start: float | None = None, beta_end: float | None = None) -> torch.Tensor:
    """float64 [T] alphas_cumprod of diffusers' DDPMScheduler betas (cumprod taken in float64).

    ``beta_schedule``: any of DDPMScheduler's ("linear", "squaredcos_cap_v2", ...); the linear
    ends default to :func:`adm_beta_range`.
    """
    default_start, default_end = adm_beta_range(num_train_timesteps)
    scheduler = DDPMScheduler(
        beta_schedule=beta_schedule,
        num_train_timesteps=num_train_timesteps,
        beta_start=default_start if beta_start is None else beta_start,
        beta_end=default_end if beta_end is None else beta_end,
    )
    return torch.cumprod(1.0 - scheduler.betas.to(torch.float64), dim=0)


def timestep_for_sigma(alphas_cumprod: torch.Tensor, sigma) -> torch.LongTensor:
    """The first t with sqrt(alphas_cumprod[t]) <= 1/sqrt(1 + 4 sigma^2), elementwise.

    ``sigma`` (float, sequence or tensor, [0,1]-pixel units) is compared in float64 on
    ``alphas_cumprod``'s device; no host sync. A sigma beyond the schedule's last level gets T-1.
    """
    acp = alphas_cumprod.to(torch.float64)
    sigma = torch.as_tensor(sigma, dtype=torch.float64, device=acp.device)
    threshold = torch.rsqrt(1.0 + 4.0 * sigma * sigma)
    # sqrt(acp) is decreasing; -sqrt(acp) is increasing, so searchsorted finds the first t.
    t = torch.searchsorted(-acp.sqrt(), -threshold.reshape(-1), side="left").reshape(threshold.shape)
    return t.clamp_(max=acp.numel() - 1)


def _per_sample(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` (scalar or [B]) shaped to broadcast against ``like`` [B, ...], in its dtype."""
    value = value.to(device=like.device, dtype=like.dtype)
    return value if value.dim() == 0 else value.reshape(-1, *([1] * (like.dim() - 1)))


def diffusion_input(x_noisy: torch.Tensor, sqrt_acp: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(acp_t) * (2 x_noisy - 1) for x_noisy = x + sigma*eps in [0,1] units.

    Equals sqrt(acp_t) * (2x - 1 + 2 sigma eps): the forward process at the t of
    :func:`timestep_for_sigma` up to its rounding. ``sqrt_acp``: scalar or [B].
    """
    return _per_sample(sqrt_acp, x_noisy) * (2.0 * x_noisy - 1.0)


def predict_x0(x_t: torch.Tensor, model_output: torch.Tensor, acp_t: torch.Tensor,
               prediction_type: str) -> torch.Tensor:
    """x0 estimate in model space [-1, 1] (clamped) from the model's output at x_t.

    Learned-variance outputs (twice x_t's channels) use the first half. ``acp_t``: scalar or [B].
    epsilon: (x_t - sqrt(1-acp) eps)/sqrt(acp); v_prediction: sqrt(acp) x_t - sqrt(1-acp) v;
    sample: the output itself.
    """
    out = model_output[:, : x_t.shape[1]]
    acp = _per_sample(acp_t, x_t)
    if prediction_type == "epsilon":
        x0 = (x_t - (1.0 - acp).sqrt() * out) / acp.sqrt()
    elif prediction_type == "v_prediction":
        x0 = acp.sqrt() * x_t - (1.0 - acp).sqrt() * out
    elif prediction_type == "sample":
        x0 = out
    else:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    return x0.clamp(-1.0, 1.0)
