"""Jeong & Shin (NeurIPS 2023)'s ImageNet classifier: a CLIP ViT image tower fine-tuned with a
patch-token mean head (their ``CLIP_B16``, github.com/jh-jeong/smoothing-multiscale), as a timm
VisionTransformer.

Their model computes, on an image x in [-1, 1] (their data pipeline normalises with mean = std = 0.5):
``conv1`` (a bias-free patch convolution) -> tokens; the ``class_embedding`` token prepended;
``positional_embedding`` added; ``ln_pre``; ``transformer.resblocks.i`` (pre-norm blocks:
``x + attn(ln_1(x))``, ``x + mlp(ln_2(x))``, attn a torch ``nn.MultiheadAttention``, mlp
``c_fc`` -> QuickGELU -> ``c_proj``, LayerNorm eps 1e-5); then ``fc_norm`` on EACH patch token
(the class token dropped), the mean over the patch tokens, and ``head``.

:class:`ClipVitPatchMean` is timm's VisionTransformer built the same way (``pre_norm``: a bias-free
patch embedding and ``norm_pre``; ``quick_gelu``; LayerNorm eps 1e-5; no final norm) whose head
keeps that order, norm per token then mean (timm's ``global_pool='avg'`` with ``fc_norm`` takes
the mean first, which is another function). The input mapping [0, 1] -> [-1, 1] is the project's
:class:`pipeline.models.classifier.Classifier` normalisation with :data:`INPUT_MEAN` /
:data:`INPUT_STD`.

Key names (their -> timm): ``conv1.weight`` -> ``patch_embed.proj.weight``; ``class_embedding``
[D] -> ``cls_token`` [1, 1, D]; ``positional_embedding`` [T, D] -> ``pos_embed`` [1, T, D];
``ln_pre`` -> ``norm_pre``; in ``transformer.resblocks.i`` -> ``blocks.i``: ``ln_1``/``ln_2`` ->
``norm1``/``norm2``, ``attn.in_proj_weight``/``attn.in_proj_bias`` -> ``attn.qkv.weight``/``bias``
(both lay out the rows as q, k, v, heads contiguous), ``attn.out_proj`` -> ``attn.proj``,
``mlp.c_fc``/``mlp.c_proj`` -> ``mlp.fc1``/``mlp.fc2``; ``fc_norm`` and ``head`` keep their names.
Their state dict also holds an unused ``patch_embed.proj`` (a PatchEmbed their forward never
calls): those two keys are dropped; any other key without a counterpart, or a missing one, is
refused naming it.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer

from pipeline.storage import load_torch_checkpoint, read_state_dict

__all__ = ["ARCHITECTURES", "SIZE_KEYS", "INPUT_MEAN", "INPUT_STD", "CHECKPOINT_KEYS", "ClipVitPatchMean",
           "create_clip_vit", "read_jeong_shin_checkpoint", "jeong_shin_to_timm_state_dict"]

# their models/finetune_clip.py's registered architectures (sizes only; the rest is fixed above)
ARCHITECTURES: Mapping[str, Mapping[str, int]] = {
    "CLIP_B16": {"img_size": 224, "patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12},
}
SIZE_KEYS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")
# x in [-1, 1]: timm's IMAGENET_INCEPTION_MEAN / IMAGENET_INCEPTION_STD, their data pipeline's
INPUT_MEAN = INPUT_STD = (0.5, 0.5, 0.5)
# where a torch.save'd checkpoint keeps the state dict, in order of preference (their certify.py
# loads 'model_ema'); a checkpoint with neither must be the state dict itself
CHECKPOINT_KEYS = ("model_ema", "model")
IGNORED = frozenset({"patch_embed.proj.weight", "patch_embed.proj.bias"})

_TOP_LEVEL = {
    "conv1.weight": "patch_embed.proj.weight",
    "class_embedding": "cls_token",
    "positional_embedding": "pos_embed",
    "ln_pre.weight": "norm_pre.weight",
    "ln_pre.bias": "norm_pre.bias",
    "fc_norm.weight": "fc_norm.weight",
    "fc_norm.bias": "fc_norm.bias",
    "head.weight": "head.weight",
    "head.bias": "head.bias",
}
_IN_BLOCK = {
    "ln_1.weight": "norm1.weight",
    "ln_1.bias": "norm1.bias",
    "attn.in_proj_weight": "attn.qkv.weight",
    "attn.in_proj_bias": "attn.qkv.bias",
    "attn.out_proj.weight": "attn.proj.weight",
    "attn.out_proj.bias": "attn.proj.bias",
    "ln_2.weight": "norm2.weight",
    "ln_2.bias": "norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
_BLOCK_KEY = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")


class ClipVitPatchMean(VisionTransformer):
    """timm's VisionTransformer with Jeong & Shin's head: ``fc_norm`` on each patch token, the
    mean over the patch tokens, ``head``. Built with ``global_pool=''`` and ``fc_norm=True`` (timm
    then has ``fc_norm`` and no final ``norm``); only :meth:`forward_head` differs from timm's."""

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.fc_norm(x[:, self.num_prefix_tokens:]).mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)


def create_clip_vit(name: str, num_classes: int = 1000, **sizes: Any) -> ClipVitPatchMean:
    """Their architecture ``name`` (a key of :data:`ARCHITECTURES`) with ``num_classes`` outputs
    and random weights; ``sizes`` (keys :data:`SIZE_KEYS`) override its sizes, e.g. for small
    test models. ValueError naming an unknown name or key."""
    if name not in ARCHITECTURES:
        raise ValueError(f"classifier format jeong-shin-clip: name {name!r}; known: {', '.join(ARCHITECTURES)}")
    unknown = sorted(set(sizes) - set(SIZE_KEYS))
    if unknown:
        raise ValueError(f"classifier format jeong-shin-clip: model_kwargs {unknown}; only the sizes "
                         f"{', '.join(SIZE_KEYS)} can be set (the rest is their architecture)")
    return ClipVitPatchMean(
        **{**ARCHITECTURES[name], **sizes}, num_classes=num_classes, class_token=True, pre_norm=True,
        global_pool="", fc_norm=True, act_layer="quick_gelu", norm_layer=partial(torch.nn.LayerNorm, eps=1e-5))


def read_jeong_shin_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """The state dict (their key names) of the checkpoint ``path``, on the CPU: a .safetensors
    file (the state dict itself), else a ``torch.save`` file read by
    :func:`pipeline.storage.load_torch_checkpoint` (``weights_only``; their training script's
    argparse ``args`` beside the weights are read, any other object refused) holding a dict with
    ``model_ema`` (preferred, what their certify.py loads) or ``model``, or the state dict itself.
    ValueError naming the file when it holds no state dict of tensors."""
    if path.endswith(".safetensors"):
        return read_state_dict(path)
    checkpoint = load_torch_checkpoint(path)
    if isinstance(checkpoint, Mapping):
        key = next((k for k in CHECKPOINT_KEYS if k in checkpoint), None)
        state = checkpoint[key] if key else checkpoint
        if isinstance(state, Mapping) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
            return dict(state)
    raise ValueError(f"{path} is not a Jeong & Shin classifier checkpoint: expected a state dict of tensors under "
                     f"{' or '.join(repr(k) for k in CHECKPOINT_KEYS)}, or the state dict itself")


def jeong_shin_to_timm_state_dict(state: Mapping[str, torch.Tensor], depth: int,
                                  source: str) -> dict[str, torch.Tensor]:
    """``state`` (their names, ``depth`` blocks) in :class:`ClipVitPatchMean`'s names (module
    docstring), without the unused ``patch_embed.proj``. ValueError naming ``source`` and every
    key without a counterpart or missing; shapes are checked by the strict load."""
    expected = set(_TOP_LEVEL) | {f"transformer.resblocks.{i}.{leaf}" for i in range(depth) for leaf in _IN_BLOCK}
    given = set(state) - IGNORED
    unexpected, missing = sorted(given - expected), sorted(expected - given)
    if unexpected or missing:
        parts = [f"{label} ({len(keys)}): {', '.join(keys[:10])}{', ...' if len(keys) > 10 else ''}"
                 for label, keys in (("unexpected", unexpected), ("missing", missing)) if keys]
        raise ValueError(f"{source} is not Jeong & Shin's CLIP ViT with {depth} blocks: " + "; ".join(parts))
    out: dict[str, torch.Tensor] = {}
    for key in given:
        match = _BLOCK_KEY.fullmatch(key)
        name = f"blocks.{match[1]}.{_IN_BLOCK[match[2]]}" if match else _TOP_LEVEL[key]
        out[name] = state[key]
    # their class token [D] and position table [T, D]; timm's carry a batch axis (other shapes
    # are left for the strict load to name)
    if out["cls_token"].dim() == 1:
        out["cls_token"] = out["cls_token"].reshape(1, 1, -1)
    if out["pos_embed"].dim() == 2:
        out["pos_embed"] = out["pos_embed"].unsqueeze(0)
    return out
