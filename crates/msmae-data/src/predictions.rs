//! The predictions table: one Parquet file per fine-tuned model, one row per scored image,
//! written by the fine-tuning stages and read by evaluation (`eval/classify`). Like the
//! image table it has an explicit Arrow schema and its schema version, label names and
//! provenance in the footer metadata (key `msmae.predictions`), so polars, pandas and DuckDB
//! read it as-is.
//!
//! | column | type | |
//! |---|---|---|
//! | id | utf8 | image id (from the image table), unique within the file |
//! | split | utf8 | `train`, `val`, `test` |
//! | label | int32, nullable | true class index (required for single-label data) |
//! | labels | `list<uint8>`, only for multi-label | true multi-hot, one 0/1 entry per label name |
//! | scores | `list<float32>` | probabilities, one per label name: a softmax row for single-label data, per-label sigmoids for multi-label data |
//!
//! Both [`write_predictions`] and [`read_predictions`] check every row (score count, finite
//! scores in [0, 1], label range, multi-hot shape, unique ids) and the schema version, and
//! name the file and the row id in their errors.

use std::collections::HashSet;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, Float32Array, Float32Builder, Int32Array, ListArray, ListBuilder, RecordBatch, StringArray,
    UInt8Array, UInt8Builder,
};
use arrow::datatypes::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};

use crate::table::{Split, TableError};

/// Bump when the predictions table's columns or their meaning change.
pub const PREDICTIONS_SCHEMA_VERSION: u32 = 1;

/// Footer key-value metadata key holding [`PredictionMeta`] as JSON.
pub const PREDICTIONS_META_KEY: &str = "msmae.predictions";

/// Table-wide facts of a predictions file, stored in its Parquet footer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PredictionMeta {
    /// [`PREDICTIONS_SCHEMA_VERSION`] when written.
    pub schema_version: u32,
    /// Class (single-label) or finding (multi-label) names; `scores` has one entry per name.
    pub label_names: Vec<String>,
    /// Multi-label data: a `labels` column, per-label sigmoid scores.
    pub multi_label: bool,
    /// What produced the predictions (stage kind, config, checkpoint digest, …).
    pub provenance: serde_json::Value,
}

/// One scored image.
#[derive(Debug, Clone, PartialEq)]
pub struct PredictionRow {
    /// Image id, unique within the file.
    pub id: String,
    pub split: Split,
    /// True class index; required for single-label data, optional for multi-label data.
    pub label: Option<i32>,
    /// True multi-hot vector (multi-label data only; `None` otherwise).
    pub labels: Option<Vec<u8>>,
    /// Probabilities, one per label name.
    pub scores: Vec<f32>,
}

fn format_err(path: &Path, message: impl Into<String>) -> TableError {
    TableError::Format { path: path.into(), message: message.into() }
}

fn check_meta(path: &Path, meta: &PredictionMeta) -> Result<(), TableError> {
    if meta.schema_version != PREDICTIONS_SCHEMA_VERSION {
        return Err(format_err(
            path,
            format!(
                "predictions schema version {} is not supported (expected {PREDICTIONS_SCHEMA_VERSION}): re-run the stage that wrote it",
                meta.schema_version
            ),
        ));
    }
    if meta.label_names.is_empty() {
        return Err(format_err(path, "label_names is empty: predictions need at least one class"));
    }
    if !meta.multi_label && meta.label_names.len() < 2 {
        return Err(format_err(
            path,
            format!("single-label predictions need at least 2 classes, label_names has {}", meta.label_names.len()),
        ));
    }
    Ok(())
}

/// Why `row` does not fit `meta`, if it does not.
fn check_row(meta: &PredictionMeta, row: &PredictionRow) -> Result<(), String> {
    let n = meta.label_names.len();
    if row.scores.len() != n {
        return Err(format!("scores hold {} values, expected {n} (one per label name)", row.scores.len()));
    }
    if let Some((k, s)) = row.scores.iter().enumerate().find(|(_, s)| !s.is_finite() || !(0.0..=1.0).contains(*s)) {
        return Err(format!("scores[{k}] = {s} is not a probability in [0, 1]"));
    }
    if let Some(l) = row.label
        && (l < 0 || l as usize >= n)
    {
        return Err(format!("label {l} is outside 0..{n}"));
    }
    if meta.multi_label {
        let Some(labels) = &row.labels else {
            return Err("multi-label predictions need `labels` (the true multi-hot vector)".into());
        };
        if labels.len() != n {
            return Err(format!("labels hold {} values, expected {n} (one per label name)", labels.len()));
        }
        if let Some((k, v)) = labels.iter().enumerate().find(|(_, v)| **v > 1) {
            return Err(format!("labels[{k}] = {v} is not 0 or 1"));
        }
    } else {
        if row.label.is_none() {
            return Err("single-label predictions need `label` (the true class)".into());
        }
        if row.labels.is_some() {
            return Err("`labels` is set, but the predictions are single-label".into());
        }
    }
    Ok(())
}

/// The Arrow schema of a predictions table with `meta` (its JSON in the schema metadata).
pub fn predictions_schema(meta: &PredictionMeta) -> Schema {
    let mut fields = vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("split", DataType::Utf8, false),
        Field::new("label", DataType::Int32, true),
    ];
    if meta.multi_label {
        fields.push(Field::new("labels", DataType::List(Arc::new(Field::new("item", DataType::UInt8, true))), false));
    }
    fields.push(Field::new("scores", DataType::List(Arc::new(Field::new("item", DataType::Float32, true))), false));
    let md = std::collections::HashMap::from([(
        PREDICTIONS_META_KEY.to_string(),
        serde_json::to_string(meta).unwrap_or_default(),
    )]);
    Schema::new(fields).with_metadata(md)
}

/// Write `rows` to `path` (created or truncated); returns the number of rows.
///
/// Every row is checked against `meta` first, so nothing is written for invalid input.
pub fn write_predictions(path: &Path, meta: &PredictionMeta, rows: &[PredictionRow]) -> Result<u64, TableError> {
    check_meta(path, meta)?;
    let mut seen = HashSet::with_capacity(rows.len());
    for row in rows {
        check_row(meta, row).map_err(|m| format_err(path, format!("row `{}`: {m}", row.id)))?;
        if !seen.insert(row.id.as_str()) {
            return Err(format_err(path, format!("row `{}`: duplicate id", row.id)));
        }
    }
    let schema = Arc::new(predictions_schema(meta));
    let fmt = |e: &dyn std::fmt::Display| format_err(path, e.to_string());
    let mut cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.id.as_str()))),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.split.as_str()))),
        Arc::new(Int32Array::from_iter(rows.iter().map(|r| r.label))),
    ];
    if meta.multi_label {
        let mut b = ListBuilder::new(UInt8Builder::new());
        for r in rows {
            b.values().append_slice(r.labels.as_deref().unwrap_or_default());
            b.append(true);
        }
        cols.push(Arc::new(b.finish()));
    }
    let mut b = ListBuilder::new(Float32Builder::with_capacity(rows.len() * meta.label_names.len()));
    for r in rows {
        b.values().append_slice(&r.scores);
        b.append(true);
    }
    cols.push(Arc::new(b.finish()));
    let batch = RecordBatch::try_new(schema.clone(), cols).map_err(|e| fmt(&e))?;
    let file = File::create(path).map_err(|source| TableError::Io { path: path.into(), source })?;
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(3).unwrap_or_default()))
        .set_created_by(format!("msmae {}", env!("CARGO_PKG_VERSION")))
        .build();
    let mut writer = ArrowWriter::try_new(file, schema, Some(props)).map_err(|e| fmt(&e))?;
    writer.write(&batch).map_err(|e| fmt(&e))?;
    writer.close().map_err(|e| fmt(&e))?;
    Ok(rows.len() as u64)
}

/// Read and check a predictions table: its metadata and every row, in file order.
pub fn read_predictions(path: &Path) -> Result<(PredictionMeta, Vec<PredictionRow>), TableError> {
    let fmt = |m: String| format_err(path, m);
    let f = File::open(path).map_err(|source| TableError::Io { path: path.into(), source })?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(f).map_err(|e| fmt(e.to_string()))?;
    let text =
        builder.schema().metadata().get(PREDICTIONS_META_KEY).cloned().ok_or_else(|| {
            fmt(format!("not an msmae predictions table (no `{PREDICTIONS_META_KEY}` footer metadata)"))
        })?;
    let meta: PredictionMeta =
        serde_json::from_str(&text).map_err(|e| fmt(format!("footer metadata `{PREDICTIONS_META_KEY}`: {e}")))?;
    check_meta(path, &meta)?;
    let reader = builder.build().map_err(|e| fmt(e.to_string()))?;
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for batch in reader {
        let batch = batch.map_err(|e| fmt(e.to_string()))?;
        let col = |name: &str| batch.column_by_name(name).ok_or_else(|| fmt(format!("missing column `{name}`")));
        let strs = |name: &str| -> Result<StringArray, TableError> {
            col(name)?
                .as_any()
                .downcast_ref::<StringArray>()
                .cloned()
                .ok_or_else(|| fmt(format!("column `{name}` is not utf8")))
        };
        let lists = |name: &str| -> Result<ListArray, TableError> {
            col(name)?
                .as_any()
                .downcast_ref::<ListArray>()
                .cloned()
                .ok_or_else(|| fmt(format!("column `{name}` is not a list")))
        };
        let (id, split) = (strs("id")?, strs("split")?);
        let label = col("label")?
            .as_any()
            .downcast_ref::<Int32Array>()
            .cloned()
            .ok_or_else(|| fmt("column `label` is not int32".into()))?;
        let scores = lists("scores")?;
        let labels = if meta.multi_label { Some(lists("labels")?) } else { None };
        for r in 0..batch.num_rows() {
            let rid = id.value(r);
            let bad = |m: String| fmt(format!("row `{rid}`: {m}"));
            let sv = scores.value(r);
            let sv = sv
                .as_any()
                .downcast_ref::<Float32Array>()
                .ok_or_else(|| bad("column `scores` does not hold float32 values".into()))?;
            let labels = match &labels {
                Some(l) => {
                    let v = l.value(r);
                    let v = v
                        .as_any()
                        .downcast_ref::<UInt8Array>()
                        .ok_or_else(|| bad("column `labels` does not hold uint8 values".into()))?;
                    Some(v.values().to_vec())
                }
                None => None,
            };
            let row = PredictionRow {
                id: rid.to_string(),
                split: Split::parse(split.value(r))
                    .ok_or_else(|| bad(format!("unknown split `{}`", split.value(r))))?,
                label: label.is_valid(r).then(|| label.value(r)),
                labels,
                scores: sv.values().to_vec(),
            };
            check_row(&meta, &row).map_err(bad)?;
            if !seen.insert(row.id.clone()) {
                return Err(bad("duplicate id".into()));
            }
            out.push(row);
        }
    }
    Ok((meta, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(multi: bool) -> PredictionMeta {
        PredictionMeta {
            schema_version: PREDICTIONS_SCHEMA_VERSION,
            label_names: vec!["a".into(), "b".into(), "c".into()],
            multi_label: multi,
            provenance: serde_json::json!({"stage": "finetune/test", "seed": 3}),
        }
    }

    fn single_rows() -> Vec<PredictionRow> {
        (0..7)
            .map(|i| PredictionRow {
                id: format!("img{i}"),
                split: Split::ALL[i % 3],
                label: Some((i % 3) as i32),
                labels: None,
                scores: vec![0.5, 0.25 + i as f32 / 100.0, 0.25 - i as f32 / 100.0],
            })
            .collect()
    }

    #[test]
    fn single_label_round_trip() {
        let d = tempfile::tempdir().expect("tmp");
        let p = d.path().join("predictions.parquet");
        let rows = single_rows();
        assert_eq!(write_predictions(&p, &meta(false), &rows).expect("write"), 7);
        let (m, back) = read_predictions(&p).expect("read");
        assert_eq!(m, meta(false));
        assert_eq!(back, rows);
    }

    #[test]
    fn multi_label_round_trip_keeps_null_labels() {
        let d = tempfile::tempdir().expect("tmp");
        let p = d.path().join("predictions.parquet");
        let rows: Vec<PredictionRow> = (0..5)
            .map(|i| PredictionRow {
                id: format!("x{i}"),
                split: Split::Test,
                label: None,
                labels: Some(vec![(i % 2) as u8, 1, 0]),
                scores: vec![0.1 * i as f32, 1.0, 0.0],
            })
            .collect();
        write_predictions(&p, &meta(true), &rows).expect("write");
        let (m, back) = read_predictions(&p).expect("read");
        assert!(m.multi_label);
        assert_eq!(back, rows);
    }

    #[test]
    fn invalid_rows_are_named() {
        let d = tempfile::tempdir().expect("tmp");
        let p = d.path().join("p.parquet");
        let mut rows = single_rows();
        rows[2].scores.pop();
        let e = write_predictions(&p, &meta(false), &rows).expect_err("short scores").to_string();
        assert!(e.contains("p.parquet") && e.contains("row `img2`: scores hold 2 values, expected 3"), "{e}");
        let mut rows = single_rows();
        rows[4].scores[1] = f32::NAN;
        let e = write_predictions(&p, &meta(false), &rows).expect_err("nan").to_string();
        assert!(e.contains("row `img4`: scores[1] = NaN is not a probability"), "{e}");
        let mut rows = single_rows();
        rows[1].label = Some(3);
        let e = write_predictions(&p, &meta(false), &rows).expect_err("label").to_string();
        assert!(e.contains("row `img1`: label 3 is outside 0..3"), "{e}");
        let mut rows = single_rows();
        rows[0].label = None;
        let e = write_predictions(&p, &meta(false), &rows).expect_err("missing label").to_string();
        assert!(e.contains("row `img0`: single-label predictions need `label`"), "{e}");
        let mut rows = single_rows();
        rows[5].id = "img1".into();
        let e = write_predictions(&p, &meta(false), &rows).expect_err("dup").to_string();
        assert!(e.contains("row `img1`: duplicate id"), "{e}");
        let multi = vec![PredictionRow {
            id: "m".into(),
            split: Split::Val,
            label: None,
            labels: Some(vec![0, 2, 1]),
            scores: vec![0.0; 3],
        }];
        let e = write_predictions(&p, &meta(true), &multi).expect_err("multi-hot").to_string();
        assert!(e.contains("row `m`: labels[1] = 2 is not 0 or 1"), "{e}");
        let e = write_predictions(&p, &PredictionMeta { schema_version: 9, ..meta(false) }, &single_rows())
            .expect_err("version")
            .to_string();
        assert!(e.contains("schema version 9 is not supported"), "{e}");
        assert!(!p.exists(), "nothing is written for invalid input");
    }

    #[test]
    fn reader_checks_what_it_reads() {
        let d = tempfile::tempdir().expect("tmp");
        // A file written with a newer schema version (bypassing the writer's check).
        let p = d.path().join("future.parquet");
        let m = PredictionMeta { schema_version: PREDICTIONS_SCHEMA_VERSION + 1, ..meta(false) };
        let schema = Arc::new(predictions_schema(&m));
        let mut sb = ListBuilder::new(Float32Builder::new());
        sb.values().append_slice(&[0.2, 0.3, 1.5]);
        sb.append(true);
        let cols: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(vec!["r0"])),
            Arc::new(StringArray::from(vec!["test"])),
            Arc::new(Int32Array::from(vec![Some(1)])),
            Arc::new(sb.finish()),
        ];
        let batch = RecordBatch::try_new(schema.clone(), cols.clone()).expect("batch");
        let mut w = ArrowWriter::try_new(File::create(&p).expect("create"), schema, None).expect("writer");
        w.write(&batch).expect("write");
        w.close().expect("close");
        let e = read_predictions(&p).expect_err("version").to_string();
        assert!(e.contains("future.parquet") && e.contains("schema version 2 is not supported"), "{e}");
        // The current version, but a score out of range.
        let p = d.path().join("bad.parquet");
        let schema = Arc::new(predictions_schema(&meta(false)));
        let batch = RecordBatch::try_new(schema.clone(), cols).expect("batch");
        let mut w = ArrowWriter::try_new(File::create(&p).expect("create"), schema, None).expect("writer");
        w.write(&batch).expect("write");
        w.close().expect("close");
        let e = read_predictions(&p).expect_err("range").to_string();
        assert!(
            e.contains("bad.parquet") && e.contains("row `r0`: scores[2] = 1.5 is not a probability in [0, 1]"),
            "{e}"
        );
        let e = read_predictions(&d.path().join("missing.parquet")).expect_err("missing").to_string();
        assert!(e.contains("missing.parquet"), "{e}");
    }
}
