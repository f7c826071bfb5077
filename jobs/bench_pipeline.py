"""What the actor costs: the sampler's samples/s inside the certification actor against the same
sampler in this process, at a config's workload (default: the demo's).

    python -m jobs.bench_pipeline [--config configs/demo.yaml] [--images 90] [--set KEY=VALUE ...]

Run from the repository root (the config's model URIs are relative to it). Both paths use the
config's models, resolution, sigmas, n0, n, seed and the same device settings: the config's,
with ``auto`` values resolved once in this process and pinned for the Ray run; torch threads are
what the actor uses (``pipeline.certify_actor.actor_threads``). The images are
random JPEGs (the work does not depend on their content) in Parquet shards (pipeline.shard_writer).
In process: ``MonteCarloSampler.sample`` on every decoded image in the calls the actors get
(``compute.images_per_call`` images each, so both paths pad the same last device batches; model
and images loaded once, for every run), timed alone, before and after each Ray run. Ray:
``pipeline.certify_run.run_certification`` on a local Ray (pipeline.ray_runtime), ``--repeats``
times (a run id each); the actor's sampling time is the sum of the counts rows' ``seconds`` (wall
time per (image, sigma)). Each Ray run is compared with the mean of the in-process runs on either
side of it (the load of a shared machine drifts by up to 30% between minutes); the ratio printed is
the median over the repeats (actor / in process; >= 0.95 is the bar of issue 12), beside every
run's figures, the Ray runs' wall time (start, decode, model load and writes included) and the
load average.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np


def write_images(root: Path, count: int, seed: int = 0) -> Path:
    """``count`` random 40x48 JPEGs in two class folders (ImageNet layout)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(count):
        folder = root / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"img{i:05d}.jpg")
    return root


def decode_images(cfg, images_dir: Path) -> tuple[list[str], np.ndarray]:
    """(image ids, float [N, 3, R, R]) of the JPEGs, decoded and resized as the config's data section says."""
    from pipeline.images import resize_image, to_float_chw

    d = cfg.data
    files = sorted(images_dir.rglob("*.jpg"))
    x = to_float_chw(np.stack([resize_image(f.read_bytes(), d["resolution"], d["resize"], d["crop"], d["interpolation"])
                               for f in files]))
    return [f.stem for f in files], x


def in_process_sampling(sampler, image_ids: list[str], x: np.ndarray, smoothing, per_call: int) -> float:
    """Seconds of ``MonteCarloSampler.sample`` on every image, in this process, ``per_call`` images a call."""
    start = time.perf_counter()
    for first in range(0, len(image_ids), per_call):
        call = slice(first, first + per_call)
        sampler.sample(x[call], image_ids[call], list(smoothing["sigmas"]), smoothing["n0"], smoothing["n"],
                       smoothing["seed"])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--images", type=int, default=90,
                        help="images per run; the default is the demo's 90 digits, so each of its actors gets "
                             "its share of calls and they sample side by side as in the demo")
    parser.add_argument("--repeats", type=int, default=3, help="Ray runs, each between two in-process runs")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = parser.parse_args()

    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipeline.certify_actor import actor_threads, prepare_sampling_process
    from pipeline.certify_run import run_certification
    from pipeline.config import config_from_dict, load_config
    from pipeline.device_settings import resolve_device_settings
    from pipeline.models.factory import create_denoise_classify
    from pipeline.ray_runtime import ray_session
    from pipeline.run_dir import RunDirectory
    from pipeline.sampling import MonteCarloSampler
    from pipeline.shard_writer import make_shards

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        root = Path(tmp)
        images = write_images(root / "images", args.images)
        make_shards(str(images), f"file://{root}/shards", "parquet", shard_size=args.images)
        cfg = load_config(args.config, [f"data.uri=file://{root}/shards/", "data.selection=null",
                                        f"output.uri=file://{root}/runs", *args.set])
        c, resolution = cfg.compute, cfg.data["resolution"]
        prepare_sampling_process(c)
        model = create_denoise_classify(cfg.models["denoiser"], cfg.models["classifier"], cfg.models["cache_dir"],
                                        resolution=resolution)
        settings = resolve_device_settings(c, "cpu", model, (3, resolution, resolution))  # once, as the probe does
        # both paths run exactly these settings, with the actor's thread count
        cfg = config_from_dict(cfg.to_dict(), [f"compute.{k}={v}" for k, v in settings.record().items() if k != "reason"])
        sampler = MonteCarloSampler.from_settings(model, settings, "cpu")
        image_ids, x = decode_images(cfg, images)
        time_in_process = partial(in_process_sampling, sampler, image_ids, x, cfg.smoothing, c["images_per_call"])
        local_s, actor_s, ray_wall = [time_in_process()], [], []
        for repeat in range(args.repeats):
            run_cfg = config_from_dict(cfg.to_dict(), [f"output.run_id=bench-{repeat}"])
            with ray_session(log_to_driver=False):
                start = time.perf_counter()
                run_certification(run_cfg)
                ray_wall.append(time.perf_counter() - start)
            store = RunDirectory(run_cfg.output["uri"], run_cfg.output["run_id"])
            table = pa.concat_tables([pq.read_table(p, columns=["seconds"]) for p in store.counts_files()])
            actor_s.append(float(pc.sum(table.column("seconds")).as_py()))  # seconds are per (image, sigma) row
            local_s.append(time_in_process())
    s = cfg.smoothing
    samples = args.images * len(s["sigmas"]) * (s["n0"] + s["n"])
    ratios = [(local_s[i] + local_s[i + 1]) / 2 / actor_s[i] for i in range(args.repeats)]
    print(json.dumps({
        "config": args.config, "images": args.images, "samples": samples,
        "actors": c["actors"], "torch_threads": actor_threads(c), "cpus_per_actor": c["cpus_per_actor"],
        "device_settings": settings.record(),
        "in_process_samples_per_s": round(samples / float(np.median(local_s)), 1),
        "actor_samples_per_s": round(samples / float(np.median(actor_s)), 1),
        "ratio": round(float(np.median(ratios)), 3), "ratios": [round(r, 3) for r in ratios],
        "in_process_s": [round(v, 2) for v in local_s], "actor_sampling_s": [round(v, 2) for v in actor_s],
        "ray_wall_s": [round(v, 2) for v in ray_wall], "load_average": round(os.getloadavg()[0], 2)}))

if __name__ == "__main__":
    main()
