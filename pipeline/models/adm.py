"""Original ADM UNets (guided-diffusion, improved-diffusion) as diffusers ``UNet2DModel``.

``adm_unet_config`` maps the original hyperparameters to ``UNet2DModel`` kwargs;
``convert_adm_state_dict`` builds that model and fills it from an original state dict. The
result computes the same function as the original network for the same ``(x, t)``: timestep
rescaling (improved-diffusion's ``rescale_timesteps``) stays with the caller.

Correspondence (original -> diffusers): ``input_blocks`` -> ``down_blocks`` (one per
``channel_mult`` level: resnets, attentions, downsampler), ``middle_block`` -> ``mid_block``,
``output_blocks`` -> ``up_blocks``, ``time_embed`` -> ``time_embedding`` (sinusoid [cos, sin],
max_period 10000: ``flip_sin_to_cos=True, freq_shift=0``), ``label_emb`` -> ``class_embedding``,
``out`` -> ``conv_norm_out``/``conv_out``. Each attention's 1x1 ``qkv`` conv is split into
``to_q``/``to_k``/``to_v``: the legacy order interleaves q, k, v per head, the new order
(``use_new_attention_order``) stacks them. Original and diffusers scale q.k by 1/sqrt(head dim).

One feature has no ``UNet2DModel`` kwarg: a head *count* fixed across levels of different
widths (``num_heads`` with ``num_head_channels=-1``) gives different head dims per level,
while ``UNet2DModel`` takes one ``attention_head_dim``. Then ``attention_head_dim`` is left
``None`` (one head of full width: right parameter shapes) and each attention's ``heads`` and
``scale`` are set after construction; such a model does not keep its head counts through
``save_pretrained``/``from_pretrained``. The real ImageNet-256 and CIFAR-10 architectures have
one head dim (64) throughout and need no adjustment.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from diffusers import UNet2DModel

__all__ = ["AdmStateDictMismatch", "adm_unet_config", "convert_adm_state_dict"]

# channel_mult the original scripts pick when it is not given (guided-diffusion and
# improved-diffusion agree where both define one).
DEFAULT_CHANNEL_MULT: dict[int, tuple[float, ...]] = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
}
# What the original scripts use for a hyperparameter left out (image_size, num_channels and
# num_res_blocks must be given); num_classes is guided-diffusion's NUM_CLASSES.
SCRIPT_DEFAULTS: dict[str, Any] = {
    "channel_mult": "",
    "attention_resolutions": "16,8",
    "num_heads": 4,
    "num_head_channels": -1,
    "num_heads_upsample": -1,
    "learn_sigma": False,
    "class_cond": False,
    "num_classes": 1000,
    "use_scale_shift_norm": True,
    "resblock_updown": False,
    "dropout": 0.0,
    "use_new_attention_order": False,
}
NORM_GROUPS = 32  # the original GroupNorm32
NORM_EPS = 1e-5   # torch's GroupNorm default, which the original uses

# diffusers submodule name -> original one, inside a resnet / an attention block
_RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_ATTENTION_NAMES = {"group_norm": "norm", "to_out.0": "proj_out"}
_QKV_TARGETS = ("to_q", "to_k", "to_v")


class AdmStateDictMismatch(ValueError):
    """The state dict does not fit the architecture; names the keys in both namings.

    ``missing``: "original_key -> diffusers_key[, ...]"; ``unexpected``: original keys;
    ``mismatched``: "original_key -> diffusers_key: checkpoint shape vs architecture shape".
    The message shows the first ``SHOWN`` of each list.
    """

    SHOWN = 20

    def __init__(self, missing: Sequence[str], unexpected: Sequence[str], mismatched: Sequence[str]):
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)
        parts = ["ADM state dict does not fit the architecture given by the config."]
        for title, items in (
            ("missing (the architecture needs them; original -> diffusers)", self.missing),
            ("unexpected (no place in the architecture; original names)", self.unexpected),
            ("wrong shape (original -> diffusers: checkpoint vs architecture)", self.mismatched),
        ):
            if items:
                more = [f"... and {len(items) - self.SHOWN} more"] if len(items) > self.SHOWN else []
                parts.append(f"{len(items)} {title}:\n  " + "\n  ".join(items[: self.SHOWN] + more))
        super().__init__("\n".join(parts))


@dataclass(frozen=True)
class _Arch:
    """The original architecture, normalised from the hyperparameter dict."""

    image_size: int
    channels: tuple[int, ...]      # width of each level
    num_res_blocks: int
    attention_levels: frozenset[int]
    heads_down: tuple[int, ...]    # attention heads per level, input blocks (and middle: last level)
    heads_mid: int
    heads_up: tuple[int, ...]      # output blocks
    out_channels: int
    resblock_updown: bool
    scale_shift: bool
    dropout: float
    new_attention_order: bool
    num_classes: int | None


def _numbers(value: str | Sequence[int | float]) -> tuple[float, ...]:
    """A comma-separated string (as the original scripts take it) or a sequence."""
    if isinstance(value, str):
        return tuple(float(v) for v in value.split(",") if v.strip())
    return tuple(float(v) for v in value)


def _heads(width: int, num_heads: int, num_head_channels: int) -> int:
    """Heads of an original AttentionBlock of ``width`` channels."""
    if num_head_channels == -1:
        if width % num_heads:
            raise ValueError(f"{width} channels do not split into {num_heads} heads")
        return num_heads
    if width % num_head_channels:
        raise ValueError(f"{width} channels do not split into heads of {num_head_channels}")
    return width // num_head_channels


def _arch(config: Mapping[str, Any]) -> _Arch:
    c = {**SCRIPT_DEFAULTS, **config}
    image_size, model_channels = int(c["image_size"]), int(c["num_channels"])
    mult = _numbers(c["channel_mult"]) or DEFAULT_CHANNEL_MULT.get(image_size)
    if mult is None:
        raise ValueError(f"no default channel_mult for image_size {image_size}; give channel_mult")
    if mult[0] != 1:
        # UNet2DModel ties the sinusoid width to block_out_channels[0]; the original uses
        # num_channels (they differ only for guided-diffusion's 512x512 models, mult 0.5).
        raise ValueError(f"channel_mult must start with 1, got {tuple(mult)}")
    channels = tuple(int(m * model_channels) for m in mult)
    attention_ds = {image_size // int(r) for r in _numbers(c["attention_resolutions"])}
    num_heads, num_head_channels = int(c["num_heads"]), int(c["num_head_channels"])
    num_heads_up = num_heads if int(c["num_heads_upsample"]) == -1 else int(c["num_heads_upsample"])
    return _Arch(
        image_size=image_size,
        channels=channels,
        num_res_blocks=int(c["num_res_blocks"]),
        attention_levels=frozenset(lv for lv in range(len(channels)) if 2**lv in attention_ds),
        heads_down=tuple(_heads(ch, num_heads, num_head_channels) for ch in channels),
        heads_mid=_heads(channels[-1], num_heads, num_head_channels),
        heads_up=tuple(_heads(ch, num_heads_up, num_head_channels) for ch in channels),
        out_channels=6 if c["learn_sigma"] else 3,
        resblock_updown=bool(c["resblock_updown"]),
        scale_shift=bool(c["use_scale_shift_norm"]),
        dropout=float(c["dropout"]),
        new_attention_order=bool(c["use_new_attention_order"]),
        num_classes=int(c["num_classes"]) if c["class_cond"] else None,
    )


def _head_dims(arch: _Arch) -> set[int]:
    """Head dims of every attention layer the architecture has."""
    dims = {arch.channels[-1] // arch.heads_mid}
    for lv in arch.attention_levels:
        dims |= {arch.channels[lv] // arch.heads_down[lv], arch.channels[lv] // arch.heads_up[lv]}
    return dims


def adm_unet_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``UNet2DModel`` kwargs for the ADM architecture described by ``config`` (original names).

    With one head dim throughout, ``UNet2DModel(**kwargs)`` is the architecture exactly;
    otherwise ``convert_adm_state_dict`` also sets per-layer head counts (module docstring).
    """
    arch = _arch(config)
    last = len(arch.channels) - 1
    resampler = "resnet" if arch.resblock_updown else "conv"
    down, up = [], []
    for lv in range(len(arch.channels)):  # down block lv and up block last - lv serve level lv
        if lv in arch.attention_levels:  # resampler type set by downsample_type / upsample_type
            down.append("AttnDownBlock2D")
            up.insert(0, "AttnUpBlock2D")
        else:
            down.append("ResnetDownsampleBlock2D" if arch.resblock_updown and lv != last else "DownBlock2D")
            up.insert(0, "ResnetUpsampleBlock2D" if arch.resblock_updown and lv != 0 else "UpBlock2D")
    head_dims = _head_dims(arch)
    return {
        "sample_size": arch.image_size,
        "in_channels": 3,
        "out_channels": arch.out_channels,
        "time_embedding_type": "positional",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": tuple(down),
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": tuple(up),
        "block_out_channels": arch.channels,
        "layers_per_block": arch.num_res_blocks,
        "mid_block_scale_factor": 1,
        "downsample_padding": 1,
        "downsample_type": resampler,
        "upsample_type": resampler,
        "dropout": arch.dropout,
        "act_fn": "silu",
        "attention_head_dim": head_dims.pop() if len(head_dims) == 1 else None,
        "norm_num_groups": NORM_GROUPS,
        "attn_norm_num_groups": NORM_GROUPS,
        "norm_eps": NORM_EPS,
        "resnet_time_scale_shift": "scale_shift" if arch.scale_shift else "default",
        "add_attention": True,
        "num_class_embeds": arch.num_classes,
    }


@dataclass(frozen=True)
class _Pair:
    """One original submodule and its diffusers counterpart."""

    adm: str
    diffusers: str
    kind: str  # "same" | "resnet" | "attention"
    heads: int = 0


def _pairs(arch: _Arch) -> list[_Pair]:
    """Every original submodule with parameters, in the original construction order."""
    pairs = [
        _Pair("time_embed.0", "time_embedding.linear_1", "same"),
        _Pair("time_embed.2", "time_embedding.linear_2", "same"),
        _Pair("input_blocks.0.0", "conv_in", "same"),
    ]
    if arch.num_classes is not None:
        pairs.append(_Pair("label_emb", "class_embedding", "same"))
    last = len(arch.channels) - 1
    block = 1
    for lv in range(last + 1):
        for j in range(arch.num_res_blocks):
            pairs.append(_Pair(f"input_blocks.{block}.0", f"down_blocks.{lv}.resnets.{j}", "resnet"))
            if lv in arch.attention_levels:
                pairs.append(_Pair(f"input_blocks.{block}.1", f"down_blocks.{lv}.attentions.{j}",
                                   "attention", arch.heads_down[lv]))
            block += 1
        if lv != last:
            if arch.resblock_updown:
                pairs.append(_Pair(f"input_blocks.{block}.0", f"down_blocks.{lv}.downsamplers.0", "resnet"))
            else:
                pairs.append(_Pair(f"input_blocks.{block}.0.op", f"down_blocks.{lv}.downsamplers.0.conv", "same"))
            block += 1
    pairs += [
        _Pair("middle_block.0", "mid_block.resnets.0", "resnet"),
        _Pair("middle_block.1", "mid_block.attentions.0", "attention", arch.heads_mid),
        _Pair("middle_block.2", "mid_block.resnets.1", "resnet"),
    ]
    block = 0
    for i, lv in enumerate(reversed(range(last + 1))):
        attn = lv in arch.attention_levels
        for j in range(arch.num_res_blocks + 1):
            pairs.append(_Pair(f"output_blocks.{block}.0", f"up_blocks.{i}.resnets.{j}", "resnet"))
            if attn:
                pairs.append(_Pair(f"output_blocks.{block}.1", f"up_blocks.{i}.attentions.{j}",
                                   "attention", arch.heads_up[lv]))
            if lv and j == arch.num_res_blocks:
                sub = 2 if attn else 1
                if arch.resblock_updown:
                    pairs.append(_Pair(f"output_blocks.{block}.{sub}", f"up_blocks.{i}.upsamplers.0", "resnet"))
                else:
                    pairs.append(_Pair(f"output_blocks.{block}.{sub}.conv", f"up_blocks.{i}.upsamplers.0.conv", "same"))
            block += 1
    pairs += [_Pair("out.0", "conv_norm_out", "same"), _Pair("out.2", "conv_out", "same")]
    return pairs


@dataclass(frozen=True)
class _Source:
    """Where one diffusers tensor comes from: an original key, its shape, and the transform."""

    key: str
    shape: tuple[int, ...]
    take: Callable[[torch.Tensor], torch.Tensor]


def _qkv_part(index: int, heads: int, new_order: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """q (0), k (1) or v (2) rows of an original qkv conv, heads in diffusers' contiguous order."""

    def take(qkv: torch.Tensor) -> torch.Tensor:
        tail = qkv.shape[1:2]  # (in_channels,) for the conv weight (its kernel dim 1 folds in), () for the bias
        if new_order:  # rows [q | k | v], each [head0 | head1 | ...]
            return qkv.reshape(3, -1, *tail)[index]
        # legacy rows [head0: q k v | head1: q k v | ...]
        return qkv.reshape(heads, 3, -1, *tail)[:, index].reshape(-1, *tail)

    return take


def _squeeze_last(t: torch.Tensor) -> torch.Tensor:
    return t.squeeze(-1)


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _source(pair: _Pair, local: str, shape: tuple[int, ...], new_order: bool) -> _Source:
    """The original tensor behind parameter ``local`` of ``pair``'s diffusers module."""
    module, _, leaf = local.rpartition(".")
    if pair.kind == "same":
        return _Source(f"{pair.adm}.{local}", shape, _identity)
    if pair.kind == "resnet":
        return _Source(f"{pair.adm}.{_RESNET_NAMES[module]}.{leaf}", shape, _identity)
    if module in _QKV_TARGETS:
        qkv_shape = (3 * shape[0], *shape[1:], 1) if leaf == "weight" else (3 * shape[0],)
        return _Source(f"{pair.adm}.qkv.{leaf}", qkv_shape,
                       _qkv_part(_QKV_TARGETS.index(module), pair.heads, new_order))
    if module == "to_out.0" and leaf == "weight":  # 1x1 conv1d -> linear
        return _Source(f"{pair.adm}.proj_out.weight", (*shape, 1), _squeeze_last)
    return _Source(f"{pair.adm}.{_ATTENTION_NAMES[module]}.{leaf}", shape, _identity)


def _sources(model: UNet2DModel, arch: _Arch) -> dict[str, _Source]:
    """Every diffusers state-dict key of ``model`` mapped to its original source."""
    sources: dict[str, _Source] = {}
    for pair in _pairs(arch):
        for local, tensor in model.get_submodule(pair.diffusers).state_dict().items():
            sources[f"{pair.diffusers}.{local}"] = _source(pair, local, tuple(tensor.shape), arch.new_attention_order)
    uncovered = set(model.state_dict()) - set(sources)
    if uncovered:  # a bug in the layout, not in the checkpoint
        raise RuntimeError(f"ADM layout leaves diffusers keys unmapped: {sorted(uncovered)}")
    return sources


def _check(state_dict: Mapping[str, torch.Tensor], sources: Mapping[str, _Source]) -> None:
    """Raise ``AdmStateDictMismatch`` unless every source is present with its shape and nothing is left over."""
    targets: dict[str, list[str]] = {}
    for key, source in sources.items():
        targets.setdefault(source.key, []).append(key)
    shapes = {source.key: source.shape for source in sources.values()}
    missing = [f"{k} -> {', '.join(targets[k])}" for k in sorted(set(targets) - set(state_dict))]
    unexpected = sorted(set(state_dict) - set(targets))
    mismatched = [
        f"{k} -> {', '.join(targets[k])}: {tuple(state_dict[k].shape)} vs {shapes[k]}"
        for k in sorted(set(targets) & set(state_dict))
        if tuple(state_dict[k].shape) != shapes[k]
    ]
    if missing or unexpected or mismatched:
        raise AdmStateDictMismatch(missing, unexpected, mismatched)


def _set_heads(model: UNet2DModel, arch: _Arch) -> None:
    """Per-layer head counts where UNet2DModel's single attention_head_dim cannot say them."""
    for pair in _pairs(arch):
        if pair.kind == "attention":
            attn = model.get_submodule(pair.diffusers)
            attn.heads = pair.heads
            attn.scale = (attn.inner_dim // pair.heads) ** -0.5


def convert_adm_state_dict(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> UNet2DModel:
    """An eval-mode float32 ``UNet2DModel`` computing what the original ADM network computes.

    ``config`` holds the original hyperparameters (extra keys are ignored). Raises
    ``AdmStateDictMismatch`` naming every missing, unexpected or wrongly shaped key when
    ``state_dict`` does not fit that architecture.
    """
    arch = _arch(config)
    kwargs = adm_unet_config(config)
    with torch.device("meta"):
        model = UNet2DModel(**kwargs)
    sources = _sources(model, arch)
    _check(state_dict, sources)
    converted = {
        k: s.take(state_dict[s.key].detach()).to(
            device="cpu", dtype=torch.float32, memory_format=torch.contiguous_format, copy=True
        )
        for k, s in sources.items()
    }
    model.load_state_dict(converted, strict=True, assign=True)
    if kwargs["attention_head_dim"] is None:
        _set_heads(model, arch)
    return model.eval()
