"""What Ray costs: end-to-end images/s of the certification job against the in-process sampler.

    python -m jobs.bench_pipeline [--images 8] [--n0 100] [--n 1000] [--sigmas 0.25 0.5] [--threads 2]

Both paths use the same tiny models (configs/small.yaml's architectures, random weights written
to a temp dir), the same JPEG shards (written with pipeline.shard_writer) and the same sampler settings.
In process: load models, decode + resize every image, one ``MonteCarloSampler.sample`` call
(measured before and after the Ray run, averaged: the load of a shared machine drifts).
Ray: ``pipeline.certify_run.run_certification`` on a local cluster (pipeline.ray_runtime; shard
read, decode tasks, actor start and model load, sampling, Parquet writes, resume listing), timed
from call to return.
Prints both rates, their ratio (Ray / in process) and the time the actors spent inside the
sampler (the rest of the Ray wall time is what the pipeline adds).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent


def write_images(root: Path, count: int, seed: int = 0) -> Path:
    """``count`` random JPEGs in two class folders (ImageNet layout)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(count):
        folder = root / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"img{i:05d}.jpg")
    return root


def small_config(overrides: list[str]):
    from pipeline.config import config_from_dict

    with open(REPO / "configs" / "small.yaml") as f:
        return config_from_dict(yaml.safe_load(f), overrides)


def in_process(cfg, images_dir: Path) -> float:
    """Seconds for models + decode + sampling of every image, in this process."""
    from pipeline.device_settings import resolve_device_settings
    from pipeline.images import resize_image, to_float_chw
    from pipeline.models.factory import create_denoise_classify
    from pipeline.sampling import MonteCarloSampler

    start = time.perf_counter()
    d, s, c = cfg.data, cfg.smoothing, cfg.compute
    model = create_denoise_classify(cfg.models["denoiser"], cfg.models["classifier"], resolution=cfg.data["resolution"])
    settings = resolve_device_settings(c, "cpu", model, (3, d["resolution"], d["resolution"]))  # as the actor does
    sampler = MonteCarloSampler.from_settings(model, settings, "cpu")
    files = sorted(images_dir.rglob("*.jpg"))
    x = np.stack([resize_image(f.read_bytes(), d["resolution"], d["resize"], d["crop"], d["interpolation"]) for f in files])
    sampler.sample(to_float_chw(x), [f.stem for f in files],
                   list(s["sigmas"]), s["n0"], s["n"], s["seed"])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both paths (more oversubscribes a loaded 2-core machine)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--images-per-call", type=int, default=2)
    args = parser.parse_args()

    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import torch

    from pipeline.certify_run import run_certification
    from pipeline.models.small import write_small_models
    from pipeline.ray_runtime import ray_session
    from pipeline.run_dir import RunDirectory
    from pipeline.shard_writer import make_shards

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        root = Path(tmp)
        denoiser, classifier = write_small_models(root)
        images = write_images(root / "images", args.images)
        make_shards(str(images), f"file://{root}/shards", "parquet", shard_size=max(1, args.images // 4))
        cfg = small_config([
            f"data.uri=file://{root}/shards/", f"models.denoiser.uri={denoiser}", f"models.classifier.uri={classifier}",
            f"output.uri=file://{root}/runs", f"smoothing.sigmas={args.sigmas}", f"smoothing.n0={args.n0}",
            f"smoothing.n={args.n}", f"compute.batch_size={args.batch_size}", f"compute.torch_threads={args.threads}",
            f"compute.images_per_call={args.images_per_call}", f"compute.log_every={max(1, args.images // 4)}"])
        local_before = in_process(cfg, images)
        with ray_session(num_cpus=2, log_to_driver=False):
            start = time.perf_counter()
            run_certification(cfg)
            ray_s = time.perf_counter() - start
        store = RunDirectory(cfg.output["uri"], cfg.output["run_id"])
        table = pa.concat_tables([pq.read_table(p, columns=["seconds"]) for p in store.counts_files()])
        sampling_s = float(pc.sum(table.column("seconds")).as_py())  # seconds are per (image, sigma) row
        local_after = in_process(cfg, images)  # bracket the Ray run: the machine's load drifts
    local_s = (local_before + local_after) / 2
    per_image = len(args.sigmas) * (args.n0 + args.n)
    result = {"images": args.images, "samples_per_image": per_image, "threads": args.threads,
              "in_process_images_per_s": round(args.images / local_s, 4), "ray_images_per_s": round(args.images / ray_s, 4),
              "in_process_s": [round(local_before, 2), round(local_after, 2)], "ray_s": round(ray_s, 2),
              "ray_sampling_s": round(sampling_s, 2),
              "ratio": round(local_s / ray_s, 3),
              "load_average": os.getloadavg()[0]}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
