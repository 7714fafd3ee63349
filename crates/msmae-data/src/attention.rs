//! The attention-map table: one Parquet file, one row per image, holding a non-negative
//! weight per patch of a `grid[0]`×`grid[1]` patch grid (row-major). Written by
//! `attention/extract` (the maps) and by the `mask/*` stages (the per-image sampling
//! weights, renormalised); read by pre-training and fine-tuning. Readable as-is by polars,
//! pandas and DuckDB.
//!
//! | column | type | |
//! |---|---|---|
//! | id | utf8 | image id (as in the image table), unique |
//! | split | utf8 | `train`, `val`, `test` |
//! | weights | `list<float32>` | row-major grid, `grid[0]·grid[1]` finite values ≥ 0 |
//!
//! Footer key-value metadata `msmae.attention` holds [`AttentionMeta`] as JSON (schema
//! version, grid, provenance). Both [`write_attention`] and [`read_attention`] check every
//! row (length, finite, non-negative, unique id) and name the file and the row id in errors.

use std::collections::HashSet;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, Float32Array, Float32Builder, LargeListArray, ListArray, ListBuilder, RecordBatch, StringArray,
};
use arrow::datatypes::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};

use crate::table::{Split, TableError};

/// Bump when the attention table's columns or their meaning change.
pub const ATTENTION_SCHEMA_VERSION: u32 = 1;

/// Footer metadata key holding [`AttentionMeta`] as JSON.
pub const ATTENTION_META_KEY: &str = "msmae.attention";

/// Rows per Parquet row group when writing.
const ROW_GROUP: usize = 1024;

/// Table-wide facts of an attention table, stored in the Parquet footer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttentionMeta {
    /// [`ATTENTION_SCHEMA_VERSION`] of the writer.
    pub schema_version: u32,
    /// Patch grid `[rows, columns]`; every row holds `grid[0]·grid[1]` weights.
    pub grid: [u32; 2],
    /// What produced the table (stage kind, model or source artifact digest, config, …).
    pub provenance: serde_json::Value,
}

impl AttentionMeta {
    /// Patches per map, `grid[0]·grid[1]`.
    pub fn patches(&self) -> usize {
        self.grid[0] as usize * self.grid[1] as usize
    }
}

/// One image's map.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionRow {
    pub id: String,
    pub split: Split,
    /// Row-major over the grid, `grid[0]·grid[1]` finite values ≥ 0.
    pub weights: Vec<f32>,
}

fn format_err(path: &Path, message: impl Into<String>) -> TableError {
    TableError::Format { path: path.into(), message: message.into() }
}

fn check_meta(path: &Path, meta: &AttentionMeta) -> Result<(), TableError> {
    if meta.schema_version != ATTENTION_SCHEMA_VERSION {
        return Err(format_err(
            path,
            format!(
                "attention table schema version {} is not supported (expected {ATTENTION_SCHEMA_VERSION}): re-run attention extraction",
                meta.schema_version
            ),
        ));
    }
    if meta.grid[0] == 0 || meta.grid[1] == 0 {
        return Err(format_err(
            path,
            format!("attention grid {}×{} is empty: it must be at least 1×1", meta.grid[0], meta.grid[1]),
        ));
    }
    Ok(())
}

/// Check one row's weights against the grid; `seen` catches duplicate ids.
fn check_row(
    path: &Path,
    meta: &AttentionMeta,
    id: &str,
    weights: &[f32],
    seen: &mut HashSet<String>,
) -> Result<(), TableError> {
    let bad = |m: String| format_err(path, format!("row `{id}`: {m}"));
    let l = meta.patches();
    if weights.len() != l {
        return Err(bad(format!(
            "holds {} weights, expected {l} for the {}×{} grid",
            weights.len(),
            meta.grid[0],
            meta.grid[1]
        )));
    }
    if let Some((i, w)) = weights.iter().enumerate().find(|(_, w)| !w.is_finite()) {
        return Err(bad(format!("weight {i} is {w}, not a finite number")));
    }
    if let Some((i, w)) = weights.iter().enumerate().find(|(_, w)| **w < 0.0) {
        return Err(bad(format!("weight {i} is {w}, weights must be non-negative")));
    }
    if !seen.insert(id.to_string()) {
        return Err(bad("duplicate id".into()));
    }
    Ok(())
}

/// The Arrow schema of an attention table with `meta` in its metadata.
pub fn attention_schema(meta: &AttentionMeta) -> Result<Schema, serde_json::Error> {
    let fields = vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("split", DataType::Utf8, false),
        Field::new("weights", DataType::List(Arc::new(Field::new("item", DataType::Float32, false))), false),
    ];
    let md = std::collections::HashMap::from([(ATTENTION_META_KEY.to_string(), serde_json::to_string(meta)?)]);
    Ok(Schema::new(fields).with_metadata(md))
}

/// Write `rows` to `path` (created or truncated). Every row is checked first (length,
/// finite, non-negative, unique id), so an invalid table is never written. Returns the
/// number of rows written.
pub fn write_attention(path: &Path, meta: &AttentionMeta, rows: &[AttentionRow]) -> Result<u64, TableError> {
    check_meta(path, meta)?;
    let mut seen = HashSet::with_capacity(rows.len());
    for r in rows {
        check_row(path, meta, &r.id, &r.weights, &mut seen)?;
    }
    let schema = Arc::new(attention_schema(meta).map_err(|e| format_err(path, format!("footer metadata: {e}")))?);
    let file = File::create(path).map_err(|source| TableError::Io { path: path.into(), source })?;
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(3).unwrap_or_default()))
        .set_max_row_group_row_count(Some(ROW_GROUP))
        .set_created_by(format!("msmae {}", env!("CARGO_PKG_VERSION")))
        .build();
    let parquet_err = |e: parquet::errors::ParquetError| format_err(path, e.to_string());
    let mut writer = ArrowWriter::try_new(file, schema.clone(), Some(props)).map_err(parquet_err)?;
    for chunk in rows.chunks(ROW_GROUP) {
        let mut w = ListBuilder::new(Float32Builder::with_capacity(chunk.len() * meta.patches()))
            .with_field(Arc::new(Field::new("item", DataType::Float32, false)));
        for r in chunk {
            w.values().append_slice(&r.weights);
            w.append(true);
        }
        let cols: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(chunk.iter().map(|r| r.id.as_str()))),
            Arc::new(StringArray::from_iter_values(chunk.iter().map(|r| r.split.as_str()))),
            Arc::new(w.finish()),
        ];
        let batch = RecordBatch::try_new(schema.clone(), cols).map_err(|e| format_err(path, e.to_string()))?;
        writer.write(&batch).map_err(parquet_err)?;
    }
    writer.close().map_err(parquet_err)?;
    Ok(rows.len() as u64)
}

/// Read and check a whole attention table: the footer metadata (schema version, grid) and
/// every row (length, finite, non-negative, unique id, known split). Accepts `list` and
/// `large_list` weights columns (as written by other tools).
pub fn read_attention(path: &Path) -> Result<(AttentionMeta, Vec<AttentionRow>), TableError> {
    let f = File::open(path).map_err(|source| TableError::Io { path: path.into(), source })?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(f)
        .map_err(|e| format_err(path, format!("not a readable Parquet file: {e}")))?;
    let text = builder.schema().metadata().get(ATTENTION_META_KEY).cloned().ok_or_else(|| {
        format_err(path, format!("not an msmae attention table (no `{ATTENTION_META_KEY}` footer metadata)"))
    })?;
    let meta: AttentionMeta = serde_json::from_str(&text)
        .map_err(|e| format_err(path, format!("footer metadata `{ATTENTION_META_KEY}`: {e}")))?;
    check_meta(path, &meta)?;
    let reader = builder.build().map_err(|e| format_err(path, e.to_string()))?;
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| format_err(path, e.to_string()))?;
        let col =
            |name: &str| batch.column_by_name(name).ok_or_else(|| format_err(path, format!("missing column `{name}`")));
        let strs = |name: &str| -> Result<StringArray, TableError> {
            col(name)?
                .as_any()
                .downcast_ref::<StringArray>()
                .cloned()
                .ok_or_else(|| format_err(path, format!("column `{name}` is not utf8")))
        };
        let (ids, splits) = (strs("id")?, strs("split")?);
        let weights = col("weights")?;
        for r in 0..batch.num_rows() {
            if ids.is_null(r) {
                return Err(format_err(path, format!("row {}: null id", out.len())));
            }
            let id = ids.value(r);
            let bad = |m: String| format_err(path, format!("row `{id}`: {m}"));
            if splits.is_null(r) {
                return Err(bad("null split".into()));
            }
            let split =
                Split::parse(splits.value(r)).ok_or_else(|| bad(format!("unknown split `{}`", splits.value(r))))?;
            if weights.is_null(r) {
                return Err(bad("null weights".into()));
            }
            let values: ArrayRef = if let Some(l) = weights.as_any().downcast_ref::<ListArray>() {
                l.value(r)
            } else if let Some(l) = weights.as_any().downcast_ref::<LargeListArray>() {
                l.value(r)
            } else {
                return Err(format_err(
                    path,
                    format!("column `weights` is {}, expected list<float32>", weights.data_type()),
                ));
            };
            let values = values
                .as_any()
                .downcast_ref::<Float32Array>()
                .ok_or_else(|| bad(format!("weights are {}, expected float32", values.data_type())))?;
            if values.null_count() > 0 {
                return Err(bad(format!("{} null weights", values.null_count())));
            }
            let w = values.values().to_vec();
            check_row(path, &meta, id, &w, &mut seen)?;
            out.push(AttentionRow { id: id.to_string(), split, weights: w });
        }
    }
    Ok((meta, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(grid: [u32; 2]) -> AttentionMeta {
        AttentionMeta {
            schema_version: ATTENTION_SCHEMA_VERSION,
            grid,
            provenance: serde_json::json!({"test": "attention"}),
        }
    }

    fn row(i: usize, l: usize) -> AttentionRow {
        AttentionRow {
            id: format!("img{i}"),
            split: Split::ALL[i % 3],
            weights: (0..l).map(|k| (k * (i + 1)) as f32 * 0.25).collect(),
        }
    }

    #[test]
    fn round_trips_across_row_groups() {
        let d = tempfile::tempdir().expect("tmp");
        let p = d.path().join("attention.parquet");
        let m = meta([3, 4]);
        let rows: Vec<AttentionRow> = (0..ROW_GROUP + 7).map(|i| row(i, 12)).collect();
        assert_eq!(write_attention(&p, &m, &rows).expect("write"), rows.len() as u64);
        let (m2, r2) = read_attention(&p).expect("read");
        assert_eq!(m2, m);
        assert_eq!(r2, rows);
        // An empty table is valid too.
        write_attention(&p, &m, &[]).expect("empty");
        assert_eq!(read_attention(&p).expect("read").1, []);
    }

    #[test]
    fn write_rejects_bad_rows_naming_file_and_row() {
        let d = tempfile::tempdir().expect("tmp");
        let p = d.path().join("a.parquet");
        let m = meta([2, 2]);
        let cases: Vec<(Vec<AttentionRow>, &str)> = vec![
            (vec![row(0, 4), row(5, 3)], "row `img5`: holds 3 weights, expected 4"),
            (vec![AttentionRow { weights: vec![0.0, f32::NAN, 0.0, 0.0], ..row(1, 4) }], "row `img1`: weight 1 is NaN"),
            (vec![AttentionRow { weights: vec![0.0, 1.0, f32::INFINITY, 0.0], ..row(1, 4) }], "not a finite number"),
            (
                vec![AttentionRow { weights: vec![0.0, 1.0, 0.0, -0.5], ..row(2, 4) }],
                "row `img2`: weight 3 is -0.5, weights must be non-negative",
            ),
            (vec![row(0, 4), row(1, 4), row(0, 4)], "row `img0`: duplicate id"),
        ];
        for (rows, want) in cases {
            let e = write_attention(&p, &m, &rows).expect_err(want).to_string();
            assert!(e.contains(want) && e.contains("a.parquet"), "{e}");
        }
        assert!(!p.exists(), "nothing written for invalid rows");
        let e = write_attention(&p, &AttentionMeta { schema_version: 9, ..m.clone() }, &[])
            .expect_err("version")
            .to_string();
        assert!(e.contains("schema version 9"), "{e}");
        let e = write_attention(&p, &meta([0, 4]), &[]).expect_err("grid").to_string();
        assert!(e.contains("0×4 is empty"), "{e}");
    }

    /// Write a table bypassing [`write_attention`]'s checks, as a buggy or foreign writer would.
    fn write_raw(path: &Path, meta_json: Option<String>, ids: &[&str], weights: &[Vec<f32>]) {
        let fields = vec![
            Field::new("id", DataType::Utf8, false),
            Field::new("split", DataType::Utf8, false),
            Field::new("weights", DataType::List(Arc::new(Field::new("item", DataType::Float32, true))), false),
        ];
        let md = meta_json
            .map(|j| std::collections::HashMap::from([(ATTENTION_META_KEY.to_string(), j)]))
            .unwrap_or_default();
        let schema = Arc::new(Schema::new(fields).with_metadata(md));
        let mut w = ListBuilder::new(Float32Builder::new());
        for v in weights {
            w.values().append_slice(v);
            w.append(true);
        }
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from_iter_values(ids.iter().copied())),
                Arc::new(StringArray::from_iter_values(ids.iter().map(|_| "train"))),
                Arc::new(w.finish()),
            ],
        )
        .expect("batch");
        let mut pw = ArrowWriter::try_new(File::create(path).expect("create"), schema, None).expect("writer");
        pw.write(&batch).expect("write");
        pw.close().expect("close");
    }

    #[test]
    fn read_rejects_corrupt_and_mismatched_tables() {
        let d = tempfile::tempdir().expect("tmp");
        let m = serde_json::to_string(&meta([2, 3])).expect("json");
        // a row of the wrong length
        let p = d.path().join("short.parquet");
        write_raw(&p, Some(m.clone()), &["a", "b"], &[vec![1.0; 6], vec![1.0; 5]]);
        let e = read_attention(&p).expect_err("length").to_string();
        assert!(e.contains("short.parquet") && e.contains("row `b`: holds 5 weights, expected 6"), "{e}");
        // negative weight, duplicate id
        let p = d.path().join("neg.parquet");
        write_raw(&p, Some(m.clone()), &["a"], &[vec![1.0, 1.0, -1.0, 0.0, 0.0, 0.0]]);
        assert!(read_attention(&p).expect_err("neg").to_string().contains("row `a`: weight 2 is -1"));
        let p = d.path().join("dup.parquet");
        write_raw(&p, Some(m.clone()), &["a", "a"], &[vec![1.0; 6], vec![1.0; 6]]);
        assert!(read_attention(&p).expect_err("dup").to_string().contains("row `a`: duplicate id"));
        // no footer metadata, wrong version
        let p = d.path().join("plain.parquet");
        write_raw(&p, None, &["a"], &[vec![1.0; 6]]);
        assert!(read_attention(&p).expect_err("meta").to_string().contains("not an msmae attention table"));
        let p = d.path().join("v2.parquet");
        write_raw(
            &p,
            Some(serde_json::to_string(&AttentionMeta { schema_version: 2, ..meta([2, 3]) }).expect("json")),
            &["a"],
            &[vec![1.0; 6]],
        );
        assert!(read_attention(&p).expect_err("version").to_string().contains("schema version 2 is not supported"));
        // not Parquet at all, truncated Parquet, missing file
        let p = d.path().join("garbage.parquet");
        std::fs::write(&p, b"this is not parquet").expect("w");
        let e = read_attention(&p).expect_err("garbage").to_string();
        assert!(e.contains("garbage.parquet") && e.contains("not a readable Parquet file"), "{e}");
        let good = d.path().join("good.parquet");
        write_attention(&good, &meta([2, 3]), &[row(0, 6), row(1, 6)]).expect("write");
        let bytes = std::fs::read(&good).expect("r");
        let p = d.path().join("truncated.parquet");
        std::fs::write(&p, &bytes[..bytes.len() / 2]).expect("w");
        assert!(read_attention(&p).expect_err("truncated").to_string().contains("truncated.parquet"));
        let e = read_attention(&d.path().join("missing.parquet")).expect_err("missing");
        assert!(matches!(e, TableError::Io { .. }) && e.to_string().contains("missing.parquet"), "{e}");
    }
}
