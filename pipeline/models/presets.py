"""Named denoisers: the architecture (original ADM hyperparameter names, as
pipeline.models.adm takes them) and the training schedule of published checkpoints."""
from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping

# guided-diffusion 256x256_diffusion_uncond.pt (Dhariwal & Nichol 2021), used for ImageNet.
ADM_IMAGENET256_UNCOND = MappingProxyType({
    "adm_config": MappingProxyType({
        "codebase": "guided-diffusion",
        "image_size": 256,
        "num_channels": 256,
        "num_res_blocks": 2,
        "attention_resolutions": "32,16,8",
        "channel_mult": (1, 1, 2, 2, 4, 4),
        "num_heads": 4,
        "num_head_channels": 64,
        "num_heads_upsample": -1,
        "learn_sigma": True,
        "resblock_updown": True,
        "use_scale_shift_norm": True,
        "dropout": 0.0,
        "use_new_attention_order": False,
        "class_cond": False,
    }),
    "schedule": MappingProxyType({
        "beta_schedule": "linear", "num_train_timesteps": 1000,
        "prediction_type": "epsilon", "rescale_timesteps": False,
    }),
})

# improved-diffusion cifar10_uncond_50M_500K.pt (Nichol & Dhariwal 2021), used for CIFAR-10.
IDDPM_CIFAR10_UNCOND = MappingProxyType({
    "adm_config": MappingProxyType({
        "codebase": "improved-diffusion",
        "image_size": 32,
        "num_channels": 128,
        "num_res_blocks": 3,
        "attention_resolutions": "16,8",
        "channel_mult": (1, 2, 2, 2),
        "num_heads": 4,
        "num_head_channels": -1,
        "num_heads_upsample": -1,
        "learn_sigma": True,
        "resblock_updown": False,
        "use_scale_shift_norm": True,
        "dropout": 0.3,
        "use_new_attention_order": False,
        "class_cond": False,
    }),
    "schedule": MappingProxyType({
        "beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 4000,
        "prediction_type": "epsilon", "rescale_timesteps": True,
    }),
})

PRESETS: Mapping[str, Mapping[str, Mapping[str, Any]]] = MappingProxyType({
    "adm-imagenet256-uncond": ADM_IMAGENET256_UNCOND,
    "iddpm-cifar10-uncond": IDDPM_CIFAR10_UNCOND,
})


def preset(name: str) -> Mapping[str, Mapping[str, Any]]:
    """The preset called ``name`` (keys ``adm_config`` and ``schedule``); KeyError lists the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown denoiser preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None
