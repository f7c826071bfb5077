"""Off-the-shelf classifier f: a timm model with its own input size and normalisation.

Weights come from exactly one source: a URI (safetensors or a flat state dict, read without
arbitrary unpickling), ``pretrained`` (timm's weights already in the local Hugging Face /
torch hub cache; nothing is downloaded from a model hub here) or ``random_weights``.

``format`` says how a URI's weights are laid out: ``timm`` (default: a timm state dict for the
model ``name``), ``hf-vit`` (a Hugging Face transformers ``ViTForImageClassification``
``save_pretrained`` folder, converted into the timm VisionTransformer ``name`` by
:mod:`pipeline.models.hf_vit`, with the checkpoint's layer-norm eps and image-processor
normalisation; e.g. Carlini et al.'s CIFAR-10 ViT-B/16 with ``name: vit_base_patch16_224``) or
``cohen`` (Cohen et al.'s ``checkpoint.pth.tar``, read by :mod:`pipeline.models.cohen` into the
timm model ``name``, e.g. ``resnet50``, normalised with their ImageNet NormalizeLayer's mean/std) or
``jeong-shin-clip`` (Jeong & Shin's fine-tuned CLIP ViT, ``name: CLIP_B16``: their checkpoint's
``model_ema`` state dict, converted by :mod:`pipeline.models.clip_vit`, fed [-1, 1]).
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from functools import partial
from typing import Any
from urllib.parse import urlparse

import huggingface_hub
import timm
import timm.data
import torch
import torch.nn.functional as F

from pipeline.models.clip_vit import (INPUT_MEAN, INPUT_STD, create_clip_vit, jeong_shin_to_timm_state_dict,
                                      read_jeong_shin_checkpoint)
from pipeline.models.cohen import IMAGENET_MEAN, IMAGENET_STD, read_cohen_checkpoint
from pipeline.models.hf_vit import check_architecture, hf_vit_to_timm_state_dict, read_hf_vit_folder
from pipeline.storage import fetch_to_cache, load_state_dict_strict, read_state_dict

SPEC_KEYS = frozenset({"name", "num_classes", "format", "uri", "per_sigma", "pretrained", "random_weights",
                       "model_kwargs", "input_size"})
FORMATS = ("timm", "hf-vit", "cohen", "jeong-shin-clip")
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

    Keys: name (timm; jeong-shin-clip: CLIP_B16), num_classes, format (timm | hf-vit | cohen |
    jeong-shin-clip, module docstring), and exactly one weight source: uri (timm: .safetensors, a
    state dict .pt/.pth/.bin, or a folder holding model.safetensors / pytorch_model.bin; hf-vit: a
    transformers folder; cohen: their checkpoint.pth.tar; jeong-shin-clip: their checkpoint, see
    :func:`pipeline.models.clip_vit.read_jeong_shin_checkpoint`), pretrained (timm's weights, only
    from the local cache; timm format) or random_weights. model_kwargs (for timm.create_model;
    jeong-shin-clip: sizes only), input_size ([3, H, W]; else model_kwargs.img_size, else timm's
    data config, or for hf-vit and jeong-shin-clip the model's image size). A state dict that does
    not fit fails naming the keys. ``per_sigma`` (one classifier per sigma) is refused here: the factory builds those
    (:func:`pipeline.models.factory.create_denoise_classify`). Returned in eval mode.
    """
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise ValueError(f"unknown classifier spec keys {sorted(unknown)}; allowed: {sorted(SPEC_KEYS)}")
    if spec.get("per_sigma") is not None:
        raise ValueError("classifier per_sigma: one classifier per sigma is built by "
                         "pipeline.models.factory.create_denoise_classify, not load_classifier")
    name, uri, kwargs = spec["name"], spec.get("uri"), dict(spec.get("model_kwargs") or {})
    fmt = spec.get("format") or "timm"
    if fmt not in FORMATS:
        raise ValueError(f"classifier format {fmt!r}; known: {', '.join(FORMATS)}")
    if spec.get("num_classes") is not None:
        kwargs["num_classes"] = int(spec["num_classes"])
    if [bool(uri), bool(spec.get("pretrained")), bool(spec.get("random_weights"))].count(True) != 1:
        raise ValueError("give the classifier exactly one of a weights uri, pretrained: true and random_weights: true")
    if fmt == "hf-vit":
        return _load_hf_vit(name, kwargs, uri, bool(spec.get("pretrained")), spec.get("input_size"), cache_dir)
    if fmt == "jeong-shin-clip":
        return _load_jeong_shin_clip(name, kwargs, uri, bool(spec.get("pretrained")), spec.get("input_size"), cache_dir)
    if fmt == "cohen" and spec.get("pretrained"):
        raise ValueError("classifier: pretrained (timm's cached weights) does not apply to format cohen; "
                         "give the checkpoint's uri")
    model = timm.create_model(name, pretrained=False, **kwargs)
    weight_files: dict[str, str] = {}
    if uri:
        local = fetch_to_cache(uri, cache_dir)
        path = _weights_path(local)
        state = read_cohen_checkpoint(path, name) if fmt == "cohen" else read_state_dict(path)
        load_state_dict_strict(model, state, path)
        weight_files[uri if path == local else f"{uri.rstrip('/')}/{os.path.basename(path)}"] = path
    elif spec.get("pretrained"):
        path, source = _cached_pretrained(model.pretrained_cfg, name)
        overlay = {"state_dict": read_state_dict(path), "custom_load": False}
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
        weight_files[source] = path
    config = timm.data.resolve_model_data_config(model)
    size = spec.get("input_size") or _img_size(kwargs.get("img_size")) or config["input_size"]
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if fmt == "cohen" else (config["mean"], config["std"])
    classifier = Classifier(model, model.num_classes, tuple(size[-2:]), mean, std,
                            config.get("interpolation", "bicubic"))
    classifier.weight_files.update(weight_files)
    return classifier.eval()


def _load_hf_vit(name: str, kwargs: dict[str, Any], uri: str | None, pretrained: bool,
                 input_size: list[int] | None, cache_dir: str | None) -> Classifier:
    """Format hf-vit: the timm VisionTransformer ``name`` with the checkpoint's layer-norm eps,
    filled from a transformers folder at ``uri`` (else random weights, transformers' ViT
    defaults for eps and normalisation); inputs resized bicubic (antialiased) to its image
    size, as Carlini et al. feed the transformers model."""
    if pretrained:
        raise ValueError("classifier: pretrained (timm's cached weights) does not apply to format hf-vit; "
                         "give the transformers folder's uri")
    local = fetch_to_cache(uri, cache_dir) if uri else None
    hf = read_hf_vit_folder(local)
    kwargs = {"norm_layer": partial(torch.nn.LayerNorm, eps=float(hf.config["layer_norm_eps"])), **kwargs}
    model = timm.create_model(name, pretrained=False, **kwargs)
    check_architecture(model, hf, local or "transformers' ViT defaults")
    classifier = Classifier(model, model.num_classes, tuple(input_size[-2:]) if input_size else model.patch_embed.img_size,
                            hf.mean, hf.std, "bicubic")
    if hf.weights is not None:
        load_state_dict_strict(model, hf_vit_to_timm_state_dict(read_state_dict(hf.weights)), hf.weights)
        classifier.weight_files[f"{uri.rstrip('/')}/{os.path.basename(hf.weights)}"] = hf.weights
    return classifier.eval()


def _load_jeong_shin_clip(name: str, kwargs: dict[str, Any], uri: str | None, pretrained: bool,
                          input_size: list[int] | None, cache_dir: str | None) -> Classifier:
    """Format jeong-shin-clip: :func:`pipeline.models.clip_vit.create_clip_vit` (``model_kwargs``:
    sizes only), filled from their checkpoint at ``uri`` (else random weights), fed their [-1, 1]
    (mean = std = 0.5); inputs resized bicubic (antialiased) to its image size when they differ."""
    if pretrained:
        raise ValueError("classifier: pretrained (timm's cached weights) does not apply to format jeong-shin-clip; "
                         "give their checkpoint's uri")
    with torch.device("meta") if uri else contextlib.nullcontext():  # no random init: the checkpoint fills every tensor
        model = create_clip_vit(name, **kwargs)
    size = tuple(input_size[-2:]) if input_size else model.patch_embed.img_size
    classifier = Classifier(model, model.num_classes, size, INPUT_MEAN, INPUT_STD, "bicubic")
    if uri:
        path = fetch_to_cache(uri, cache_dir)
        state = jeong_shin_to_timm_state_dict(read_jeong_shin_checkpoint(path), len(model.blocks), path)
        load_state_dict_strict(model, {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, path,
                               assign=True)
        classifier.weight_files[uri] = path
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
