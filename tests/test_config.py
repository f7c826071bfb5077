"""Config loading: every shipped config validates; errors name the key; overrides are YAML-parsed."""
from __future__ import annotations

import copy
import json

import pytest
import yaml

from pipeline.config import ConfigError, config_from_dict, load_config

CONFIGS = ("configs/small.yaml", "configs/imagenet.yaml", "configs/cifar10.yaml")


@pytest.fixture
def raw():
    with open("configs/small.yaml") as f:
        return yaml.safe_load(f)


@pytest.mark.parametrize("path", CONFIGS)
def test_shipped_configs_validate_and_round_trip(path):
    cfg = load_config(path)
    again = config_from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert cfg.smoothing["sigmas"] == tuple(sorted(cfg.smoothing["sigmas"]))


def test_defaults_are_filled(raw):
    del raw["compute"]["log_every"], raw["smoothing"]["mode"], raw["data"]["crop"]
    cfg = config_from_dict(raw)
    assert (cfg.compute["log_every"], cfg.smoothing["mode"], cfg.data["crop"]) == (100, "full", "center")
    assert cfg.data["selection"] == {"every": 1, "offset": 0, "limit": None, "image_ids": None}
    assert cfg.data["columns"] == {"image": "image", "label": "label", "image_id": "image_id"}


@pytest.mark.parametrize("override, message", [
    ("smoothing.n0=-3", "smoothing.n0: must be an integer in [1, 1000000000], got -3"),
    ("smoothing.n=1.5", "smoothing.n: must be an integer in [1, 1000000000], got 1.5"),
    ("smoothing.mode=greedy", "smoothing.mode: must be one of full, cascade, predict, got 'greedy'"),
    ("smoothing.sigmas=[0.5, -1]", "smoothing.sigmas: must be a non-empty list of positive numbers"),
    ("smoothing.sigmas=[0.5, 0.5]", "smoothing.sigmas: must not repeat a value"),
    ("smoothing.alpha=1", "smoothing.alpha: must be a number in (0, 1), got 1"),
    ("smoothing.p0=0.4", "smoothing.p0: must be a number in [0.5, 1), got 0.4"),
    ("data.format=zip", "data.format: must be one of parquet, webdataset, got 'zip'"),
    ("data.selection.every=0", "data.selection.every: must be a positive integer, got 0"),
    ("data.selection.colour=red", "data.selection.colour: unknown key"),
    ("compute.gpus_per_actor=-1", "compute.gpus_per_actor: must be a finite number >= 0, got -1"),
    ("compute.compile=yes please", "compute.compile: must be true or false, got 'yes please'"),
    ("models.classifier.input_size=[3, 32]", "models.classifier.input_size: must be [3, H, W]"),
    ("models.denoiser.weights=x", "models.denoiser.weights: unknown key"),
    ("output.run_id=a/b", "output.run_id: must be a non-empty string without '/'"),
    ("extra.key=1", "extra: unknown section"),
])
def test_errors_name_the_key(raw, override, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw, [override])
    assert str(err.value).startswith(message)


@pytest.mark.parametrize("section, key", [("data", "uri"), ("models", "denoiser"), ("smoothing", "n0"),
                                          ("output", "run_id")])
def test_missing_required_key(raw, section, key):
    del raw[section][key]
    with pytest.raises(ConfigError, match=rf"^{section}\.{key}: required"):
        config_from_dict(raw)


def test_missing_section(raw):
    del raw["compute"]
    with pytest.raises(ConfigError, match=r"^compute: required section"):
        config_from_dict(raw)


def test_overrides_are_yaml_parsed_and_nested(raw):
    original = copy.deepcopy(raw)
    cfg = config_from_dict(raw, ["smoothing.sigmas=[1.0, 0.12]", "compute.compile=true",
                                 "data.selection.limit=7", "models.classifier.model_kwargs={img_size: 32, depth: 2}",
                                 "output.run_id=r2"])
    assert cfg.smoothing["sigmas"] == (0.12, 1.0)
    assert cfg.compute["compile"] is True
    assert cfg.data["selection"]["limit"] == 7
    assert cfg.models["classifier"]["model_kwargs"] == {"img_size": 32, "depth": 2}
    assert cfg.output["run_id"] == "r2"
    assert raw == original  # the input mapping is not modified


def test_override_needs_key_and_value(raw):
    with pytest.raises(ConfigError, match="must look like"):
        config_from_dict(raw, ["smoothing.n0"])


def test_content_key_ignores_compute_output_and_cache(raw):
    a = config_from_dict(raw)
    b = config_from_dict(raw, ["compute.actors=3", "output.run_id=other", "models.cache_dir=/tmp/c"])
    c = config_from_dict(raw, ["smoothing.n=17"])
    assert a.content_key() == b.content_key()
    assert a.content_key() != c.content_key()


def test_missing_or_malformed_config_file_is_a_one_line_error(tmp_path, capsys):
    from jobs.cli import run_config_job

    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {uri: x\nmodels: [")
    with pytest.raises(ConfigError, match=r"--config .*nope\.yaml: no such file"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match=r"--config .*bad\.yaml: not valid YAML: .*line"):
        load_config(str(bad))
    for path in (tmp_path / "nope.yaml", bad):
        assert run_config_job(["--config", str(path)], "t", "k=v", load_config, lambda cfg: {}) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --config ") and "Traceback" not in err


def test_a_bug_keeps_its_traceback(raw, tmp_path):
    """Only the project's own errors become one-line messages: a ValueError from a bug propagates."""
    from jobs.cli import run_config_job

    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(raw))

    def buggy(cfg):
        raise ValueError("a bug, not a config problem")

    with pytest.raises(ValueError, match="a bug"):
        run_config_job(["--config", str(path)], "t", "k=v", load_config, buggy)


def test_a_project_error_raised_inside_a_ray_task_keeps_its_traceback(raw, tmp_path):
    """Ray re-raises a task's error as a subclass of the remote type: still shown in full."""
    from ray.exceptions import RayTaskError

    from jobs.cli import run_config_job

    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(raw))
    remote = RayTaskError("decode", "Traceback (remote) ...", ConfigError("x: raised in a worker")).as_instanceof_cause()
    assert isinstance(remote, ConfigError)

    def fails_remotely(cfg):
        raise remote

    with pytest.raises(RayTaskError):
        run_config_job(["--config", str(path)], "t", "k=v", load_config, fails_remotely)


def test_exponent_notation_is_a_number(raw):
    """YAML 1.1 reads 1e-3 as a string; configs and --set read it as the float a user means."""
    cfg = config_from_dict(raw, ["smoothing.alpha=1e-3", "smoothing.sigmas=[2.5e-1, 5e-1]"])
    assert cfg.smoothing["alpha"] == 0.001 and cfg.smoothing["sigmas"] == (0.25, 0.5)


@pytest.mark.parametrize("override, message", [
    ("smoothing.sigmas=[.inf]",
     "smoothing.sigmas: must be a non-empty list of positive numbers, all finite, got [inf]"),
    ("smoothing.sigmas=[0.25, .nan]", "smoothing.sigmas: must be a non-empty list of positive numbers, all finite"),
    ("compute.cpus_per_actor=.nan", "compute.cpus_per_actor: must be a finite number >= 0, got nan"),
    ("compute.gpus_per_actor=.inf", "compute.gpus_per_actor: must be a finite number >= 0, got inf"),
    ("compute.cpus_per_task=-.inf", "compute.cpus_per_task: must be a finite number >= 0, got -inf"),
    ("smoothing.alpha=.nan", "smoothing.alpha: must be a number in (0, 1), got nan"),
    ("smoothing.p0=.nan", "smoothing.p0: must be a number in [0.5, 1), got nan"),
    ("data.resolution=100000", "data.resolution: must be an integer in [1, 4096], got 100000"),
    ("data.resolution=0", "data.resolution: must be an integer in [1, 4096], got 0"),
    ("data.resolution=32.0", "data.resolution: must be an integer in [1, 4096], got 32.0"),
    ("data.resize=5000", "data.resize: must be an integer in [1, 4096], got 5000"),
    ("models.denoiser.input.size=8192", "models.denoiser.input.size: must be an integer in [1, 4096], got 8192"),
    ("smoothing.n=10000000000000", "smoothing.n: must be an integer in [1, 1000000000], got 10000000000000"),
    ("smoothing.n0=0", "smoothing.n0: must be an integer in [1, 1000000000], got 0"),
])
def test_non_finite_and_absurd_values_are_refused(raw, override, message):
    """Issue 11, item 7: NaN and inf pass no number check; an absurd size names its bounds."""
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw, [override])
    assert str(err.value).startswith(message)


def test_every_number_check_refuses_nan_and_inf():
    """Each of the module's number checks, called directly: a new one that lets NaN through fails here."""
    import pipeline.config as cfglib

    checks = [cfglib.positive_int, cfglib.nonneg_int, cfglib.nonneg_number, cfglib.open_unit, cfglib.half_to_one,
              cfglib.zero_to_one, cfglib.positive_number, cfglib.int_at_least(-1), cfglib.int_in(1, 10),
              cfglib.image_side]
    for check in checks:
        for bad in (float("nan"), float("inf"), float("-inf")):
            with pytest.raises(ConfigError, match=r"^k: must be .*, got (nan|inf|-inf)$"):
                check("k", bad)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ConfigError, match=r"^k: must be a non-empty list of positive numbers, all finite"):
            cfglib.sigmas("k", [0.5, bad])


def test_the_largest_image_side_is_accepted(raw):
    cfg = config_from_dict(raw, ["data.resolution=4096", "data.resize=4096"])
    assert (cfg.data["resolution"], cfg.data["resize"]) == (4096, 4096)
