//! The image table: one Parquet file per dataset, one row per image, with an explicit Arrow
//! schema, and the schema version, label names and provenance in the footer metadata.
//! Readable as-is by polars, pandas and DuckDB.
//!
//! | column | type | |
//! |---|---|---|
//! | id | utf8 | unique image id |
//! | patient_id | utf8 | splits never cross patients (or lesions) |
//! | split | utf8 | `train`, `val`, `test` |
//! | label | int32, nullable | class index (single-label data) |
//! | labels | `list<uint8>`, only for multi-label | multi-hot, one entry per label name |
//! | width, height | int32 | of the source image |
//! | channels | int32 | of `pixels` |
//! | pixels | binary | row-major H×W×C at the table's size: uint8, or little-endian uint16 when `bit_depth` is 16 |
//! | mask | binary, nullable | uint8 0/1, H×W (segmentation sources) |
//! | source_path | utf8 | |
//! | source_sha256 | utf8 | of the source file (of the generated pixels for synthetic data) |

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BinaryArray, BinaryBuilder, Int32Array, ListArray, ListBuilder, RecordBatch, StringArray,
    UInt8Builder,
};
use arrow::datatypes::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;
use serde::{Deserialize, Serialize};

/// Bump when the table's columns or their meaning change.
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
}

impl From<TableError> for msmae_core::StageError {
    fn from(e: TableError) -> Self {
        match e {
            TableError::Io { path, source } => msmae_core::StageError::Io { path, source },
            TableError::Format { path, message } => msmae_core::StageError::data(path, None, message),
        }
    }
}

/// Dataset split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Val,
    Test,
}

impl Split {
    pub const ALL: [Split; 3] = [Split::Train, Split::Val, Split::Test];
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.as_str() == s)
    }
    /// A split as datasets name it (folder or manifest value), case-insensitive:
    /// train/training, val/valid/validation, test/testing.
    pub fn from_name(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "train" | "training" => Some(Split::Train),
            "val" | "valid" | "validation" => Some(Split::Val),
            "test" | "testing" => Some(Split::Test),
            _ => None,
        }
    }
}

/// Move `fraction` of `patients` (given in a deterministic order) to validation: a seeded
/// shuffle, then the first `round(n · fraction)`. Returns those patients.
pub fn carve_validation<T: Clone + Ord>(
    mut patients: Vec<T>,
    fraction: f64,
    rng: &mut impl rand::Rng,
) -> std::collections::BTreeSet<T> {
    rand::seq::SliceRandom::shuffle(patients.as_mut_slice(), rng);
    let n_val = (patients.len() as f64 * fraction).round() as usize;
    patients.into_iter().take(n_val).collect()
}

/// Fractions of patients per split, for sources that do not prescribe a split.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitFractions {
    pub train: f64,
    pub val: f64,
    pub test: f64,
}

impl Default for SplitFractions {
    fn default() -> Self {
        SplitFractions { train: 0.7, val: 0.1, test: 0.2 }
    }
}

impl SplitFractions {
    /// `Err` with a message for the config's `split` key.
    pub fn check(&self) -> Result<(), String> {
        let all = [self.train, self.val, self.test];
        if all.iter().any(|f| !(0.0..=1.0).contains(f)) || (all.iter().sum::<f64>() - 1.0).abs() > 1e-6 {
            return Err("train, val and test must be fractions that add up to 1".into());
        }
        Ok(())
    }

    /// Split of each of `n` patients (in the order given): shuffled by `rng`, then cut by the
    /// fractions (rounded; the test split takes the rest).
    pub fn assign(&self, n: usize, rng: &mut impl rand::Rng) -> Vec<Split> {
        let mut order: Vec<usize> = (0..n).collect();
        rand::seq::SliceRandom::shuffle(order.as_mut_slice(), rng);
        let n_train = ((n as f64 * self.train).round() as usize).min(n);
        let n_val = ((n as f64 * self.val).round() as usize).min(n - n_train);
        let mut out = vec![Split::Test; n];
        for (rank, &p) in order.iter().enumerate() {
            out[p] = if rank < n_train {
                Split::Train
            } else if rank < n_train + n_val {
                Split::Val
            } else {
                Split::Test
            };
        }
        out
    }
}

/// Table-wide facts, stored in the Parquet footer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableMeta {
    pub schema_version: u32,
    pub label_names: Vec<String>,
    pub multi_label: bool,
    pub height: u32,
    pub width: u32,
    pub channels: u32,
    pub has_masks: bool,
    /// Bits per pixel sample: 8 (`pixels` are bytes) or 16 (little-endian u16 pairs, for
    /// sources deeper than 8 bits: DICOM, 16-bit PNG/TIFF). Absent in older tables: 8.
    #[serde(default = "eight_bits")]
    pub bit_depth: u32,
    /// Multi-class segmentation: the name of each `mask` value (0 = background). Empty:
    /// binary lesion masks (0/1).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mask_classes: Vec<String>,
    /// What produced the table (stage kind, config, seed, …).
    pub provenance: serde_json::Value,
}

fn eight_bits() -> u32 {
    8
}

impl TableMeta {
    /// Bytes of one pixel sample (1 or 2).
    pub fn sample_bytes(&self) -> usize {
        if self.bit_depth == 16 { 2 } else { 1 }
    }
}

/// One image.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageRow {
    pub id: String,
    pub patient_id: String,
    pub split: Split,
    pub label: Option<i32>,
    /// Multi-hot (multi-label tables only).
    pub labels: Option<Vec<u8>>,
    pub width: i32,
    pub height: i32,
    pub channels: i32,
    pub pixels: Vec<u8>,
    pub mask: Option<Vec<u8>>,
    pub source_path: String,
    pub source_sha256: String,
}

const META_KEY: &str = "msmae.image_table";

/// The Arrow schema of a table with `meta`.
pub fn schema(meta: &TableMeta) -> Schema {
    let mut fields = vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("patient_id", DataType::Utf8, false),
        Field::new("split", DataType::Utf8, false),
        Field::new("label", DataType::Int32, true),
    ];
    if meta.multi_label {
        fields.push(Field::new("labels", DataType::List(Arc::new(Field::new("item", DataType::UInt8, true))), false));
    }
    fields.extend([
        Field::new("width", DataType::Int32, false),
        Field::new("height", DataType::Int32, false),
        Field::new("channels", DataType::Int32, false),
        Field::new("pixels", DataType::Binary, false),
        Field::new("mask", DataType::Binary, true),
        Field::new("source_path", DataType::Utf8, false),
        Field::new("source_sha256", DataType::Utf8, false),
    ]);
    let md = std::collections::HashMap::from([(META_KEY.to_string(), serde_json::to_string(meta).unwrap_or_default())]);
    Schema::new(fields).with_metadata(md)
}

/// Streams rows into a Parquet file, one row group at a time: memory stays bounded by a
/// row group whatever the dataset size.
pub struct ImageTableWriter {
    path: PathBuf,
    meta: TableMeta,
    schema: Arc<Schema>,
    writer: ArrowWriter<File>,
    pending: Vec<ImageRow>,
    row_group: usize,
    rows: u64,
}

impl std::fmt::Debug for ImageTableWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageTableWriter").field("path", &self.path).field("rows", &self.rows).finish_non_exhaustive()
    }
}

impl ImageTableWriter {
    /// Create `path`; `row_group` rows are buffered before each write.
    pub fn create(path: &Path, meta: TableMeta, row_group: usize) -> Result<Self, TableError> {
        let file = File::create(path).map_err(|source| TableError::Io { path: path.into(), source })?;
        let schema = Arc::new(schema(&meta));
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::try_new(3).unwrap_or_default()))
            .set_max_row_group_row_count(Some(row_group.max(1)))
            .set_created_by(format!("msmae {}", env!("CARGO_PKG_VERSION")))
            // min/max statistics of image bytes are useless and, untruncated, put two whole
            // images per row group and page into the footer (which readers hold in memory)
            .set_column_statistics_enabled(ColumnPath::from("pixels"), EnabledStatistics::None)
            .set_column_statistics_enabled(ColumnPath::from("mask"), EnabledStatistics::None)
            .build();
        let writer = ArrowWriter::try_new(file, schema.clone(), Some(props))
            .map_err(|e| TableError::Format { path: path.into(), message: e.to_string() })?;
        Ok(Self {
            path: path.into(),
            meta,
            schema,
            writer,
            pending: Vec::with_capacity(row_group),
            row_group: row_group.max(1),
            rows: 0,
        })
    }

    /// Queue a row (checked against the table's size and labels).
    pub fn push(&mut self, row: ImageRow) -> Result<(), TableError> {
        let (h, w, c, b) = (
            self.meta.height as usize,
            self.meta.width as usize,
            self.meta.channels as usize,
            self.meta.sample_bytes(),
        );
        let bad = |m: String| TableError::Format { path: self.path.clone(), message: format!("row `{}`: {m}", row.id) };
        if row.pixels.len() != h * w * c * b {
            return Err(bad(format!("pixels hold {} bytes, expected {h}×{w}×{c}×{b}", row.pixels.len())));
        }
        if let Some(m) = &row.mask
            && m.len() != h * w
        {
            return Err(bad(format!("mask holds {} bytes, expected {h}×{w}", m.len())));
        }
        if let Some(l) = row.label
            && (l < 0 || l as usize >= self.meta.label_names.len())
        {
            return Err(bad(format!("label {l} is outside 0..{}", self.meta.label_names.len())));
        }
        self.pending.push(row);
        if self.pending.len() >= self.row_group {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), TableError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let rows = std::mem::take(&mut self.pending);
        let batch = to_batch(&self.schema, &self.meta, &rows)
            .map_err(|e| TableError::Format { path: self.path.clone(), message: e.to_string() })?;
        self.writer
            .write(&batch)
            .map_err(|e| TableError::Format { path: self.path.clone(), message: e.to_string() })?;
        self.writer.flush().map_err(|e| TableError::Format { path: self.path.clone(), message: e.to_string() })?;
        self.rows += rows.len() as u64;
        Ok(())
    }

    /// Write the footer; returns the number of rows.
    pub fn finish(mut self) -> Result<u64, TableError> {
        self.flush()?;
        self.writer.close().map_err(|e| TableError::Format { path: self.path.clone(), message: e.to_string() })?;
        Ok(self.rows)
    }
}

fn to_batch(
    schema: &Arc<Schema>,
    meta: &TableMeta,
    rows: &[ImageRow],
) -> Result<RecordBatch, arrow::error::ArrowError> {
    let s = |f: fn(&ImageRow) -> &str| Arc::new(StringArray::from_iter_values(rows.iter().map(f))) as ArrayRef;
    let i = |f: fn(&ImageRow) -> i32| Arc::new(Int32Array::from_iter_values(rows.iter().map(f))) as ArrayRef;
    let mut cols: Vec<ArrayRef> = vec![
        s(|r| &r.id),
        s(|r| &r.patient_id),
        s(|r| r.split.as_str()),
        Arc::new(Int32Array::from_iter(rows.iter().map(|r| r.label))),
    ];
    if meta.multi_label {
        let mut b = ListBuilder::new(UInt8Builder::new());
        for r in rows {
            let v = r.labels.clone().unwrap_or_else(|| vec![0; meta.label_names.len()]);
            b.values().append_slice(&v);
            b.append(true);
        }
        cols.push(Arc::new(b.finish()));
    }
    cols.extend([i(|r| r.width), i(|r| r.height), i(|r| r.channels)]);
    let mut px = BinaryBuilder::with_capacity(rows.len(), rows.iter().map(|r| r.pixels.len()).sum());
    let mut mk = BinaryBuilder::new();
    for r in rows {
        px.append_value(&r.pixels);
        match &r.mask {
            Some(m) => mk.append_value(m),
            None => mk.append_null(),
        }
    }
    cols.push(Arc::new(px.finish()));
    cols.push(Arc::new(mk.finish()));
    cols.push(s(|r| &r.source_path));
    cols.push(s(|r| &r.source_sha256));
    RecordBatch::try_new(schema.clone(), cols)
}

/// Read the table-wide metadata of an image table.
pub fn read_meta(path: &Path) -> Result<TableMeta, TableError> {
    let f = File::open(path).map_err(|source| TableError::Io { path: path.into(), source })?;
    let b = ParquetRecordBatchReaderBuilder::try_new(f)
        .map_err(|e| TableError::Format { path: path.into(), message: e.to_string() })?;
    let text = b.schema().metadata().get(META_KEY).cloned().ok_or_else(|| TableError::Format {
        path: path.into(),
        message: format!("not an msmae image table (no `{META_KEY}` footer metadata)"),
    })?;
    let meta: TableMeta = serde_json::from_str(&text)
        .map_err(|e| TableError::Format { path: path.into(), message: format!("footer metadata: {e}") })?;
    if meta.schema_version != SCHEMA_VERSION {
        return Err(TableError::Format {
            path: path.into(),
            message: format!(
                "image table schema version {} is not supported (expected {SCHEMA_VERSION}): re-run ingestion",
                meta.schema_version
            ),
        });
    }
    Ok(meta)
}

/// Read every row (tests, small tables; training streams row groups instead).
pub fn read_rows(path: &Path) -> Result<Vec<ImageRow>, TableError> {
    let fmt = |m: String| TableError::Format { path: path.into(), message: m };
    let f = File::open(path).map_err(|source| TableError::Io { path: path.into(), source })?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(f).and_then(|b| b.build()).map_err(|e| fmt(e.to_string()))?;
    let mut out = Vec::new();
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
        let ints = |name: &str| -> Result<Int32Array, TableError> {
            col(name)?
                .as_any()
                .downcast_ref::<Int32Array>()
                .cloned()
                .ok_or_else(|| fmt(format!("column `{name}` is not int32")))
        };
        let bins = |name: &str| -> Result<BinaryArray, TableError> {
            col(name)?
                .as_any()
                .downcast_ref::<BinaryArray>()
                .cloned()
                .ok_or_else(|| fmt(format!("column `{name}` is not binary")))
        };
        let (id, pid, split, sp, sh) =
            (strs("id")?, strs("patient_id")?, strs("split")?, strs("source_path")?, strs("source_sha256")?);
        let (label, w, h, c) = (ints("label")?, ints("width")?, ints("height")?, ints("channels")?);
        let (px, mask) = (bins("pixels")?, bins("mask")?);
        let labels = batch.column_by_name("labels").and_then(|a| a.as_any().downcast_ref::<ListArray>().cloned());
        for r in 0..batch.num_rows() {
            out.push(ImageRow {
                id: id.value(r).into(),
                patient_id: pid.value(r).into(),
                split: Split::parse(split.value(r))
                    .ok_or_else(|| fmt(format!("row {r}: unknown split `{}`", split.value(r))))?,
                label: label.is_valid(r).then(|| label.value(r)),
                labels: labels.as_ref().map(|l| {
                    let v = l.value(r);
                    v.as_any()
                        .downcast_ref::<arrow::array::UInt8Array>()
                        .map(|a| a.values().to_vec())
                        .unwrap_or_default()
                }),
                width: w.value(r),
                height: h.value(r),
                channels: c.value(r),
                pixels: px.value(r).to_vec(),
                mask: mask.is_valid(r).then(|| mask.value(r).to_vec()),
                source_path: sp.value(r).into(),
                source_sha256: sh.value(r).into(),
            });
        }
    }
    Ok(out)
}
