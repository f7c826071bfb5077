"""pipeline.diffusion against the original ADM schedules and DESIGN.md section 3, computed directly in numpy."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.diffusion import (NoiseSchedule, adm_beta_range, alphas_cumprod_for, diffusion_input, predict_x0,
                                timestep_for_sigma)
from tests.golden import TIMESTEPS


def adm_alphas_cumprod(schedule: str, steps: int) -> np.ndarray:
    """guided/improved-diffusion's get_named_beta_schedule, in float64 numpy."""
    if schedule == "linear":
        scale = 1000 / steps
        betas = np.linspace(scale * 0.0001, scale * 0.02, steps, dtype=np.float64)
    else:
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = np.array([min(1 - f((i + 1) / steps) / f(i / steps), 0.999) for i in range(steps)])
    return np.cumprod(1.0 - betas)


@pytest.mark.parametrize("schedule,steps", [("linear", 1000), ("squaredcos_cap_v2", 4000), ("linear", 4000)])
def test_alphas_cumprod_match_original_schedules(schedule, steps):
    acp = alphas_cumprod_for(schedule, steps)
    assert acp.dtype == torch.float64 and acp.shape == (steps,)
    ref = adm_alphas_cumprod(schedule, steps)
    # diffusers keeps betas in float32; the products agree to float32 rounding of the betas.
    np.testing.assert_allclose(acp.numpy(), ref, rtol=2e-5, atol=1e-9)


@pytest.mark.parametrize("schedule,steps", sorted(TIMESTEPS))
def test_timestep_table(schedule, steps):
    expected = list(TIMESTEPS[schedule, steps].values())
    acp = alphas_cumprod_for(schedule, steps)
    t = timestep_for_sigma(acp, torch.tensor([0.25, 0.5, 1.0]))
    assert t.dtype == torch.int64
    assert t.tolist() == expected
    assert [int(timestep_for_sigma(acp, s)) for s in (0.25, 0.5, 1.0)] == expected


def test_timestep_is_first_crossing():
    acp = alphas_cumprod_for("squaredcos_cap_v2", 4000)
    sigmas = np.random.default_rng(0).uniform(0.0, 3.0, size=200)
    t = timestep_for_sigma(acp, torch.from_numpy(sigmas)).numpy()
    root = np.sqrt(acp.numpy())
    for s, ti in zip(sigmas, t):
        below = np.nonzero(root <= 1 / np.sqrt(1 + 4 * s * s))[0]
        assert ti == below[0]


def test_timestep_shapes_and_saturation():
    acp = alphas_cumprod_for("linear", 1000)
    assert timestep_for_sigma(acp, 0.0).shape == ()
    assert int(timestep_for_sigma(acp, 0.0)) == 0
    assert timestep_for_sigma(acp, torch.full((2, 3), 0.5)).shape == (2, 3)
    assert int(timestep_for_sigma(acp, 1e6)) == 999


def test_adm_beta_range_and_schedule_defaults():
    assert adm_beta_range(1000) == pytest.approx((0.0001, 0.02))
    assert adm_beta_range(4000) == pytest.approx((0.000025, 0.005))
    s = NoiseSchedule("squaredcos_cap_v2", 4000, rescale_timesteps=True)
    assert s.timestep_scale == 0.25 and s.beta_start == pytest.approx(0.000025)
    assert NoiseSchedule("linear", 1000).timestep_scale == 1.0
    with pytest.raises(ValueError, match="prediction_type"):
        NoiseSchedule("linear", 1000, prediction_type="eps")


def test_diffusion_input_is_forward_process():
    rng = np.random.default_rng(1)
    x = rng.uniform(size=(4, 3, 8, 8))
    eps = rng.standard_normal(size=x.shape)
    sigma = np.array([0.12, 0.25, 0.5, 1.0])
    acp = alphas_cumprod_for("linear", 1000)
    a = acp[timestep_for_sigma(acp, torch.from_numpy(sigma))].numpy()
    x_noisy = x + sigma[:, None, None, None] * eps
    got = diffusion_input(torch.from_numpy(x_noisy), torch.from_numpy(np.sqrt(a))).numpy()
    want = np.sqrt(a)[:, None, None, None] * (2 * x - 1 + 2 * sigma[:, None, None, None] * eps)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_predict_x0_epsilon_direct_and_clamped():
    rng = np.random.default_rng(2)
    x_t = rng.standard_normal(size=(3, 3, 8, 8)) * 1.5
    eps_hat = rng.standard_normal(size=x_t.shape)
    a = np.array([0.9, 0.5, 0.1])
    got = predict_x0(torch.from_numpy(x_t), torch.from_numpy(eps_hat), torch.from_numpy(a), "epsilon").numpy()
    A = a[:, None, None, None]
    want = np.clip((x_t - np.sqrt(1 - A) * eps_hat) / np.sqrt(A), -1, 1)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert (np.abs(want) == 1).any() and (np.abs(want) < 1).any()  # both branches of the clamp exercised


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_predict_x0_recovers_x0_from_the_true_target(prediction_type):
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(4, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    a = torch.tensor([0.99, 0.7, 0.3, 0.02], dtype=torch.float64)
    A = a.reshape(-1, 1, 1, 1)
    x_t = A.sqrt() * x0 + (1 - A).sqrt() * eps
    target = {"epsilon": eps, "v_prediction": A.sqrt() * eps - (1 - A).sqrt() * x0, "sample": x0}[prediction_type]
    torch.testing.assert_close(predict_x0(x_t, target, a, prediction_type), x0, rtol=0, atol=1e-10)


def test_learned_variance_uses_first_half():
    g = torch.Generator().manual_seed(4)
    x_t = torch.randn(2, 3, 8, 8, generator=g)
    eps = torch.randn(2, 3, 8, 8, generator=g)
    variance = torch.randn(2, 3, 8, 8, generator=g) * 100
    a = torch.tensor([0.8, 0.4])
    for prediction_type in ("epsilon", "v_prediction"):
        torch.testing.assert_close(predict_x0(x_t, torch.cat([eps, variance], 1), a, prediction_type),
                                   predict_x0(x_t, eps, a, prediction_type))


def test_scalar_acp_broadcasts_and_dtype_follows_input():
    x = torch.rand(2, 3, 4, 4, dtype=torch.bfloat16)
    out = diffusion_input(x, torch.tensor(0.5, dtype=torch.float64))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, 0.5 * (2 * x - 1))
    with pytest.raises(ValueError, match="prediction_type"):
        predict_x0(x, x, torch.tensor(0.5), "score")
