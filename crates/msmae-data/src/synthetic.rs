//! `ingest/synthetic`: a seeded generator of X-ray-like (1 channel) and fundus-like
//! (3 channel) images with small lesions of known class, position and shape — the ground
//! truth no public dataset gives offline (docs/datasets.md, "Synthetic data"). The class is
//! carried by the lesion only (its shape and texture), so a classifier must look at the
//! lesion, and lesions cover a few patches, so random masking often hides them.
//!
//! Every image is a pure function of (seed, index): the table is bit-identical across runs
//! and thread counts. Images of one patient share their anatomy; splits are by patient.

use std::f32::consts::PI;

use rand::Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::Digest;

use msmae_core::{ConfigError, InputSlot, OutputDecl, Resources, Stage, StageContext, StageError, seeded_rng};

use crate::report::SplitTally;
use crate::table::{ImageRow, ImageTableWriter, Split, SplitFractions, TableMeta};

/// Which kind of image to draw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Modality {
    /// Chest-radiograph-like, 1 channel: lungs, ribs; nodule / mass / cavity lesions.
    #[default]
    Xray,
    /// Fundus-like, 3 channels: disc, vessels; microaneurysms / exudates / haemorrhage.
    Fundus,
}

/// Where the class evidence lives (a benchmark condition with known ground truth).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Evidence {
    /// A small lesion (nodule, mass, cavity): a few patches carry the class.
    #[default]
    Focal,
    /// X-ray only: a change spread over a large part of one lung (haze as in oedema,
    /// lucency as in emphysema, a reticular pattern as in fibrosis); the mask marks the
    /// affected region. `contrast` scales its amplitude, `lesion_radius` is not used.
    Diffuse,
}

impl Modality {
    pub fn label_names(self) -> Vec<String> {
        let n: &[&str] = match self {
            Modality::Xray => &["normal", "nodule", "mass", "cavity"],
            Modality::Fundus => &["healthy", "microaneurysms", "exudates", "haemorrhage"],
        };
        n.iter().map(|s| s.to_string()).collect()
    }
    pub fn channels(self) -> u32 {
        match self {
            Modality::Xray => 1,
            Modality::Fundus => 3,
        }
    }
}

/// The most images `ingest/synthetic` generates (its split assignment holds one entry per
/// patient in memory).
pub const MAX_IMAGES: u32 = 10_000_000;

fn d_images() -> u32 {
    600
}
fn d_size() -> u32 {
    64
}
fn d_ipp() -> u32 {
    2
}
fn d_contrast() -> f64 {
    0.3
}
fn d_noise() -> f64 {
    0.04
}
fn d_lesion() -> [f64; 2] {
    [0.05, 0.08]
}
fn d_normal() -> f64 {
    0.25
}
fn d_previews() -> u32 {
    16
}
fn d_row_group() -> u32 {
    256
}

/// `with:` of `ingest/synthetic`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyntheticConfig {
    /// Number of images.
    #[serde(default = "d_images")]
    pub images: u32,
    /// Side of the square images, in pixels.
    #[serde(default = "d_size")]
    pub size: u32,
    #[serde(default)]
    pub modality: Modality,
    /// Images per patient (same anatomy; never split across train/val/test).
    #[serde(default = "d_ipp")]
    pub images_per_patient: u32,
    #[serde(default)]
    pub split: SplitFractions,
    /// Lesion amplitude relative to the intensity range: lower is harder.
    #[serde(default = "d_contrast")]
    pub contrast: f64,
    /// Standard deviation of the pixel noise.
    #[serde(default = "d_noise")]
    pub noise: f64,
    /// Lesion radius range as a fraction of the image side.
    #[serde(default = "d_lesion")]
    pub lesion_radius: [f64; 2],
    /// Fraction of images without a lesion (class 0).
    #[serde(default = "d_normal")]
    pub normal_fraction: f64,
    /// Images drawn in the preview sheet.
    #[serde(default = "d_previews")]
    pub previews: u32,
    /// Rows per Parquet row group.
    #[serde(default = "d_row_group")]
    pub row_group: u32,
    /// `focal` (a small lesion carries the class) or `diffuse` (a region of one lung; X-ray).
    #[serde(default)]
    pub evidence: Evidence,
}

impl SyntheticConfig {
    /// Class names, index = label.
    pub fn label_names(&self) -> Vec<String> {
        match self.evidence {
            Evidence::Focal => self.modality.label_names(),
            Evidence::Diffuse => ["normal", "haze", "lucency", "reticular"].iter().map(|s| s.to_string()).collect(),
        }
    }
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        serde_json::from_value(serde_json::json!({})).unwrap_or_else(|_| unreachable!("all fields have defaults"))
    }
}

/// One generated image with its ground truth.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub label: u8,
    /// H×W×C, uint8.
    pub pixels: Vec<u8>,
    /// H×W, 1 inside the lesion.
    pub mask: Vec<u8>,
    /// Lesion centre (x, y) in pixels and radius; `None` for normal images.
    pub lesion: Option<(f32, f32, f32)>,
}

/// The `ingest/synthetic` stage.
#[derive(Debug, Default, Clone, Copy)]
pub struct Synthetic;

impl Stage for Synthetic {
    type Config = SyntheticConfig;
    const KIND: &'static str = "ingest/synthetic";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str =
        "seeded X-ray-/fundus-like images with lesions of known class and shape → image table";

    fn code_fingerprint(&self) -> &'static str {
        msmae_core::code_fingerprint!()
    }

    fn validate(&self, c: &SyntheticConfig) -> Result<(), ConfigError> {
        let err = |path: &str, message: &str| Err(ConfigError { path: path.into(), message: message.into() });
        if !(1..=MAX_IMAGES).contains(&c.images) {
            return err(
                "images",
                &format!("must be between 1 and {MAX_IMAGES} (a generated benchmark, not a data set)"),
            );
        }
        if !(16..=1024).contains(&c.size) {
            return err("size", "must be between 16 and 1024 pixels");
        }
        if c.images_per_patient == 0 {
            return err("images_per_patient", "must be at least 1");
        }
        if let Err(m) = c.split.check() {
            return err("split", &m);
        }
        if !(c.lesion_radius[0] > 0.0 && c.lesion_radius[0] <= c.lesion_radius[1] && c.lesion_radius[1] < 0.25) {
            return err("lesion_radius", "must be [min, max] with 0 < min ≤ max < 0.25 (fractions of the image side)");
        }
        if !(0.0..=1.0).contains(&c.normal_fraction) {
            return err("normal_fraction", "must be between 0 and 1");
        }
        if !(0.0..=1.0).contains(&c.contrast) || !(0.0..=0.5).contains(&c.noise) {
            return err("contrast", "contrast must be in [0, 1] and noise in [0, 0.5]");
        }
        if !(1..=65_536).contains(&c.row_group) {
            return err("row_group", "must be between 1 and 65536 rows");
        }
        if c.evidence == Evidence::Diffuse && c.modality != Modality::Xray {
            return err("evidence", "`diffuse` is drawn on X-ray images only (modality: xray)");
        }
        Ok(())
    }

    fn inputs(&self, _: &SyntheticConfig) -> Vec<InputSlot> {
        Vec::new()
    }

    fn output(&self, _: &SyntheticConfig) -> OutputDecl {
        OutputDecl::new("image-table", &["images.parquet", "split_report.json", "previews/*.png"])
            .figure("sample images", "previews/*.png")
    }

    fn resources(&self, _: &SyntheticConfig) -> Resources {
        Resources::Exclusive
    }

    fn run(&self, c: &SyntheticConfig, ctx: &mut StageContext<'_>) -> Result<(), StageError> {
        let names = c.label_names();
        let meta = TableMeta {
            schema_version: crate::table::SCHEMA_VERSION,
            label_names: names.clone(),
            multi_label: false,
            height: c.size,
            width: c.size,
            channels: c.modality.channels(),
            has_masks: true,
            bit_depth: 8,
            mask_classes: Vec::new(),
            provenance: serde_json::json!({ "stage": Self::KIND, "version": Self::VERSION, "seed": ctx.seed, "config": c }),
        };
        let table = ctx.output_path("images.parquet")?;
        let mut writer = ImageTableWriter::create(&table, meta, c.row_group as usize)?;
        let splits = patient_splits(c, ctx.seed);
        let mut tally = SplitTally::new(&names);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(ctx.threads.max(1))
            .build()
            .map_err(|e| StageError::other(e.to_string()))?;
        let bar = ctx.progress.bar(Some(u64::from(c.images)), &ctx.name);
        let mut previews: Vec<Sample> = Vec::new();
        let chunk = c.row_group.max(1);
        for start in (0..c.images).step_by(chunk as usize) {
            ctx.cancel.check()?;
            let end = (start + chunk).min(c.images);
            let samples: Vec<Sample> =
                pool.install(|| (start..end).into_par_iter().map(|i| generate(c, ctx.seed, i)).collect());
            for (i, s) in (start..end).zip(samples) {
                let patient = i / c.images_per_patient;
                let split = splits[patient as usize];
                let pid = format!("P{patient:06}");
                tally.add(&pid, split, Some(i32::from(s.label)), None).map_err(StageError::other)?;
                if (previews.len() as u32) < c.previews {
                    previews.push(s.clone());
                }
                writer.push(ImageRow {
                    id: format!("syn{i:07}"),
                    patient_id: pid,
                    split,
                    label: Some(i32::from(s.label)),
                    labels: None,
                    width: c.size as i32,
                    height: c.size as i32,
                    channels: c.modality.channels() as i32,
                    source_sha256: hex(&sha2::Sha256::digest(&s.pixels)),
                    source_path: format!("synthetic://{:?}/seed-{}/{i}", c.modality, ctx.seed).to_lowercase(),
                    pixels: s.pixels,
                    mask: Some(s.mask),
                })?;
            }
            bar.inc(u64::from(end - start));
        }
        writer.finish()?;
        let report = tally.report();
        let rp = ctx.output_path("split_report.json")?;
        std::fs::write(&rp, serde_json::to_vec_pretty(&report).unwrap_or_default())
            .map_err(|e| StageError::io(&rp, e))?;
        tracing::info!("{}: split report\n{}", ctx.name, report.table(&names));
        if !previews.is_empty() {
            let pp = ctx.output_path("previews/sheet.png")?;
            crate::preview::sheet(
                &previews.iter().map(|p| (p.pixels.as_slice(), Some(p.mask.as_slice()))).collect::<Vec<_>>(),
                c.size,
                c.size,
                c.modality.channels(),
            )
            .save(&pp)
            .map_err(|e| StageError::write(&pp, e))?;
        }
        Ok(())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Split of each patient: patients shuffled by the seed, then cut by the fractions.
pub fn patient_splits(c: &SyntheticConfig, seed: u64) -> Vec<Split> {
    c.split
        .assign(c.images.div_ceil(c.images_per_patient) as usize, &mut seeded_rng(seed, &["synthetic/splits".into()]))
}

/// Per-patient anatomy.
struct Anatomy {
    lung_rx: f32,
    lung_ry: f32,
    lung_dx: f32,
    brightness: f32,
    rib_phase: f32,
    disc_left: bool,
    vessels: Vec<[f32; 4]>,
}

fn anatomy(seed: u64, patient: u32) -> Anatomy {
    let mut r = seeded_rng(seed, &["synthetic/patient".into(), patient.into()]);
    let vessels = (0..7)
        .map(|_| {
            [
                r.random_range(0.0..2.0 * PI),
                r.random_range(0.25..0.45),
                r.random_range(-0.6..0.6),
                r.random_range(0.6..1.0),
            ]
        })
        .collect();
    Anatomy {
        lung_rx: r.random_range(0.15..0.19),
        lung_ry: r.random_range(0.29..0.36),
        lung_dx: r.random_range(0.16..0.20),
        brightness: r.random_range(0.9..1.1),
        rib_phase: r.random_range(0.0..1.0),
        disc_left: r.random_bool(0.5),
        vessels,
    }
}

/// Generate image `index` (deterministic in (seed, index)).
pub fn generate(c: &SyntheticConfig, seed: u64, index: u32) -> Sample {
    let (contrast, noise_sigma, normal_fraction) = (c.contrast as f32, c.noise as f32, c.normal_fraction as f32);
    let lesion_radius = [c.lesion_radius[0] as f32, c.lesion_radius[1] as f32];
    let n = c.size as usize;
    let sz = c.size as f32;
    let a = anatomy(seed, index / c.images_per_patient);
    let mut r = seeded_rng(seed, &["synthetic/image".into(), index.into()]);
    let label: u8 = if r.random::<f32>() < normal_fraction { 0 } else { r.random_range(1..=3) };
    let radius = sz * r.random_range(lesion_radius[0]..=lesion_radius[1]);
    let ch = c.modality.channels() as usize;
    let mut img = vec![0f32; n * n * ch];
    let mut lesion_field = vec![0f32; n * n];
    // pose jitter between images of one patient
    let (jx, jy) = (r.random_range(-0.02..0.02) * sz, r.random_range(-0.02..0.02) * sz);
    let center = match c.modality {
        Modality::Xray => {
            let side = if r.random_bool(0.5) { -1.0 } else { 1.0 };
            let (t, rr) = (r.random_range(0.0..2.0 * PI), r.random::<f32>().sqrt() * 0.65);
            (sz * (0.5 + side * a.lung_dx + rr * a.lung_rx * t.cos()) + jx, sz * (0.5 + rr * a.lung_ry * t.sin()) + jy)
        }
        Modality::Fundus => {
            let (t, rr) = (r.random_range(0.0..2.0 * PI), r.random_range(0.1..0.32));
            (sz * (0.5 + rr * t.cos()), sz * (0.5 + rr * t.sin()))
        }
    };
    // diffuse change: a smooth region of one lung, with the class's pattern
    let diffuse = c.evidence == Evidence::Diffuse && label > 0;
    let mut envelope = Vec::new();
    if diffuse {
        let side = if r.random_bool(0.5) { -1.0 } else { 1.0 };
        let (rx, ry) = (sz * a.lung_rx * r.random_range(0.8..1.1), sz * a.lung_ry * r.random_range(0.55..0.8));
        let (cx, cy) = (sz * (0.5 + side * a.lung_dx) + jx, sz * (0.5 + r.random_range(-0.3..0.3) * a.lung_ry) + jy);
        let period = (sz / 14.0).max(3.0);
        let (p1, p2) = (r.random_range(0.0..2.0 * PI), r.random_range(0.0..2.0 * PI));
        envelope = vec![0f32; n * n];
        for y in 0..n {
            for x in 0..n {
                let (dx, dy) = ((x as f32 + 0.5 - cx) / rx, (y as f32 + 0.5 - cy) / ry);
                let e = 1.0 / (1.0 + ((dx * dx + dy * dy - 1.0) * 6.0).exp());
                let pattern = match label {
                    1 => 1.0,
                    2 => -1.0,
                    _ => (2.0 * PI * x as f32 / period + p1).sin() * (2.0 * PI * y as f32 / period + p2).sin() * 1.5,
                };
                envelope[y * n + x] = e;
                lesion_field[y * n + x] = e * pattern;
            }
        }
    }
    // lesion profile (amplitude 1 at its strongest)
    if label > 0 && !diffuse {
        let lobes: Vec<(f32, f32, f32)> = (0..4)
            .map(|_| (r.random_range(-0.6..0.6) * radius, r.random_range(-0.6..0.6) * radius, r.random_range(0.6..1.0)))
            .collect();
        let dots: Vec<(f32, f32)> =
            (0..6).map(|_| (r.random_range(-1.2..1.2) * radius, r.random_range(-1.2..1.2) * radius)).collect();
        for y in 0..n {
            for x in 0..n {
                let (dx, dy) = (x as f32 + 0.5 - center.0, y as f32 + 0.5 - center.1);
                let d = (dx * dx + dy * dy).sqrt();
                let g = |s: f32, d: f32| (-d * d / (2.0 * s * s)).exp();
                let v = match (c.modality, label) {
                    (Modality::Xray, 1) => g(radius * 0.6, d),
                    (Modality::Xray, 2) => lobes
                        .iter()
                        .map(|(ox, oy, w)| w * g(radius * 0.7, ((dx - ox).powi(2) + (dy - oy).powi(2)).sqrt()))
                        .fold(0.0, f32::max),
                    (Modality::Xray, _) => g(radius * 0.25, d - radius) - 0.6 * g(radius * 0.45, d),
                    (Modality::Fundus, 1) => dots
                        .iter()
                        .map(|(ox, oy)| g(0.6f32.max(sz / 110.0), ((dx - ox).powi(2) + (dy - oy).powi(2)).sqrt()))
                        .fold(0.0, f32::max),
                    (Modality::Fundus, 2) => lobes
                        .iter()
                        .map(|(ox, oy, w)| w * g(radius * 0.35, ((dx - ox).powi(2) + (dy - oy).powi(2)).sqrt()))
                        .fold(0.0, f32::max),
                    (Modality::Fundus, _) => g(radius * 0.7, d) * (1.0 + 0.2 * (5.0 * dy.atan2(dx)).sin()),
                };
                lesion_field[y * n + x] = v;
            }
        }
    }
    for y in 0..n {
        for x in 0..n {
            let (u, v) = ((x as f32 + 0.5 - jx) / sz, (y as f32 + 0.5 - jy) / sz);
            let l = lesion_field[y * n + x];
            let px = &mut img[(y * n + x) * ch..(y * n + x + 1) * ch];
            match c.modality {
                Modality::Xray => {
                    let lung = |cx: f32| {
                        let e = ((u - cx) / a.lung_rx).powi(2) + ((v - 0.5) / a.lung_ry).powi(2);
                        1.0 / (1.0 + ((e - 1.0) * 12.0).exp())
                    };
                    let inside = lung(0.5 - a.lung_dx).max(lung(0.5 + a.lung_dx));
                    let ribs = (2.0 * PI * (v * 6.5 + a.rib_phase + 0.15 * (u - 0.5).abs())).sin().max(0.0).powi(3);
                    let spine = (-((u - 0.5) / 0.04).powi(2)).exp() * 0.15;
                    let base = (0.72 + 0.1 * v) * a.brightness * (1.0 - 0.55 * inside) + inside * 0.07 * ribs + spine;
                    px[0] = base + contrast * l;
                }
                Modality::Fundus => {
                    let d = ((u - 0.5).powi(2) + (v - 0.5).powi(2)).sqrt();
                    let fov = 1.0 / (1.0 + ((d - 0.46) * 80.0).exp());
                    let vign = 1.0 - 0.6 * (d / 0.46).powi(2);
                    let disc_x = if a.disc_left { 0.3 } else { 0.7 };
                    let disc = (-(((u - disc_x).powi(2) + (v - 0.5).powi(2)) / (2.0 * 0.035f32.powi(2)))).exp();
                    let mut vessel = 0.0f32;
                    for w in &a.vessels {
                        // a vessel: a curve leaving the disc at angle w[0]
                        let (du, dv) = (u - disc_x, v - 0.5);
                        let rr = (du * du + dv * dv).sqrt();
                        let ang = dv.atan2(du);
                        let target = w[0] + w[2] * rr;
                        let da = ((ang - target + PI).rem_euclid(2.0 * PI) - PI).abs() * rr;
                        if rr < w[1] + 0.2 {
                            vessel = vessel.max(w[3] * (-(da / 0.006).powi(2)).exp() * (1.0 - rr / (w[1] + 0.2)));
                        }
                    }
                    let base = [0.78 * vign * a.brightness, 0.36 * vign, 0.16 * vign];
                    let col = match label {
                        1 | 3 => [-0.35, -0.3, -0.12],
                        2 => [0.2, 0.45, 0.1],
                        _ => [0.0, 0.0, 0.0],
                    };
                    for k in 0..3 {
                        let vcol = [-0.35, -0.25, -0.1][k];
                        let dcol = [0.2, 0.5, 0.4][k];
                        px[k] = fov * (base[k] + disc * dcol + vessel * vcol + contrast / 0.3 * l * col[k]);
                    }
                }
            }
        }
    }
    let noise = rand_distr_normal(&mut r, n * n * ch, noise_sigma);
    let pixels: Vec<u8> = img.iter().zip(noise).map(|(v, e)| ((v + e).clamp(0.0, 1.0) * 255.0).round() as u8).collect();
    let mask: Vec<u8> = if diffuse {
        envelope.iter().map(|&e| u8::from(e > 0.5)).collect()
    } else {
        let peak = lesion_field.iter().copied().fold(0.0, f32::max);
        lesion_field.iter().map(|&v| u8::from(label > 0 && v.abs() > 0.35 * peak.max(1e-6))).collect()
    };
    Sample { label, pixels, mask, lesion: (label > 0 && !diffuse).then_some((center.0, center.1, radius)) }
}

/// Box–Muller normal noise.
fn rand_distr_normal(r: &mut impl Rng, count: usize, sigma: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(count + 1);
    while out.len() < count {
        let (u1, u2): (f32, f32) = (r.random_range(f32::EPSILON..1.0), r.random());
        let m = (-2.0 * u1.ln()).sqrt();
        out.push(sigma * m * (2.0 * PI * u2).cos());
        out.push(sigma * m * (2.0 * PI * u2).sin());
    }
    out.truncate(count);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> SyntheticConfig {
        SyntheticConfig { images: 40, size: 32, ..Default::default() }
    }

    #[test]
    fn images_are_deterministic_and_distinct() {
        let c = cfg();
        assert_eq!(generate(&c, 1, 5), generate(&c, 1, 5));
        assert_ne!(generate(&c, 1, 5).pixels, generate(&c, 1, 6).pixels);
        assert_ne!(generate(&c, 1, 5).pixels, generate(&c, 2, 5).pixels);
    }

    #[test]
    fn lesions_are_small_marked_and_absent_in_normals() {
        for modality in [Modality::Xray, Modality::Fundus] {
            let c = SyntheticConfig { modality, size: 64, ..cfg() };
            let (mut normals, mut lesions) = (0, 0);
            for i in 0..60 {
                let s = generate(&c, 7, i);
                let area: usize = s.mask.iter().map(|&m| m as usize).sum();
                assert_eq!(s.pixels.len(), 64 * 64 * modality.channels() as usize);
                if s.label == 0 {
                    normals += 1;
                    assert_eq!(area, 0);
                    assert!(s.lesion.is_none());
                } else {
                    lesions += 1;
                    // a few 8-px patches, not a large part of the image
                    assert!(area > 0 && area < 64 * 64 / 12, "{modality:?} image {i}: lesion area {area}");
                    let (cx, cy, r) = s.lesion.expect("lesion");
                    for (k, &m) in s.mask.iter().enumerate() {
                        let (x, y) = ((k % 64) as f32 + 0.5, (k / 64) as f32 + 0.5);
                        if m == 1 {
                            assert!(
                                ((x - cx).powi(2) + (y - cy).powi(2)).sqrt() < 2.5 * r,
                                "{modality:?} image {i}: mask pixel far from the lesion"
                            );
                        }
                    }
                }
            }
            assert!(normals > 5 && lesions > 30, "{modality:?}: {normals} normal, {lesions} with lesions");
        }
    }

    #[test]
    fn diffuse_evidence_covers_a_lung_region_with_the_class_pattern() {
        let c = SyntheticConfig { evidence: Evidence::Diffuse, contrast: 0.15, size: 64, ..cfg() };
        let plain = SyntheticConfig { contrast: 0.0, ..c.clone() };
        assert_eq!(c.label_names()[1], "haze");
        let mut seen = [0usize; 4];
        for i in 0..60 {
            let s = generate(&c, 3, i);
            let area = s.mask.iter().filter(|&&m| m > 0).count();
            seen[s.label as usize] += 1;
            if s.label == 0 {
                assert_eq!(area, 0);
                continue;
            }
            // a large region (a twentieth of the image or more), unlike a focal lesion
            assert!(area > 64 * 64 / 20, "image {i}: region of {area} pixels");
            assert!(s.lesion.is_none());
            // the change lives inside the region: haze brightens it, lucency darkens it
            let base = generate(&plain, 3, i);
            let (mut inside, mut outside) = (0f64, 0f64);
            for (k, m) in s.mask.iter().enumerate() {
                let d = f64::from(s.pixels[k]) - f64::from(base.pixels[k]);
                if *m > 0 { inside += d / area as f64 } else { outside += d.abs() / (64.0 * 64.0 - area as f64) }
            }
            match s.label {
                1 => assert!(inside > 15.0, "image {i}: haze mean change {inside}"),
                2 => assert!(inside < -15.0, "image {i}: lucency mean change {inside}"),
                _ => {}
            }
            assert!(outside < 6.0, "image {i}: change outside the region {outside}");
        }
        assert!(seen.iter().all(|&n| n > 3), "every class drawn: {seen:?}");
        let fundus = SyntheticConfig { modality: Modality::Fundus, ..c };
        assert!(Synthetic.validate(&fundus).is_err());
    }

    #[test]
    fn lesion_raises_local_contrast() {
        // The mean absolute difference to the same image without lesion concentrates on
        // the mask: the lesion is visible and localised.
        let c = SyntheticConfig { noise: 0.0, ..cfg() };
        let no = SyntheticConfig { contrast: 0.0, ..c.clone() };
        for i in 0..20 {
            let (a, b) = (generate(&c, 3, i), generate(&no, 3, i));
            if a.label == 0 {
                continue;
            }
            let (mut inside, mut outside, mut n_in) = (0f64, 0f64, 0f64);
            for (k, (&pa, &pb)) in a.pixels.iter().zip(&b.pixels).enumerate() {
                let d = (f64::from(pa) - f64::from(pb)).abs();
                if a.mask[k] == 1 {
                    inside += d;
                    n_in += 1.0;
                } else {
                    outside += d;
                }
            }
            let (mean_in, mean_out) = (inside / n_in, outside / (a.mask.len() as f64 - n_in));
            assert!(
                mean_in > 20.0 && mean_in > 10.0 * mean_out,
                "image {i}: mean change {mean_in:.1} inside vs {mean_out:.2} outside"
            );
        }
    }

    #[test]
    fn splits_follow_fractions_by_patient() {
        let c = SyntheticConfig { images: 1000, images_per_patient: 4, ..cfg() };
        let s = patient_splits(&c, 9);
        assert_eq!(s.len(), 250);
        let count = |x: Split| s.iter().filter(|&&y| y == x).count();
        assert_eq!((count(Split::Train), count(Split::Val), count(Split::Test)), (175, 25, 50));
        assert_eq!(s, patient_splits(&c, 9));
        assert_ne!(s, patient_splits(&c, 10));
    }
}
