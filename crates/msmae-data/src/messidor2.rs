//! `ingest/messidor2`: Messidor-2 as published (docs/datasets.md, "Messidor-2").
//!
//! - Images (JPG/PNG/TIF, various sizes) in `IMAGES/`.
//! - Grades in `messidor_data.csv`: `image_id,adjudicated_dr_grade,adjudicated_dme,
//!   adjudicated_gradable`. Ungradable images (`adjudicated_gradable` 0, grade empty) are
//!   excluded and listed in `rejects.json` as such. The released CSV writes `IM…jpg` where
//!   the files are `IM….JPG`, so ids match file names without regard to case.
//! - Exams in the publisher's `messidor-2.csv` (`left;right` pairs, `;`-separated, with a
//!   header): both eyes of an exam are one patient, so they land in one split.

use std::collections::BTreeMap;
use std::path::PathBuf;

use msmae_core::{ConfigError, InputSlot, OutputDecl, Resources, Stage, StageContext, StageError, seeded_rng};

use crate::ingest::{Item, Reject, Triage, WriteOptions, index_files, output_decl, relative, write_image_table};
use crate::meta::TextTable;
use crate::table::SplitFractions;

/// The five diabetic-retinopathy grades (ICDR), in order 0–4.
pub const GRADES: [&str; 5] = ["none", "mild", "moderate", "severe", "proliferative"];

const HEADER: &str = "image_id,adjudicated_dr_grade,adjudicated_dme,adjudicated_gradable";

fn d_grades() -> PathBuf {
    PathBuf::from("messidor_data.csv")
}
fn d_pairs() -> Option<PathBuf> {
    Some(PathBuf::from("messidor-2.csv"))
}
fn d_images() -> PathBuf {
    PathBuf::from("IMAGES")
}

crate::ingest::ingest_config! {
/// `with:` of `ingest/messidor2`.
pub struct Messidor2Config, channels: "crate::ingest::defaults::rgb" {
    /// Dataset root (relative to the pipeline file).
    pub root: PathBuf,
    /// The adjudicated grades, relative to the root.
    #[serde(default = "d_grades")]
    pub grades: PathBuf,
    /// The publisher's exam list (`left;right`); `null` treats every image as its own
    /// patient (then the two eyes of an exam may land in different splits).
    #[serde(default = "d_pairs")]
    pub pairs: Option<PathBuf>,
    /// Image folder, relative to the root.
    #[serde(default = "d_images")]
    pub images: PathBuf,
    /// Fractions of patients (exams) per split.
    #[serde(default)]
    pub split: SplitFractions,
}
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Messidor2;

/// A grade cell: an integer 0–4 (`2` or `2.0`).
fn parse_grade(s: &str) -> Option<i32> {
    let v: f64 = s.parse().ok()?;
    (v.fract() == 0.0 && (0.0..=4.0).contains(&v)).then_some(v as i32)
}

impl Stage for Messidor2 {
    type Config = Messidor2Config;
    const KIND: &'static str = "ingest/messidor2";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str =
        "Messidor-2 as published (grades CSV, exam pairs, IMAGES/) → DR grade 0–4 image table, splits by exam";

    fn code_fingerprint(&self) -> &'static str {
        msmae_core::code_fingerprint!()
    }

    fn validate(&self, c: &Messidor2Config) -> Result<(), ConfigError> {
        c.table().check(&c.split)
    }

    fn inputs(&self, _: &Messidor2Config) -> Vec<InputSlot> {
        Vec::new()
    }

    fn output(&self, _: &Messidor2Config) -> OutputDecl {
        output_decl()
    }

    fn external_inputs(&self, c: &Messidor2Config) -> Vec<PathBuf> {
        let mut v = vec![c.root.join(&c.grades), c.root.join(&c.images)];
        v.extend(c.pairs.iter().map(|p| c.root.join(p)));
        v
    }

    fn resources(&self, _: &Messidor2Config) -> Resources {
        Resources::Exclusive
    }

    fn run(&self, c: &Messidor2Config, ctx: &mut StageContext<'_>) -> Result<(), StageError> {
        let root = ctx.resolve(&c.root);
        let files =
            index_files(&[root.join(&c.images)], &["jpg", "jpeg", "png", "tif", "tiff"], str::to_ascii_lowercase)?;
        let mut triage = Triage::new(c.on_error);

        // Exams: both eyes are one patient.
        let mut exam_of: BTreeMap<String, String> = BTreeMap::new();
        if let Some(pairs) = &c.pairs {
            let path = root.join(pairs);
            if !path.is_file() {
                return Err(StageError::data(
                    &path,
                    None,
                    "exam list not found: it keeps both eyes of an exam in one split (set `pairs: null` to split by image instead)",
                ));
            }
            let t = TextTable::read_csv(&path, b';')?;
            let (left, right) = (t.column("left", "left;right")?, t.column("right", "left;right")?);
            for i in 0..t.len() {
                let exam = format!("exam-{:04}", i + 1);
                for col in [left, right] {
                    let Some(name) = col.get(i) else { continue };
                    if let Some(prev) = exam_of.insert(name.to_ascii_lowercase(), exam.clone()) {
                        return Err(col.error(i, format!("`{name}` is also in {prev}: an image belongs to one exam")));
                    }
                }
            }
        }

        let t = TextTable::read_csv(&root.join(&c.grades), b',')?;
        let (id_col, grade_col, gradable_col) = (
            t.column("image_id", HEADER)?,
            t.column("adjudicated_dr_grade", HEADER)?,
            t.column("adjudicated_gradable", HEADER)?,
        );
        let grades_name = relative(&root.join(&c.grades), &root);
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        let mut ungradable: Vec<Reject> = Vec::new();
        let mut rows: Vec<(String, PathBuf, i32)> = Vec::new();
        for i in 0..t.len() {
            let id = id_col.require(i)?;
            let key = id.to_ascii_lowercase();
            let what = format!("{grades_name}:{}", i + 2);
            if let Some(first) = seen.insert(key.clone(), i + 2) {
                triage.problem(
                    t.path(),
                    Some(format!("{}, column `image_id`", t.row_name(i))),
                    what,
                    format!("`{id}` is listed twice (first on line {first})"),
                )?;
                continue;
            }
            let Some(path) = files.get(&key) else {
                triage.problem(
                    t.path(),
                    Some(t.row_name(i)),
                    what,
                    format!("image `{id}` is listed but not in {}/", c.images.display()),
                )?;
                continue;
            };
            if gradable_col.get(i).and_then(parse_grade) == Some(0) {
                ungradable.push(Reject {
                    path: relative(path, &root),
                    reason: "excluded: ungradable (adjudicated_gradable = 0)".into(),
                });
                continue;
            }
            match grade_col.get(i).and_then(parse_grade) {
                Some(g) => rows.push((id.to_string(), path.clone(), g)),
                None => triage.problem(
                    t.path(),
                    Some(format!("{}, column `adjudicated_dr_grade`", t.row_name(i))),
                    what,
                    format!("grade `{}` is not 0–4", grade_col.get(i).unwrap_or("")),
                )?,
            }
        }
        for (key, p) in &files {
            if !seen.contains_key(key) {
                triage.problem(p, None, relative(p, &root), format!("image is not listed in {grades_name}"))?;
            }
        }
        if !ungradable.is_empty() {
            tracing::info!("{}: {} ungradable images excluded (listed in rejects.json)", ctx.name, ungradable.len());
        }

        // Split by exam (an image outside the exam list is its own patient).
        let patient = |id: &str| exam_of.get(&id.to_ascii_lowercase()).cloned().unwrap_or_else(|| id.to_string());
        let patients: Vec<String> =
            rows.iter().map(|(id, _, _)| patient(id)).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
        let splits = c.split.assign(patients.len(), &mut seeded_rng(ctx.seed, &["messidor2/splits".into()]));
        let split_of: BTreeMap<&str, crate::table::Split> = patients.iter().map(String::as_str).zip(splits).collect();
        let items: Vec<Item> = rows
            .into_iter()
            .map(|(id, path, g)| {
                let p = patient(&id);
                Item::new(id, path.clone(), relative(&path, &root), p.clone(), split_of[p.as_str()], Some(g))
            })
            .collect();
        let names: Vec<String> = GRADES.iter().map(|s| s.to_string()).collect();
        let mut rejects = triage.rejects;
        rejects.extend(ungradable);
        let provenance =
            serde_json::json!({ "stage": Self::KIND, "version": Self::VERSION, "seed": ctx.seed, "config": c });
        let opts = WriteOptions { ..c.table().write_options() };
        write_image_table(ctx, provenance, &names, &items, opts, rejects)
    }
}
