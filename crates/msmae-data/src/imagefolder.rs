//! `ingest/imagefolder`: the ImageFolder layout — `ROOT/<class>/*` with a seeded split, or
//! `ROOT/<split>/<class>/*` with split folders named train/training, val/valid/validation,
//! test/testing (BTMD ships `Training/` and `Testing/`; validation is then carved out of
//! the training patients). ImageFolder carries no patient ids: each image is its own
//! patient unless `patient_separator` says the file-name prefix names the patient.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use msmae_core::{ConfigError, InputSlot, OutputDecl, Resources, Stage, StageContext, StageError, seeded_rng};

pub use crate::ingest::OnError;
use crate::ingest::{Item, Reject, Triage, WriteOptions, defaults, output_decl, write_image_table};
use crate::table::{Split, SplitFractions, carve_validation};

fn d_ext() -> Vec<String> {
    ["png", "jpg", "jpeg", "tif", "tiff", "bmp", "dcm"].iter().map(|s| s.to_string()).collect()
}

crate::ingest::ingest_config! {
/// `with:` of `ingest/imagefolder`.
pub struct ImageFolderConfig, channels: "crate::ingest::defaults::rgb" {
    /// Dataset root (relative to the pipeline file).
    pub root: PathBuf,
    /// Patient fractions when the root has no split folders.
    #[serde(default)]
    pub split: SplitFractions,
    /// Fraction of training patients moved to validation when there is no val folder.
    #[serde(default = "defaults::val_fraction")]
    pub val_fraction: f64,
    /// The patient id is the file stem up to this separator (e.g. `_` for `P001_left.png`).
    #[serde(default)]
    pub patient_separator: Option<String>,
    /// Segmentation pairs: files named `<image stem><mask_suffix>[_<n>].<ext>` beside an
    /// image are its masks (BUSI: `_mask`, with `_mask_1`, `_mask_2`, … merged), and every
    /// image must have at least one.
    #[serde(default)]
    pub mask_suffix: Option<String>,
    /// File extensions taken as images (case-insensitive); other files are ignored.
    #[serde(default = "d_ext")]
    pub extensions: Vec<String>,
}
}

/// One file found under the root.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Found {
    path: PathBuf,
    rel: String,
    class: String,
    split: Option<Split>,
    patient: String,
    masks: Vec<PathBuf>,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct ImageFolder;

fn sorted_dirs(p: &Path) -> Result<Vec<PathBuf>, StageError> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(p)
        .map_err(|e| StageError::io(p, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir() && !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
        .collect();
    v.sort();
    Ok(v)
}

fn scan(root: &Path, c: &ImageFolderConfig) -> Result<(Vec<Found>, usize), StageError> {
    let name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let top = sorted_dirs(root)?;
    let split_layout = top.iter().any(|d| Split::from_name(&name(d)).is_some());
    let mut class_dirs: Vec<(Option<Split>, PathBuf)> = Vec::new();
    for d in &top {
        match (split_layout, Split::from_name(&name(d))) {
            (true, Some(s)) => class_dirs.extend(sorted_dirs(d)?.into_iter().map(|cd| (Some(s), cd))),
            (true, None) => tracing::warn!("{}: ignored (not a split folder beside the split folders)", d.display()),
            (false, _) => class_dirs.push((None, d.clone())),
        }
    }
    if class_dirs.is_empty() {
        return Err(StageError::data(
            root,
            None,
            "no class folders: expected ROOT/<class>/<image> or ROOT/<split>/<class>/<image>",
        ));
    }
    let exts: BTreeSet<String> = c.extensions.iter().map(|e| e.to_ascii_lowercase()).collect();
    let (mut found, mut ignored) = (Vec::new(), 0);
    for (split, cd) in class_dirs {
        let class = name(&cd);
        let mut stack = vec![cd.clone()];
        let mut n = 0;
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).map_err(|e| StageError::io(&d, e))? {
                let p = e.map_err(|e| StageError::io(&d, e))?.path();
                let fname = name(&p);
                if fname.starts_with('.') {
                    continue;
                }
                if p.is_dir() {
                    stack.push(p);
                    continue;
                }
                let ext = p.extension().map(|x| x.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
                if !exts.contains(&ext) {
                    ignored += 1;
                    tracing::debug!("ignoring {} (not an image extension)", p.display());
                    continue;
                }
                let rel = p.strip_prefix(root).unwrap_or(&p).to_string_lossy().replace('\\', "/");
                let stem = p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                let patient = match &c.patient_separator {
                    Some(sep) if !sep.is_empty() => stem.split(sep.as_str()).next().unwrap_or(&stem).to_string(),
                    _ => rel.clone(),
                };
                found.push(Found { path: p, rel, class: class.clone(), split, patient, masks: Vec::new() });
                n += 1;
            }
        }
        if n == 0 {
            tracing::warn!("{}: class folder without images", cd.display());
        }
    }
    found.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok((found, ignored))
}

/// The image stem a mask file belongs to: `<base><suffix>` or `<base><suffix>_<digits>`.
fn mask_base<'a>(stem: &'a str, suffix: &str) -> Option<&'a str> {
    let pos = stem.rfind(suffix)?;
    let rest = &stem[pos + suffix.len()..];
    let numbered = rest.strip_prefix('_').is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()));
    (pos > 0 && (rest.is_empty() || numbered)).then(|| &stem[..pos])
}

/// Move mask files onto their images. An image without a mask, or a mask without an
/// image, is an error naming the file, or with `on_error: skip` a reject.
fn pair_masks(found: Vec<Found>, suffix: &str, on_error: OnError) -> Result<(Vec<Found>, Vec<Reject>), StageError> {
    let stem = |p: &Path| p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let (masks, mut images): (Vec<Found>, Vec<Found>) =
        found.into_iter().partition(|f| mask_base(&stem(&f.path), suffix).is_some());
    let index: BTreeMap<(PathBuf, String), usize> =
        images.iter().enumerate().map(|(i, f)| ((f.path.with_file_name(""), stem(&f.path)), i)).collect();
    let mut triage = Triage::new(on_error);
    for m in masks {
        let s = stem(&m.path);
        let base = mask_base(&s, suffix).unwrap_or_default().to_string();
        match index.get(&(m.path.with_file_name(""), base.clone())) {
            Some(&i) => images[i].masks.push(m.path),
            None => triage.problem(
                &m.path,
                None,
                m.rel.clone(),
                format!("mask without an image: no `{base}.*` beside it"),
            )?,
        }
    }
    let mut kept = Vec::with_capacity(images.len());
    for mut f in images {
        if f.masks.is_empty() {
            triage.problem(
                &f.path,
                None,
                f.rel.clone(),
                format!("image without a mask: no `{}{suffix}.*` beside it", stem(&f.path)),
            )?;
            continue;
        }
        f.masks.sort();
        kept.push(f);
    }
    Ok((kept, triage.rejects))
}

/// Give every patient one split: the folder's (val carved out of train when absent), or a
/// seeded draw by the fractions.
fn assign_splits(found: &mut [Found], c: &ImageFolderConfig, seed: u64) -> Result<(), StageError> {
    let mut by_patient: BTreeMap<String, BTreeSet<Option<Split>>> = BTreeMap::new();
    for f in found.iter() {
        by_patient.entry(f.patient.clone()).or_default().insert(f.split);
    }
    if let Some((p, s)) = by_patient.iter().find(|(_, s)| s.len() > 1) {
        let folders: Vec<&str> = s.iter().map(|x| x.map_or("(none)", |x| x.as_str())).collect();
        return Err(StageError::data(
            &c.root,
            Some(format!("patient `{p}`")),
            format!("has images in several split folders ({}): splits must be by patient", folders.join(", ")),
        ));
    }
    let folder_layout = found.iter().any(|f| f.split.is_some());
    let patients: Vec<String> = by_patient.keys().cloned().collect();
    let mut rng = seeded_rng(seed, &["imagefolder/splits".into()]);
    let mut assigned: BTreeMap<String, Split> = BTreeMap::new();
    if folder_layout {
        let has_val = found.iter().any(|f| f.split == Some(Split::Val));
        let train: Vec<String> =
            patients.iter().filter(|p| by_patient[*p].contains(&Some(Split::Train))).cloned().collect();
        let val = carve_validation(train.clone(), if has_val { 0.0 } else { c.val_fraction }, &mut rng);
        for p in train {
            let s = if val.contains(&p) { Split::Val } else { Split::Train };
            assigned.insert(p, s);
        }
        for p in &patients {
            if let Some(Some(s)) = by_patient[p].iter().next() {
                assigned.entry(p.clone()).or_insert(*s);
            }
        }
    } else {
        let splits = c.split.assign(patients.len(), &mut rng);
        assigned.extend(patients.iter().cloned().zip(splits));
    }
    for f in found.iter_mut() {
        f.split = assigned.get(&f.patient).copied();
    }
    Ok(())
}

impl Stage for ImageFolder {
    type Config = ImageFolderConfig;
    const KIND: &'static str = "ingest/imagefolder";
    const VERSION: u32 = 2;
    const SUMMARY: &'static str = "ImageFolder layout (ROOT/[split/]class/image) → image table, splits by patient";

    fn code_fingerprint(&self) -> &'static str {
        msmae_core::code_fingerprint!()
    }

    fn validate(&self, c: &ImageFolderConfig) -> Result<(), ConfigError> {
        c.table().check(&c.split)?;
        let err = |path: &str, message: &str| Err(ConfigError { path: path.into(), message: message.into() });
        if !(0.0..1.0).contains(&c.val_fraction) {
            return err("val_fraction", "must be in [0, 1)");
        }
        if c.mask_suffix.as_deref().is_some_and(str::is_empty) {
            return err("mask_suffix", "must not be empty (BUSI uses `_mask`)");
        }
        if c.extensions.is_empty() {
            return err("extensions", "name at least one image extension");
        }
        Ok(())
    }

    fn inputs(&self, _: &ImageFolderConfig) -> Vec<InputSlot> {
        Vec::new()
    }

    fn output(&self, _: &ImageFolderConfig) -> OutputDecl {
        output_decl()
    }

    fn external_inputs(&self, c: &ImageFolderConfig) -> Vec<PathBuf> {
        vec![c.root.clone()]
    }

    fn resources(&self, _: &ImageFolderConfig) -> Resources {
        Resources::Exclusive
    }

    fn run(&self, c: &ImageFolderConfig, ctx: &mut StageContext<'_>) -> Result<(), StageError> {
        let root = ctx.resolve(&c.root);
        let (found, ignored) = scan(&root, c)?;
        let (mut found, rejects) = match c.mask_suffix.as_deref() {
            Some(suffix) => pair_masks(found, suffix, c.on_error)?,
            None => (found, Vec::new()),
        };
        assign_splits(&mut found, c, ctx.seed)?;
        if ignored > 0 {
            tracing::info!("{}: {ignored} files without an image extension ignored", ctx.name);
        }
        let names: Vec<String> = found.iter().map(|f| f.class.clone()).collect::<BTreeSet<_>>().into_iter().collect();
        let items = found
            .into_iter()
            .map(|f| {
                let split = f.split.ok_or_else(|| StageError::other(format!("{}: no split assigned", f.rel)))?;
                let label = names.iter().position(|n| n == &f.class).map(|i| i as i32);
                Ok(Item { masks: f.masks, ..Item::new(f.rel.clone(), f.path, f.rel, f.patient, split, label) })
            })
            .collect::<Result<Vec<_>, StageError>>()?;
        let provenance =
            serde_json::json!({ "stage": Self::KIND, "version": Self::VERSION, "seed": ctx.seed, "config": c });
        let opts = WriteOptions { masks: c.mask_suffix.is_some(), ..c.table().write_options() };
        write_image_table(ctx, provenance, &names, &items, opts, rejects)
    }
}
