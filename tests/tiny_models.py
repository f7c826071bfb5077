"""The tests' tiny models, from one place: real diffusers/timm architectures, random weights.

``TINY_DENOISER`` / ``TINY_CLASSIFIER`` are model specs (as in a config's ``models`` section)
for a 16x16 ADM-style UNet with learned variance and a 2-block ViT; :func:`tiny_model` builds
the denoise-and-classify model from them with a fixed seed.
"""
from __future__ import annotations

import torch

from pipeline.models.factory import DenoiseAndClassify, create_denoise_classify

TINY_DENOISER = {
    "adm_config": {"image_size": 16, "num_channels": 32, "num_res_blocks": 1, "attention_resolutions": "8",
                   "channel_mult": (1, 2), "num_head_channels": 16, "learn_sigma": True, "resblock_updown": True,
                   "use_scale_shift_norm": True},
    "schedule": {"beta_schedule": "linear", "num_train_timesteps": 1000},
    "random_weights": True,
}
TINY_CLASSIFIER = {"name": "vit_tiny_patch16_224", "num_classes": 10, "input_size": [3, 16, 16],
                   "model_kwargs": {"img_size": 16, "patch_size": 4, "depth": 2, "embed_dim": 48, "num_heads": 3},
                   "random_weights": True}


def tiny_model(seed: int = 0) -> DenoiseAndClassify:
    """The tiny denoise-and-classify model with random weights drawn from ``seed``."""
    torch.manual_seed(seed)
    return create_denoise_classify(TINY_DENOISER, TINY_CLASSIFIER)
