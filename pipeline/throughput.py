"""Denoise-and-classify throughput: MonteCarloSampler against the reference implementations' loop.

:func:`measure_throughput` runs both paths on the same model (a benchmark preset's, random
weights), the same images (seeded uniform noise) and the same sample counts in this process:
the baseline (pipeline.reference_loop: the reference implementations' loop and denoise, float32,
their batch size of 1,000 unless given) first, then the sampler (its dtype, optional
torch.compile), each after a warm-up, each timed as the least wall and process-CPU seconds over
``repeats`` runs with the device drained before and after. It also counts the model's FLOPs
per sample (``FlopCounterMode`` on one full batch) for the achieved FLOP/s and, on a known GPU,
the fraction of its dense bf16 peak.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.device_info import device_name, peak_bf16_flops, synchronize
from pipeline.models.benchmark_presets import BENCHMARK_PRESETS
from pipeline.models.factory import create_denoise_classify
from pipeline.reference_loop import REFERENCE_BATCH_SIZE, ReferenceDenoiseClassify, reference_counts
from pipeline.sampling import MonteCarloSampler, default_device


@dataclass
class Workload:
    images: torch.Tensor  # [K, 3, H, W] in [0, 1]
    image_ids: list[str]
    sigmas: list[float]
    n0: int
    n: int

    @property
    def samples(self) -> int:
        return len(self.image_ids) * len(self.sigmas) * (self.n0 + self.n)


@dataclass
class ThroughputResult:
    """Timings of both paths on one workload, and the model's FLOPs per sample."""

    preset: str
    device: str
    device_name: str
    dtype: str
    batch_size: int
    baseline_batch_size: int
    samples: int
    baseline_s: float  # wall seconds
    sampler_s: float
    baseline_cpu_s: float  # this process's CPU seconds (robust to other load on a shared CPU)
    sampler_cpu_s: float
    flops_per_sample: float
    peak_flops: float | None

    @property
    def baseline_samples_per_s(self) -> float:
        return self.samples / self.baseline_s

    @property
    def sampler_samples_per_s(self) -> float:
        return self.samples / self.sampler_s

    @property
    def ratio(self) -> float:
        return self.sampler_samples_per_s / self.baseline_samples_per_s

    @property
    def achieved_flops(self) -> float:
        return self.flops_per_sample * self.sampler_samples_per_s

    def lines(self) -> list[str]:
        out = [
            f"preset={self.preset} device={self.device} ({self.device_name}) dtype={self.dtype} "
            f"batch_size={self.batch_size} samples={self.samples}",
            f"baseline (reference loop, float32, batch {self.baseline_batch_size}): "
            f"{self.baseline_samples_per_s:.2f} samples/s",
            f"sampler (MonteCarloSampler, {self.dtype}): {self.sampler_samples_per_s:.2f} samples/s",
            f"ratio sampler/baseline: {self.ratio:.2f}x",
            f"seconds wall / process CPU: baseline {self.baseline_s:.2f} / {self.baseline_cpu_s:.2f}, "
            f"sampler {self.sampler_s:.2f} / {self.sampler_cpu_s:.2f} "
            f"(CPU-time ratio {self.baseline_cpu_s / self.sampler_cpu_s:.2f}x)",
            f"model FLOPs per sample: {self.flops_per_sample / 1e9:.3f} GFLOP; "
            f"sampler achieved {self.achieved_flops / 1e12:.4f} TFLOP/s",
        ]
        if self.peak_flops:
            out.append(f"fraction of dense bf16 peak ({self.peak_flops / 1e12:.0f} TFLOP/s): "
                       f"{self.achieved_flops / self.peak_flops:.3f}")
        return out


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float, float]:
    """Least (wall seconds, this process's CPU seconds) of ``fn()`` over ``repeats`` runs, the device
    drained before and after each."""
    best_wall = best_cpu = math.inf
    for _ in range(repeats):
        synchronize(device)
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        synchronize(device)
        best_wall, best_cpu = min(best_wall, time.perf_counter() - wall), min(best_cpu, time.process_time() - cpu)
    return best_wall, best_cpu


def flops_per_sample(sampler: MonteCarloSampler, work: Workload) -> float:
    """FLOPs of one forward of a full device batch (autocast as the sampler runs), per sample."""
    b = sampler.batch_size
    x = work.images[:1].to(sampler.device).repeat(b, 1, 1, 1).contiguous(memory_format=sampler.memory_format)
    sigma = torch.full((b,), work.sigmas[0], device=sampler.device)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), sampler.autocast(), counter:
        sampler.model(x, sigma)
    return counter.get_total_flops() / b


def build_workload(model: torch.nn.Module, images: int, sigmas: Sequence[float], n0: int, n: int,
                   device: torch.device) -> Workload:
    """``images`` seeded uniform-noise images at the denoiser's resolution, on ``device``."""
    size = int(model.denoiser.image_size)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand((images, 3, size, size), generator=generator).to(device)
    return Workload(x, [f"bench-{i}" for i in range(images)], list(sigmas), n0, n)


def measure_throughput(preset: str = "small", device: str | None = None, images: int | None = None,
                       n0: int | None = None, n: int | None = None, sigmas: Sequence[float] | None = None,
                       batch_size: int | None = None, dtype: str | None = None, compile: bool = False,
                       channels_last: bool = True, repeats: int = 1, threads: int | None = None,
                       baseline_batch_size: int = REFERENCE_BATCH_SIZE) -> ThroughputResult:
    """Builds the preset's models, times baseline then sampler on the same workload.

    Unset workload values are the preset's; the batch size is the preset's CPU or GPU one; the
    sampler's dtype defaults to bfloat16 on CUDA, float32 elsewhere.
    """
    torch.manual_seed(0)
    dev = torch.device(device) if device else default_device()
    if threads:
        torch.set_num_threads(threads)
    spec = BENCHMARK_PRESETS[preset]
    batch_size = batch_size or (spec.gpu_batch_size if dev.type == "cuda" else spec.cpu_batch_size)
    dtype = dtype or ("bfloat16" if dev.type == "cuda" else "float32")
    model = create_denoise_classify(spec.denoiser, spec.classifier).to(dev)
    work = build_workload(model, images or spec.images, sigmas or spec.sigmas, spec.n0 if n0 is None else n0,
                          n or spec.n, dev)

    reference = ReferenceDenoiseClassify(model)
    reference_counts(reference, work.images[:1], work.sigmas[:1], 0, batch_size, baseline_batch_size)  # warm-up
    baseline_s, baseline_cpu_s = timed(
        lambda: reference_counts(reference, work.images, work.sigmas, work.n0, work.n, baseline_batch_size), dev, repeats)

    sampler = MonteCarloSampler(model, batch_size, dtype=dtype, device=str(dev), compile=compile,
                                channels_last=channels_last)
    sample = lambda: sampler.sample(work.images, work.image_ids, work.sigmas, work.n0, work.n, seed=0)  # noqa: E731
    sampler.sample(work.images[:1], work.image_ids[:1], work.sigmas[:1], 0, batch_size, seed=1)  # warm-up, compile
    sampler_s, sampler_cpu_s = timed(sample, dev, repeats)

    name = device_name(dev)
    return ThroughputResult(preset, str(dev), name, dtype, batch_size, baseline_batch_size, work.samples, baseline_s, sampler_s,
                            baseline_cpu_s, sampler_cpu_s, flops_per_sample(sampler, work),
                            peak_bf16_flops(name) if dev.type == "cuda" else None)
