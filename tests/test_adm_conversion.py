"""ADM checkpoint conversion against the original code's outputs and an independent count."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DModel

from pipeline.models.adm import AdmStateDictMismatch, adm_unet_config, convert_adm_state_dict

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "adm"
NAMES = ("guided-small", "improved-small")

# The real checkpoints' hyperparameters (fixtures README).
GUIDED_256_UNCOND = dict(
    codebase="guided-diffusion", image_size=256, num_channels=256, num_res_blocks=2,
    attention_resolutions="32,16,8", channel_mult="1,1,2,2,4,4", num_heads=4, num_head_channels=64,
    num_heads_upsample=-1, learn_sigma=True, resblock_updown=True, use_scale_shift_norm=True,
    dropout=0.0, use_new_attention_order=False, class_cond=False,
)
CIFAR10_UNCOND = dict(
    codebase="improved-diffusion", image_size=32, num_channels=128, num_res_blocks=3,
    attention_resolutions="16,8", channel_mult="1,2,2,2", num_heads=4, num_heads_upsample=-1,
    learn_sigma=True, use_scale_shift_norm=True, dropout=0.3,
)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load(name: str) -> tuple[dict, dict, dict]:
    config = json.loads((FIXTURES / f"{name}.json").read_text())
    state = torch.load(FIXTURES / f"{name}.pt", weights_only=True)
    io = torch.load(FIXTURES / f"{name}-io.pt", weights_only=True)
    return config, state, io


def run(model: UNet2DModel, x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(x, t, **kwargs).sample


def channel_errors(out: torch.Tensor, ref: torch.Tensor) -> list[float]:
    return (out - ref).abs().amax(dim=(0, 2, 3)).tolist()


@pytest.mark.parametrize("name", NAMES)
def test_fixture_reproduces_original_output(name):
    config, state, io = load(name)
    model = convert_adm_state_dict(state, config)
    assert isinstance(model, UNet2DModel) and not model.training
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
    out = run(model, io["x"], io["t"])
    assert out.shape == io["out"].shape == (4, 6, 32, 32)
    assert max(channel_errors(out, io["out"])) < 1e-4


def legacy_to_new_order(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows [h0: q k v | h1: q k v | ...] -> [q: h0 h1 ... | k: ... | v: ...]."""
    return qkv.reshape(heads, 3, -1, *qkv.shape[1:]).transpose(0, 1).reshape(qkv.shape)


def test_new_attention_order_reproduces_original_output():
    config, state, io = load("guided-small")
    heads = {k: v.shape[0] // 3 // config["num_head_channels"] for k, v in state.items() if ".qkv." in k}
    relaid = {k: legacy_to_new_order(v, heads[k]) if k in heads else v for k, v in state.items()}
    model = convert_adm_state_dict(relaid, {**config, "use_new_attention_order": True})
    assert max(channel_errors(run(model, io["x"], io["t"]), io["out"])) < 1e-4
    legacy_reading = convert_adm_state_dict(relaid, config)
    assert max(channel_errors(run(legacy_reading, io["x"], io["t"]), io["out"])) > 1e-4


def adm_attention(x: torch.Tensor, state: dict, prefix: str, heads: int, new_order: bool) -> torch.Tensor:
    """The original AttentionBlock, written from its definition (GroupNorm32, 1x1 conv qkv, per-head softmax)."""
    b, c, h, w = x.shape
    flat = x.reshape(b, c, h * w)
    normed = F.group_norm(flat, 32, state[f"{prefix}.norm.weight"], state[f"{prefix}.norm.bias"], eps=1e-5)
    qkv = F.conv1d(normed, state[f"{prefix}.qkv.weight"], state[f"{prefix}.qkv.bias"])
    ch = c // heads
    if new_order:
        q, k, v = (part.reshape(b * heads, ch, h * w) for part in qkv.chunk(3, dim=1))
    else:
        q, k, v = qkv.reshape(b * heads, 3 * ch, h * w).split(ch, dim=1)
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(ch), dim=-1)
    mixed = torch.einsum("bts,bcs->bct", weight, v).reshape(b, c, h * w)
    out = F.conv1d(mixed, state[f"{prefix}.proj_out.weight"], state[f"{prefix}.proj_out.bias"])
    return (flat + out).reshape(b, c, h, w)


@pytest.mark.parametrize("new_order", [False, True])
def test_attention_with_per_level_head_counts(new_order):
    """num_heads 4 down/middle, num_heads_upsample 2: head dims 16 and 32, set per layer."""
    config, state, _ = load("guided-small")
    # sharpen the fixture's near-uniform attention so that head counts and q/k/v order show
    state = {k: torch.ones_like(v) if k.endswith(".norm.weight") else 5 * v if ".qkv." in k else v
             for k, v in state.items()}
    config = {**config, "num_head_channels": -1, "num_heads": 4, "num_heads_upsample": 2,
              "use_new_attention_order": new_order}
    assert adm_unet_config(config)["attention_head_dim"] is None
    model = convert_adm_state_dict(state, config)
    x = torch.randn(2, 64, 8, 8, generator=torch.Generator().manual_seed(0))
    for adm, diffusers, heads in [
        ("input_blocks.5.1", "down_blocks.2.attentions.0", 4),
        ("middle_block.1", "mid_block.attentions.0", 4),
        ("output_blocks.0.1", "up_blocks.0.attentions.0", 2),
    ]:
        with torch.no_grad():
            got = model.get_submodule(diffusers)(x)
        want = adm_attention(x, state, adm, heads, new_order)
        assert (got - want).abs().max() < 1e-5, (adm, diffusers)
        # the check can fail: another head count or the other q/k/v order gives another result
        assert (adm_attention(x, state, adm, 6 - heads, new_order) - want).abs().max() > 1e-3
        assert (adm_attention(x, state, adm, heads, not new_order) - want).abs().max() > 1e-3


def test_class_conditional_label_embedding():
    """label_emb[y] is added to the time embedding: same as shifting time_embed.2's bias by it."""
    config, state, io = load("guided-small")
    label_emb = torch.randn(10, 128, generator=torch.Generator().manual_seed(1)) * 0.1
    model = convert_adm_state_dict({**state, "label_emb.weight": label_emb},
                                   {**config, "class_cond": True, "num_classes": 10})
    y = torch.tensor([3, 3, 3, 3])
    shifted = {**state, "time_embed.2.bias": state["time_embed.2.bias"] + label_emb[3]}
    reference = run(convert_adm_state_dict(shifted, config), io["x"], io["t"])
    assert max(channel_errors(run(model, io["x"], io["t"], class_labels=y), reference)) < 1e-5
    assert max(channel_errors(reference, io["out"])) > 1e-4


def test_dropped_key_is_named_in_both_namings():
    config, state, _ = load("guided-small")
    del state["input_blocks.3.1.qkv.weight"]
    with pytest.raises(AdmStateDictMismatch) as err:
        convert_adm_state_dict(state, config)
    assert err.value.unexpected == [] and err.value.mismatched == []
    assert len(err.value.missing) == 1
    message = str(err.value)
    assert "input_blocks.3.1.qkv.weight" in message
    assert "down_blocks.1.attentions.0.to_q.weight" in message


def test_wrong_num_res_blocks_names_missing_and_unexpected():
    config, state, _ = load("improved-small")
    with pytest.raises(AdmStateDictMismatch) as err:
        convert_adm_state_dict(state, {**config, "num_res_blocks": 2})
    missing, unexpected = err.value.missing, err.value.unexpected
    assert "output_blocks.8.0.in_layers.0.weight -> up_blocks.2.resnets.2.norm1.weight" in missing
    assert "input_blocks.2.0.op.weight" in unexpected  # a downsampler where a resnet now belongs
    message = str(err.value)
    assert missing[0] in message and "input_blocks.2.0.op.weight" in message
    assert f"{len(missing)} missing" in message and f"{len(missing) - 20} more" in message


def test_unexpected_key_and_wrong_shape():
    config, state, _ = load("improved-small")
    state["label_emb.weight"] = torch.zeros(10, 128)
    state["out.2.weight"] = state["out.2.weight"][:3]
    with pytest.raises(AdmStateDictMismatch) as err:
        convert_adm_state_dict(state, config)
    assert err.value.unexpected == ["label_emb.weight"]
    assert err.value.mismatched == ["out.2.weight -> conv_out.weight: (3, 32, 3, 3) vs (6, 32, 3, 3)"]


def test_config_forms_are_equivalent():
    config, _, _ = load("guided-small")
    as_strings = {**config, "channel_mult": "1,2,2", "attention_resolutions": "16,8"}
    as_lists = {**config, "channel_mult": (1, 2, 2), "attention_resolutions": [16, 8]}
    assert adm_unet_config(as_strings) == adm_unet_config(as_lists) == adm_unet_config(config)
    # left-out hyperparameters take the original scripts' defaults (channel_mult by image_size)
    minimal = dict(image_size=32, num_channels=128, num_res_blocks=3, learn_sigma=True, dropout=0.3)
    assert adm_unet_config(minimal) == adm_unet_config(CIFAR10_UNCOND)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"image_size": 512, "channel_mult": ""}, "channel_mult must start with 1"),  # guided 512: 0.5,1,1,...
        ({"image_size": 48, "channel_mult": ""}, "no default channel_mult"),
        ({"num_heads": 3}, "do not split into 3 heads"),
    ],
)
def test_unsupported_or_inconsistent_configs_are_refused(change, match):
    with pytest.raises(ValueError, match=match):
        adm_unet_config({**CIFAR10_UNCOND, **change})


def test_save_pretrained_round_trip(tmp_path):
    config, state, io = load("guided-small")
    convert_adm_state_dict(state, config).save_pretrained(tmp_path)
    reloaded = UNet2DModel.from_pretrained(tmp_path).eval()
    assert max(channel_errors(run(reloaded, io["x"], io["t"]), io["out"])) < 1e-4


def adm_param_count(config: dict) -> int:
    """Parameters of the original UNetModel, counted by walking its construction."""
    mc, nrb = config["num_channels"], config["num_res_blocks"]
    mult = [int(m) for m in config["channel_mult"].split(",")]
    attention_ds = {config["image_size"] // int(r) for r in config["attention_resolutions"].split(",")}
    ss, updown, emb = config["use_scale_shift_norm"], config.get("resblock_updown", False), 4 * mc

    def conv(cin, cout, k=1):
        return cin * cout * k * k + cout

    def resblock(cin, cout):
        skip = conv(cin, cout) if cin != cout else 0
        return 2 * cin + conv(cin, cout, 3) + conv(emb, cout * (2 if ss else 1)) + 2 * cout + conv(cout, cout, 3) + skip

    def attention(c):
        return 2 * c + conv(c, 3 * c) + conv(c, c)

    resample = (lambda c: resblock(c, c)) if updown else (lambda c: conv(c, c, 3))
    total = conv(mc, emb) + conv(emb, emb) + (config["num_classes"] * emb if config.get("class_cond") else 0)
    ch, ds = mc, 1
    total += conv(3, ch, 3)
    skips = [ch]
    for level, m in enumerate(mult):
        for _ in range(nrb):
            total += resblock(ch, m * mc) + (attention(m * mc) if ds in attention_ds else 0)
            ch = m * mc
            skips.append(ch)
        if level != len(mult) - 1:
            total += resample(ch)
            skips.append(ch)
            ds *= 2
    total += 2 * resblock(ch, ch) + attention(ch)
    for level, m in reversed(list(enumerate(mult))):
        for i in range(nrb + 1):
            total += resblock(ch + skips.pop(), m * mc) + (attention(m * mc) if ds in attention_ds else 0)
            ch = m * mc
            if level and i == nrb:
                total += resample(ch)
                ds //= 2
    return total + 2 * ch + conv(ch, 6 if config["learn_sigma"] else 3, 3)


@pytest.mark.parametrize(
    "config, expected",
    [
        (GUIDED_256_UNCOND, 552_814_086),
        ({**GUIDED_256_UNCOND, "class_cond": True, "num_classes": 1000}, 552_814_086 + 1000 * 1024),
        (CIFAR10_UNCOND, 52_546_438),
    ],
    ids=["guided-256-uncond", "guided-256-cond", "cifar10-uncond"],
)
def test_real_architectures_have_the_original_parameter_count(config, expected):
    assert adm_param_count(config) == expected
    kwargs = adm_unet_config(config)
    assert kwargs["attention_head_dim"] == 64  # one head dim throughout: plain UNet2DModel kwargs
    with torch.device("meta"):
        model = UNet2DModel(**kwargs)
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize("name", NAMES)
def test_fixture_parameter_count(name):
    config, state, _ = load(name)
    mult = ",".join(str(m) for m in config["channel_mult"])
    assert adm_param_count({**config, "channel_mult": mult}) == sum(v.numel() for v in state.values())
