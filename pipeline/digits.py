"""The demo's data and committed files: scikit-learn's bundled handwritten digits as images and shards.

Guarantees:
* :func:`digits_split` is deterministic: the same stratified train/test split (seed 0,
  360 test images) every time, upsampled bilinearly from 8x8 to ``SIZE``x``SIZE``, replicated
  to RGB and quantised to 8 bits, so the arrays equal the PNGs :func:`write_image_folder`
  writes (what the certification pipeline reads).
* :func:`write_digit_shards` writes one split as PNGs in class folders, then as Parquet shards
  (pipeline.shard_writer), so labels travel through the same path as any image folder's.
* ``DEMO_CONFIG`` / ``DEMO_MODELS`` are the demo's committed certification config and models
  (classifier, denoiser and the denoiser fine-tuned for the cascade, all trained by
  ``python -m jobs.train_demo``); ``DEMO_RADII`` the radii of its tables.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.shard_writer import make_shards

REPO = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
DEMO_MODELS = REPO / "configs" / "demo" / "models"   # classifier.safetensors, denoiser/, denoiser-finetuned/
DEMO_RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5)

SIZE = 16                      # certification resolution (digits are 8x8)
NUM_CLASSES = 10
TEST_SIZE = 360
SEED = 0


def digits_split(size: int = SIZE, test_size: int = TEST_SIZE, seed: int = SEED
                 ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train"|"test": (images uint8 [N, size, size, 3], labels int64 [N])}, stratified, deterministic."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]  # [N,1,8,8] in [0,1]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).permute(0, 2, 3, 1)
    images, labels = x.contiguous().numpy(), digits.target.astype(np.int64)
    idx_train, idx_test = train_test_split(np.arange(len(labels)), test_size=test_size,
                                           stratify=labels, random_state=seed)
    return {"train": (images[idx_train], labels[idx_train]), "test": (images[idx_test], labels[idx_test])}


def write_image_folder(images: np.ndarray, labels: np.ndarray, root: str | Path, prefix: str = "digit") -> Path:
    """PNG files in ImageNet layout: ``{root}/{label}/{prefix}_{index:04d}.png``; returns root."""
    from PIL import Image

    root = Path(root)
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = root / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{prefix}_{i:04d}.png")
    return root


def write_digit_shards(split: str, images_dir: str | Path, shards_dir: str | Path, shard_size: int,
                       prefix: str = "digit") -> str:
    """One split of :func:`digits_split` as PNGs in ``images_dir``, then Parquet shards of
    ``shard_size`` images in ``shards_dir``; returns the shards' ``file://`` URI."""
    images, labels = digits_split()[split]
    folder = write_image_folder(images, labels, images_dir, prefix=prefix)
    uri = Path(shards_dir).resolve().as_uri()
    make_shards(str(folder), uri, fmt="parquet", shard_size=shard_size)
    return uri
