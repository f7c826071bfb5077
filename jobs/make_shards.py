"""Image folder -> Parquet or WebDataset shards on any fsspec URI (pipeline.shard_writer).

    python -m jobs.make_shards SOURCE OUT_URI --format parquet|webdataset [--shard-size 1000]
        [--class-index imagenet_class_index.json | --labels-csv labels.csv]

Sources: ImageNet layout (one sub-folder per class; labels from a class-index JSON, else sorted
folder names), or a flat folder plus a CSV with columns ``filename,label``. The order, ids, shard
names and columns are pipeline.shard_writer's guarantees.
"""
from __future__ import annotations

import argparse
from typing import Sequence

from pipeline.shard_writer import make_shards


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Image folder -> Parquet or WebDataset shards")
    parser.add_argument("source", help="image folder (local path or fsspec URI)")
    parser.add_argument("out", help="output folder URI for the shards")
    parser.add_argument("--format", choices=("parquet", "webdataset"), default="parquet")
    parser.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    parser.add_argument("--labels-csv", help="CSV with filename,label for a flat folder")
    parser.add_argument("--class-index", help="JSON class-index mapping for class sub-folders")
    parser.add_argument("--prefix", default="shard")
    args = parser.parse_args(argv)
    uris = make_shards(args.source, args.out, args.format, args.shard_size, args.labels_csv, args.class_index, args.prefix)
    print(f"wrote {len(uris)} shards to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
