//! `ingest/ham10000`: the HAM10000 dermoscopy release as published (docs/datasets.md, "HAM10000"):
//! `HAM10000_metadata.csv` (`lesion_id,image_id,dx,dx_type,age,sex,localization`, some
//! releases add `dataset`) and the JPEGs in `HAM10000_images_part_1/` and `_part_2/`.
//! Seven classes from `dx`; several images share a lesion, so splits are by `lesion_id`.
//!
//! Metadata is read with polars (all columns as text, then checked row by row so an error
//! can name the row and column). Every listed image must exist and every image must be
//! listed: a mismatch is an error naming the file or row, or with `on_error: skip` a
//! rejects.json entry.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use msmae_core::{ConfigError, InputSlot, OutputDecl, Resources, Stage, StageContext, StageError, seeded_rng};

use crate::ingest::{Item, Triage, WriteOptions, index_files, output_decl, relative, write_image_table};
use crate::meta::TextTable;
use crate::table::SplitFractions;

/// The seven diagnoses, in the conventional (alphabetical) order.
pub const CLASSES: [&str; 7] = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"];

fn d_metadata() -> PathBuf {
    PathBuf::from("HAM10000_metadata.csv")
}
fn d_dirs() -> Vec<PathBuf> {
    vec![PathBuf::from("HAM10000_images_part_1"), PathBuf::from("HAM10000_images_part_2")]
}

crate::ingest::ingest_config! {
/// `with:` of `ingest/ham10000`.
pub struct Ham10000Config, channels: "crate::ingest::defaults::rgb" {
    /// Dataset root (relative to the pipeline file).
    pub root: PathBuf,
    /// Metadata CSV, relative to the root.
    #[serde(default = "d_metadata")]
    pub metadata: PathBuf,
    /// Image folders, relative to the root.
    #[serde(default = "d_dirs")]
    pub image_dirs: Vec<PathBuf>,
    /// Fractions of lesions per split.
    #[serde(default)]
    pub split: SplitFractions,
}
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Ham10000;

/// One metadata row.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Row {
    line: usize,
    lesion: String,
    image: String,
    dx: String,
}

fn read_metadata(path: &Path) -> Result<Vec<Row>, StageError> {
    let t = TextTable::read_csv(path, b',')?;
    const EXPECTED: &str = "lesion_id,image_id,dx,dx_type,age,sex,localization";
    let (lesion, image, dx) =
        (t.column("lesion_id", EXPECTED)?, t.column("image_id", EXPECTED)?, t.column("dx", EXPECTED)?);
    (0..t.len())
        .map(|i| {
            Ok(Row {
                line: i + 2,
                lesion: lesion.require(i)?.to_string(),
                image: image.require(i)?.to_string(),
                dx: dx.require(i)?.to_string(),
            })
        })
        .collect()
}

impl Stage for Ham10000 {
    type Config = Ham10000Config;
    const KIND: &'static str = "ingest/ham10000";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str =
        "HAM10000 as published (metadata CSV + two image folders) → image table, splits by lesion";

    fn code_fingerprint(&self) -> &'static str {
        msmae_core::code_fingerprint!()
    }

    fn validate(&self, c: &Ham10000Config) -> Result<(), ConfigError> {
        c.table().check(&c.split)?;
        if c.image_dirs.is_empty() {
            return Err(ConfigError { path: "image_dirs".into(), message: "name at least one image folder".into() });
        }
        Ok(())
    }

    fn inputs(&self, _: &Ham10000Config) -> Vec<InputSlot> {
        Vec::new()
    }

    fn output(&self, _: &Ham10000Config) -> OutputDecl {
        output_decl()
    }

    fn external_inputs(&self, c: &Ham10000Config) -> Vec<PathBuf> {
        let mut v = vec![c.root.join(&c.metadata)];
        v.extend(c.image_dirs.iter().map(|d| c.root.join(d)));
        v
    }

    fn resources(&self, _: &Ham10000Config) -> Resources {
        Resources::Exclusive
    }

    fn run(&self, c: &Ham10000Config, ctx: &mut StageContext<'_>) -> Result<(), StageError> {
        let root = ctx.resolve(&c.root);
        let meta_path = root.join(&c.metadata);
        let rows = read_metadata(&meta_path)?;
        let mut triage = Triage::new(c.on_error);
        // Images on disk, by id (the file stem).
        let dirs: Vec<PathBuf> = c.image_dirs.iter().map(|d| root.join(d)).collect();
        let files =
            index_files(&dirs, &["jpg"], |name| name.rsplit_once('.').map_or(name, |(stem, _)| stem).to_string())?;
        // Check rows: known labels, unique ids, images present.
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        let mut good: Vec<&Row> = Vec::new();
        for r in &rows {
            let problem = if !CLASSES.contains(&r.dx.as_str()) {
                Some(format!(
                    "line {}, column `dx`: unknown label `{}` (expected one of {})",
                    r.line,
                    r.dx,
                    CLASSES.join(", ")
                ))
            } else if let Some(first) = seen.get(&r.image) {
                Some(format!(
                    "line {}, column `image_id`: `{}` is listed twice (first on line {first})",
                    r.line, r.image
                ))
            } else if !files.contains_key(&r.image) {
                Some(format!(
                    "line {}: image `{}` is listed but no {}.jpg exists in {:?}",
                    r.line, r.image, r.image, c.image_dirs
                ))
            } else {
                None
            };
            seen.entry(r.image.clone()).or_insert(r.line);
            match problem {
                Some(p) => triage.problem(&meta_path, None, format!("{}:{}", c.metadata.display(), r.line), p)?,
                None => good.push(r),
            }
        }
        for (id, p) in &files {
            if !seen.contains_key(id) {
                triage.problem(
                    p,
                    None,
                    relative(p, &root),
                    format!("image `{id}` is not listed in {}", c.metadata.display()),
                )?;
            }
        }
        // Split by lesion.
        let lesions: Vec<String> = good.iter().map(|r| r.lesion.clone()).collect::<BTreeSet<_>>().into_iter().collect();
        let splits = c.split.assign(lesions.len(), &mut seeded_rng(ctx.seed, &["ham10000/splits".into()]));
        let split_of: BTreeMap<&str, crate::table::Split> = lesions.iter().map(String::as_str).zip(splits).collect();
        let names: Vec<String> = CLASSES.iter().map(|s| s.to_string()).collect();
        let items: Vec<Item> = good
            .iter()
            .map(|r| {
                let path = files[&r.image].clone();
                let source = relative(&path, &root);
                Item::new(
                    r.image.clone(),
                    path,
                    source,
                    r.lesion.clone(),
                    split_of[r.lesion.as_str()],
                    CLASSES.iter().position(|k| *k == r.dx).map(|i| i as i32),
                )
            })
            .collect();
        let provenance =
            serde_json::json!({ "stage": Self::KIND, "version": Self::VERSION, "seed": ctx.seed, "config": c });
        let opts = WriteOptions { ..c.table().write_options() };
        write_image_table(ctx, provenance, &names, &items, opts, triage.rejects)
    }
}
