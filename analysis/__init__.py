"""Aggregation of counts tables into certified-accuracy results, tables and plots.

Typical use::

    import analysis
    table = analysis.load_counts("s3://bucket/runs/run-1")          # validated pa.Table
    results = analysis.certify_table(table, cascades=[[0.25, 0.5, 1.0]], p0=0.5, alpha=0.001)
    summary = analysis.summarize(results, radii=[0, 0.5, 1.0])
    print(analysis.to_markdown(summary))
"""
from analysis.counts import CountsError, CountsTable, load_counts, read_counts, skipped_images, validate_counts
from analysis.io import RunFiles, resolve_run
from analysis.legacy import LegacyLogError, read_legacy_log, write_legacy_log
from analysis.plot import plot_certified_accuracy
from analysis.results import RESULT_COLUMNS, cascade_method, certify_table, concat_results, single_method
from analysis.summary import DEFAULT_RADII, summarize, to_latex, to_markdown

__all__ = [
    "CountsError",
    "CountsTable",
    "DEFAULT_RADII",
    "LegacyLogError",
    "RESULT_COLUMNS",
    "RunFiles",
    "cascade_method",
    "certify_table",
    "concat_results",
    "load_counts",
    "plot_certified_accuracy",
    "read_counts",
    "read_legacy_log",
    "resolve_run",
    "single_method",
    "skipped_images",
    "summarize",
    "to_latex",
    "to_markdown",
    "validate_counts",
    "write_legacy_log",
]
