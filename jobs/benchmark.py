"""Denoise-and-classify throughput: MonteCarloSampler against the reference implementations' loop.

    python -m jobs.benchmark [--preset small|cifar10|imagenet] [--device cpu|cuda] [--images K]
        [--n0 N0] [--n N] [--sigmas S ...] [--batch-size B] [--dtype float32|bfloat16|float16] [--compile]
    ray job submit --working-dir . -- python -m jobs.benchmark --ray ...

Both paths run the same model (random weights) on the same images and sample counts in one
process. The baseline is the loop of the reference implementations (Cohen et al.'s ``core.py``,
Carlini et al.'s denoised smoothing): one image and one sigma at a time, ``x.repeat(batch)``,
``torch.randn`` noise per batch, argmax copied to the host every batch, float32. Printed:
samples/s of each, their ratio, and the model's FLOPs per sample (``FlopCounterMode`` on one
batch), the achieved FLOP/s and, on a known GPU, the fraction of its dense bf16 peak.
With ``--ray`` the measurement runs as a Ray task (with one GPU when the cluster has GPUs).
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.models.factory import create_denoise_classify
from pipeline.sampling import DTYPES, MonteCarloSampler, default_device


@dataclass(frozen=True)
class Preset:
    """Models (random weights) and the workload a preset measures by default."""

    denoiser: Mapping[str, Any]
    classifier: Mapping[str, Any]
    images: int
    n0: int
    n: int
    cpu_batch_size: int
    gpu_batch_size: int
    sigmas: tuple[float, ...] = (0.25, 0.5)


_SMALL_ADM = {"image_size": 32, "num_channels": 32, "num_res_blocks": 1, "attention_resolutions": "16",
              "channel_mult": (1, 2), "num_heads": 2, "num_head_channels": 16, "learn_sigma": True,
              "resblock_updown": True, "use_scale_shift_norm": True, "dropout": 0.0}
_LINEAR_1000 = {"beta_schedule": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
                "rescale_timesteps": False}

PRESETS: dict[str, Preset] = {
    # Tiny ADM-style UNet + tiny ViT: a CPU run of about a minute.
    "small": Preset(
        denoiser={"adm_config": _SMALL_ADM, "schedule": _LINEAR_1000},
        classifier={"name": "vit_tiny_patch16_224", "num_classes": 10, "input_size": [3, 32, 32],
                    "model_kwargs": {"img_size": 32, "patch_size": 8, "depth": 2}},
        images=2, n0=8, n=56, cpu_batch_size=32, gpu_batch_size=256),
    # improved-diffusion CIFAR-10 32x32 + ViT-B/16 at 224 (Carlini et al.'s CIFAR-10 setup).
    "cifar10": Preset(
        denoiser={"preset": "iddpm-cifar10-uncond"},
        classifier={"name": "vit_base_patch16_224", "num_classes": 10},
        images=2, n0=16, n=240, cpu_batch_size=8, gpu_batch_size=256),
    # guided-diffusion ImageNet 256x256 + BEiT-L/16 at 512 (Carlini et al.'s ImageNet setup).
    "imagenet": Preset(
        denoiser={"preset": "adm-imagenet256-uncond"},
        classifier={"name": "beit_large_patch16_512", "num_classes": 1000},
        images=1, n0=8, n=56, cpu_batch_size=2, gpu_batch_size=32),
}

# Dense bf16 tensor-core peak FLOP/s by device name substring (no sparsity).
BF16_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


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
class Result:
    """Timings of both paths on one workload, and the model's FLOPs per sample."""

    preset: str
    device: str
    device_name: str
    dtype: str
    batch_size: int
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
            f"baseline (reference loop, float32): {self.baseline_samples_per_s:.2f} samples/s",
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


def reference_counts(model: torch.nn.Module, x: torch.Tensor, sigma: float, num: int, batch_size: int) -> np.ndarray:
    """The reference implementations' sampling loop for one image and one sigma (float32)."""
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


def run_baseline(model: torch.nn.Module, work: Workload, batch_size: int) -> None:
    for x in work.images:
        for sigma in work.sigmas:
            for num in (work.n0, work.n):
                reference_counts(model, x[None], sigma, num, batch_size)


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


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flops_per_sample(sampler: MonteCarloSampler, work: Workload) -> float:
    """FLOPs of one forward of a full device batch (autocast as the sampler runs), per sample."""
    b = sampler.batch_size
    x = work.images[:1].to(sampler.device).repeat(b, 1, 1, 1).contiguous(memory_format=sampler.memory_format)
    sigma = torch.full((b,), work.sigmas[0], device=sampler.device)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), sampler.autocast(), counter:
        sampler.model(x, sigma)
    return counter.get_total_flops() / b


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def peak_bf16_flops(name: str) -> float | None:
    return next((peak for key, peak in BF16_PEAK_FLOPS.items() if key in name), None)


def build_workload(preset: Preset, model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> Workload:
    size = int(model.denoiser.image_size)
    k = args.images or preset.images
    generator = torch.Generator().manual_seed(0)
    images = torch.rand((k, 3, size, size), generator=generator).to(device)
    return Workload(images, [f"bench-{i}" for i in range(k)], list(args.sigmas or preset.sigmas),
                    preset.n0 if args.n0 is None else args.n0, args.n or preset.n)


def run(args: argparse.Namespace) -> Result:
    """Builds the preset's models, times baseline then sampler on the same workload."""
    torch.manual_seed(0)
    device = torch.device(args.device) if args.device else default_device()
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    batch_size = args.batch_size or (preset.gpu_batch_size if device.type == "cuda" else preset.cpu_batch_size)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    model = create_denoise_classify(preset.denoiser, preset.classifier).to(device)
    work = build_workload(preset, model, args, device)

    reference_counts(model, work.images[:1], work.sigmas[0], batch_size, batch_size)  # warm-up
    baseline_s, baseline_cpu_s = timed(lambda: run_baseline(model, work, batch_size), device, args.repeats)

    sampler = MonteCarloSampler(model, batch_size, dtype=dtype, device=str(device), compile=args.compile,
                                channels_last=not args.no_channels_last)
    sample = lambda: sampler.sample(work.images, work.image_ids, work.sigmas, work.n0, work.n, seed=0)  # noqa: E731
    sampler.sample(work.images[:1], work.image_ids[:1], work.sigmas[:1], 0, batch_size, seed=1)  # warm-up, compile
    sampler_s, sampler_cpu_s = timed(sample, device, args.repeats)

    name = device_name(device)
    return Result(args.preset, str(device), name, dtype, batch_size, work.samples, baseline_s, sampler_s,
                  baseline_cpu_s, sampler_cpu_s, flops_per_sample(sampler, work),
                  peak_bf16_flops(name) if device.type == "cuda" else None)


def run_on_ray(args: argparse.Namespace) -> Result:
    """``run`` as a Ray task, given one GPU when the cluster has any."""
    import ray

    ray.init(ignore_reinit_error=True)
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    return ray.get(ray.remote(num_gpus=gpus)(run).remote(args))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.benchmark", description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--images", type=int, default=None, help="number of images (default: the preset's)")
    p.add_argument("--n0", type=int, default=None, help="selection samples per image and sigma")
    p.add_argument("--n", type=int, default=None, help="estimation samples per image and sigma")
    p.add_argument("--sigmas", type=float, nargs="+", default=None)
    p.add_argument("--batch-size", type=int, default=None, help="device batch (default: the preset's)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="sampler precision (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model in the sampler")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--repeats", type=int, default=1, help="time each path this many times, keep the best")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--ray", action="store_true", help="run as a Ray task (a GPU one when GPUs exist)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> Result:
    args = parse_args(argv)
    result = run_on_ray(args) if args.ray else run(args)
    for line in result.lines():
        print(line, flush=True)
    return result


if __name__ == "__main__":
    main()
