"""``python -m jobs.smoke_protocols --end-to-end`` on Cohen et al.'s ImageNet protocol (no denoiser, a
ResNet-50 with random weights, about 0.6 s per sample on CPU): two synthetic 300 x 260 images
certified through the real pipeline on the tests' local Ray, every (image, sigma) row once."""
from __future__ import annotations

import json
import os

import pytest

from conftest import REPO
from jobs.smoke_protocols import main

pytestmark = pytest.mark.slow


def test_cohen_imagenet_certifies_end_to_end_with_random_weights(ray_local, capsys):
    config = os.path.join(REPO, "configs", "protocols", "cohen-imagenet.yaml")
    assert main(["--config", config, "--end-to-end"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    run = summary["end_to_end"]
    assert (run["images"], run["image_size"]) == (2, [300, 260])
    assert run["rows"] == run["pairs"] == 2 * 3  # one row per (image, sigma): the job raises otherwise
    assert run["samples"] == 2 * 3 * (1 + 2)
    assert run["seconds_per_sample"] > 0 and run["sampling_seconds_per_sample"] > 0
    assert run["actor_peak_memory_gib"] > 0
