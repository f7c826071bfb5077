"""Cohen et al. (2019)'s classifier checkpoints (github.com/locuslab/smoothing).

Their ``train.py`` saves ``torch.save({'epoch', 'arch', 'state_dict', 'optimizer'})`` of the model
``architectures.get_architecture`` builds: ``Sequential(NormalizeLayer(mean, std),
DataParallel(torchvision resnet50()))``. The weights' names therefore carry the prefix
``1.module.``; the NormalizeLayer (``datasets.py``) keeps its mean and std as plain attributes,
outside the state dict, and standardises the noisy image in [0,1]: noise is added before it.

:func:`read_cohen_checkpoint` reads such a file with ``torch.load(weights_only=True)`` (no
arbitrary unpickling: a checkpoint that needs more is refused) and returns the inner model's
state dict under timm's names (timm's ``resnet50`` names its parameters as torchvision's).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from pipeline.storage import load_torch_checkpoint

# datasets.py: _IMAGENET_MEAN, _IMAGENET_STDDEV (the NormalizeLayer of every ImageNet model)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PREFIX = "1.module."  # Sequential index 1 (after the NormalizeLayer), then DataParallel's module


def read_cohen_checkpoint(path: str, name: str) -> dict[str, torch.Tensor]:
    """The state dict of the classifier in Cohen et al.'s checkpoint ``path``, keys without
    ``1.module.``, on the CPU. ValueError, naming the file, when the file holds an object that
    :func:`pipeline.storage.load_torch_checkpoint` refuses (``weights_only``), is not a dict with a
    ``state_dict`` of tensors, records an ``arch`` other than ``name``, or holds a key without
    the prefix."""
    checkpoint = load_torch_checkpoint(path)
    state = checkpoint.get("state_dict") if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a Cohen et al. checkpoint: no 'state_dict' of tensors "
                         "(expected a dict with 'epoch', 'arch', 'state_dict', 'optimizer')")
    if checkpoint.get("arch") != name:
        raise ValueError(f"{path} holds arch {checkpoint.get('arch')!r}, the classifier's name is {name!r} "
                         "(Cohen et al.'s ImageNet models are resnet50)")
    foreign = sorted(k for k in state if not k.startswith(PREFIX))
    if foreign:
        raise ValueError(f"{path}: state_dict keys without the prefix {PREFIX!r} of "
                         f"Sequential(NormalizeLayer, DataParallel(model)): {', '.join(foreign[:5])}")
    return {k[len(PREFIX):]: v for k, v in state.items()}
