"""Image conversions shared by the certification, fine-tuning, demo and benchmark code.

* :func:`resize_image`: encoded bytes -> uint8 [R, R, 3] RGB at the certification resolution;
  :class:`ImageError` for an image that cannot be (too many pixels, a mode without an 8-bit scale).
* :func:`to_float_chw`: uint8 [N, H, W, 3] (numpy or torch) -> float32 [N, 3, H, W] in [0, 1]
  on a device; the one place where pixels become the [0, 1] units of DESIGN section 3.
"""
from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch
    from PIL import Image


class ImageError(ValueError):
    """An image that cannot be certified as it is (more pixels than :func:`pixel_limit`, a pixel
    mode with no defined 8-bit scale): the image's own fault, recorded as its error record."""


# Decoded pixels admitted per image: max(PIXELS_PER_OUTPUT_PIXEL * resolution**2, MIN_PIXEL_LIMIT),
# checked on the header's size before any pixel is decoded. 64 output pixels per certified pixel
# admits an image 8x the resolution on each side; the floor (8192 x 8192 = 67 MP) admits camera
# photographs of any size in use (ImageNet's are far smaller). A 12000 x 12000 PNG (144 MP, a
# 140 KB decompression bomb) is refused at every resolution below 1500.
PIXELS_PER_OUTPUT_PIXEL = 64
MIN_PIXEL_LIMIT = 8192 * 8192

# Pillow's modes holding samples of more than 8 bits, read as unsigned 16-bit values whose high
# byte is the 8-bit value (as Pillow itself reads 16-bit RGB and RGBA PNGs). Mode I is 32-bit
# signed; it holds 16-bit samples only for the formats listed (PPM/PGM with maxval > 255, scaled
# by Pillow to 0..65535; 16-bit grayscale PNG in older Pillow versions); elsewhere (a 32-bit
# TIFF) it has no defined 8-bit scale and is refused, as is mode F (floating-point pixels).
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
SIXTEEN_BIT_I_FORMATS = ("PNG", "PPM")
# Modes that Pillow converts to RGB itself. Alpha (LA, PA, RGBA, RGBa, P with transparency) is
# dropped and the colour under it kept, as torchvision's image loader (``convert("RGB")``) does for
# the published protocols.
RGB_CONVERTIBLE_MODES = ("1", "L", "P", "PA", "LA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")


def pixel_limit(resolution: int) -> int:
    """The most pixels an image may decode to when certified at ``resolution``."""
    return max(PIXELS_PER_OUTPUT_PIXEL * resolution * resolution, MIN_PIXEL_LIMIT)


def open_image(data: bytes, resolution: int) -> "Image.Image":
    """Encoded bytes -> a PIL image (header read, pixels not yet decoded) whose size is within
    :func:`pixel_limit`; :class:`ImageError` otherwise, before any pixel is decoded."""
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # Pillow's own limit, 2 * Image.MAX_IMAGE_PIXELS
        raise ImageError(str(exc)) from exc
    w, h = img.size
    if w * h > pixel_limit(resolution):
        img.close()
        raise ImageError(f"{w} x {h} = {w * h} pixels exceeds the {pixel_limit(resolution)} pixels admitted "
                         f"at resolution {resolution} (max({PIXELS_PER_OUTPUT_PIXEL} * resolution^2, "
                         f"{MIN_PIXEL_LIMIT}); a decompression bomb or an image to downscale first)")
    return img


def to_rgb(img: "Image.Image") -> "Image.Image":
    """Any mode Pillow opens -> 8-bit RGB with the image's own scale: 16-bit samples keep their
    high byte (65535 -> 255, not Pillow's saturating ``convert``, which clips values > 255);
    modes without a defined 8-bit scale are :class:`ImageError` naming the mode."""
    from PIL import Image

    if img.mode in SIXTEEN_BIT_MODES or (img.mode == "I" and img.format in SIXTEEN_BIT_I_FORMATS):
        samples = np.asarray(img).astype(np.uint32)  # I;16B arrives big-endian: astype makes it native
        return Image.fromarray((samples >> 8).astype(np.uint8)).convert("RGB")
    if img.mode not in RGB_CONVERTIBLE_MODES:
        raise ImageError(f"pixel mode {img.mode} ({img.format}) has no defined 8-bit RGB scale; "
                         f"convert the image to 8- or 16-bit RGB or grayscale")
    return img.convert("RGB")


def resize_image(data: bytes, resolution: int, resize: int | None, crop: str, interpolation: str) -> np.ndarray:
    """Decode (:func:`open_image`: at most :func:`pixel_limit` pixels), convert to RGB
    (:func:`to_rgb`: 16-bit samples scaled, not clipped), then ``crop: center``: the pixels of
    torchvision's ``Resize(resize or resolution, interpolation) + CenterCrop(resolution)`` on
    the PIL image (the ImageNet protocols of Cohen et al. and Carlini et al.; PIL does the
    resampling in both): shorter side to ``resize``, longer side ``int(resize * long / short)``,
    crop offsets ``int(round((side - resolution) / 2))``. ``crop: none``: squash to
    resolution x resolution. An image that cannot be used raises :class:`ImageError` (or PIL's
    own ``OSError`` for undecodable bytes): the image's fault, never a bug.
    """
    from PIL import Image

    method = getattr(Image.Resampling, interpolation.upper())
    with open_image(data, resolution) as img:
        img = to_rgb(img)
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
