"""The benchmarks' parts: the reference loop does the reference implementations' work and computes
the sampler's function, it draws the samples it claims, its FLOP count matches the layers' formula,
the GPU peak lookup matches whole model numbers; ``python -m jobs.benchmark`` runs both paths;
time to table gives (a) and (b) the same table where Monte Carlo noise cannot differ (no timing
thresholds)."""
from __future__ import annotations

import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from pipeline.device_info import BF16_PEAK_FLOPS, peak_bf16_flops
from pipeline.models.benchmark_presets import BENCHMARK_PRESETS
from pipeline.models.factory import create_denoise_classify
from pipeline.reference_loop import ReferenceDenoiseClassify, count_arr, reference_counts, sample_noise
from pipeline.sampling import MonteCarloSampler
from pipeline.throughput import Workload, flops_per_sample, measure_throughput

TINY = ["--preset", "small", "--device", "cpu", "--images", "1", "--n0", "2", "--n", "6", "--batch-size", "4",
        "--sigmas", "0.5", "--threads", "1"]


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    preset = BENCHMARK_PRESETS["small"]
    return create_denoise_classify(preset.denoiser, preset.classifier)


@pytest.fixture(scope="module")
def reference(small_model):
    return ReferenceDenoiseClassify(small_model)


def test_reference_denoise_is_the_denoiser_at_its_levels_noise(small_model, reference):
    """Carlini et al.'s q_sample + p_sample (learned-range variance: the small preset's UNet) is this
    project's Denoiser fed x + sigma_t * eps, sigma_t the noise level of their timestep: the same
    x0 for the same eps; their timestep search picks the Denoiser's timestep."""
    g = torch.Generator().manual_seed(3)
    x, eps = torch.rand(4, 3, 32, 32, generator=g), torch.randn(4, 3, 32, 32, generator=g)
    for sigma in (0.12, 0.25, 0.5, 1.0):
        t = reference.diffusion.timestep(sigma)
        assert t == int(small_model.denoiser.timesteps(torch.tensor(sigma)))
        abar = float(small_model.denoiser.alphas_cumprod[t])
        sigma_t = math.sqrt(1 - abar) / (2 * math.sqrt(abar))
        assert sigma <= sigma_t < sigma * 1.05
        t_batch = torch.full((4,), t)
        with torch.no_grad():
            theirs = reference.p_sample(reference.q_sample(2 * x - 1, t_batch, eps), t_batch)
            ours = small_model.denoiser(x + sigma_t * eps, torch.tensor(sigma))
        torch.testing.assert_close((theirs["pred_xstart"] + 1) / 2, ours, atol=2e-5, rtol=1e-4)
        assert not torch.equal(theirs["sample"], theirs["pred_xstart"])  # the work they do and discard


def test_reference_loop_and_sampler_agree_at_tiny_noise(small_model, reference):
    """At sigma = 1e-4 the smoothed prediction is deterministic: both loops count only the class the
    model gives the (almost) clean image, every sample."""
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        clean = int(small_model(x, torch.full((1,), 1e-4)).argmax(1))
    counts0, counts = reference_counts(reference, x, [1e-4], 3, 10, batch_size=4)
    ours = MonteCarloSampler(small_model, batch_size=8, device="cpu").sample(x, ["x"], [1e-4], 3, 10, seed=0)
    np.testing.assert_array_equal(ours.counts, counts)
    np.testing.assert_array_equal(ours.counts0, counts0)
    assert counts[0, 0, clean] == 10 and counts0[0, 0, clean] == 3


@pytest.mark.parametrize("num, batch_size", [(10, 4), (3, 8), (8, 8), (0, 4)])
def test_reference_loop_draws_exactly_num_samples(reference, num, batch_size):
    x = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(2))
    counts = sample_noise(reference, x, reference.diffusion.timestep(0.5), num, batch_size)
    assert counts.shape == (10,) and counts.sum() == num


def test_their_counting_loop_counts():
    predictions = np.array([3, 1, 3, 9, 3, 0])
    np.testing.assert_array_equal(count_arr(predictions, 10), np.bincount(predictions, minlength=10))


class ConvNet(torch.nn.Module):
    """conv 3x3 (3 -> 8 channels, same padding), global mean, linear 8 -> 10: FLOPs known in closed form."""

    num_classes = 10

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x, sigma):
        return self.fc(self.conv(x).mean((2, 3)))


@pytest.mark.parametrize("batch_size, size", [(4, 16), (3, 8)])
def test_flops_per_sample_match_the_layers_formula(batch_size, size):
    sampler = MonteCarloSampler(ConvNet(), batch_size=batch_size, device="cpu")
    work = Workload(torch.rand(2, 3, size, size), ["a", "b"], [0.25], 1, 1)
    conv = 2 * size * size * 8 * (3 * 3 * 3)      # a multiply and an add per weight per output pixel
    linear = 2 * 8 * 10
    assert flops_per_sample(sampler, work) == conv + linear


def test_peak_lookup_matches_whole_model_numbers():
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == BF16_PEAK_FLOPS["H100"]
    assert peak_bf16_flops("NVIDIA A100-SXM4-80GB") == BF16_PEAK_FLOPS["A100"]
    assert peak_bf16_flops("NVIDIA GH200 480GB") == BF16_PEAK_FLOPS["H200"]
    assert peak_bf16_flops("NVIDIA RTX A1000 6GB Laptop GPU") is None  # no A100
    assert peak_bf16_flops("NVIDIA GeForce RTX 3090") is None


def test_measure_throughput_counts_what_it_ran():
    result = measure_throughput("small", device="cpu", images=2, n0=1, n=3, sigmas=[0.5, 1.0], batch_size=4, threads=1)
    assert (result.device, result.dtype, result.batch_size, result.peak_flops) == ("cpu", "float32", 4, None)
    assert result.baseline_batch_size == 1000
    assert result.samples == 2 * 2 * (1 + 3)
    assert result.baseline_s > 0 and result.sampler_s > 0 and result.flops_per_sample > 0
    assert result.ratio == pytest.approx(result.baseline_s / result.sampler_s)
    assert not any("fraction of dense bf16 peak" in line for line in result.lines())


def printed(pattern: str, out: str) -> float:
    match = re.search(pattern, out, re.MULTILINE)
    assert match, out
    return float(match.group(1))


def test_command_line_prints_both_rates_and_their_ratio():
    proc = subprocess.run([sys.executable, "-m", "jobs.benchmark", *TINY], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    baseline = printed(r"^baseline \(reference loop, float32, batch 1000\): ([0-9.]+) samples/s$", proc.stdout)
    sampler = printed(r"^sampler \(MonteCarloSampler, float32\): ([0-9.]+) samples/s$", proc.stdout)
    ratio = printed(r"^ratio sampler/baseline: ([0-9.]+)x$", proc.stdout)
    assert ratio == pytest.approx(sampler / baseline, rel=0.02, abs=0.01)
    assert "samples=8" in proc.stdout and "GFLOP" in proc.stdout


@pytest.mark.slow
def test_runs_as_ray_task(ray_local, capsys):
    from jobs.benchmark import main

    result = main([*TINY, "--ray"])
    assert result.samples == 8 and result.device == "cpu"
    assert printed(r"^ratio sampler/baseline: ([0-9.]+)x$", capsys.readouterr().out) > 0


def test_time_to_table_reference_and_full_mode_agree_where_noise_cannot_differ(ray_local, tmp_path):
    """Two digits at sigma = 0.05: every sample of both paths is the clean class, so (a) and (b) must
    give the same class and the same radius per image (a wrong denoise, scale or count breaks it)."""
    from analysis.results import RESULT_COLUMNS
    from pipeline.time_to_table import time_to_table

    # the project paths run sequential sampling and measured device settings by default: fixed
    # sampling in float32 here, so that both paths compute the same function and certificate
    result = time_to_table(tmp_path, images=2, n0=4, n=16, batch_size=1000,
                           overrides=["smoothing.sigmas=[0.05]", "smoothing.sampling=fixed", "compute.dtype=float32"])
    assert set(result.seconds) == {"reference", "full", "cascade"} and min(result.seconds.values()) > 0
    for table in result.tables.values():
        assert tuple(table.columns) == RESULT_COLUMNS and len(table) == 2
    ref, full = result.tables["reference"], result.tables["full"]
    assert ref["method"].astype(str).tolist() == full["method"].astype(str).tolist() == ["sigma=0.05"] * 2
    assert ref["image_id"].tolist() == full["image_id"].tolist()
    np.testing.assert_array_equal(ref["pred"].to_numpy(), full["pred"].to_numpy())
    np.testing.assert_array_equal(ref["pred"].to_numpy(), ref["label"].to_numpy())
    np.testing.assert_allclose(ref["radius"].to_numpy(), full["radius"].to_numpy(), rtol=0, atol=1e-12)
    assert (ref["radius"] > 0).all()
    assert result.tables["cascade"]["method"].astype(str).unique().tolist() == ["cascade(0.05)"]
    [agreement] = result.agreement
    assert (agreement.same_decision, agreement.images, agreement.within_noise) == (2, 2, True)
    text = "\n".join(result.lines())
    assert "faster than (a)" in text and "| sigma=0.05 | 2 |" in text


def test_each_project_path_starts_with_an_empty_compile_cache(tmp_path, monkeypatch):
    """(b) and (c) each pay a first user's compile: a new empty cache folder per path, for the
    processes started inside (through the environment), and the caller's setting back after."""
    import os
    from pathlib import Path

    from pipeline.time_to_table import empty_compile_cache

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "warm"))
    folders = []
    for _ in range(2):
        with empty_compile_cache(tmp_path / "work"):
            folder = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
            assert folder.parent == tmp_path / "work" and folder.is_dir() and not any(folder.iterdir())
            (folder / "compiled").write_text("x")  # what a path's compile leaves behind
            folders.append(folder)
    assert folders[0] != folders[1] and os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "warm")
