"""Image folder -> Parquet or WebDataset shards on any fsspec URI (pipeline.shard_writer).

    python -m jobs.make_shards SOURCE OUT_URI --format parquet|webdataset [--shard-size 1000]
        [--class-index imagenet_class_index.json | --labels-csv labels.csv]
    python -m jobs.make_shards --index-only SHARDS_URI

Sources: ImageNet layout (one sub-folder per class; labels from a class-index JSON, else sorted
folder names), or a flat folder plus a CSV with columns ``filename,label``. The order, ids, shard
names, columns and the WebDataset id index (``_index.parquet``) are pipeline.shard_writer's
guarantees. ``--index-only`` (re)writes the id index of existing WebDataset tars from their headers.
"""
from __future__ import annotations

import argparse
from typing import Sequence

from pipeline.shard_writer import make_shards, write_wds_index


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Image folder -> Parquet or WebDataset shards")
    parser.add_argument("source", help="image folder (local path or fsspec URI); with --index-only, the tars' folder")
    parser.add_argument("out", nargs="?", help="output folder URI for the shards")
    parser.add_argument("--format", choices=("parquet", "webdataset"), default="parquet")
    parser.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    parser.add_argument("--labels-csv", help="CSV with filename,label for a flat folder")
    parser.add_argument("--class-index", help="JSON class-index mapping for class sub-folders")
    parser.add_argument("--prefix", default="shard")
    parser.add_argument("--index-only", action="store_true",
                        help="only (re)write the id index of the WebDataset tars in SOURCE")
    args = parser.parse_args(argv)
    if args.index_only:
        if args.out is not None:
            parser.error("--index-only takes the tars' folder only")
        print(f"indexed {write_wds_index(args.source)} shards in {args.source}")
        return 0
    if args.out is None:
        parser.error("OUT_URI is required")
    uris = make_shards(args.source, args.out, args.format, args.shard_size, args.labels_csv, args.class_index, args.prefix)
    print(f"wrote {len(uris)} shards to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
