"""The demo: certify real handwritten digits end to end on an embedded local Ray, in minutes on CPU.

    python -m jobs.demo [--work-dir demo_out] [--set smoothing.n=64 ...]

1. scikit-learn's digits, test split (360 images, jobs.train_demo.digits_split) -> PNG folder
   ``{work}/images/{label}/digit_NNNN.png``;
2. jobs.make_shards -> Parquet shards at ``file://{work}/shards`` (the local "object store");
3. jobs.certify with configs/demo.yaml (every 4th test image: 90; n0 = 32, n = 512; models from
   configs/demo/models, mode ``full``,
   sigmas 0.25/0.5/1.0) on an embedded local Ray -> counts at ``{work}/runs/{run_id}``;
4. jobs.aggregate (each sigma alone and the cascade over all three, from the same counts)
   -> markdown table on stdout, ``{work}/aggregate/certified_accuracy.png``, results.parquet;
5. prints where the Parquet results are and how to open them with pandas.

Re-running resumes the same run (finished rows are not recomputed); a changed
data/models/smoothing setting needs a new ``--set output.run_id=...``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from jobs import aggregate, certify, make_shards
from jobs.train_demo import digits_split, write_image_folder
from pipeline.config import load_config

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "demo.yaml"
MODELS = REPO / "configs" / "demo" / "models"
RADII = ("0", "0.25", "0.5", "0.75", "1.0", "1.25", "1.5", "2.0")


def write_shards(work_dir: Path) -> str:
    """The digits test split as PNGs, then Parquet shards; returns the shards' file:// URI."""
    images, labels = digits_split()["test"]
    folder = write_image_folder(images, labels, work_dir / "images")
    uri = (work_dir / "shards").as_uri()
    make_shards.make_shards(str(folder), uri, fmt="parquet", shard_size=120)
    return uri


def run_demo(work_dir: str | Path, overrides: Sequence[str] = (), num_cpus: int = 2) -> dict[str, str]:
    """Steps 1-4 above; returns the run, counts, aggregate and plot locations."""
    import ray

    work_dir = Path(work_dir).resolve()
    settings = [f"data.uri={write_shards(work_dir)}",
                f"models.denoiser.uri={MODELS / 'denoiser'}",
                f"models.classifier.uri={MODELS / 'classifier.safetensors'}",
                f"output.uri={(work_dir / 'runs').as_uri()}", *overrides]
    cfg = load_config(str(CONFIG), settings)
    started = not ray.is_initialized()
    if started:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        summary = certify.run(cfg)
    finally:
        if started:
            ray.shutdown()
    run_dir = f"{cfg.output['uri']}/{cfg.output['run_id']}"
    out = work_dir / "aggregate"
    if aggregate.main([run_dir, "--out", str(out), "--radii", *RADII]) != 0:
        raise RuntimeError(f"jobs.aggregate failed on {run_dir}")
    return {"run": summary["run"], "counts": f"{run_dir}/counts", "aggregate": str(out),
            "results": str(out / "results.parquet"), "plot": str(out / "certified_accuracy.png")}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", default="demo_out", help="local folder for images, shards, run and plots")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a configs/demo.yaml value, e.g. smoothing.n=64")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the embedded Ray")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    paths = run_demo(args.work_dir, args.set, args.num_cpus)
    print(f"\nplot:    {paths['plot']}\n"
          f"counts:  {paths['counts']}/*.parquet  (one row per image x sigma)\n"
          f"results: {paths['results']}  (one row per image x method)\n\n"
          "import pandas as pd\n"
          f"counts = pd.read_parquet({paths['counts'].removeprefix('file://')!r})\n"
          f"results = pd.read_parquet({paths['results']!r})\n"
          "print(results.groupby('method').agg(accuracy=('correct', 'mean'), "
          "mean_radius=('radius', 'mean')))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
