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
    """Decode, convert to RGB, then ``crop: center``: the pixels of torchvision's
    ``Resize(resize or resolution, interpolation) + CenterCrop(resolution)`` on the PIL image
    (the ImageNet protocols of Cohen et al. and Carlini et al.; PIL does the resampling in
    both): shorter side to ``resize``, longer side ``int(resize * long / short)``, crop offsets
    ``int(round((side - resolution) / 2))``. ``crop: none``: squash to resolution x resolution.
    """
    from PIL import Image

    method = getattr(Image.Resampling, interpolation.upper())
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        if crop == "none":
            return np.asarray(img.resize((resolution, resolution), method), dtype=np.uint8)
        short = resize or resolution
        w, h = img.size
        img = img.resize((short, int(short * h / w)) if w <= h else (int(short * w / h), short), method)
        w, h = img.size
        left, top = int(round((w - resolution) / 2.0)), int(round((h - resolution) / 2.0))
        return np.asarray(img.crop((left, top, left + resolution, top + resolution)), dtype=np.uint8)


def to_float_chw(images: Any, device: "torch.device | str" = "cpu") -> torch.Tensor:
    """uint8 [N, H, W, 3] (numpy or torch) -> float32 [N, 3, H, W] in [0, 1] on ``device``.

    The uint8 pixels travel to the device (4x less traffic than float) and are converted there.
    """
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    return x.to(device).permute(0, 3, 1, 2).float().div_(255)
