"""configs/small.yaml's models with random weights: tiny, seeded, written in seconds (tests, benchmarks).

:func:`write_small_models` writes a diffusers ``UNet2DModel`` folder (32x32, two levels) and a
timm ``test_vit`` state dict (10 classes, 32x32) as safetensors; the same bytes every time
(``torch.manual_seed(0)`` before building them).
"""
from __future__ import annotations

from pathlib import Path


def write_small_models(root: str | Path) -> tuple[Path, Path]:
    """configs/small.yaml's models with random weights under ``root``: (denoiser folder, classifier safetensors)."""
    import safetensors.torch
    import timm
    import torch
    from diffusers import UNet2DModel

    root = Path(root)
    torch.manual_seed(0)
    UNet2DModel(sample_size=32, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                down_block_types=("DownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "UpBlock2D")).save_pretrained(root / "denoiser")
    safetensors.torch.save_file(timm.create_model("test_vit", num_classes=10, img_size=32).state_dict(),
                                str(root / "classifier.safetensors"))
    return root / "denoiser", root / "classifier.safetensors"
