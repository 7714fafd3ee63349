//! `ingest/manifest`: any dataset described by a CSV or Parquet manifest — one row per
//! image with a path column, label(s) in one of three forms, and optional patient, split,
//! id and mask columns. Image and mask paths are relative to `root` (default: the manifest's
//! folder); absolute paths and `..` out of the root are refused unless
//! `allow_outside_root: true`. Images may be PNG, JPEG, TIFF, BMP or DICOM.
//!
//! Labels: `label_column` (one class name per row), `labels_column` (names joined by
//! `separator`, multi-label) or `label_columns` (one 0/1 column per label, multi-label).
//! Class names and their order come from `classes`, or are the sorted distinct values.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use msmae_core::{
    ConfigError, InputSlot, ListedFiles, OutputDecl, Resources, Stage, StageContext, StageError, seeded_rng,
};

use crate::ingest::{Item, Triage, WriteOptions, output_decl, write_image_table};
use crate::meta::{Column, TextTable};
use crate::table::{Split, SplitFractions};

fn d_path() -> String {
    "path".into()
}
fn d_sep() -> String {
    "|".into()
}

/// What a missing column error says the manifest should have.
const EXPECTED: &str = "the columns named in the stage's `with:`";

/// The manifest and the base of its relative paths (`root`, else the manifest's folder).
fn locate(c: &ManifestConfig, resolve: impl Fn(&Path) -> PathBuf) -> (PathBuf, PathBuf) {
    let manifest = resolve(&c.manifest);
    let root = match &c.root {
        Some(r) => resolve(r),
        None => manifest.parent().map(Path::to_path_buf).unwrap_or_default(),
    };
    (manifest, root)
}

/// The mask paths of one manifest cell (several joined by `separator`).
fn mask_paths<'a>(cell: Option<&'a str>, separator: &'a str, root: &'a Path) -> impl Iterator<Item = PathBuf> + 'a {
    cell.unwrap_or("").split(separator).map(str::trim).filter(|s| !s.is_empty()).map(|m| root.join(m))
}

crate::ingest::ingest_config! {
/// `with:` of `ingest/manifest`.
pub struct ManifestConfig, channels: "crate::ingest::defaults::rgb" {
    /// The manifest (`.csv`, or `.parquet`/`.pq`), relative to the pipeline file.
    pub manifest: PathBuf,
    /// Base of relative image paths; default: the manifest's folder.
    #[serde(default)]
    pub root: Option<PathBuf>,
    #[serde(default = "d_path")]
    pub path_column: String,
    /// Image id column; default: the path as written in the manifest.
    #[serde(default)]
    pub id_column: Option<String>,
    /// One class name per row (single-label).
    #[serde(default)]
    pub label_column: Option<String>,
    /// Class names joined by `separator` (multi-label; empty = no label).
    #[serde(default)]
    pub labels_column: Option<String>,
    /// One 0/1 column per label (multi-label); the column names are the label names.
    #[serde(default)]
    pub label_columns: Option<Vec<String>>,
    #[serde(default = "d_sep")]
    pub separator: String,
    /// Class names in label order; default: sorted distinct values.
    #[serde(default)]
    pub classes: Option<Vec<String>>,
    /// Patient column; default: every image its own patient.
    #[serde(default)]
    pub patient_column: Option<String>,
    /// Split column (`train`/`val`/`test`, also `training`, `valid`, `validation`,
    /// `testing`); default: a seeded split of patients by `split`.
    #[serde(default)]
    pub split_column: Option<String>,
    /// Mask path(s) of a segmentation dataset, several joined by `separator` are merged.
    #[serde(default)]
    pub mask_column: Option<String>,
    /// Multi-class segmentation: the masks are single-channel images of class indices
    /// named here (index 0 = background), one file per image. Absent: binary lesion masks.
    #[serde(default)]
    pub mask_classes: Option<Vec<String>>,
    #[serde(default)]
    pub split: SplitFractions,
    /// Accept image and mask paths outside `root` (absolute, or with `..` leading out of
    /// it). Off by default: a manifest from elsewhere must not make the stage read files
    /// anywhere on the machine.
    #[serde(default)]
    pub allow_outside_root: bool,
}
}

/// Whether `written` (a path from the manifest) leads outside `root`: absolute but not
/// under it, or more `..` than folders before them (judged on the text: a symlink inside
/// the root is the root owner's choice).
pub fn leaves_root(written: &str, root: &Path) -> bool {
    use std::path::Component;
    let w = Path::new(written);
    if w.is_absolute() {
        let root = std::path::absolute(root).unwrap_or_else(|_| root.to_path_buf());
        return match w.strip_prefix(&root) {
            Ok(rest) => leaves_root(&rest.to_string_lossy(), &root),
            Err(_) => true,
        };
    }
    let mut depth: i64 = 0;
    for c in w.components() {
        match c {
            Component::Prefix(_) | Component::RootDir => return true,
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return true;
                }
            }
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
        }
    }
    false
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Manifest;

/// One accepted manifest row.
/// The label columns of a manifest, whichever form it uses: one class name per row,
/// joined names (multi-label), or one 0/1 column per class.
struct LabelColumns<'a> {
    label: Option<Column<'a>>,
    labels: Option<Column<'a>>,
    hot: Option<&'a [Column<'a>]>,
    /// Class names, in class-index order.
    names: &'a [String],
    separator: &'a str,
}

impl LabelColumns<'_> {
    fn class_index(&self, col: &Column<'_>, v: &str) -> Result<usize, String> {
        self.names.iter().position(|n| n == v).ok_or_else(|| {
            format!("unknown label `{v}` in column `{}` (classes: {})", col.name(), self.names.join(", "))
        })
    }

    /// Row `i`'s class index or multi-hot labels, and the last problem found (column, message).
    #[allow(clippy::type_complexity)]
    fn of_row(&self, i: usize) -> (Option<i32>, Option<Vec<u8>>, Option<(String, String)>) {
        let mut bad = None;
        if let Some(col) = self.label {
            return match col.get(i).map(|v| self.class_index(&col, v)) {
                Some(Ok(k)) => (Some(k as i32), None, None),
                Some(Err(m)) => (None, None, Some((col.name().to_string(), m))),
                None => (None, None, Some((col.name().to_string(), "empty label".into()))),
            };
        }
        if let Some(col) = self.labels {
            let mut hot = vec![0u8; self.names.len()];
            for v in col.get(i).unwrap_or("").split(self.separator).map(str::trim).filter(|s| !s.is_empty()) {
                match self.class_index(&col, v) {
                    Ok(k) => hot[k] = 1,
                    Err(m) => bad = Some((col.name().to_string(), m)),
                }
            }
            return (None, Some(hot), bad);
        }
        let Some(cols) = self.hot else { return (None, None, None) };
        let mut hot = Vec::with_capacity(cols.len());
        for col in cols {
            match col.get(i).and_then(|v| v.parse::<f64>().ok()) {
                Some(v) if v == 0.0 || v == 1.0 => hot.push(v as u8),
                _ => bad = Some((col.name().to_string(), format!("`{}` is not 0 or 1", col.get(i).unwrap_or("")))),
            }
        }
        (None, Some(hot), bad)
    }
}

struct Row {
    id: String,
    path: PathBuf,
    source: String,
    patient: String,
    split: Option<Split>,
    label: Option<i32>,
    labels: Option<Vec<u8>>,
    masks: Vec<PathBuf>,
}

impl Stage for Manifest {
    type Config = ManifestConfig;
    const KIND: &'static str = "ingest/manifest";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "CSV/Parquet manifest (path, label(s), patient, split, mask columns) → image table";

    fn code_fingerprint(&self) -> &'static str {
        msmae_core::code_fingerprint!()
    }

    fn validate(&self, c: &ManifestConfig) -> Result<(), ConfigError> {
        c.table().check(&c.split)?;
        let err = |path: &str, message: &str| Err(ConfigError { path: path.into(), message: message.into() });
        let forms = [c.label_column.is_some(), c.labels_column.is_some(), c.label_columns.is_some()]
            .iter()
            .filter(|b| **b)
            .count();
        if forms > 1 {
            return err("label_column", "give one of label_column, labels_column, label_columns");
        }
        if c.label_columns.as_ref().is_some_and(Vec::is_empty) {
            return err("label_columns", "name at least one column");
        }
        if c.label_columns.is_some() && c.classes.is_some() {
            return err("classes", "with label_columns the column names are the classes");
        }
        if let Some(k) = &c.mask_classes {
            if c.mask_column.is_none() {
                return err("mask_classes", "needs a mask_column");
            }
            if k.len() < 2 || k.len() > 256 || k.iter().collect::<BTreeSet<_>>().len() != k.len() {
                return err("mask_classes", "2 to 256 distinct names, background first");
            }
        }
        if c.separator.is_empty() {
            return err("separator", "must not be empty");
        }
        if c.classes.as_ref().is_some_and(|v| v.iter().collect::<BTreeSet<_>>().len() != v.len() || v.is_empty()) {
            return err("classes", "must be a non-empty list of distinct names");
        }
        Ok(())
    }

    fn inputs(&self, _: &ManifestConfig) -> Vec<InputSlot> {
        Vec::new()
    }

    fn output(&self, _: &ManifestConfig) -> OutputDecl {
        output_decl()
    }

    /// The manifest itself; the images and masks it lists are [`Stage::listed_inputs`].
    fn external_inputs(&self, c: &ManifestConfig) -> Vec<PathBuf> {
        vec![c.manifest.clone()]
    }

    /// Every image and mask path in the manifest, wherever it lives (under `root` or
    /// absolute elsewhere): the cache tracks exactly the files the stage reads, so a
    /// changed image re-runs it, and unrelated files beside the images are not hashed.
    fn listed_inputs(&self, c: &ManifestConfig, base: &Path) -> Result<Option<ListedFiles>, StageError> {
        let (manifest, root) = locate(c, |p| if p.is_absolute() { p.to_path_buf() } else { base.join(p) });
        let t = TextTable::read(&manifest)?;
        let path_col = t.column(&c.path_column, EXPECTED)?;
        let mask_col = c.mask_column.as_deref().map(|n| t.column(n, EXPECTED)).transpose()?;
        let mut files = Vec::with_capacity(t.len());
        for i in 0..t.len() {
            files.extend(path_col.get(i).map(|p| root.join(p)));
            if let Some(col) = &mask_col {
                files.extend(mask_paths(col.get(i), &c.separator, &root));
            }
        }
        Ok(Some(ListedFiles { list: manifest, files }))
    }

    fn resources(&self, _: &ManifestConfig) -> Resources {
        Resources::Exclusive
    }

    fn run(&self, c: &ManifestConfig, ctx: &mut StageContext<'_>) -> Result<(), StageError> {
        let (manifest, root) = locate(c, |p| ctx.resolve(p));
        let t = TextTable::read(&manifest)?;
        let path_col = t.column(&c.path_column, EXPECTED)?;
        let opt = |name: &Option<String>| name.as_deref().map(|n| t.column(n, EXPECTED)).transpose();
        let (id_col, label_col, labels_col, patient_col, split_col, mask_col) = (
            opt(&c.id_column)?,
            opt(&c.label_column)?,
            opt(&c.labels_column)?,
            opt(&c.patient_column)?,
            opt(&c.split_column)?,
            opt(&c.mask_column)?,
        );
        let hot_cols = c
            .label_columns
            .as_ref()
            .map(|v| v.iter().map(|n| t.column(n, EXPECTED)).collect::<Result<Vec<_>, _>>())
            .transpose()?;
        let names = class_names(c, &t, hot_cols.as_deref(), label_col, labels_col);
        let cols = Columns {
            path: path_col,
            id: id_col,
            patient: patient_col,
            split: split_col,
            mask: mask_col,
            labels: LabelColumns {
                label: label_col,
                labels: labels_col,
                hot: hot_cols.as_deref(),
                names: &names,
                separator: &c.separator,
            },
        };
        let mut triage = Triage::new(c.on_error);
        let rows = read_rows(c, &t, &cols, &manifest, &root, &mut triage)?;
        let split_of = assign_splits(c, &rows, cols.split.is_some(), &manifest, ctx.seed)?;
        let multi = labels_col.is_some() || hot_cols.is_some();
        let items: Vec<Item> = rows
            .into_iter()
            .map(|r| {
                let split = split_of[&r.patient];
                Item {
                    labels: r.labels,
                    masks: r.masks,
                    ..Item::new(r.id, r.path, r.source, r.patient, split, r.label)
                }
            })
            .collect();
        let provenance =
            serde_json::json!({ "stage": Self::KIND, "version": Self::VERSION, "seed": ctx.seed, "config": c });
        let opts = WriteOptions {
            multi_label: multi,
            masks: c.mask_column.is_some(),
            mask_classes: c.mask_classes.clone().unwrap_or_default(),
            ..c.table().write_options()
        };
        write_image_table(ctx, provenance, &names, &items, opts, triage.rejects)
    }
}

/// The manifest's columns a run reads.
struct Columns<'a> {
    path: Column<'a>,
    id: Option<Column<'a>>,
    patient: Option<Column<'a>>,
    split: Option<Column<'a>>,
    mask: Option<Column<'a>>,
    labels: LabelColumns<'a>,
}

/// Class names: given, or the label columns' names, or the sorted distinct values.
fn class_names(
    c: &ManifestConfig,
    t: &TextTable,
    hot_cols: Option<&[Column<'_>]>,
    label_col: Option<Column<'_>>,
    labels_col: Option<Column<'_>>,
) -> Vec<String> {
    match (&c.classes, hot_cols, label_col, labels_col) {
        (Some(v), ..) => v.clone(),
        (None, Some(cols), ..) => cols.iter().map(|c| c.name().to_string()).collect(),
        (None, None, Some(col), _) => {
            (0..t.len()).filter_map(|i| col.get(i)).map(str::to_string).collect::<BTreeSet<_>>().into_iter().collect()
        }
        (None, None, None, Some(col)) => (0..t.len())
            .filter_map(|i| col.get(i))
            .flat_map(|v| v.split(c.separator.as_str()).map(str::trim).filter(|s| !s.is_empty()).map(str::to_string))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect(),
        _ => Vec::new(),
    }
}

/// The rows that can be ingested: unique ids, paths inside the root (unless allowed),
/// existing images and masks, known labels and splits; every problem goes through `triage`.
fn read_rows(
    c: &ManifestConfig,
    t: &TextTable,
    cols: &Columns<'_>,
    manifest: &Path,
    root: &Path,
    triage: &mut Triage,
) -> Result<Vec<Row>, StageError> {
    let manifest_name = manifest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut rows: Vec<Row> = Vec::new();
    for i in 0..t.len() {
        let what = format!("{manifest_name}:{}", t.row_name(i));
        let written = cols.path.require(i)?;
        let id = match cols.id {
            Some(col) => col.require(i)?.to_string(),
            None => written.to_string(),
        };
        let loc = |col: &str| Some(format!("{}, column `{col}`", t.row_name(i)));
        if let Some(first) = seen.insert(id.clone(), i) {
            let col = c.id_column.as_deref().unwrap_or(&c.path_column);
            triage.problem(
                manifest,
                loc(col),
                what,
                format!("id `{id}` is listed twice (first on {})", t.row_name(first)),
            )?;
            continue;
        }
        check_inside_root(c, cols, i, written, manifest, root, &loc)?;
        let path = root.join(written);
        if !path.is_file() {
            triage.problem(
                manifest,
                loc(&c.path_column),
                what,
                format!("image `{}` is listed but does not exist", path.display()),
            )?;
            continue;
        }
        let (label, labels, split, masks) = match row_values(c, cols, i, root) {
            Ok(v) => v,
            Err((col, m)) => {
                triage.problem(manifest, loc(&col), what, m)?;
                continue;
            }
        };
        let patient = match cols.patient {
            Some(col) => col.require(i)?.to_string(),
            None => id.clone(),
        };
        let source = crate::ingest::relative(&path, root);
        rows.push(Row { id, path, source, patient, split, label, labels, masks });
    }
    Ok(rows)
}

/// A path of row `i` (the image's, then its masks') that leads outside the root is an
/// error whatever the policy, unless `allow_outside_root`.
fn check_inside_root(
    c: &ManifestConfig,
    cols: &Columns<'_>,
    i: usize,
    written: &str,
    manifest: &Path,
    root: &Path,
    loc: &dyn Fn(&str) -> Option<String>,
) -> Result<(), StageError> {
    let outside = |w: &str, col: &str| -> Result<(), StageError> {
        if !c.allow_outside_root && leaves_root(w, root) {
            return Err(StageError::data(
                manifest,
                loc(col),
                format!(
                    "`{w}` leads outside the root {}; set `allow_outside_root: true` if the manifest is trusted to name files anywhere",
                    root.display()
                ),
            ));
        }
        Ok(())
    };
    outside(written, &c.path_column)?;
    if let (Some(col), Some(mc)) = (cols.mask, &c.mask_column) {
        for m in col.get(i).unwrap_or("").split(c.separator.as_str()).map(str::trim).filter(|m| !m.is_empty()) {
            outside(m, mc)?;
        }
    }
    Ok(())
}

/// Row `i`'s label(s), split and mask files; `Err((column, message))` for the last problem
/// found on the row (the one reported).
#[allow(clippy::type_complexity)]
fn row_values(
    c: &ManifestConfig,
    cols: &Columns<'_>,
    i: usize,
    root: &Path,
) -> Result<(Option<i32>, Option<Vec<u8>>, Option<Split>, Vec<PathBuf>), (String, String)> {
    let (label, labels, mut bad) = cols.labels.of_row(i);
    let split = match cols.split {
        Some(col) => match col.get(i).map(|v| (v, Split::from_name(v))) {
            Some((_, Some(s))) => Some(s),
            Some((v, None)) => {
                bad = Some((col.name().to_string(), format!("unknown split `{v}` (expected train, val or test)")));
                None
            }
            None => {
                bad = Some((col.name().to_string(), "empty split".into()));
                None
            }
        },
        None => None,
    };
    let masks: Vec<PathBuf> = match cols.mask {
        Some(col) => mask_paths(col.get(i), &c.separator, root).collect(),
        None => Vec::new(),
    };
    if cols.mask.is_some() && masks.is_empty() {
        bad = Some((c.mask_column.clone().unwrap_or_default(), "no mask path".into()));
    }
    if let Some(m) = masks.iter().find(|m| !m.is_file()) {
        bad = Some((c.mask_column.clone().unwrap_or_default(), format!("mask `{}` does not exist", m.display())));
    }
    match bad {
        Some(b) => Err(b),
        None => Ok((label, labels, split, masks)),
    }
}

/// Each patient's split: the manifest's (checked patient-disjoint), or a seeded draw by
/// patient when it has no split column.
fn assign_splits(
    c: &ManifestConfig,
    rows: &[Row],
    has_split_column: bool,
    manifest: &Path,
    seed: u64,
) -> Result<BTreeMap<String, Split>, StageError> {
    let mut split_of: BTreeMap<String, Split> = BTreeMap::new();
    if !has_split_column {
        let patients: Vec<String> =
            rows.iter().map(|r| r.patient.clone()).collect::<BTreeSet<_>>().into_iter().collect();
        let splits = c.split.assign(patients.len(), &mut seeded_rng(seed, &["manifest/splits".into()]));
        split_of.extend(patients.into_iter().zip(splits));
        return Ok(split_of);
    }
    for r in rows {
        let s = r.split.unwrap_or(Split::Train);
        if let Some(prev) = split_of.insert(r.patient.clone(), s)
            && prev != s
        {
            return Err(StageError::data(
                manifest,
                Some(format!("column `{}`", c.split_column.clone().unwrap_or_default())),
                format!(
                    "patient `{}` is in both {} and {}: splits must be by patient",
                    r.patient,
                    prev.as_str(),
                    s.as_str()
                ),
            ));
        }
    }
    Ok(split_of)
}
