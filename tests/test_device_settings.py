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

    def measure(model, device, image, dtype, channels_last, batch_size, min_seconds, compile=False):
        key = (dtype, channels_last, batch_size, "compiled") if compile else (dtype, channels_last, batch_size)
        asked.append(key)
        return Measurement(dtype, channels_last, batch_size, speeds[key], compile, 30.0 if compile else 0.1)
    return measure, asked


def test_cpu_picks_the_fastest_measured_setting_and_says_why(monkeypatch):
    speeds = {("float32", True, 128): 100.0, ("float32", False, 128): 120.0, ("bfloat16", True, 128): 90.0,
              ("bfloat16", False, 128): 150.0, ("bfloat16", False, 64): 140.0, ("bfloat16", False, 256): 141.0}
    measure, asked = fake_speeds(speeds)
    monkeypatch.setattr(ds, "_measure", measure)
    got = resolve_device_settings(AUTO, "cpu", tiny_model(), (3, 16, 16))
    assert (got.dtype, got.channels_last, got.compile, got.batch_size) == ("bfloat16", False, False, 128)
    assert sorted(asked) == sorted(speeds)
    assert re.fullmatch(r"cpu: bfloat16, contiguous, eager, batch 128: 1\.50x float32, channels_last, eager, batch 128 "
                        r"\(measured 6 settings in [0-9.]+ s\)", got.reason), got.reason
    # the batch sweep runs on the winner of the dtype x layout sweep, and a larger batch can win
    speeds[("bfloat16", False, 256)] = 200.0
    got = resolve_device_settings(AUTO, "cpu", tiny_model(), (3, 16, 16))
    assert got.batch_size == 256 and got.reason.startswith("cpu: bfloat16, contiguous, eager, batch 256: 2.00x")


def test_cpu_measures_compiled_settings_only_for_long_runs_and_counts_the_compile(monkeypatch):
    speeds = {("float32", True, 128): 100.0, ("float32", False, 128): 90.0, ("bfloat16", True, 128): 10.0,
              ("bfloat16", False, 128): 12.0, ("float32", True, 64): 95.0, ("float32", True, 256): 99.0,
              ("float32", False, 128, "compiled"): 150.0, ("bfloat16", False, 128, "compiled"): 200.0}
    measure, asked = fake_speeds(speeds)  # a compiled setting's first call takes 30 s
    monkeypatch.setattr(ds, "_measure", measure)
    monkeypatch.setattr(ds, "native_bf16", lambda: True)
    short = 100.0 * ds.CPU_COMPILE_MIN_WORK_S * 0.99  # just under the threshold at the eager 100 samples/s
    got = resolve_device_settings(AUTO, "cpu", tiny_model(), (3, 16, 16), work_samples=short)
    assert got.compile is False and not any("compiled" in key for key in asked)
    asked.clear()
    # 240 s eager; bfloat16 compiled: 30 s + 120 s: chosen, and the reason says the work it was measured for
    got = resolve_device_settings(AUTO, "cpu", tiny_model(), (3, 16, 16), work_samples=24_000)
    assert (got.dtype, got.channels_last, got.compile, got.batch_size) == ("bfloat16", False, True, 128)
    assert [k for k in asked if "compiled" in k] == [("bfloat16", False, 128, "compiled")]
    assert "compiled ones for 24,000 samples per actor" in got.reason
    # without native bfloat16 the compiled candidate is float32
    monkeypatch.setattr(ds, "native_bf16", lambda: False)
    asked.clear()
    got = resolve_device_settings(AUTO, "cpu", tiny_model(), (3, 16, 16), work_samples=24_000)
    assert [k for k in asked if "compiled" in k] == [("float32", False, 128, "compiled")]
    assert (got.dtype, got.compile) == ("float32", True)  # 30 s + 160 s beats 240 s eager
    monkeypatch.setattr(ds, "native_bf16", lambda: True)
    # a compile that costs more than it saves loses: 2.0x faster, but the run is short beside 30 s
    speeds[("bfloat16", False, 128, "compiled")] = 105.0
    speeds[("float32", False, 128, "compiled")] = 101.0
    got = resolve_device_settings(AUTO, "cpu", tiny_model(), (3, 16, 16), work_samples=24_000)
    assert got.compile is False and (got.dtype, got.channels_last) == ("float32", True)
    # an explicit compile is never measured
    asked.clear()
    got = resolve_device_settings(AUTO | {"compile": False}, "cpu", tiny_model(), (3, 16, 16), work_samples=10**9)
    assert got.compile is False and not any("compiled" in key for key in asked)


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


def test_projected_work_counts_the_sigmas_drawn_and_the_sequential_share():
    from pipeline.certify_run import SEQUENTIAL_DRAW_SHARE, projected_samples_per_actor

    full = {"mode": "full", "sigmas": [0.25, 0.5, 1.0], "n0": 100, "n": 10_000, "sampling": "fixed"}
    assert projected_samples_per_actor(full, 24, 2) == 24 * 3 * 10_100 / 2
    assert projected_samples_per_actor(full | {"mode": "cascade"}, 24, 2) == 24 * 10_100 / 2  # the top stage
    sequential = full | {"sampling": "sequential"}  # n0 is always drawn, n only in part
    assert projected_samples_per_actor(sequential, 24, 1) == 24 * 3 * (100 + SEQUENTIAL_DRAW_SHARE * 10_000)
    assert 0 < SEQUENTIAL_DRAW_SHARE < 1
