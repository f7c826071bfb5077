"""Device settings: ``auto`` is the config default, explicit values win, the CPU choice is the
fastest measured setting (and says so), CUDA follows the documented policy."""
from __future__ import annotations

import re

import pytest
import torch

import pipeline.device_settings as ds
from pipeline.config import ConfigError, config_from_dict
from pipeline.device_settings import CPU_DEFAULT, DeviceSettings, Measurement, resolve_device_settings
from tests.tiny_models import tiny_model

AUTO = {"dtype": "auto", "channels_last": "auto", "compile": "auto", "batch_size": "auto"}
MINIMAL = {"data": {"uri": "x", "format": "parquet", "resolution": 16},
           "models": {"denoiser": {"random_weights": True},
                      "classifier": {"name": "resnet18", "num_classes": 10, "random_weights": True}},
           "smoothing": {"sigmas": [0.5], "n0": 1, "n": 1}, "compute": {}, "output": {"uri": "o", "run_id": "r"}}


def test_config_defaults_are_auto_and_explicit_values_are_checked():
    cfg = config_from_dict(MINIMAL)
    assert {k: cfg.compute[k] for k in AUTO} == AUTO
    cfg = config_from_dict(MINIMAL, ["compute.dtype=bfloat16", "compute.channels_last=false",
                                     "compute.compile=true", "compute.batch_size=64"])
    assert (cfg.compute["dtype"], cfg.compute["channels_last"], cfg.compute["compile"], cfg.compute["batch_size"]) \
        == ("bfloat16", False, True, 64)
    for bad, message in (("compute.batch_size=0", "compute.batch_size: must be a positive integer"),
                         ("compute.dtype=int8", "compute.dtype: must be one of"),
                         ("compute.channels_last=maybe", "compute.channels_last: must be true or false")):
        with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
            config_from_dict(MINIMAL, [bad])


def test_explicit_values_are_used_as_given_without_measuring(monkeypatch):
    monkeypatch.setattr(ds, "_measure", lambda *a, **k: pytest.fail("measured although every value was set"))
    given = {"dtype": "float16", "channels_last": True, "compile": True, "batch_size": 12}
    assert resolve_device_settings(given, "cpu", tiny_model()) == DeviceSettings(**given, reason="cpu: all four set in the config")


def fake_speeds(speeds):
    """A _measure that returns ``speeds[(dtype, channels_last, batch)]`` and records what was asked."""
    asked = []

    def measure(model, device, image, dtype, channels_last, batch_size, passes):
        asked.append((dtype, channels_last, batch_size))
        return Measurement(dtype, channels_last, batch_size, speeds[(dtype, channels_last, batch_size)])
    return measure, asked


def test_cpu_picks_the_fastest_measured_setting_and_says_why(monkeypatch):
    speeds = {("float32", True, 128): 100.0, ("float32", False, 128): 120.0, ("bfloat16", True, 128): 90.0,
              ("bfloat16", False, 128): 150.0, ("bfloat16", False, 64): 140.0, ("bfloat16", False, 256): 141.0}
    measure, asked = fake_speeds(speeds)
    monkeypatch.setattr(ds, "_measure", measure)
    got = resolve_device_settings(AUTO, "cpu", tiny_model(), (3, 16, 16))
    assert (got.dtype, got.channels_last, got.compile, got.batch_size) == ("bfloat16", False, False, 128)
    assert sorted(asked) == sorted(speeds)
    assert re.fullmatch(r"cpu: bfloat16, contiguous, eager, batch 128: 1\.50x float32, channels_last, batch 128 "
                        r"\(measured 6 settings in [0-9.]+ s\)", got.reason), got.reason
    # the batch sweep runs on the winner of the dtype x layout sweep, and a larger batch can win
    speeds[("bfloat16", False, 256)] = 200.0
    got = resolve_device_settings(AUTO, "cpu", tiny_model(), (3, 16, 16))
    assert got.batch_size == 256 and got.reason.startswith("cpu: bfloat16, contiguous, eager, batch 256: 2.00x")


def test_cpu_sweep_keeps_explicit_values_fixed(monkeypatch):
    speeds = {("float32", True, 32): 10.0, ("float32", False, 32): 5.0}
    measure, asked = fake_speeds(speeds)
    monkeypatch.setattr(ds, "_measure", measure)
    got = resolve_device_settings(AUTO | {"dtype": "float32", "batch_size": 32, "compile": True}, "cpu", tiny_model())
    assert (got.dtype, got.channels_last, got.compile, got.batch_size) == ("float32", True, True, 32)
    assert sorted(asked) == sorted(speeds)
    assert got.reason.endswith("; from the config: dtype=float32, compile=True, batch_size=32")


def test_cpu_measures_the_real_model():
    """No fakes: the sweep runs the sampler; the choice is one of the candidates, never compiled."""
    model = tiny_model()
    got = resolve_device_settings(AUTO | {"batch_size": 2}, "cpu", model, (3, 16, 16))
    assert got.dtype in ("float32", "bfloat16") and got.batch_size == 2 and got.compile is False
    assert re.search(r"\(measured 4 settings in [0-9.]+ s\); from the config: batch_size=2$", got.reason), got.reason


def test_cpu_without_a_model_uses_the_documented_default():
    got = resolve_device_settings(AUTO | {"batch_size": 64}, "cpu")
    assert got.record() == CPU_DEFAULT | {"batch_size": 64, "reason": got.reason}
    assert "documented default" in got.reason and got.reason.endswith("from the config: batch_size=64")


@pytest.mark.parametrize("bf16, dtype", [(True, "bfloat16"), (False, "float32")])
def test_cuda_policy(monkeypatch, bf16, dtype):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16)
    got = resolve_device_settings(AUTO, "cuda")
    assert (got.dtype, got.channels_last, got.compile, got.batch_size) == (dtype, True, True, ds.CUDA_DEFAULT_BATCH)
    assert got.reason.startswith(f"cuda: {dtype}, channels_last, compiled, batch {ds.CUDA_DEFAULT_BATCH}: policy")
    got = resolve_device_settings(AUTO | {"compile": False}, "cuda")
    assert got.compile is False and got.reason.endswith("from the config: compile=False")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_batch_probe_finds_a_batch_that_runs():
    got = resolve_device_settings(AUTO | {"compile": False}, "cuda", tiny_model(), (3, 16, 16))
    assert ds.CUDA_PROBE_START <= got.batch_size <= ds.MAX_CUDA_BATCH and "doubling probe" in got.reason
