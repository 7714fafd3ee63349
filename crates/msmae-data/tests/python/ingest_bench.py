"""Straightforward Python baseline for the ingest benchmark (Pillow + pyarrow, one process).

Usage: python ingest_bench.py MANIFEST OUT.parquet [--size 224] [--channels 1] [--row-group 256]

MANIFEST: one absolute image path per line. For each image, in order: read the bytes, sha256
them, decode with Pillow, convert to L (channels 1) or RGB (3), centre-crop to the short side's
square, resize to size×size with Image.BILINEAR (antialiased on downscale, like our triangle
filter), and stream the rows into a Parquet file with the image table's columns (zstd level 3,
one row group per --row-group rows). Prints one JSON line:
{"images", "seconds", "images_per_s", "peak_rss_mib"}.
"""
import argparse
import hashlib
import io
import json
import os
import resource
import time

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def table_schema(size, channels):
    meta = {
        "schema_version": 1,
        "label_names": ["unlabelled"],
        "multi_label": False,
        "height": size,
        "width": size,
        "channels": channels,
        "has_masks": False,
        "provenance": {"stage": "ingest_bench.py"},
    }
    return pa.schema(
        [
            pa.field("id", pa.utf8(), nullable=False),
            pa.field("patient_id", pa.utf8(), nullable=False),
            pa.field("split", pa.utf8(), nullable=False),
            pa.field("label", pa.int32(), nullable=True),
            pa.field("width", pa.int32(), nullable=False),
            pa.field("height", pa.int32(), nullable=False),
            pa.field("channels", pa.int32(), nullable=False),
            pa.field("pixels", pa.binary(), nullable=False),
            pa.field("mask", pa.binary(), nullable=True),
            pa.field("source_path", pa.utf8(), nullable=False),
            pa.field("source_sha256", pa.utf8(), nullable=False),
        ],
        metadata={"msmae.image_table": json.dumps(meta)},
    )


def decode(data, size, channels):
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("L" if channels == 1 else "RGB")
    w, h = im.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    im = im.crop((left, top, left + s, top + s)).resize((size, size), Image.BILINEAR)
    return w, h, im.tobytes()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("manifest")
    ap.add_argument("out")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--channels", type=int, choices=(1, 3), default=1)
    ap.add_argument("--row-group", type=int, default=256)
    args = ap.parse_args()
    row_group = max(1, args.row_group)

    start = time.perf_counter()
    with open(args.manifest) as f:
        paths = [line.strip() for line in f if line.strip()]
    schema = table_schema(args.size, args.channels)
    columns = {name: [] for name in schema.names}

    def flush(writer):
        if columns["id"]:
            writer.write_table(pa.Table.from_pydict(columns, schema=schema), row_group_size=row_group)
            for v in columns.values():
                v.clear()

    with pq.ParquetWriter(args.out, schema, compression="zstd", compression_level=3) as writer:
        for path in paths:
            with open(path, "rb") as f:
                data = f.read()
            width, height, pixels = decode(data, args.size, args.channels)
            name = os.path.basename(path)
            columns["id"].append(name)
            columns["patient_id"].append(os.path.splitext(name)[0])
            columns["split"].append("train")
            columns["label"].append(0)
            columns["width"].append(width)
            columns["height"].append(height)
            columns["channels"].append(args.channels)
            columns["pixels"].append(pixels)
            columns["mask"].append(None)
            columns["source_path"].append(path)
            columns["source_sha256"].append(hashlib.sha256(data).hexdigest())
            if len(columns["id"]) >= row_group:
                flush(writer)
        flush(writer)
    seconds = time.perf_counter() - start
    print(json.dumps({
        "images": len(paths),
        "seconds": round(seconds, 3),
        "images_per_s": round(len(paths) / seconds, 2) if seconds > 0 else None,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }))


if __name__ == "__main__":
    main()
