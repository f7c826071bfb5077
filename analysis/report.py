"""A report of a counts run and/or legacy logs: certified-accuracy results, summary tables and a
plot, rendered then written whole.

:func:`render_report` reads and validates the inputs and computes every output in memory (it
raises before anything is written); :func:`write_report` writes them. The files:
results.parquet (one row per image x method), summary.csv, summary.md, summary.tex (each with
the settings used) and certified_accuracy.png.
"""
from __future__ import annotations

import io
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from analysis.counts import read_counts, skipped_images, validate_counts
from analysis.io import resolve_run
from analysis.legacy import read_legacy_log
from analysis.plot import plot_certified_accuracy
from analysis.results import certify_table, concat_results, predict_table
from analysis.summary import DEFAULT_RADII, predict_markdown, summarize, summarize_predict, to_latex, to_markdown
from pipeline.errors import MsdsmoothError
from pipeline.sequential import SequentialPlan
from pipeline.storage import is_local, url_to_fs

SETTING_DEFAULTS = {"p0": 0.5, "alpha": 0.001, "schedule": "bonferroni"}
REPORT_FILES = ("results.parquet", "summary.csv", "summary.md", "summary.tex", "certified_accuracy.png",
                "predictions.parquet")


class ReportError(MsdsmoothError, ValueError):
    """The report cannot be written where asked (nothing was written)."""


@dataclass(frozen=True)
class Report:
    """Every output file's bytes by name, and the markdown summary table."""

    files: dict[str, bytes]
    markdown: str


def render_report(run_uri: str | None, sigmas: Sequence[float] | None = None,
                  cascades: Sequence[Sequence[float]] | None = None, p0: float | None = None,
                  alpha: float | None = None, schedule: str | None = None,
                  radii: Sequence[float] | None = None, legacy: Sequence[tuple[str, str]] = ()) -> Report:
    """The report of the run (or counts directory, or Parquet file) at ``run_uri``, and of the
    ``legacy`` logs: (method name, per-image log path) pairs added as methods.

    ``sigmas``: the single sigmas to certify (None: all present); ``cascades``: the cascades
    (None: one over ``sigmas``; empty: none). ``p0`` / ``alpha`` / ``schedule`` default to the
    run manifest's ``smoothing`` section (so a cascade-mode run is re-traced with the settings
    it sampled with), else to ``SETTING_DEFAULTS``; a sequential run's plan (manifest
    ``sequential_plan``) decides every certificate and which re-analyses are allowed; a
    cascade-mode run's default analysis is its own cascade (and its top sigma alone); a predict
    run's is its predictions. ``radii``: the table's radii (None: a sequential run's grid, else
    ``DEFAULT_RADII``). ``run_uri`` None: the legacy logs alone
    (published baselines tabulated by themselves); at least one is then needed, and the counts
    settings above, which have nothing to apply to, must be None. Raises (ReportError,
    CountsError, LegacyLogError, ValueError, FileNotFoundError) before anything is written.
    """
    frames, described, skipped, predicted = [], [], None, ""
    if run_uri is None:
        given = [name for name, value in (("sigmas", sigmas), ("cascades", cascades), ("p0", p0), ("alpha", alpha),
                                          ("schedule", schedule)) if value is not None]
        if not legacy:
            raise ReportError("nothing to report: give a counts run, a legacy log, or both")
        if given:
            raise ReportError(f"{', '.join(given)}: apply to a counts run; without one only legacy logs are tabulated")
    else:
        run = resolve_run(run_uri)
        counts = validate_counts(read_counts(run))
        manifest = run.read_manifest()
        run_settings = manifest.get("config", manifest).get("smoothing") or {}
        plan = SequentialPlan.from_dict(manifest["sequential_plan"]) if "sequential_plan" in manifest else None
        given = {"p0": p0, "alpha": alpha, "schedule": schedule}
        settings = {k: given[k] if given[k] is not None else run_settings.get(k, default)
                    for k, default in SETTING_DEFAULTS.items()}
        if radii is None and plan is not None:
            radii = list(plan.radii)
        if run_settings.get("mode") == "predict":
            predictions = predict_table(counts, sigmas, settings["alpha"], plan)
            predicted = predict_markdown(summarize_predict(predictions))
        elif plan is None and run_settings.get("mode") == "cascade" and cascades is None and sigmas is None:
            # the run's own cascade (its levels, hence its alpha split); of the single sigmas only the
            # top level holds every image
            levels = [float(s) for s in run_settings["sigmas"]]
            sigmas, cascades = [max(levels)], [levels]
        if run_settings.get("mode") != "predict":
            frames.append(certify_table(counts, sigmas, cascades, **settings, plan=plan, radii=radii))
        skipped = skipped_images(run, counts.image_ids) if run.errors else None
        described.append(f"{run_uri} ({counts.sigma.size} counts rows, {counts.image_ids.size} images"
                         + (", sequential sampling" if plan is not None else "") + "); "
                         + ", ".join(f"{k}={v}" for k, v in settings.items()))
    frames += [read_legacy_log(path, name) for name, path in legacy]
    if legacy:
        described.append("legacy logs: " + ", ".join(f"{name}={path}" for name, path in legacy))
    if not frames:  # a prediction run alone: no certified table
        return Report({"summary.md": f"Settings: {'; '.join(described)}\n\n{predicted}".encode(),
                       "predictions.parquet": _parquet(predictions)}, predicted)
    results = concat_results(frames)
    summary = summarize(results, DEFAULT_RADII if radii is None else radii)
    markdown = to_markdown(summary, skipped=skipped) + (f"\n{predicted}" if predicted else "")
    settings_line = "; ".join(described)
    files = {
        "results.parquet": _parquet(results),
        "summary.csv": summary.to_csv(index=False).encode(),
        "summary.md": f"Settings: {settings_line}\n\n{markdown}".encode(),
        "summary.tex": f"% Settings: {settings_line}\n{to_latex(summary, skipped=skipped)}".encode(),
        "certified_accuracy.png": plot_certified_accuracy(results),
    }
    return Report(files, markdown)


def _parquet(frame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def write_report(out_uri: str, files: Mapping[str, bytes]) -> None:
    """Write ``files`` as the folder ``out_uri``: a local path or any fsspec URI (e.g. s3://).

    Local: all or nothing. The files go to a staging folder beside ``out_uri`` first; then the
    old folder (if any) is renamed aside, the staging folder renamed into place, and the old one
    deleted. A failure before the swap leaves the old folder as it was; a failed swap is rolled
    back; a crash between the two renames leaves the old complete set in the sibling
    ``.{name}.old-*``. The folder is the report's: one holding anything but report files
    (another report's included) is refused before anything is written (ReportError).
    Object storage: each file is one atomic put (a reader may see old and new files mixed while
    it runs).
    """
    fs, path = url_to_fs(out_uri)
    if not is_local(fs):
        fs.makedirs(path, exist_ok=True)
        for name, data in files.items():
            fs.pipe_file(f"{path.rstrip('/')}/{name}", data)
        return
    out = os.path.abspath(path)
    if os.path.exists(out):
        foreign = sorted(set(os.listdir(out)) - set(REPORT_FILES) - set(files))
        if foreign or not os.path.isdir(out):
            raise ReportError(f"{out_uri}: not a report folder (holds {foreign[:5] or 'a file'}); "
                              "choose an empty or new folder for --out")
    parent, name = os.path.split(out)
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{name}.new-{uuid.uuid4().hex}")
    old = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex}")
    try:
        os.makedirs(staging)
        for file, data in files.items():
            with open(os.path.join(staging, file), "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        had_old = os.path.exists(out)
        if had_old:
            os.replace(out, old)
        try:
            os.replace(staging, out)
        except BaseException:
            if had_old:
                os.replace(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

