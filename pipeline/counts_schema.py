"""The counts table: the contract between the certification pipeline and the analysis.

One Parquet row per (image, sigma); see DESIGN.md section 4. Writers build rows against
``COUNTS_SCHEMA``; readers validate against ``REQUIRED_COLUMNS``. Extra provenance columns
(``OPTIONAL_COLUMNS``) may be present.
"""
from __future__ import annotations

import pyarrow as pa

REQUIRED_FIELDS: tuple[pa.Field, ...] = (
    pa.field("run_id", pa.string()),
    pa.field("image_id", pa.string()),
    pa.field("label", pa.int64()),
    pa.field("sigma", pa.float64()),
    pa.field("n0", pa.int64()),
    pa.field("n", pa.int64()),
    pa.field("counts0_classes", pa.list_(pa.int32())),
    pa.field("counts0_values", pa.list_(pa.int64())),
    pa.field("counts_classes", pa.list_(pa.int32())),
    pa.field("counts_values", pa.list_(pa.int64())),
    pa.field("num_classes", pa.int64()),
    pa.field("pred_clean", pa.int64()),
)

OPTIONAL_FIELDS: tuple[pa.Field, ...] = (
    pa.field("timestep", pa.int64()),
    pa.field("seed", pa.int64()),
    pa.field("denoiser_id", pa.string()),
    pa.field("classifier_id", pa.string()),
    pa.field("worker", pa.string()),
    pa.field("seconds", pa.float64()),
    pa.field("look", pa.int64()),  # sequential sampling: the look it stopped at (n = plan.looks[look]); null if fixed
)

REQUIRED_COLUMNS: dict[str, pa.DataType] = {f.name: f.type for f in REQUIRED_FIELDS}
COUNTS_SCHEMA = pa.schema(list(REQUIRED_FIELDS) + list(OPTIONAL_FIELDS))

# Images that could not be decoded: one row each, in their own table beside the counts.
ERRORS_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string()),
        pa.field("image_id", pa.string()),
        pa.field("source", pa.string()),
        pa.field("error", pa.string()),
    ]
)
