"""Run configuration: YAML, validated on load, with ``--set key.sub=value`` overrides.

Guarantee: :func:`load_config` either returns a fully resolved :class:`Config` (every key
present, every value checked) or raises :class:`ConfigError` whose message starts with the
dotted key that is wrong, e.g. ``smoothing.n0: must be a positive integer, got -3``.
Credentials never belong here: storage access comes from the environment.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import re

import yaml

from pipeline.errors import MsdsmoothError
from pipeline.schedules import CASCADE_SCHEDULES, SCHEDULES


class _ConfigLoader(yaml.SafeLoader):
    """YAML's safe loader, reading numbers as YAML 1.2 does: ``1e-3`` is a float (YAML 1.1
    would make it a string), as a user writing ``--set training.lr=1e-3`` means."""


_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
               r"|[0-9][0-9_]*[eE][-+]?[0-9]+|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def parse_yaml(text: Any) -> Any:
    """A YAML document (string or stream) as plain Python values, with :class:`_ConfigLoader`."""
    return yaml.load(text, Loader=_ConfigLoader)


class ConfigError(MsdsmoothError, ValueError):
    """A configuration value is missing, unknown or invalid; the message names the key."""


Check = Callable[[str, Any], Any]
REQUIRED = object()


def _fail(key: str, what: str, value: Any) -> None:
    raise ConfigError(f"{key}: {what}, got {value!r}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def positive_int(key: str, v: Any) -> int:
    if not _is_int(v) or v <= 0:
        _fail(key, "must be a positive integer", v)
    return v


def nonneg_int(key: str, v: Any) -> int:
    if not _is_int(v) or v < 0:
        _fail(key, "must be a non-negative integer", v)
    return v


def number_in(low: float, high: float, brackets: str = "()", message: str | None = None) -> Check:
    """A number (not a bool) from ``low`` to ``high``, each end closed ("[", "]") or open ("(",
    ")") as ``brackets`` says; NaN is in no interval, and an open infinite end refuses inf. The
    message states the interval unless ``message`` words it."""
    what = message or f"must be a number in {brackets[0]}{low:g}, {high:g}{brackets[1]}"

    def check(key: str, v: Any) -> float:
        number = not isinstance(v, bool) and isinstance(v, (int, float))
        if not (number and (low <= v if brackets[0] == "[" else low < v) and (v <= high if brackets[1] == "]" else v < high)):
            _fail(key, what, v)
        return float(v)
    return check


INF = float("inf")
nonneg_number = number_in(0, INF, "[)", "must be a finite number >= 0")


def boolean(key: str, v: Any) -> bool:
    if not isinstance(v, bool):
        _fail(key, "must be true or false", v)
    return v


def string(key: str, v: Any) -> str:
    if not isinstance(v, str) or not v:
        _fail(key, "must be a non-empty string", v)
    return v


def optional(check: Check) -> Check:
    return lambda key, v: None if v is None else check(key, v)


def choice(*options: str) -> Check:
    def check(key: str, v: Any) -> str:
        if v not in options:
            _fail(key, f"must be one of {', '.join(options)}", v)
        return v
    return check


open_unit = number_in(0, 1)
half_to_one = number_in(0.5, 1, "[)")
zero_to_one = number_in(0, 1, "[)")
positive_number = number_in(0, INF, "()", "must be a positive number")


def int_at_least(low: int) -> Check:
    def check(key: str, v: Any) -> int:
        if not _is_int(v) or v < low:
            _fail(key, f"must be an integer >= {low}", v)
        return v
    return check


def int_in(low: int, high: int) -> Check:
    """An integer in [low, high]; the message states the bounds."""
    def check(key: str, v: Any) -> int:
        if not _is_int(v) or not low <= v <= high:
            _fail(key, f"must be an integer in [{low}, {high}]", v)
        return v
    return check


# The largest image side in pixels (data.resolution, data.resize, a denoiser's input size): one
# noisy 4096 x 4096 sample is 200 MB in float32, and a certification draws n of them per image.
MAX_IMAGE_SIDE = 4096
image_side = int_in(1, MAX_IMAGE_SIDE)
MAX_SAMPLES = 10**9  # Monte Carlo samples per (image, sigma): 10,000x the largest published protocol (100,000)
sample_count = int_in(1, MAX_SAMPLES)


def sigmas(key: str, v: Any) -> tuple[float, ...]:
    """A non-empty list of distinct finite noise levels > 0, returned ascending."""
    ok = isinstance(v, (list, tuple)) and len(v) > 0 and all(
        isinstance(s, (int, float)) and not isinstance(s, bool) and 0 < s < float("inf") for s in v)
    if not ok:
        _fail(key, "must be a non-empty list of positive numbers, all finite", v)
    if len(set(v)) != len(v):
        _fail(key, "must not repeat a value", v)
    return tuple(sorted(float(s) for s in v))


def radius_grid(key: str, v: Any) -> tuple[float, ...]:
    """A non-empty list of distinct finite radii >= 0, returned ascending."""
    ok = isinstance(v, (list, tuple)) and len(v) > 0 and all(
        isinstance(r, (int, float)) and not isinstance(r, bool) and 0 <= r < float("inf") for r in v)
    if not ok:
        _fail(key, "must be a non-empty list of finite numbers >= 0", v)
    if len(set(v)) != len(v):
        _fail(key, "must not repeat a value", v)
    return tuple(sorted(float(r) for r in v))


above_one = number_in(1, INF, "()", "must be a finite number > 1")
zero_to_half = number_in(0, 0.5, "[)")
zero_to_one = number_in(0, 1, "[)")
unit_share = number_in(0, 1, "(]")


def sampling_rules(check: Check) -> Check:
    """``check`` (the smoothing section), then the rules between its keys that sequential
    sampling adds: its plan bounds at alpha < 0.5, and its cascade has the bonferroni budgets."""
    def checked(key: str, v: Any) -> dict:
        out = check(key, v)
        if out["sampling"] == "sequential":
            if out["alpha"] >= 0.5:
                _fail(f"{key}.alpha", "must be < 0.5 with sequential sampling", out["alpha"])
            looks = out["sequential"]
            if looks["final_share"] + looks["top_share"] > 1:
                _fail(f"{key}.sequential.top_share", "must be <= 1 - final_share (shares of one alpha)",
                      looks["top_share"])
            if out["mode"] == "cascade" and out["schedule"] not in CASCADE_SCHEDULES:
                _fail(f"{key}.schedule", f"must be {' or '.join(CASCADE_SCHEDULES)} with sequential sampling in "
                      "cascade mode", out["schedule"])
        return out
    return checked


def string_list(key: str, v: Any) -> tuple[str, ...]:
    if not isinstance(v, (list, tuple)) or not all(isinstance(s, str) for s in v):
        _fail(key, "must be a list of strings", v)
    return tuple(v)


def input_size(key: str, v: Any) -> list[int]:
    if not (isinstance(v, (list, tuple)) and len(v) == 3 and all(_is_int(x) and x > 0 for x in v)):
        _fail(key, "must be [3, H, W] with positive integers", v)
    return list(v)


def run_id(key: str, v: Any) -> str:
    if not isinstance(v, str) or not v or "/" in v or v.startswith("."):
        _fail(key, "must be a non-empty string without '/' and not starting with '.'", v)
    return v


def mapping(key: str, v: Any) -> dict:
    if not isinstance(v, Mapping):
        _fail(key, "must be a mapping", v)
    return dict(v)


def per_sigma_uris(key: str, v: Any) -> dict[str, str]:
    """``{sigma: weights uri}``, a model per noise level: every key a noise level (a finite
    number > 0, or a string that reads as one), none twice, every value a non-empty string.
    Returned ascending by sigma with the keys written as ``str(float(sigma))`` ("0.25", "1.0"),
    so that the mapping reads the same after a JSON round trip (the manifest); the keys must be
    ``smoothing.sigmas`` exactly (:func:`check_per_sigma_models`)."""
    if not isinstance(v, Mapping) or not v:
        _fail(key, "must be a non-empty mapping {sigma: weights uri}", v)
    out: dict[str, str] = {}
    for level, uri in v.items():
        sigma = _noise_level(level)
        if sigma is None:
            raise ConfigError(f"{key}.{level}: not a noise level (a finite number > 0)")
        name = str(sigma)
        if name in out:
            raise ConfigError(f"{key}.{name}: given twice")
        out[name] = string(f"{key}.{name}", uri)
    return dict(sorted(out.items(), key=lambda item: float(item[0])))


def _noise_level(v: Any) -> float | None:
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            return None
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < INF
    return float(v) if ok else None


def check_per_sigma_models(models: Mapping[str, Any], smoothing: Mapping[str, Any]) -> None:
    """The rule between the models and smoothing sections: ``models.classifier.per_sigma``, when
    given, has a classifier for every one of ``smoothing.sigmas`` and for nothing else
    (ConfigError naming the key ``models.classifier.per_sigma.<sigma>``)."""
    per_sigma = models["classifier"]["per_sigma"]
    if per_sigma is None:
        return
    key, sigmas = "models.classifier.per_sigma", [str(float(s)) for s in smoothing["sigmas"]]
    for name in sigmas:
        if name not in per_sigma:
            raise ConfigError(f"{key}.{name}: required: smoothing.sigmas has {name} (the keys must be "
                              f"smoothing.sigmas exactly: {', '.join(sigmas)})")
    for name in per_sigma:
        if name not in sigmas:
            raise ConfigError(f"{key}.{name}: not one of smoothing.sigmas ({', '.join(sigmas)})")


def model_uris(models: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(config key, uri) of every weights file or folder a resolved ``models`` section names:
    ``models.denoiser.uri`` (none without a denoiser), then ``models.classifier.uri`` or each
    ``models.classifier.per_sigma.<sigma>``."""
    denoiser, classifier = models["denoiser"], models["classifier"]
    uris = [("models.denoiser.uri", denoiser["uri"])] if denoiser is not None and denoiser["uri"] is not None else []
    if classifier.get("per_sigma") is not None:
        return uris + [(f"models.classifier.per_sigma.{name}", uri) for name, uri in classifier["per_sigma"].items()]
    return uris + ([("models.classifier.uri", classifier["uri"])] if classifier["uri"] is not None else [])


def section(fields: Mapping[str, tuple[Any, Check]]) -> Check:
    """Check a nested mapping against ``{name: (default or REQUIRED, check)}``."""
    def check(key: str, v: Any) -> dict:
        v = {} if v is None else v
        if not isinstance(v, Mapping):
            _fail(key, "must be a mapping", v)
        unknown = sorted(set(v) - set(fields))
        if unknown:
            raise ConfigError(f"{key}.{unknown[0]}: unknown key (known: {', '.join(fields)})")
        out = {}
        for name, (default, field_check) in fields.items():
            sub = f"{key}.{name}"
            if name not in v and default is REQUIRED:
                raise ConfigError(f"{sub}: required")
            out[name] = field_check(sub, v[name] if name in v else copy.deepcopy(default))
        return out
    return check


def auto_or(check: Check) -> Check:
    """``auto`` (chosen for the device at run time, pipeline.device_settings) or a value ``check`` accepts."""
    return lambda key, v: v if v == "auto" else check(key, v)


def one_weight_source(check: Check, flags: Sequence[str], values: Sequence[str] = ()) -> Check:
    """``check`` (a model's section), then exactly one weight source: ``uri``, one of the other
    ``values`` keys given (e.g. ``per_sigma``) or one of the boolean ``flags`` set true (e.g.
    ``random_weights``); never a silent random default."""
    def checked(key: str, v: Any) -> dict:
        out = check(key, v)
        given = [f"{key}.{name}" for name in ("uri", *values) if out[name] is not None]
        given += [f"{key}.{flag}" for flag in flags if out[flag]]
        if not given:
            others = [f"{key}.{name}" for name in values] + [f"{key}.{flag}: true" for flag in flags]
            raise ConfigError(f"{key}.uri: required (or {' or '.join(others)})")
        if len(given) > 1:
            raise ConfigError(f"{given[1]}: cannot be combined with {given[0]}: the weights come from one source")
        return out
    return checked


SCHEMA: dict[str, Check] = {
    "data": section({
        "uri": (REQUIRED, string),                      # file, folder or glob on any fsspec URI
        "format": (REQUIRED, choice("parquet", "webdataset")),
        "expected_shards": (None, optional(positive_int)),
        "columns": (None, section({                     # parquet column names
            "image": ("image", string), "label": ("label", string), "image_id": ("image_id", string)})),
        "selection": (None, section({
            "every": (1, positive_int), "offset": (0, nonneg_int),
            "limit": (None, optional(positive_int)), "image_ids": (None, optional(string_list))})),
        "resolution": (REQUIRED, image_side),           # certification resolution (square)
        "resize": (None, optional(image_side)),         # shorter side before the crop; null = resolution
        "crop": ("center", choice("center", "none")),   # none: squash to resolution x resolution
        "interpolation": ("bicubic", choice("bicubic", "bilinear", "lanczos", "nearest")),
    }),
    "models": section({
        # weights: exactly one of uri, random_weights: true (and, classifier, pretrained: true or
        # per_sigma). denoiser: null (given explicitly) classifies the noisy image itself (Cohen et al.)
        "denoiser": (REQUIRED, optional(one_weight_source(section({
            "uri": (None, optional(string)), "random_weights": (False, boolean),
            "preset": (None, optional(string)),
            "adm_config": (None, optional(mapping)), "schedule": (None, optional(mapping)),
            # where the data.resolution image sits in the UNet's input (pipeline.models.denoiser)
            "input": (None, section({
                "mode": ("direct", choice("direct", "reflect_pad")),
                "size": (None, optional(image_side))}))}), ("random_weights",)))),
        "classifier": (REQUIRED, one_weight_source(section({
            "name": (REQUIRED, string), "num_classes": (REQUIRED, positive_int),
            # weights layout (pipeline.models.classifier)
            "format": ("timm", choice("timm", "hf-vit", "cohen", "jeong-shin-clip")),
            "uri": (None, optional(string)),
            # {sigma: uri}: one classifier per noise level, same name and format (keys: smoothing.sigmas)
            "per_sigma": (None, optional(per_sigma_uris)),
            "pretrained": (False, boolean), "random_weights": (False, boolean),
            "model_kwargs": (None, optional(mapping)), "input_size": (None, optional(input_size))}),
            ("pretrained", "random_weights"), ("per_sigma",))),
        "cache_dir": (None, optional(string)),
    }),
    "smoothing": sampling_rules(section({
        "sigmas": (REQUIRED, sigmas),
        "n0": (REQUIRED, sample_count),
        "n": (REQUIRED, sample_count),                  # estimation samples; n_max with sequential sampling
        "seed": (0, nonneg_int),
        # full: CERTIFY per sigma; cascade: Jeong & Shin's; predict: Cohen's PREDICT per sigma (no radius)
        "mode": ("full", choice("full", "cascade", "predict")),
        "p0": (0.5, half_to_one),
        "alpha": (0.001, open_unit),
        "schedule": ("bonferroni", choice(*SCHEDULES)),
        # fixed: n samples per pair; sequential: up to n, stopping per pipeline.sequential's plan
        "sampling": ("fixed", choice("fixed", "sequential")),
        # the grid a sequential plan decides; null: 0, 0.25, ... up to the largest reachable radius
        "radii": (None, optional(radius_grid)),
        "sequential": (None, section({                  # looks first_look * look_ratio**i up to n
            "first_look": (100, positive_int),
            "look_ratio": (1.25, above_one),
            "final_share": (0.75, unit_share),          # alpha's share spent at the last look
            "top_share": (0.2, zero_to_one),            # at the looks certifying each sigma's top bin
            "futility": (0.1, zero_to_half)})),         # level of the futility bound; 0: none
    })),
    "compute": section({
        "actors": (1, positive_int),
        "gpus_per_actor": (0.0, nonneg_number),         # 0 = CPU actors
        "cpus_per_actor": (1.0, nonneg_number),
        "cpus_per_task": (1.0, nonneg_number),          # preprocessing (decode + resize) tasks
        # device settings: auto = chosen for the device (pipeline.device_settings: measured on CPU)
        "batch_size": ("auto", auto_or(positive_int)),  # noisy samples per forward pass
        "images_per_call": (16, positive_int),          # images per actor call = per counts file
        "dtype": ("auto", auto_or(choice("float32", "float16", "bfloat16"))),
        "channels_last": ("auto", auto_or(boolean)),
        "compile": ("auto", auto_or(boolean)),
        "torch_threads": (None, optional(positive_int)),
        "log_every": (100, positive_int),               # images between progress log lines
    }),
    "output": section({
        "uri": (REQUIRED, string),
        "run_id": (REQUIRED, run_id),
    }),
}

# Sections whose values decide the content of the counts: a resumed run must match them.
CONTENT_SECTIONS = ("data", "models", "smoothing")


@dataclass(frozen=True)
class Config:
    """A validated, fully resolved configuration (plain dicts, JSON-serialisable)."""
    data: dict
    models: dict
    smoothing: dict
    compute: dict
    output: dict

    def to_dict(self) -> dict:
        return {name: _plain(getattr(self, name)) for name in SCHEMA}

    def content_key(self) -> dict:
        """The part of the config that determines the counts rows (for resume checks)."""
        d = self.to_dict()
        d["models"].pop("cache_dir")
        return {name: d[name] for name in CONTENT_SECTIONS}


def _plain(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def changed_keys(previous: Mapping, current: Mapping, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config mappings (sorted)."""
    out = []
    for k in sorted(set(previous) | set(current), key=str):
        a, b, key = previous.get(k), current.get(k), f"{prefix}{k}"
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += changed_keys(a, b, f"{key}.")
        elif a != b:
            out.append(key)
    return out


def refuse_changed(key: str, name: str, previous: Mapping, current: Mapping) -> None:
    """The one "config changed on resume" rule: ConfigError naming ``key`` (e.g. output.run_id)
    and every setting that differs when ``previous`` (what the existing run recorded) and
    ``current`` (what this submission would do) disagree."""
    diff = changed_keys(previous, current)
    if diff:
        raise ConfigError(f"{key}: {name} exists with a different config ({', '.join(diff)} differ); "
                          f"use a new {key.rsplit('.', 1)[-1]} or the original settings")


def validate_sections(raw: Any, schema: Mapping[str, Check], require_all: bool = True) -> dict[str, Any]:
    """Check every section of ``raw`` with ``schema``; unknown sections (and, with
    ``require_all``, missing ones) are :class:`ConfigError` naming the section."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"<root>: must be a mapping of sections, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(schema))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown section (known: {', '.join(schema)})")
    if require_all:
        for name in schema:
            if name not in raw:
                raise ConfigError(f"{name}: required section")
    return {name: check(name, raw.get(name)) for name, check in schema.items()}


def validate(raw: Any) -> Config:
    """Validate a raw mapping (as parsed from YAML) into a :class:`Config`."""
    sections = validate_sections(raw, SCHEMA)
    check_per_sigma_models(sections["models"], sections["smoothing"])
    return Config(**sections)


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one ``dotted.key=value`` override in place; the value is parsed as YAML."""
    key, sep, text = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"{assignment}: override must look like section.key=value")
    parts = key.strip().split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[:i + 1])}: is not a mapping, cannot set {key}")
        node = child
    node[parts[-1]] = parse_yaml(text) if text.strip() else None


def with_overrides(raw: Mapping, overrides: Sequence[str] = ()) -> dict:
    """A deep copy of ``raw`` with the ``dotted.key=value`` overrides applied."""
    raw = copy.deepcopy(dict(raw))
    for assignment in overrides:
        apply_override(raw, assignment)
    return raw


def read_yaml(path: str, overrides: Sequence[str] = ()) -> dict:
    """A YAML file (local path or fsspec URI) as a dict, with the overrides applied."""
    import fsspec

    try:
        with fsspec.open(path, "r") as f:
            raw = parse_yaml(f) or {}
    except FileNotFoundError as exc:
        raise ConfigError(f"--config {path}: no such file") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path}: not valid YAML: {' '.join(str(exc).split())}") from exc
    return with_overrides(raw, overrides)


def load_config(path: str, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML file (local path or fsspec URI), apply overrides, validate."""
    return validate(read_yaml(path, overrides))


def config_from_dict(raw: Mapping, overrides: Sequence[str] = ()) -> Config:
    return validate(with_overrides(raw, overrides))
