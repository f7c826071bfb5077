"""Smoke test of a protocol's real architectures: random weights, one denoise-and-classify pass.

    python -m jobs.smoke_protocols --config configs/protocols/carlini-imagenet.yaml [--set key=value]

Builds the config's denoiser and classifier with random weights (``models.*.uri`` null,
``models.*.random_weights`` true) for the config's ``data.resolution`` (the factory checks the
denoiser placement), runs one forward pass on ``compute.images_per_call`` uniform images (one
noisy sample each, sigma = the config's largest) on the GPU when there is one, and prints as JSON:
the seconds to build, the seconds per sample of that pass, the logits' shape, the UNet's input
side and the peak memory (the process's max RSS; the CUDA allocator's peak on a GPU). Run one
protocol per process: max RSS only grows.
"""
from __future__ import annotations

import resource
import sys
import time
from typing import Any, Sequence

import torch

from jobs.cli import run_config_job
from pipeline.config import Config, load_config
from pipeline.models.factory import create_denoise_classify

RANDOM_WEIGHTS = ("models.denoiser.uri=null", "models.denoiser.random_weights=true",
                  "models.classifier.uri=null", "models.classifier.pretrained=false",
                  "models.classifier.random_weights=true")


def load(path: str, overrides: Sequence[str]) -> Config:
    return load_config(path, [*RANDOM_WEIGHTS, *overrides])


def smoke(cfg: Config) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    torch.manual_seed(0)
    model = create_denoise_classify(cfg.models["denoiser"], cfg.models["classifier"], cfg.models["cache_dir"],
                                    resolution=cfg.data["resolution"]).to(device)
    built = time.perf_counter() - started
    side, count = cfg.data["resolution"], cfg.compute["images_per_call"]
    unet_sides: list[int] = []
    model.denoiser.unet.register_forward_hook(lambda module, args, out: unet_sides.append(args[0].shape[-1]))
    x = torch.rand(count, 3, side, side, generator=torch.Generator().manual_seed(0)).to(device)
    sigma = torch.tensor(max(cfg.smoothing["sigmas"]), device=device)
    with torch.inference_mode():
        started = time.perf_counter()
        logits = model((x + sigma * torch.randn_like(x)), sigma)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _max_rss_bytes()
    return {"config": cfg.output["run_id"], "device": str(device), "torch_threads": torch.get_num_threads(),
            "resolution": side, "unet_input_side": unet_sides[0], "logits_shape": list(logits.shape),
            "build_seconds": round(built, 2), "seconds_per_sample": round(seconds / count, 3),
            "peak_memory_gib": round(peak / 2**30, 2)}


def _max_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def main(argv: Sequence[str] | None = None) -> int:
    return run_config_job(argv, "Build a protocol's models with random weights and time one forward pass.",
                          "compute.images_per_call=1", load, smoke)


if __name__ == "__main__":
    sys.exit(main())
