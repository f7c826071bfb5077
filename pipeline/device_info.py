"""What the compute device is: its name, its dense bf16 peak, and draining its queue before a clock reads."""
from __future__ import annotations

import re

import torch

# Dense bf16 tensor-core peak FLOP/s by GPU model (no sparsity); GH200 carries an H200-class GPU.
BF16_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def peak_bf16_flops(name: str) -> float | None:
    """The dense bf16 peak of the GPU called ``name`` (e.g. "NVIDIA H100 80GB HBM3"), None when unknown.

    A model number matches only whole (not followed by a digit): an "RTX A1000" is no A100.
    """
    return next((peak for model, peak in BF16_PEAK_FLOPS.items() if re.search(rf"{model}(?!\d)", name)), None)


def synchronize(device: torch.device) -> None:
    """Wait until the device has finished the work queued so far (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
