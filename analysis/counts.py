"""Read counts tables (DESIGN.md section 4), validate them and view them as SparseCounts.

Guarantee: a ``CountsTable`` exists only for a table that meets the contract: every required
column present with its type and no nulls; one row per (image_id, sigma) (identical
duplicates are dropped); non-negative counts with classes strictly ascending in [0, C); one C
for the whole table; counts summing to n0 / n; one label per image in [-1, C). Anything
else raises ``CountsError`` naming the column and an example row (image_id, sigma).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from analysis.io import RunFiles, read_tables, resolve_run
from pipeline.certification import SparseCounts
from pipeline.counts_schema import REQUIRED_COLUMNS
from pipeline.errors import MsdsmoothError

# (classes column, values column, total column) of the two sparse count vectors.
COUNT_COLUMNS = (("counts0_classes", "counts0_values", "n0"), ("counts_classes", "counts_values", "n"))


class CountsError(MsdsmoothError, ValueError):
    """A counts table breaks the contract; the message names the column and an example row."""


def _example(table: pa.Table, row: int) -> str:
    keys = [k for k in ("image_id", "sigma") if k in table.column_names]
    if not keys or table.num_rows == 0:
        return "no row to show"
    return "e.g. row " + ", ".join(f"{k}={table[k][row].as_py()!r}" for k in keys)


def _fail(table: pa.Table, column: str, problem: str, row: int = 0) -> CountsError:
    return CountsError(f"column '{column}': {problem} ({_example(table, row)})")


@dataclass(frozen=True)
class CountsTable:
    """A validated, de-duplicated counts table as arrays, one entry per (image, sigma) row."""

    table: pa.Table  # the de-duplicated rows, required columns only
    image_ids: np.ndarray  # object [M]: distinct image ids, sorted
    image: np.ndarray  # int64 [R]: index into image_ids
    sigma: np.ndarray  # float64 [R]
    label: np.ndarray  # int64 [R]
    pred_clean: np.ndarray  # int64 [R]
    num_classes: int
    counts0: SparseCounts  # [R]
    counts: SparseCounts  # [R]

    @property
    def sigmas(self) -> np.ndarray:
        """The distinct sigmas, ascending."""
        return np.unique(self.sigma)


def _check_columns(table: pa.Table, where: str = "") -> None:
    for name, dtype in REQUIRED_COLUMNS.items():
        if name not in table.column_names:
            raise _fail(table, name, f"missing{where}")
        if not table.schema.field(name).type.equals(dtype):
            raise _fail(table, name, f"has type {table.schema.field(name).type}, expected {dtype}{where}")


def _check_nulls(table: pa.Table) -> None:
    for name in REQUIRED_COLUMNS:
        column = table[name]
        if column.null_count:
            raise _fail(table, name, "null value", int(np.flatnonzero(column.is_null())[0]))
        if pa.types.is_list(column.type) and pc.list_flatten(column).null_count:
            element = np.flatnonzero(pc.list_flatten(column).is_null())[0]
            raise _fail(table, name, "null list element", int(pc.list_parent_indices(column)[element].as_py()))


def _flatten(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(offsets int64 [R+1] starting at 0, flat values) of a list column, zero-copy where possible."""
    array = column.combine_chunks()
    offsets = array.offsets.to_numpy().astype(np.int64)
    values = array.values.to_numpy()[offsets[0] : offsets[-1]]
    return offsets - offsets[0], values


def _row_of(offsets: np.ndarray, element: int) -> int:
    return int(np.searchsorted(offsets, element, side="right") - 1)


def _dedupe(table: pa.Table, image: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Mask of rows to keep: the first of identical (image_id, sigma) rows; CountsError otherwise."""
    order = np.lexsort((sigma, image))
    same = (image[order][1:] == image[order][:-1]) & (sigma[order][1:] == sigma[order][:-1])
    keep = np.ones(table.num_rows, dtype=bool)
    if not same.any():
        return keep
    first, second = order[:-1][same], order[1:][same]  # only the duplicates go through Python
    for row, kept, dropped in zip(second, table.take(first).to_pylist(), table.take(second).to_pylist()):
        differing = [k for k in kept if kept[k] != dropped[k]]
        if differing:
            raise _fail(table, differing[0], "duplicate (image_id, sigma) rows with different values", int(row))
        keep[row] = False
    return keep


def _sparse(table: pa.Table, classes_col: str, values_col: str, total_col: str, num_classes: int) -> SparseCounts:
    offsets, classes = _flatten(table[classes_col])
    value_offsets, values = _flatten(table[values_col])
    lengths_differ = np.flatnonzero(offsets != value_offsets)
    if lengths_differ.size:
        row = max(int(lengths_differ[0]) - 1, 0)
        raise _fail(table, values_col, f"list length differs from {classes_col}", row)
    bad = np.flatnonzero(values < 0)
    if bad.size:
        raise _fail(table, values_col, f"negative count {values[bad[0]]}", _row_of(offsets, bad[0]))
    bad = np.flatnonzero((classes < 0) | (classes >= num_classes))
    if bad.size:
        problem = f"class {classes[bad[0]]} outside [0, num_classes={num_classes})"
        raise _fail(table, classes_col, problem, _row_of(offsets, bad[0]))
    row_start = np.zeros(classes.size + 1, dtype=bool)
    row_start[offsets[:-1]] = True
    bad = np.flatnonzero((np.diff(classes) <= 0) & ~row_start[1:-1])
    if bad.size:
        raise _fail(table, classes_col, "classes not strictly ascending", _row_of(offsets, bad[0]))
    cumulative = np.concatenate([[0], np.cumsum(values)])
    sums = cumulative[offsets[1:]] - cumulative[offsets[:-1]]
    totals = table[total_col].to_numpy()
    bad = np.flatnonzero(sums != totals)
    if bad.size:
        row = int(bad[0])
        raise _fail(table, values_col, f"counts sum to {sums[row]} but {total_col}={totals[row]}", row)
    return SparseCounts(offsets=offsets, classes=classes.astype(np.int64), values=values.astype(np.int64))


def validate_counts(table: pa.Table) -> CountsTable:
    """Check ``table`` against the counts contract and return its array view (see module doc)."""
    _check_columns(table)
    if table.num_rows == 0:
        raise CountsError("the counts table has no rows")
    table = table.select(list(REQUIRED_COLUMNS))
    _check_nulls(table)
    sigma = table["sigma"].to_numpy()
    bad = np.flatnonzero(~(np.isfinite(sigma) & (sigma > 0)))
    if bad.size:
        raise _fail(table, "sigma", "not a finite positive number", int(bad[0]))
    encoded = table["image_id"].combine_chunks().dictionary_encode()
    order = pc.array_sort_indices(encoded.dictionary).to_numpy()  # number images by sorted id
    rank = np.empty(order.size, dtype=np.int64)
    rank[order] = np.arange(order.size)
    image = rank[encoded.indices.to_numpy()]
    image_ids = encoded.dictionary.take(pa.array(order)).to_numpy(zero_copy_only=False)
    keep = _dedupe(table, image, sigma)
    if not keep.all():
        table, image, sigma = table.filter(pa.array(keep)), image[keep], sigma[keep]
    num_classes = table["num_classes"].to_numpy()
    bad = np.flatnonzero((num_classes != num_classes[0]) | (num_classes < 1))
    if bad.size:
        problem = f"{num_classes[bad[0]]} disagrees with {num_classes[0]} in the first row or is < 1"
        raise _fail(table, "num_classes", problem, int(bad[0]))
    classes = int(num_classes[0])
    label, pred_clean = table["label"].to_numpy(), table["pred_clean"].to_numpy()
    for name, values in (("label", label), ("pred_clean", pred_clean)):
        bad = np.flatnonzero((values < -1) | (values >= classes))
        if bad.size:
            raise _fail(table, name, f"{values[bad[0]]} outside [-1, num_classes={classes})", int(bad[0]))
    first_row = np.unique(image, return_index=True)[1]  # codes are 0..M-1, all present
    bad = np.flatnonzero(label != label[first_row][image])
    if bad.size:
        raise _fail(table, "label", "differs between the rows of one image", int(bad[0]))
    counts0, counts = (_sparse(table, *cols, num_classes=classes) for cols in COUNT_COLUMNS)
    return CountsTable(
        table=table,
        image_ids=image_ids,
        image=image,
        sigma=sigma,
        label=label,
        pred_clean=pred_clean,
        num_classes=classes,
        counts0=counts0,
        counts=counts,
    )


def read_counts(run: RunFiles) -> pa.Table:
    """The raw counts table of ``run`` (required columns only; values not yet validated).

    Every file must have every required column with its type, and every row one run_id, the
    manifest's when the run has one: CountsError naming the column, the file and an example row
    (or both run_ids and their files) otherwise.
    """
    tables = read_tables(run.fs, run.counts, list(REQUIRED_COLUMNS))
    for file, table in zip(run.counts, tables):
        _check_columns(table, f" in {file}")
    _check_one_run(run, tables)
    return pa.concat_tables(tables)


def _check_one_run(run: RunFiles, tables: list[pa.Table]) -> None:
    """All rows carry one run_id, the manifest's when there is a manifest."""
    first: tuple[str, str] | None = None  # (run_id, file)
    for file, table in zip(run.counts, tables):
        for run_id in pc.unique(table["run_id"]).to_pylist():
            if first is None:
                first = (run_id, file)
            elif run_id != first[0]:
                raise CountsError(f"column 'run_id': {first[0]!r} in {first[1]} and {run_id!r} in {file}: the counts "
                                  "of two runs; aggregate one run at a time (move the other run's files out)")
    expected = run.read_manifest().get("run_id")
    if first is not None and expected is not None and first[0] != expected:
        raise CountsError(f"column 'run_id': {first[0]!r} in {first[1]} but {expected!r} in the manifest "
                          f"{run.manifest}: these counts belong to another run")


def load_counts(uri: str) -> pa.Table:
    """The validated, de-duplicated counts table at ``uri`` (run dir, counts dir or file)."""
    return validate_counts(read_counts(resolve_run(uri))).table


def skipped_images(run: RunFiles, image_ids: np.ndarray) -> int:
    """Distinct images with an error record (ERRORS_SCHEMA) and no counts row; 0 without errors/."""
    if not run.errors:
        return 0
    tables = read_tables(run.fs, run.errors, ["image_id"])
    for file, table in zip(run.errors, tables):
        if table.schema.names != ["image_id"] or not table.schema.field(0).type.equals(pa.string()):
            raise CountsError(f"column 'image_id': missing or not a string in error records {file}")
    errors = pa.chunked_array([t["image_id"] for t in tables], pa.string())
    failed = pc.unique(errors)
    return int(pc.sum(pc.invert(pc.is_in(failed, value_set=pa.array(image_ids, pa.string())))).as_py() or 0)
