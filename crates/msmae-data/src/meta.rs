//! Metadata tables of the sources (label CSVs, manifests in CSV or Parquet) read as text
//! columns, so that every value is checked by the source itself and an error can name the
//! file, the line and the column.
//!
//! CSV goes through polars (every column as text, ragged lines truncated so that copies
//! with a trailing comma on every line read the same); Parquet through arrow, each column
//! cast to text.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, StringArray};
use arrow::datatypes::DataType;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use polars::prelude::*;

use msmae_core::StageError;

/// A table of optional text values, column-major.
#[derive(Debug, Clone, PartialEq)]
pub struct TextTable {
    path: PathBuf,
    names: Vec<String>,
    cols: Vec<TextColumn>,
    /// CSV rows are named by their line (header is line 1); Parquet rows by their index.
    csv: bool,
}

impl TextTable {
    /// Read a CSV file with a header line; `separator` is usually `b','`.
    pub fn read_csv(path: &Path, separator: u8) -> Result<Self, StageError> {
        Self::from_csv_frame(path, csv_frame(path, separator, None, None)?)
    }

    /// [`read_csv`](Self::read_csv) holding only the columns named in `keep` (a label file's
    /// other columns can be most of it). When one of them is missing, every column is read,
    /// so that [`column`](Self::column) names what the file has.
    pub fn read_csv_columns(path: &Path, separator: u8, keep: &[&str]) -> Result<Self, StageError> {
        let header = csv_frame(path, separator, Some(0), None)?;
        let names: Vec<String> = header.get_column_names().iter().map(|n| clean_name(n)).collect();
        let mut idx: Vec<usize> = keep.iter().filter_map(|k| names.iter().position(|n| n == k)).collect();
        if idx.len() != keep.len() {
            return Self::read_csv(path, separator);
        }
        idx.sort_unstable();
        idx.dedup();
        Self::from_csv_frame(path, csv_frame(path, separator, None, Some(idx))?)
    }

    /// The table of a CSV frame, column by column, each polars column dropped once copied.
    fn from_csv_frame(path: &Path, df: DataFrame) -> Result<Self, StageError> {
        let mut names = Vec::new();
        let mut cols = Vec::new();
        for col in df.into_columns() {
            let s = col
                .as_materialized_series()
                .str()
                .map_err(|e| StageError::data(path, Some(format!("column `{}`", col.name())), e.to_string()))?;
            names.push(clean_name(col.name()));
            let mut c = TextColumn::default();
            c.extend((0..s.len()).map(|i| s.get(i)));
            cols.push(c);
        }
        Ok(Self { path: path.into(), names, cols, csv: true })
    }

    /// Read a Parquet file; every column is cast to text.
    pub fn read_parquet(path: &Path) -> Result<Self, StageError> {
        let fmt = |m: String| StageError::data(path, None, m);
        let f = std::fs::File::open(path).map_err(|e| StageError::io(path, e))?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(f)
            .map_err(|e| fmt(format!("not a readable Parquet file: {e}")))?;
        let names: Vec<String> = builder.schema().fields().iter().map(|f| f.name().clone()).collect();
        let mut cols: Vec<TextColumn> = vec![TextColumn::default(); names.len()];
        for batch in builder.build().map_err(|e| fmt(e.to_string()))? {
            let batch = batch.map_err(|e| fmt(e.to_string()))?;
            for (i, a) in batch.columns().iter().enumerate() {
                let text = arrow::compute::cast(a, &DataType::Utf8).map_err(|e| {
                    StageError::data(path, Some(format!("column `{}`", names[i])), format!("cannot read as text: {e}"))
                })?;
                let s = text
                    .as_any()
                    .downcast_ref::<StringArray>()
                    .ok_or_else(|| fmt(format!("column `{}`: not text after cast", names[i])))?;
                cols[i].extend(s.iter());
            }
        }
        Ok(Self { path: path.into(), names, cols, csv: false })
    }

    /// CSV or Parquet by the file's extension (`.parquet`/`.pq` → Parquet).
    pub fn read(path: &Path) -> Result<Self, StageError> {
        let ext = path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
        if ext == "parquet" || ext == "pq" { Self::read_parquet(path) } else { Self::read_csv(path, b',') }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn len(&self) -> usize {
        self.cols.first().map_or(0, TextColumn::len)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn names(&self) -> &[String] {
        &self.names
    }
    pub fn has(&self, name: &str) -> bool {
        self.names.iter().any(|n| n == name)
    }

    /// How an error names row `row` (0-based): its line in a CSV, its index in Parquet.
    pub fn row_name(&self, row: usize) -> String {
        if self.csv { format!("line {}", row + 2) } else { format!("row {row}") }
    }

    /// The column `name`; the error lists the columns the file has and what was expected.
    pub fn column(&self, name: &str, expected: &str) -> Result<Column<'_>, StageError> {
        let idx = self.names.iter().position(|n| n == name).ok_or_else(|| {
            StageError::data(
                &self.path,
                Some(format!("header, column `{name}`")),
                format!("missing column `{name}`; the file has columns {:?} (expected {expected})", self.names),
            )
        })?;
        Ok(Column { table: self, name: &self.names[idx], idx })
    }

    /// An error about row `row`, column `col`.
    pub fn error(&self, row: usize, col: &str, message: impl Into<String>) -> StageError {
        StageError::data(&self.path, Some(format!("{}, column `{col}`", self.row_name(row))), message)
    }
}

/// A CSV file as polars reads it, every column as text (values are checked by the
/// source), ragged lines truncated; the first `n_rows` rows only, the `projection`'s columns
/// only, when given.
fn csv_frame(
    path: &Path,
    separator: u8,
    n_rows: Option<usize>,
    projection: Option<Vec<usize>>,
) -> Result<DataFrame, StageError> {
    if !path.is_file() {
        return Err(StageError::data(path, None, "file not found"));
    }
    CsvReadOptions::default()
        .with_has_header(true)
        .with_infer_schema_length(Some(0))
        .with_n_rows(n_rows)
        .with_projection(projection.map(Arc::new))
        .map_parse_options(|p| p.with_separator(separator).with_truncate_ragged_lines(true))
        .try_into_reader_with_file_path(Some(path.to_path_buf()))
        .and_then(|r| r.finish())
        .map_err(|e| StageError::data(path, None, format!("cannot read the CSV: {e}")))
}

/// A header name without a byte-order mark or surrounding spaces.
fn clean_name(name: &str) -> String {
    name.trim_start_matches('\u{feff}').trim().to_string()
}

/// A column's values end to end in one buffer: a few bytes per cell over the text itself,
/// so a million-row label file stays small. A null reads as an empty value (both are
/// "no value" to the sources).
#[derive(Debug, Clone, PartialEq, Default)]
struct TextColumn {
    text: String,
    /// End of each value in `text`.
    ends: Vec<usize>,
}

impl TextColumn {
    fn extend<'s>(&mut self, values: impl Iterator<Item = Option<&'s str>>) {
        for v in values {
            self.text.push_str(v.unwrap_or(""));
            self.ends.push(self.text.len());
        }
    }
    fn len(&self) -> usize {
        self.ends.len()
    }
    fn value(&self, row: usize) -> &str {
        let start = if row == 0 { 0 } else { self.ends[row - 1] };
        &self.text[start..self.ends[row]]
    }
}

/// One column of a [`TextTable`].
#[derive(Debug, Clone, Copy)]
pub struct Column<'a> {
    table: &'a TextTable,
    name: &'a str,
    idx: usize,
}

impl<'a> Column<'a> {
    /// The trimmed value, `None` when empty or null.
    pub fn get(&self, row: usize) -> Option<&'a str> {
        Some(self.table.cols[self.idx].value(row).trim()).filter(|s| !s.is_empty())
    }
    /// The trimmed value; an error naming the line and column when empty.
    pub fn require(&self, row: usize) -> Result<&'a str, StageError> {
        self.get(row).ok_or_else(|| self.table.error(row, self.name, "empty value"))
    }
    pub fn name(&self) -> &'a str {
        self.name
    }
    /// An error about this column at `row`.
    pub fn error(&self, row: usize, message: impl Into<String>) -> StageError {
        self.table.error(row, self.name, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_read_back_trimmed_and_empty_or_missing_cells_are_no_value() {
        let d = tempfile::tempdir().expect("tmp");
        let p = d.path().join("labels.csv");
        std::fs::write(&p, "\u{feff}id, label ,note\na.png,1, x \nb.png,,\n,2,\"q, r\"\nc.png,  ,é\n").expect("csv");
        let t = TextTable::read_csv(&p, b',').expect("read");
        assert_eq!(t.names(), ["id", "label", "note"]);
        assert_eq!(t.len(), 4);
        let (id, label, note) = (
            t.column("id", "").expect("id"),
            t.column("label", "").expect("label"),
            t.column("note", "").expect("note"),
        );
        fn all<'a>(c: Column<'a>, n: usize) -> Vec<Option<&'a str>> {
            (0..n).map(|r| c.get(r)).collect()
        }
        let all = |c| all(c, t.len());
        assert_eq!(all(id), [Some("a.png"), Some("b.png"), None, Some("c.png")]);
        assert_eq!(all(label), [Some("1"), None, Some("2"), None]);
        assert_eq!(all(note), [Some("x"), None, Some("q, r"), Some("é")]);
        let e = id.require(2).expect_err("empty id").to_string();
        assert!(e.contains("line 4") && e.contains("`id`") && e.contains("empty value"), "{e}");
        let e = t.column("Patient ID", "id, label").expect_err("missing").to_string();
        assert!(e.contains("missing column `Patient ID`") && e.contains("\"note\""), "{e}");
    }

    #[test]
    fn reading_some_columns_keeps_their_values_and_a_missing_one_is_named_as_before() {
        let d = tempfile::tempdir().expect("tmp");
        let p = d.path().join("labels.csv");
        std::fs::write(&p, "\u{feff}id,age,label,site,\na.png,40,1,x,\nb.png,,0,y,\n").expect("csv");
        let all = TextTable::read_csv(&p, b',').expect("all");
        let some = TextTable::read_csv_columns(&p, b',', &["label", "id"]).expect("some");
        assert_eq!(some.names(), ["id", "label"], "file order");
        assert_eq!(some.len(), 2);
        for name in ["id", "label"] {
            let (a, b) = (all.column(name, "").expect("all"), some.column(name, "").expect("some"));
            assert_eq!((0..2).map(|r| a.get(r)).collect::<Vec<_>>(), (0..2).map(|r| b.get(r)).collect::<Vec<_>>());
        }
        assert!(!some.has("age") && !some.has("site"));
        let full = TextTable::read_csv_columns(&p, b',', &["id", "Patient ID"]).expect("falls back");
        let e = full.column("Patient ID", "id, Patient ID").expect_err("missing").to_string();
        assert!(e.contains("missing column `Patient ID`") && e.contains("\"age\""), "{e}");
    }
}
