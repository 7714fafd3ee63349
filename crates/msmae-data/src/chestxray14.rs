//! `ingest/chestxray14`: NIH ChestX-ray14 as published (docs/datasets.md, "NIH ChestX-ray14").
//!
//! - `Data_Entry_2017.csv` (or `Data_Entry_2017_v2020.csv`): `Image Index`, `Finding Labels`
//!   (`|`-separated, or `No Finding`), `Patient ID`. Both published variants read the same:
//!   with or without a trailing comma on every line, `Patient Gender` or `Patient Sex`
//!   (only the three columns above are used).
//! - The official patient-disjoint split: `train_val_list.txt` and `test_list.txt`;
//!   validation is carved out of train_val by patient (seeded).
//! - PNGs in `images_001/images/ … images_012/images/`, `images_0NN/`, or one flat `images/`.
//!
//! Multi-label: the table's `labels` column holds 14 multi-hot entries in the conventional
//! order ([`FINDINGS`]); `No Finding` is all zeros.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use msmae_core::{ConfigError, InputSlot, OutputDecl, Resources, Stage, StageContext, StageError, seeded_rng};

use crate::ingest::{
    Item, Triage, WriteOptions, defaults, index_files, output_decl, read_list, relative, write_image_table,
};
use crate::meta::TextTable;
use crate::table::{Split, SplitFractions, carve_validation};

/// The 14 findings, in the conventional order.
pub const FINDINGS: [&str; 14] = [
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
];

/// The header the published CSV has (for error messages).
const HEADER: &str = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]";

fn d_train_val() -> PathBuf {
    PathBuf::from("train_val_list.txt")
}
fn d_test() -> PathBuf {
    PathBuf::from("test_list.txt")
}

crate::ingest::ingest_config! {
/// `with:` of `ingest/chestxray14`.
pub struct ChestXray14Config, channels: "crate::ingest::defaults::grey" {
    /// Dataset root (relative to the pipeline file).
    pub root: PathBuf,
    /// Label CSV, relative to the root; default: `Data_Entry_2017.csv`, else
    /// `Data_Entry_2017_v2020.csv`.
    #[serde(default)]
    pub metadata: Option<PathBuf>,
    #[serde(default = "d_train_val")]
    pub train_val_list: PathBuf,
    #[serde(default = "d_test")]
    pub test_list: PathBuf,
    /// Fraction of train_val patients moved to validation.
    #[serde(default = "defaults::val_fraction")]
    pub val_fraction: f64,
}
}

#[derive(Debug, Default, Clone, Copy)]
pub struct ChestXray14;

/// The image folders of a release: `images/`, `images_NNN/images/` or `images_NNN/`.
fn image_dirs(root: &Path) -> Result<Vec<PathBuf>, StageError> {
    let mut dirs = Vec::new();
    if root.join("images").is_dir() {
        dirs.push(root.join("images"));
    }
    let mut parts: Vec<PathBuf> = std::fs::read_dir(root)
        .map_err(|e| StageError::io(root, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_dir()
                && p.file_name().is_some_and(|n| {
                    n.to_string_lossy()
                        .strip_prefix("images_")
                        .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
                })
        })
        .collect();
    parts.sort();
    for p in parts {
        let inner = p.join("images");
        dirs.push(if inner.is_dir() { inner } else { p });
    }
    if dirs.is_empty() {
        return Err(StageError::data(
            root,
            None,
            "no image folder: expected images_001/images/ … images_012/images/ (as downloaded) or one images/ folder",
        ));
    }
    Ok(dirs)
}

/// Multi-hot of a `Finding Labels` value; `Err` names the unknown finding.
pub fn parse_findings(value: &str) -> Result<Vec<u8>, String> {
    let mut v = vec![0u8; FINDINGS.len()];
    let parts: Vec<&str> = value.split('|').map(str::trim).collect();
    if parts == ["No Finding"] {
        return Ok(v);
    }
    for p in parts {
        match FINDINGS.iter().position(|f| *f == p) {
            Some(i) => v[i] = 1,
            None if p == "No Finding" => return Err(format!("`No Finding` together with findings in `{value}`")),
            None => {
                return Err(format!(
                    "unknown finding `{p}` (expected `No Finding` or `|`-separated names among {})",
                    FINDINGS.join(", ")
                ));
            }
        }
    }
    Ok(v)
}

impl Stage for ChestXray14 {
    type Config = ChestXray14Config;
    const KIND: &'static str = "ingest/chestxray14";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str =
        "NIH ChestX-ray14 as published (Data_Entry CSV, official split lists) → multi-label image table";

    fn code_fingerprint(&self) -> &'static str {
        msmae_core::code_fingerprint!()
    }

    fn validate(&self, c: &ChestXray14Config) -> Result<(), ConfigError> {
        c.table().check(&SplitFractions::default())?;
        if !(0.0..1.0).contains(&c.val_fraction) {
            return Err(ConfigError { path: "val_fraction".into(), message: "must be in [0, 1)".into() });
        }
        Ok(())
    }

    fn inputs(&self, _: &ChestXray14Config) -> Vec<InputSlot> {
        Vec::new()
    }

    fn output(&self, _: &ChestXray14Config) -> OutputDecl {
        output_decl()
    }

    fn external_inputs(&self, c: &ChestXray14Config) -> Vec<PathBuf> {
        vec![c.root.clone()]
    }

    fn resources(&self, _: &ChestXray14Config) -> Resources {
        Resources::Exclusive
    }

    fn run(&self, c: &ChestXray14Config, ctx: &mut StageContext<'_>) -> Result<(), StageError> {
        let root = ctx.resolve(&c.root);
        let csv_path = label_file(c, &root)?;
        let csv_name = relative(&csv_path, &root);
        let mut triage = Triage::new(c.on_error);
        // The label file, the lists and the folder index are dropped before any image is
        // decoded: only the kept rows stay in memory.
        let rows = read_rows(c, &root, &csv_path, &mut triage)?;
        let rows = drop_crossing_patients(rows, c, &root, &mut triage)?;
        let items = assign_validation(rows, c.val_fraction, ctx.seed, &root);
        let names: Vec<String> = FINDINGS.iter().map(|s| s.to_string()).collect();
        let provenance = serde_json::json!({ "stage": Self::KIND, "version": Self::VERSION, "seed": ctx.seed, "config": c, "metadata": csv_name });
        let opts = WriteOptions { multi_label: true, ..c.table().write_options() };
        write_image_table(ctx, provenance, &names, &items, opts, triage.rejects)
    }
}

/// `metadata:`, else whichever published label file the root has.
fn label_file(c: &ChestXray14Config, root: &Path) -> Result<PathBuf, StageError> {
    match &c.metadata {
        Some(m) => Ok(root.join(m)),
        None => ["Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv"]
            .iter()
            .map(|n| root.join(n))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                StageError::data(
                    root,
                    None,
                    "no label file: expected Data_Entry_2017.csv or Data_Entry_2017_v2020.csv (or name it with `metadata:`)",
                )
            }),
    }
}

/// A kept row of the label file.
struct Row {
    id: String,
    patient: String,
    labels: Vec<u8>,
    /// The official side: train (train_val) or test.
    split: Split,
    path: PathBuf,
}

/// Image name → (official split, line) from both list files; a name in both is an error
/// whatever the policy.
fn official_split(c: &ChestXray14Config, root: &Path) -> Result<BTreeMap<String, (Split, usize)>, StageError> {
    let mut official: BTreeMap<String, (Split, usize)> = BTreeMap::new();
    for (file, split) in [(&c.train_val_list, Split::Train), (&c.test_list, Split::Test)] {
        let p = root.join(file);
        for (line, name) in read_list(&p)? {
            match official.get(&name) {
                Some((s, _)) if *s != split => {
                    return Err(StageError::data(
                        &p,
                        Some(format!("line {line}")),
                        format!(
                            "`{name}` is also in {}: the official split files must be disjoint",
                            c.train_val_list.display()
                        ),
                    ));
                }
                Some(_) => tracing::warn!("{}:{line}: `{name}` is listed twice", p.display()),
                None => {
                    official.insert(name, (split, line));
                }
            }
        }
    }
    Ok(official)
}

/// The rows of the label file that can be ingested: unique ids, known findings, the image
/// present and in an official list; every problem goes through `triage`, and an image
/// no row lists is one too.
fn read_rows(c: &ChestXray14Config, root: &Path, csv_path: &Path, triage: &mut Triage) -> Result<Vec<Row>, StageError> {
    // Only the three columns used are held (the published file has eleven).
    let t = TextTable::read_csv_columns(csv_path, b',', &["Image Index", "Finding Labels", "Patient ID"])?;
    let (index, findings, patient) =
        (t.column("Image Index", HEADER)?, t.column("Finding Labels", HEADER)?, t.column("Patient ID", HEADER)?);
    let official = official_split(c, root)?;
    let mut files = index_files(&image_dirs(root)?, &["png"], str::to_string)?;
    let csv_name = relative(csv_path, root);
    let mut rows: Vec<Row> = Vec::with_capacity(t.len());
    let mut seen: std::collections::HashMap<&str, usize> = std::collections::HashMap::with_capacity(t.len());
    for i in 0..t.len() {
        let (id, pid, f) = (index.require(i)?, patient.require(i)?, findings.require(i)?);
        let what = format!("{csv_name}:{}", i + 2);
        if let Some(first) = seen.insert(id, i + 2) {
            triage.problem(
                csv_path,
                Some(format!("{}, column `Image Index`", t.row_name(i))),
                what,
                format!("`{id}` is listed twice (first on line {first})"),
            )?;
            continue;
        }
        // Taken out of the index once listed, whatever else is wrong with the row: what is
        // left at the end is what no row lists.
        let file = files.remove(id);
        let labels = match parse_findings(f) {
            Ok(l) => l,
            Err(m) => {
                triage.problem(csv_path, Some(format!("{}, column `Finding Labels`", t.row_name(i))), what, m)?;
                continue;
            }
        };
        let Some(path) = file else {
            triage.problem(
                csv_path,
                Some(t.row_name(i)),
                what,
                format!("image `{id}` is listed but no such file is in the image folders"),
            )?;
            continue;
        };
        let Some(&(split, _)) = official.get(id) else {
            triage.problem(
                csv_path,
                Some(t.row_name(i)),
                what,
                format!("image `{id}` is in neither {} nor {}", c.train_val_list.display(), c.test_list.display()),
            )?;
            continue;
        };
        rows.push(Row { id: id.to_string(), patient: pid.to_string(), labels, split, path });
    }
    for (name, p) in &files {
        triage.problem(p, None, relative(p, root), format!("image `{name}` is not listed in {csv_name}"))?;
    }
    Ok(rows)
}

/// A patient on both sides of the official split: an error, or (with `on_error: skip`) all
/// of the patient's images rejected.
fn drop_crossing_patients(
    mut rows: Vec<Row>,
    c: &ChestXray14Config,
    root: &Path,
    triage: &mut Triage,
) -> Result<Vec<Row>, StageError> {
    let mut sides: BTreeMap<&str, BTreeSet<Split>> = BTreeMap::new();
    for r in &rows {
        sides.entry(r.patient.as_str()).or_default().insert(r.split);
    }
    let crossing: BTreeSet<String> = sides.iter().filter(|(_, s)| s.len() > 1).map(|(p, _)| p.to_string()).collect();
    for p in &crossing {
        let ids: Vec<&str> = rows.iter().filter(|r| &r.patient == p).map(|r| r.id.as_str()).collect();
        triage.problem(
            &root.join(&c.test_list),
            None,
            format!("patient {p}"),
            format!(
                "patient `{p}` has images in both {} and {} ({})",
                c.train_val_list.display(),
                c.test_list.display(),
                ids.join(", ")
            ),
        )?;
    }
    rows.retain(|r| !crossing.contains(&r.patient));
    Ok(rows)
}

/// The items to write: validation carved out of train_val by patient (seeded).
fn assign_validation(rows: Vec<Row>, val_fraction: f64, seed: u64, root: &Path) -> Vec<Item> {
    let train: Vec<String> = rows
        .iter()
        .filter(|r| r.split == Split::Train)
        .map(|r| r.patient.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let val = carve_validation(train, val_fraction, &mut seeded_rng(seed, &["chestxray14/val".into()]));
    rows.into_iter()
        .map(|r| {
            let split = if r.split == Split::Train && val.contains(&r.patient) { Split::Val } else { r.split };
            let source = relative(&r.path, root);
            Item { labels: Some(r.labels), ..Item::new(r.id, r.path, source, r.patient, split, None) }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn findings_parse_to_multi_hot() {
        assert_eq!(parse_findings("No Finding"), Ok(vec![0; 14]));
        let v = parse_findings("Cardiomegaly|Effusion").expect("ok");
        assert_eq!((v[1], v[2], v.iter().map(|&x| u32::from(x)).sum::<u32>()), (1, 1, 2));
        assert_eq!(parse_findings("Hernia").expect("ok")[13], 1);
        assert!(
            parse_findings("Cardiomegaly|Pneumonitis")
                .expect_err("unknown finding")
                .contains("unknown finding `Pneumonitis`")
        );
        assert!(
            parse_findings("No Finding|Mass")
                .expect_err("contradiction")
                .contains("`No Finding` together with findings")
        );
    }
}
