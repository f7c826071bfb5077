"""Time to table: wall seconds from shards to the certified-accuracy table, the reference
implementations against this project, on the same images, models, sigmas, n0, n and alpha.

(a) ``reference``: the reference implementations' loop (pipeline.reference_loop: one image and one
    sigma at a time, their batch of 1,000, q_sample + p_sample denoise, their counting loop) in
    this process, with as many torch threads as the whole actor pool of (b) has (``compute.actors``
    x the actor's threads), after reading and decoding the selected images from the shards; then CERTIFY
    per (image, sigma) (pipeline.certification.certify) into a results table.
(b) ``full``: :func:`pipeline.certify_run.run_certification` in full mode on an embedded local Ray
    (started and stopped inside the timing, as ``python -m jobs.certify`` does), then the counts
    read back and :func:`analysis.results.certify_table`; with the project's defaults
    (:data:`PROJECT_DEFAULTS`: device settings measured on the device, sequential sampling with
    n_max = n), not the demo's pinned ones.
(c) ``cascade``: the same in cascade mode; its table is the cascade over every sigma.
(b) and (c) each start with an empty torch.compile cache (:func:`empty_compile_cache`): a
compiled setting costs them a first user's cold compile.

:func:`fixed_vs_sequential` times the project alone with fixed and with sequential sampling
(same n_max and alpha), per mode: the samples each spends and both certified tables.

Default workload: the demo's models (configs/demo/models), the digits test split written as
Parquet shards (pipeline.digits), the demo's sigmas and alpha, ``images`` of the demo's selection.

How (a) and (b) are compared: the two draw independent noise, so tables agree up to Monte Carlo
noise, not bit for bit. Per sigma: the number of images with the same decision (class or
abstain) and, per radius of the summary, whether the certified accuracies differ by at most
:func:`noise_tolerance` (3 standard deviations of the difference of two independent estimates,
plus one image). The smoothed functions differ only by the timestep's rounding (pipeline.reference_loop).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.results import GRID_LABEL, certify_table, concat_results, results_frame, single_method
from analysis.summary import radius_column, summarize, to_markdown
from pipeline.config import Config, load_config
from pipeline.digits import DEMO_CONFIG, DEMO_MODELS, DEMO_RADII, write_digit_shards

log = logging.getLogger(__name__)
PATHS = ("reference", "full", "cascade")


def demo_config(work_dir: Path, images: int, n0: int, n: int, overrides: list[str] = ()) -> Config:
    """The demo's config on digits shards written under ``work_dir`` (once), ``images`` of its
    selection, ``n0`` / ``n`` samples, output under ``work_dir/runs``."""
    shards = work_dir / "shards"
    uri = shards.resolve().as_uri() if shards.exists() else write_digit_shards("test", work_dir / "images", shards, 120)
    return load_config(str(DEMO_CONFIG), [
        f"data.uri={uri}", f"data.selection.limit={images}",
        f"models.denoiser.uri={DEMO_MODELS / 'denoiser'}",
        f"models.classifier.uri={DEMO_MODELS / 'classifier.safetensors'}",
        f"output.uri={(work_dir / 'runs').as_uri()}", f"smoothing.n0={n0}", f"smoothing.n={n}", *overrides])


def demo_model(cfg: Config):
    """The config's denoise-and-classify model (eval mode, CPU)."""
    from pipeline.models.factory import create_denoise_classify

    return create_denoise_classify(cfg.models["denoiser"], cfg.models["classifier"], cfg.models["cache_dir"],
                                   resolution=cfg.data["resolution"])


def read_selected_images(cfg: Config) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image_ids, labels, uint8 images [N, R, R, 3]) of the config's selection, in dataset order,
    read shard by shard in this process (as the reference scripts iterate their dataset)."""
    import pyarrow.parquet as pq

    from pipeline.images import resize_image
    from pipeline.shards import list_shards, scan_image_ids, select_ids

    d, cols = cfg.data, cfg.data["columns"]
    if d["format"] != "parquet":
        raise ValueError("the time-to-table benchmark reads Parquet shards")
    fs, shards = list_shards(d["uri"], d["format"])
    selected = select_ids(scan_image_ids(fs, shards, "parquet", cols["image_id"]), d["selection"])
    ids, labels, images = [], [], []
    for shard in shards:
        with fs.open(shard, "rb") as f:
            table = pq.read_table(f, columns=[cols["image_id"], cols["image"], cols["label"]]).to_pydict()
        for image_id, data, label in zip(table[cols["image_id"]], table[cols["image"]], table[cols["label"]]):
            if selected is None or image_id in selected:
                ids.append(image_id)
                labels.append(int(label))
                images.append(resize_image(data, d["resolution"], d["resize"], d["crop"], d["interpolation"]))
    return np.array(ids, dtype=object), np.array(labels, dtype=np.int64), np.stack(images)


def reference_table(cfg: Config, batch_size: int) -> pd.DataFrame:
    """(a): models, images, the reference loop, CERTIFY per (image, sigma); one results frame per sigma."""
    import torch

    from pipeline.certification import certify
    from pipeline.certify_actor import actor_threads
    from pipeline.images import to_float_chw
    from pipeline.reference_loop import ReferenceDenoiseClassify, reference_counts

    s = cfg.smoothing
    torch.set_num_threads(cfg.compute["actors"] * actor_threads(cfg.compute))  # the CPU threads of the actor pool
    model = ReferenceDenoiseClassify(demo_model(cfg))
    ids, labels, images = read_selected_images(cfg)
    torch.manual_seed(s["seed"])
    counts0, counts = reference_counts(model, to_float_chw(images), s["sigmas"], s["n0"], s["n"], batch_size)
    frames = []
    for k, sigma in enumerate(s["sigmas"]):
        decided = [certify(counts0[i, k], counts[i, k], sigma, s["alpha"]) for i in range(len(ids))]
        pred = np.array([p for p, _ in decided], dtype=np.int64)
        radius = np.array([r for _, r in decided], dtype=np.float64)
        order = np.argsort(ids.astype(str))  # certify_table sorts by image_id
        frames.append(results_frame(ids[order], labels[order], single_method(sigma), pred[order], radius[order],
                                    np.where(pred[order] >= 0, sigma, np.nan), None))
    return concat_results(frames)


def project_run(cfg: Config, mode: str, run_id: str | None = None):
    """(b) / (c): the certification run in ``mode`` (its own run_id): (results table, the run's
    validated CountsTable); a sequential run's certificates by its plan, as the aggregation
    recomputes them."""
    from analysis.counts import read_counts, validate_counts
    from analysis.io import resolve_run
    from pipeline.certify_run import run_certification
    from pipeline.config import config_from_dict
    from pipeline.sequential import sequential_plan

    raw = cfg.to_dict()
    raw["smoothing"]["mode"] = mode
    raw["output"]["run_id"] = run_id or f"time-to-table-{mode}"
    run_cfg = config_from_dict(raw)
    summary = run_certification(run_cfg)
    s = run_cfg.smoothing
    counts = validate_counts(read_counts(resolve_run(summary["run"])))
    plan = sequential_plan(s)
    if mode == "cascade":
        table = certify_table(counts, sigmas=[], cascades=[s["sigmas"]], p0=s["p0"], alpha=s["alpha"],
                              schedule=s["schedule"], plan=plan)
    else:
        table = certify_table(counts, p0=s["p0"], alpha=s["alpha"], schedule=s["schedule"], plan=plan)
    return table, counts


def noise_tolerance(p: float, images: int) -> float:
    """Largest difference of two independent certified-accuracy estimates over ``images`` images
    read as Monte Carlo noise: 3 standard deviations of the difference, plus one image."""
    return 3 * math.sqrt(2 * p * (1 - p) / images) + 1 / images


@dataclass
class MethodAgreement:
    """How (a) and (b) agree on one single-sigma method."""

    method: str
    images: int
    same_decision: int           # same class or both abstain
    max_radius_gap: float        # over the images with the same decision
    within_noise: bool           # every radius column of the summary within noise_tolerance

    def line(self) -> str:
        return (f"{self.method}: same decision {self.same_decision}/{self.images}, max radius gap where the "
                f"decision agrees {self.max_radius_gap:.3f}, certified accuracies "
                f"{'within' if self.within_noise else 'OUTSIDE'} Monte Carlo noise")


def compare_tables(reference: pd.DataFrame, ours: pd.DataFrame, radii=DEMO_RADII) -> list[MethodAgreement]:
    """Per single-sigma method of ``reference``: agreement with ``ours`` (module docstring)."""
    out = []
    ours = ours.assign(method=ours["method"].astype(str).str.removesuffix(GRID_LABEL))
    ref_summary, our_summary = summarize(reference, radii).set_index("method"), summarize(ours, radii).set_index("method")
    for method, ref in reference.groupby("method", observed=True, sort=False):
        mine = ours[ours["method"].astype(str).str.removesuffix(GRID_LABEL) == method]
        mine = mine.set_index("image_id").loc[ref["image_id"]]
        same = ref["pred"].to_numpy() == mine["pred"].to_numpy()
        gap = np.abs(ref["radius"].to_numpy() - mine["radius"].to_numpy())[same]
        n = len(ref)
        within = all(
            abs(ref_summary.loc[method, c] - our_summary.loc[method, c])
            <= noise_tolerance((ref_summary.loc[method, c] + our_summary.loc[method, c]) / 2, n)
            for c in map(radius_column, radii))
        out.append(MethodAgreement(str(method), n, int(same.sum()), float(gap.max()) if gap.size else 0.0, within))
    return out


@dataclass
class TimeToTable:
    """Seconds and tables of each path, and how (a) and (b) agree."""

    images: int
    samples_per_image: int       # the fixed protocol's: sigmas x (n0 + n)
    seconds: dict[str, float] = field(default_factory=dict)
    samples: dict[str, float] = field(default_factory=dict)  # samples drawn per image, per path
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    agreement: list[MethodAgreement] = field(default_factory=list)

    def lines(self, radii=DEMO_RADII) -> list[str]:
        out = [f"images={self.images} samples per image (all sigmas, n0 + n)={self.samples_per_image}"]
        names = {"reference": "(a) reference loop", "full": "(b) this project, full mode",
                 "cascade": "(c) this project, cascade mode"}
        for path, secs in self.seconds.items():
            ratio = "" if path == "reference" or "reference" not in self.seconds else \
                f"  ({self.seconds['reference'] / secs:.2f}x faster than (a))"
            drawn = f", {self.samples[path]:,.0f} samples per image" if path in self.samples else ""
            out.append(f"{names[path]}: {secs:.1f} s{ratio}{drawn}")
        for path, table in self.tables.items():
            out += ["", f"{names[path]}:", to_markdown(summarize(table, radii), radii).rstrip()]
        if self.agreement:
            out += ["", "(a) vs (b), per sigma:"] + [a.line() for a in self.agreement]
        return out


# (b) and (c) run as a user's run does, not with the demo's pinned settings: the device settings
# measured on the device, sequential sampling with n_max = n (configs/demo.yaml pins both for its
# own two-minute run). ``--set`` values are applied after these.
PROJECT_DEFAULTS = ("compute.dtype=auto", "compute.channels_last=auto", "compute.compile=auto",
                    "compute.batch_size=auto", "smoothing.sampling=sequential")


def time_to_table(work_dir: Path, images: int, n0: int, n: int, batch_size: int,
                  paths=PATHS, overrides: list[str] = ()) -> TimeToTable:
    """Each of ``paths`` timed on the demo workload (module docstring), the tables compared; (b)
    and (c) with :data:`PROJECT_DEFAULTS`, then ``overrides``."""
    reference_cfg = demo_config(work_dir, images, n0, n, list(overrides))
    project_cfg = demo_config(work_dir, images, n0, n, [*PROJECT_DEFAULTS, *overrides])
    result = TimeToTable(images, len(reference_cfg.smoothing["sigmas"]) * (n0 + n))
    for path in paths:
        log.info("time to table: %s", path)
        start = time.perf_counter()
        if path == "reference":
            result.tables[path] = reference_table(reference_cfg, batch_size)
            result.samples[path] = result.samples_per_image
        else:
            with empty_compile_cache(work_dir):
                result.tables[path], counts = project_run(project_cfg, path)
            result.samples[path] = float((counts.table["n0"].to_numpy() + counts.table["n"].to_numpy()).sum()) / images
        result.seconds[path] = time.perf_counter() - start
    if "reference" in result.tables and "full" in result.tables:
        full = result.tables["full"]
        singles = full[~full["method"].astype(str).str.startswith("cascade")]
        result.agreement = compare_tables(result.tables["reference"], singles)
    return result


@contextlib.contextmanager
def empty_compile_cache(parent: Path):
    """torch.compile's on-disk cache (``TORCHINDUCTOR_CACHE_DIR``) in a new empty folder under
    ``parent``, for the processes started inside: the embedded Ray's probe and actors inherit it,
    so each timed path pays a first user's cold compile, not a cache an earlier path warmed."""
    parent.mkdir(parents=True, exist_ok=True)
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-cache-", dir=parent)
    try:
        yield
    finally:
        if before is None:
            del os.environ["TORCHINDUCTOR_CACHE_DIR"]
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = before


@dataclass
class SamplingRun:
    """One project run of the fixed-vs-sequential comparison."""

    mode: str
    sampling: str
    seconds: float
    table: pd.DataFrame
    samples: dict[float, float]  # sigma -> mean samples (n0 + n) per (image, sigma) row
    rows: dict[float, int]       # sigma -> (image, sigma) rows sampled (a cascade: the images that reached it)
    images: int

    @property
    def samples_per_image(self) -> float:
        """Mean samples per image over every sigma sampled."""
        return sum(self.samples[s] * self.rows[s] for s in self.samples) / self.images


def fixed_vs_sequential(work_dir: Path, images: int, n0: int, n_max: int, modes=("full", "cascade"),
                        overrides: list[str] = ()) -> list[SamplingRun]:
    """The demo workload certified with fixed sampling (n = ``n_max``) and with sequential sampling
    (the plan's n_max = ``n_max``, same alpha) in each of ``modes``, timed: samples drawn, wall
    seconds and the certified tables (the sequential ones recomputed from their counts by the plan)."""
    from pipeline.config import config_from_dict

    cfg = demo_config(work_dir, images, n0, n_max, list(overrides))
    runs = []
    for mode in modes:
        for sampling in ("fixed", "sequential"):
            raw = cfg.to_dict()
            raw["smoothing"]["sampling"] = sampling
            start = time.perf_counter()
            table, counts = project_run(config_from_dict(raw), mode, f"sampling-{mode}-{sampling}")
            seconds = time.perf_counter() - start
            drawn = counts.table["n0"].to_numpy() + counts.table["n"].to_numpy()
            per_sigma = {float(sg): float(drawn[counts.sigma == sg].mean()) for sg in counts.sigmas}
            rows = {float(sg): int((counts.sigma == sg).sum()) for sg in counts.sigmas}
            runs.append(SamplingRun(mode, sampling, seconds, table, per_sigma, rows, len(counts.image_ids)))
    return runs


def sampling_lines(runs: list[SamplingRun], radii=DEMO_RADII) -> list[str]:
    """The comparison as printable lines: per mode, samples and seconds fixed vs sequential, and both tables."""
    out = []
    for mode in dict.fromkeys(r.mode for r in runs):
        fixed, seq = (next(r for r in runs if r.mode == mode and r.sampling == s) for s in ("fixed", "sequential"))
        out.append(f"## {mode} mode, {fixed.images} images")
        for sigma in fixed.samples:
            got = seq.samples.get(sigma)
            out.append(f"sigma={sigma}: mean samples per (image, sigma) fixed {fixed.samples[sigma]:.0f}, sequential "
                       + (f"{got:.0f} ({fixed.samples[sigma] / got:.2f}x fewer)" if got else "none (no image reached it)"))
        out.append(f"samples per image: fixed {fixed.samples_per_image:.0f}, sequential {seq.samples_per_image:.0f} "
                   f"({fixed.samples_per_image / seq.samples_per_image:.2f}x fewer); wall {fixed.seconds:.1f} s vs "
                   f"{seq.seconds:.1f} s ({fixed.seconds / seq.seconds:.2f}x)")
        for run in (fixed, seq):
            out += ["", f"{run.sampling}:", to_markdown(summarize(run.table, radii), radii).rstrip()]
        out.append("")
    return out
