"""Independent reader for the msmae image table (pyarrow): prints a JSON summary that the
Rust test compares with what it wrote."""
import hashlib
import json
import sys

import pyarrow.parquet as pq

path = sys.argv[1]
table = pq.read_table(path)
meta = json.loads(table.schema.metadata[b"msmae.image_table"])
rows = table.to_pylist()
print(json.dumps({
    "num_rows": table.num_rows,
    "columns": table.schema.names,
    "types": {f.name: str(f.type) for f in table.schema},
    "nullable": {f.name: f.nullable for f in table.schema},
    "label_names": meta["label_names"],
    "schema_version": meta["schema_version"],
    "ids": [r["id"] for r in rows],
    "labels": [r["label"] for r in rows],
    "splits": [r["split"] for r in rows],
    "pixel_sha256": [hashlib.sha256(r["pixels"]).hexdigest() for r in rows],
    "source_sha256": [r["source_sha256"] for r in rows],
    "mask_sums": [sum(r["mask"]) if r["mask"] is not None else None for r in rows],
    "multi_hot": [r["labels"] for r in rows] if "labels" in table.schema.names else None,
    "bit_depth": meta.get("bit_depth", 8),
}))
