"""Image conversions shared by the certification, fine-tuning, demo and benchmark code.

* :func:`resize_image`: encoded bytes -> uint8 [R, R, 3] RGB at the certification resolution.
* :func:`to_float_chw`: uint8 [N, H, W, 3] (numpy or torch) -> float32 [N, 3, H, W] in [0, 1]
  on a device; the one place where pixels become the [0, 1] units of DESIGN section 3.
"""
from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch


def resize_image(data: bytes, resolution: int, resize: int | None, crop: str, interpolation: str) -> np.ndarray:
    """Decode, convert to RGB, resize (shorter side to ``resize``) and centre-crop to a square."""
    from PIL import Image

    method = getattr(Image.Resampling, interpolation.upper())
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        if crop == "none":
            img = img.resize((resolution, resolution), method)
        else:
            short = resize or resolution
            w, h = img.size
            scale = short / min(w, h)
            img = img.resize((max(short, round(w * scale)), max(short, round(h * scale))), method)
            w, h = img.size
            left, top = (w - resolution) // 2, (h - resolution) // 2
            img = img.crop((left, top, left + resolution, top + resolution))
        return np.asarray(img, dtype=np.uint8)


def to_float_chw(images: Any, device: "torch.device | str" = "cpu") -> torch.Tensor:
    """uint8 [N, H, W, 3] (numpy or torch) -> float32 [N, 3, H, W] in [0, 1] on ``device``.

    The uint8 pixels travel to the device (4x less traffic than float) and are converted there.
    """
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    return x.to(device).permute(0, 3, 1, 2).float().div_(255)
