"""The throughput benchmark's presets: models (random weights) and the workload each measures by default.

``small``: a tiny ADM-style UNet and a tiny ViT (a CPU run of about a minute); ``cifar10`` and
``imagenet``: the architectures of Carlini et al.'s CIFAR-10 and ImageNet setups (the model
specs are pipeline.models.factory's: a ``preset`` name refers to pipeline.models.presets).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class BenchmarkPreset:
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

BENCHMARK_PRESETS: dict[str, BenchmarkPreset] = {
    # Tiny ADM-style UNet + tiny ViT: a CPU run of about a minute.
    "small": BenchmarkPreset(
        denoiser={"adm_config": _SMALL_ADM, "schedule": _LINEAR_1000, "random_weights": True},
        classifier={"name": "vit_tiny_patch16_224", "num_classes": 10, "input_size": [3, 32, 32],
                    "model_kwargs": {"img_size": 32, "patch_size": 8, "depth": 2}, "random_weights": True},
        images=2, n0=8, n=56, cpu_batch_size=32, gpu_batch_size=256),
    # improved-diffusion CIFAR-10 32x32 + ViT-B/16 at 224 (Carlini et al.'s CIFAR-10 setup).
    "cifar10": BenchmarkPreset(
        denoiser={"preset": "iddpm-cifar10-uncond", "random_weights": True},
        classifier={"name": "vit_base_patch16_224", "num_classes": 10, "random_weights": True},
        images=2, n0=16, n=240, cpu_batch_size=8, gpu_batch_size=256),
    # guided-diffusion ImageNet 256x256 + BEiT-L/16 at 512 (Carlini et al.'s ImageNet setup).
    "imagenet": BenchmarkPreset(
        denoiser={"preset": "adm-imagenet256-uncond", "random_weights": True},
        classifier={"name": "beit_large_patch16_512", "num_classes": 1000, "random_weights": True},
        images=1, n0=8, n=56, cpu_batch_size=2, gpu_batch_size=32),
}
