"""Off-the-shelf classifier f: a timm model with its own input size and normalisation.

Weights come from a URI (safetensors or a flat state dict, read without arbitrary unpickling)
or, when the spec asks for ``pretrained``, from timm's weights already in the local
Hugging Face / torch hub cache; nothing is downloaded from a model hub here.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlparse

import huggingface_hub
import timm
import timm.data
import torch
import torch.nn.functional as F

from pipeline.storage import fetch_to_cache, load_state_dict_strict, read_state_dict

SPEC_KEYS = frozenset({"name", "num_classes", "uri", "pretrained", "model_kwargs", "input_size"})
FOLDER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
ANTIALIAS_MODES = ("bicubic", "bilinear")


class Classifier(torch.nn.Module):
    """Images in [0,1] of any size -> logits [B, num_classes].

    Resizes (antialiased, ``interpolation`` if bilinear, else bicubic) to ``input_size`` when
    the size differs, then normalises with the model's mean/std. ``weight_files`` maps the
    loaded weight files' URIs to their local paths.
    """

    def __init__(self, model: torch.nn.Module, num_classes: int, input_size: tuple[int, int],
                 mean: tuple[float, ...], std: tuple[float, ...], interpolation: str = "bicubic") -> None:
        super().__init__()
        self.model = model
        self.num_classes = num_classes
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.interpolation = interpolation if interpolation in ANTIALIAS_MODES else "bicubic"
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1), persistent=False)
        self.weight_files: dict[str, str] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode=self.interpolation, antialias=True, align_corners=False)
        return self.model((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))


def load_classifier(spec: Mapping[str, Any], cache_dir: str | None = None) -> Classifier:
    """A :class:`Classifier` from ``spec``.

    Keys: name (timm), num_classes, uri (weights: .safetensors, a state dict .pt/.pth/.bin, or a
    folder holding model.safetensors / pytorch_model.bin), pretrained (timm's weights, only from
    the local cache), model_kwargs (for timm.create_model), input_size ([3, H, W]; else
    model_kwargs.img_size, else timm's data config). Without uri or pretrained the weights are
    random. A state dict that does not fit fails naming the keys. Returned in eval mode.
    """
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise ValueError(f"unknown classifier spec keys {sorted(unknown)}; allowed: {sorted(SPEC_KEYS)}")
    name, uri, kwargs = spec["name"], spec.get("uri"), dict(spec.get("model_kwargs") or {})
    if spec.get("num_classes") is not None:
        kwargs["num_classes"] = int(spec["num_classes"])
    if uri and spec.get("pretrained"):
        raise ValueError("give the classifier either a weights uri or pretrained: true, not both")
    model = timm.create_model(name, pretrained=False, **kwargs)
    weight_files: dict[str, str] = {}
    if uri:
        local = fetch_to_cache(uri, cache_dir)
        path = _weights_path(local)
        load_state_dict_strict(model, read_state_dict(path), path)
        weight_files[uri if path == local else f"{uri.rstrip('/')}/{os.path.basename(path)}"] = path
    elif spec.get("pretrained"):
        path, source = _cached_pretrained(model.pretrained_cfg, name)
        overlay = {"state_dict": read_state_dict(path), "custom_load": False}
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
        weight_files[source] = path
    config = timm.data.resolve_model_data_config(model)
    size = spec.get("input_size") or _img_size(kwargs.get("img_size")) or config["input_size"]
    classifier = Classifier(model, model.num_classes, tuple(size[-2:]), config["mean"], config["std"],
                            config.get("interpolation", "bicubic"))
    classifier.weight_files.update(weight_files)
    return classifier.eval()


def _img_size(img_size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if img_size is None:
        return None
    return (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)


def _weights_path(local: str) -> str:
    """The weights file itself, or the standard one inside a folder."""
    if not os.path.isdir(local):
        return local
    for name in FOLDER_WEIGHTS:
        if os.path.isfile(os.path.join(local, name)):
            return os.path.join(local, name)
    raise FileNotFoundError(f"{local} holds none of {FOLDER_WEIGHTS}")


def _cached_pretrained(pretrained_cfg: Mapping[str, Any], name: str) -> tuple[str, str]:
    """(local path, source) of timm's pretrained weights for ``name`` if the Hugging Face hub
    cache or the torch hub cache already holds them; FileNotFoundError otherwise."""
    hub_id = pretrained_cfg.get("hf_hub_id")
    if hub_id:
        repo, _, revision = hub_id.partition("@")
        filenames = [pretrained_cfg["hf_hub_filename"]] if pretrained_cfg.get("hf_hub_filename") else FOLDER_WEIGHTS
        for filename in filenames:
            path = huggingface_hub.try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(path, str):
                return path, f"hf://{repo}/{filename}"
    url = pretrained_cfg.get("url")
    if url and not url.endswith(".npz"):
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))
        if os.path.isfile(path):
            return path, url
    raise FileNotFoundError(
        f"pretrained weights for timm model {name!r} ({hub_id or url or 'no source'}) are not in the local "
        f"cache ({huggingface_hub.constants.HF_HUB_CACHE}, {torch.hub.get_dir()}); nothing is downloaded at run "
        "time: fetch them once (timm.create_model(name, pretrained=True) with network access) or give a weights uri")
