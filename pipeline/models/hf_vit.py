"""Hugging Face transformers ``ViTForImageClassification`` checkpoints as timm VisionTransformers.

A ``save_pretrained`` folder (config.json with ``model_type: vit``, model.safetensors or
pytorch_model.bin, optionally preprocessor_config.json) is read without transformers and
without executing pickles (safetensors / ``torch.load(weights_only=True)`` through
:mod:`pipeline.storage`). The timm model computes the same function as the transformers one:

* key names: ``vit.embeddings.*`` -> ``cls_token``, ``pos_embed``, ``patch_embed.proj``;
  layer i's ``layernorm_before``/``layernorm_after`` -> ``blocks.i.norm1``/``norm2``, its
  ``attention.attention.{query,key,value}`` concatenated (q, k, v rows) -> ``blocks.i.attn.qkv``,
  ``attention.output.dense`` -> ``attn.proj``, ``intermediate.dense``/``output.dense`` ->
  ``mlp.fc1``/``mlp.fc2``; ``vit.layernorm`` -> ``norm``; ``classifier`` -> ``head``;
* layer norms with the checkpoint's ``layer_norm_eps`` (transformers 1e-12, timm 1e-6);
* exact GELU, class-token pooling, pre-norm blocks: timm's VisionTransformer defaults;
* inputs normalised with the image processor's ``image_mean``/``image_std`` (0.5 when the
  folder has no preprocessor_config.json, ViTImageProcessor's default).

Shape mismatches surface in the strict state-dict load; what shapes cannot show (head count,
activation) is checked here against config.json.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer

__all__ = ["HfVit", "read_hf_vit_folder", "hf_vit_to_timm_state_dict", "check_architecture", "DEFAULT_CONFIG"]

WEIGHTS = ("model.safetensors", "pytorch_model.bin")
# transformers' ViTConfig / ViTImageProcessor defaults, for keys a config.json leaves out and for
# the random-weights case (no folder): the architecture of google/vit-base-patch16-224-in21k.
DEFAULT_CONFIG: Mapping[str, Any] = {
    "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
    "hidden_act": "gelu", "layer_norm_eps": 1e-12, "image_size": 224, "patch_size": 16, "num_channels": 3,
    "qkv_bias": True,
}
DEFAULT_MEAN = DEFAULT_STD = (0.5, 0.5, 0.5)

_TOP_LEVEL = {
    "vit.embeddings.cls_token": "cls_token",
    "vit.embeddings.position_embeddings": "pos_embed",
    "vit.embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "vit.embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "vit.layernorm.weight": "norm.weight",
    "vit.layernorm.bias": "norm.bias",
    "classifier.weight": "head.weight",
    "classifier.bias": "head.bias",
}
_IN_LAYER = {
    "layernorm_before": "norm1",
    "attention.output.dense": "attn.proj",
    "layernorm_after": "norm2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
_QKV = ("query", "key", "value")
_LAYER_KEY = re.compile(r"vit\.encoder\.layer\.(\d+)\.(.+)\.(weight|bias)")


@dataclass(frozen=True)
class HfVit:
    """What a transformers ViT folder says: the architecture (DEFAULT_CONFIG's keys), the
    weights file, and the processor's normalisation."""

    config: Mapping[str, Any]
    weights: str | None
    mean: tuple[float, ...]
    std: tuple[float, ...]


def read_hf_vit_folder(folder: str | None) -> HfVit:
    """The :class:`HfVit` of a ``save_pretrained`` folder; ``None``: transformers' defaults
    with no weights (random-weights models). ValueError naming the file when it is no ViT."""
    if folder is None:
        return HfVit(dict(DEFAULT_CONFIG), None, DEFAULT_MEAN, DEFAULT_STD)
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{folder}: no config.json; format hf-vit takes a transformers save_pretrained folder")
    with open(config_path) as f:
        raw = json.load(f)
    if raw.get("model_type") != "vit":
        raise ValueError(f"{config_path}: model_type {raw.get('model_type')!r}, format hf-vit reads 'vit'")
    weights = next((os.path.join(folder, n) for n in WEIGHTS if os.path.isfile(os.path.join(folder, n))), None)
    if weights is None:
        raise ValueError(f"{folder} holds none of {WEIGHTS}")
    mean, std = DEFAULT_MEAN, DEFAULT_STD
    processor_path = os.path.join(folder, "preprocessor_config.json")
    if os.path.isfile(processor_path):
        with open(processor_path) as f:
            processor = json.load(f)
        if processor.get("do_normalize", True):
            mean = tuple(float(v) for v in processor.get("image_mean", DEFAULT_MEAN))
            std = tuple(float(v) for v in processor.get("image_std", DEFAULT_STD))
        else:
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    config = {k: raw.get(k, default) for k, default in DEFAULT_CONFIG.items()}
    return HfVit(config, weights, mean, std)


def check_architecture(model: torch.nn.Module, hf: HfVit, source: str) -> None:
    """ValueError unless ``model`` is a timm VisionTransformer and, for a folder, has what its
    config.json says and weight shapes cannot show: activation, head count, image and patch size."""
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"format hf-vit converts into a timm VisionTransformer, got {type(model).__name__}")
    if hf.weights is None:
        return
    config = hf.config
    if config["hidden_act"] != "gelu":
        raise ValueError(f"{source}: hidden_act {config['hidden_act']!r}; only transformers' exact 'gelu' is converted")
    found = {"num_attention_heads": sorted({block.attn.num_heads for block in model.blocks}),
             "image_size": sorted(set(model.patch_embed.img_size)),
             "patch_size": sorted(set(model.patch_embed.patch_size))}
    for key, values in found.items():
        if values != [int(config[key])]:
            raise ValueError(f"{source}: config.json {key} {config[key]} but the timm model has {values}; "
                             "choose models.classifier.name / model_kwargs to match")


def hf_vit_to_timm_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ``ViTForImageClassification`` state dict in timm VisionTransformer names (module
    docstring). ValueError naming the keys that have no counterpart or lack q, k or v."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in state.items():
        if key in _TOP_LEVEL:
            out[_TOP_LEVEL[key]] = tensor
            continue
        match = _LAYER_KEY.fullmatch(key)
        if match is None:
            unknown.append(key)
            continue
        layer, module, leaf = int(match[1]), match[2], match[3]
        if module in _IN_LAYER:
            out[f"blocks.{layer}.{_IN_LAYER[module]}.{leaf}"] = tensor
        elif module.startswith("attention.attention.") and module.rpartition(".")[2] in _QKV:
            qkv.setdefault((layer, leaf), {})[module.rpartition(".")[2]] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"transformers ViT keys without a timm counterpart: {', '.join(sorted(unknown)[:20])}")
    for (layer, leaf), parts in sorted(qkv.items()):
        missing = [p for p in _QKV if p not in parts]
        if missing:
            raise ValueError(f"vit.encoder.layer.{layer}.attention.attention: no {', '.join(missing)} {leaf}")
        out[f"blocks.{layer}.attn.qkv.{leaf}"] = torch.cat([parts[p] for p in _QKV], dim=0)
    return out
