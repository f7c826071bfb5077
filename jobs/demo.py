"""The demo: certify real handwritten digits end to end on Ray, in minutes on CPU.

    python -m jobs.demo [--work-dir demo_out] [--set smoothing.n=64 ...]
    ray job submit --working-dir . -- python -m jobs.demo --work-dir /abs/path   # a running cluster

1. scikit-learn's digits, test split (360 images, pipeline.digits) -> PNG folder
   ``{work}/images/{label}/digit_NNNN.png`` -> Parquet shards at ``file://{work}/shards`` (the
   local "object store", pipeline.shard_writer);
2. certification (pipeline.certify_run) with configs/demo.yaml (every 4th test image: 90;
   n0 = 32, n = 512; models from configs/demo/models, mode ``full``, sigmas 0.25/0.5/1.0) on an
   embedded local Ray, or on the cluster the job was submitted to (pipeline.ray_runtime)
   -> counts at ``{work}/runs/{run_id}``;
3. the report (analysis.report: each sigma alone and the cascade over all three, from the same
   counts) -> markdown table on stdout, ``{work}/aggregate/certified_accuracy.png``, results.parquet;
4. prints where the Parquet results are and how to open them with pandas.

Re-running resumes the same run (finished rows are not recomputed); a changed
data/models/smoothing setting needs a new ``--set output.run_id=...``.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from analysis.report import render_report, write_report
from pipeline.certify_run import run_certification
from pipeline.config import load_config
from pipeline.digits import DEMO_CONFIG, DEMO_MODELS, DEMO_RADII, write_digit_shards
from pipeline.ray_runtime import ray_session


def run_demo(work_dir: Path, overrides: Sequence[str], num_cpus: int) -> dict[str, str]:
    """Steps 1-3 above; returns the run, counts, aggregate and plot locations and the markdown table."""
    shards = write_digit_shards("test", work_dir / "images", work_dir / "shards", shard_size=120)
    cfg = load_config(str(DEMO_CONFIG), [
        f"data.uri={shards}", f"models.denoiser.uri={DEMO_MODELS / 'denoiser'}",
        f"models.classifier.uri={DEMO_MODELS / 'classifier.safetensors'}",
        f"output.uri={(work_dir / 'runs').as_uri()}", *overrides])
    with ray_session(num_cpus, log_to_driver=False):
        summary = run_certification(cfg)
    run_dir = f"{cfg.output['uri']}/{cfg.output['run_id']}"
    out = work_dir / "aggregate"
    report = render_report(run_dir, radii=DEMO_RADII)
    write_report(str(out), report.files)
    return {"run": summary["run"], "counts": f"{run_dir}/counts", "aggregate": str(out),
            "results": str(out / "results.parquet"), "plot": str(out / "certified_accuracy.png"),
            "table": report.markdown}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", default="demo_out", help="local folder for images, shards, run and plots")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a configs/demo.yaml value, e.g. smoothing.n=64")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the embedded Ray (not used on a cluster)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    paths = run_demo(Path(args.work_dir).resolve(), args.set, args.num_cpus)
    print(paths["table"], end="")
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
