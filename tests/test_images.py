"""Image decoding (issue 11, items 4 and 14): every pixel mode Pillow opens becomes the right 8-bit
RGB or an :class:`ImageError`; an image with too many pixels is refused before it is decoded. The
decoder records both as the image's own error record."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

import pipeline.images as images
from pipeline.images import ImageError, pixel_limit, resize_image
from pipeline.shards import decode_batch

SIDE = 6
# 16-bit samples spanning the range: high bytes 0, 85, 170, 255, with low bytes that clipping or
# truncation would expose.
SAMPLES16 = np.array([0, 85 * 257, 170 * 257 + 200, 65535, 1000, 40000], dtype=np.uint16)
GRAY16 = np.tile(SAMPLES16, (SIDE, 1))
EXPECTED8 = (GRAY16 >> 8).astype(np.uint8)


def as_is(data: bytes) -> np.ndarray:
    """resize_image at the image's own size without a crop: the decoded RGB pixels unchanged."""
    return resize_image(data, SIDE, None, "none", "nearest")


def saved(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def png16(samples: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG (Pillow writes only grayscale at 16 bits): color_type 0 gray, 2 RGB, 4 gray+alpha, 6 RGBA."""
    h, w = samples.shape[:2]
    raw = b"".join(b"\x00" + samples[y].astype(">u2").tobytes() for y in range(h))
    return png_chunks(w, h, 16, color_type, zlib.compress(raw))


def png_chunks(w: int, h: int, depth: int, color_type: int, idat: bytes) -> bytes:
    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))
    header = struct.pack(">IIBBBBB", w, h, depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def rgb_of(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=-1)


SIXTEEN_BIT = {
    "I;16 PNG": lambda: saved(Image.fromarray(GRAY16), "PNG"),
    "I;16 TIFF": lambda: saved(Image.fromarray(GRAY16), "TIFF"),
    "I;16B TIFF": lambda: saved(Image.frombytes("I;16B", (SIDE, SIDE), GRAY16.astype(">u2").tobytes()), "TIFF"),
    "16-bit PGM (mode I)": lambda: f"P5 {SIDE} {SIDE} 65535\n".encode() + GRAY16.astype(">u2").tobytes(),
    "16-bit gray PNG": lambda: png16(GRAY16, 0),
    "16-bit RGB PNG": lambda: png16(rgb_of(GRAY16), 2),
    "16-bit RGBA PNG": lambda: png16(np.concatenate([rgb_of(GRAY16), GRAY16[..., None] * 0], -1), 6),
    "16-bit gray+alpha PNG": lambda: png16(np.stack([GRAY16, GRAY16 * 0 + 7], -1), 4),
}


@pytest.mark.parametrize("name", SIXTEEN_BIT)
def test_16_bit_samples_keep_their_scale(name):
    """A 16-bit sample v becomes v >> 8 whatever the container (Pillow's own reading of 16-bit RGB
    PNGs): 85 * 257 is 85, not the 255 of Pillow's saturating I;16 -> RGB conversion."""
    out = as_is(SIXTEEN_BIT[name]())
    assert out.dtype == np.uint8 and out.shape == (SIDE, SIDE, 3)
    np.testing.assert_array_equal(out, rgb_of(EXPECTED8))


def test_a_16_bit_photograph_keeps_its_mean():
    """The issue's reproduction: a 16-bit grayscale PNG of mean 85 (8-bit) is certified at mean 85."""
    rng = np.random.default_rng(0)
    gray = (rng.integers(0, 171, (64, 64)) * 257).astype(np.uint16)
    out = resize_image(saved(Image.fromarray(gray), "PNG"), 32, None, "center", "bicubic")
    assert abs(out.mean() - (gray >> 8).mean()) < 2


def eight_bit_images() -> dict[str, tuple[bytes, np.ndarray]]:
    """Encoded images of every 8-bit mode a file can hold, with the RGB they must decode to."""
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
    gray = rgb[..., 0]
    alpha = np.where(rng.random((SIDE, SIDE)) < 0.5, 0, 255).astype(np.uint8)
    palette = Image.fromarray(rgb).quantize(8)
    with_transparency = palette.copy()
    with_transparency.info["transparency"] = 3
    cases = {
        "1": Image.fromarray(gray > 127).convert("1"),
        "L": Image.fromarray(gray),
        "LA": Image.merge("LA", [Image.fromarray(gray), Image.fromarray(alpha)]),
        "P": palette,
        "P with transparency": with_transparency,
        "RGB": Image.fromarray(rgb),
        "RGBA": Image.merge("RGBA", [*Image.fromarray(rgb).split(), Image.fromarray(alpha)]),
    }
    out = {}
    for name, img in cases.items():
        data = saved(img, "PNG", **({"transparency": 3} if name == "P with transparency" else {}))
        out[f"{name} PNG"] = (data, np.asarray(img.convert("RGB")))
    cmyk = Image.fromarray(rgb).convert("CMYK")
    out["CMYK TIFF"] = (saved(cmyk, "TIFF"), np.asarray(cmyk.convert("RGB")))
    ycbcr = Image.fromarray(rgb).convert("YCbCr")
    out["YCbCr TIFF"] = (saved(ycbcr, "TIFF"), np.asarray(ycbcr.convert("RGB")))
    lab = Image.fromarray(rgb).convert("LAB")
    out["LAB TIFF"] = (saved(lab, "TIFF"), np.asarray(lab.convert("RGB")))
    pa = Image.merge("PA", [palette, Image.fromarray(alpha)])
    pa.putpalette(palette.getpalette())
    out["PA TIFF"] = (saved(pa, "TIFF"), np.asarray(pa.convert("RGB")))
    return out


EIGHT_BIT = eight_bit_images()


@pytest.mark.parametrize("name", EIGHT_BIT)
def test_eight_bit_modes_are_converted_by_pillow(name):
    """Alpha is dropped and the colour under it kept, as torchvision's loader (``convert("RGB")``)."""
    data, expected = EIGHT_BIT[name]
    with Image.open(io.BytesIO(data)) as img:
        assert img.mode == name.split()[0]
    np.testing.assert_array_equal(as_is(data), expected)


@pytest.mark.parametrize("name, data, mode", [
    ("float TIFF", lambda: saved(Image.fromarray(GRAY16.astype(np.float32)), "TIFF"), "F"),
    ("32-bit integer TIFF", lambda: saved(Image.fromarray(GRAY16.astype(np.int32)), "TIFF"), "I"),
])
def test_modes_without_an_8_bit_scale_are_refused(name, data, mode):
    with pytest.raises(ImageError, match=rf"pixel mode {mode} \(TIFF\) has no defined 8-bit RGB scale"):
        as_is(data())


def bomb(side: int) -> bytes:
    """A side x side 8-bit gray PNG of zeros: a few hundred KB that decode to side^2 bytes."""
    compressor = zlib.compressobj(9)
    row = bytes(side + 1)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    return png_chunks(side, side, 8, 0, idat)


def test_a_decompression_bomb_is_refused_before_decoding(monkeypatch):
    """The issue's 12000 x 12000 PNG (about 140 KB): refused from its header, no pixel decoded."""
    data = bomb(12000)
    assert len(data) < 200_000

    def decoded(self, *args, **kwargs):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", decoded)
    with pytest.raises(ImageError, match=r"12000 x 12000 = 144000000 pixels exceeds the 67108864 pixels admitted "
                                         r"at resolution 224"):
        resize_image(data, 224, 256, "center", "bicubic")


def test_the_pixel_limit_grows_with_the_resolution():
    assert pixel_limit(32) == pixel_limit(224) == 8192 * 8192
    assert pixel_limit(2048) == 64 * 2048 * 2048


def test_an_image_at_the_limit_is_decoded_one_pixel_more_is_refused(monkeypatch):
    monkeypatch.setattr(images, "MIN_PIXEL_LIMIT", 40 * 30)
    ok = saved(Image.fromarray(np.zeros((30, 40), np.uint8)), "PNG")
    assert resize_image(ok, 4, None, "center", "bilinear").shape == (4, 4, 3)
    with pytest.raises(ImageError, match="1230 pixels exceeds the 1200 pixels"):
        resize_image(saved(Image.fromarray(np.zeros((30, 41), np.uint8)), "PNG"), 4, None, "center", "bilinear")


def test_a_large_photograph_is_admitted():
    """A 24-megapixel camera image at the ImageNet resolution is certified as usual."""
    data = saved(Image.fromarray(np.full((4000, 6000, 3), 90, np.uint8)), "JPEG", quality=50)
    out = resize_image(data, 224, 256, "center", "bicubic")
    assert out.shape == (224, 224, 3) and abs(int(out.mean()) - 90) <= 2


def test_the_decoder_records_refused_images_as_their_own_errors():
    """ImageError is the image's fault: an error record, while the other images are certified."""
    batch = {"image_id": np.array(["bomb", "float", "ok"], dtype=object),
             "image": np.array([bomb(12000), saved(Image.fromarray(GRAY16.astype(np.float32)), "TIFF"),
                                saved(Image.fromarray(GRAY16), "PNG")], dtype=object),
             "label": np.array([1, 2, 3]), "path": np.array(["s.parquet"] * 3, dtype=object)}
    errors = []
    out = decode_batch(batch, fmt="parquet", columns={"image_id": "image_id", "image": "image", "label": "label"},
                       data_cfg={"resolution": SIDE, "resize": None, "crop": "none", "interpolation": "nearest"},
                       sigmas=(0.25,), keep=lambda _: np.array([True]), on_error=lambda *e: errors.append(e))
    assert out["image_id"].tolist() == ["ok"]
    np.testing.assert_array_equal(out["image"][0], rgb_of(EXPECTED8))
    assert [e[0] for e in errors] == ["bomb", "float"]
    assert all(e[2].startswith("ImageError: ") for e in errors)
