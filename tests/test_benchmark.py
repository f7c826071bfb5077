"""jobs.benchmark on tiny settings: it runs both paths, prints their ratio, and its baseline
computes the same function as the sampler (no timing thresholds)."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from jobs.benchmark import PRESETS, main, peak_bf16_flops, reference_counts
from pipeline.models.factory import create_denoise_classify
from pipeline.sampling import MonteCarloSampler

TINY = ["--preset", "small", "--device", "cpu", "--images", "1", "--n0", "2", "--n", "6", "--batch-size", "4",
        "--sigmas", "0.5", "--threads", "1"]


def printed_ratio(out: str) -> float:
    match = re.search(r"^ratio sampler/baseline: ([0-9.]+)x$", out, re.MULTILINE)
    assert match, out
    return float(match.group(1))


def test_main_prints_both_rates_and_ratio(capsys):
    result = main(TINY)
    out = capsys.readouterr().out
    assert result.samples == 8 and result.device == "cpu" and result.dtype == "float32"
    assert printed_ratio(out) == pytest.approx(result.baseline_s / result.sampler_s, abs=0.006)
    assert f"baseline (reference loop, float32): {8 / result.baseline_s:.2f} samples/s" in out
    assert result.flops_per_sample > 0 and result.peak_flops is None
    assert "fraction of dense bf16 peak" not in out


def test_baseline_and_sampler_agree_at_tiny_noise():
    """At sigma = 1e-4 the smoothed prediction is deterministic: both loops count one class."""
    torch.manual_seed(0)
    preset = PRESETS["small"]
    model = create_denoise_classify(preset.denoiser, preset.classifier)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    base = reference_counts(model, x, 1e-4, 10, batch_size=4)
    ours = MonteCarloSampler(model, batch_size=8, device="cpu").sample(x, ["x"], [1e-4], 0, 10, seed=0)
    np.testing.assert_array_equal(ours.counts[0, 0], base)
    assert base.max() == 10


def test_peak_table():
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_bf16_flops("NVIDIA H200") == 989e12
    assert peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_bf16_flops("NVIDIA GeForce RTX 3090") is None


@pytest.mark.slow
def test_runs_as_ray_task(ray_local, capsys):
    result = main([*TINY, "--ray"])
    assert result.samples == 8
    assert printed_ratio(capsys.readouterr().out) > 0
