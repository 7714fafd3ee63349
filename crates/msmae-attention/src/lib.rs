//! The attention stages of MSMAE (docs/method.md §2):
//!
//! - `attention/train-supervised`: the label-supervised ViT (CLS-token head) whose CLS
//!   attention guides masking; trained by the shared classifier loop of `msmae-train`;
//! - `attention/extract`: CLS-attention maps of every image from any ViT/MAE checkpoint →
//!   Parquet, overlay PNGs, and where lesion masks exist, how much of each lesion the top
//!   attention patches cover ([`lesion_coverage`]).

use serde::{Deserialize, Serialize};

use msmae_core::{ConfigError, InputSlot, OutputDecl, Resources, Stage, StageContext, StageError};
use msmae_data::table::Split;
use msmae_train::classifier::{ClassifierKind, predict};
use std::sync::Arc;

use msmae_train::data::{ImageTable, LoaderSpec, Normalizer};
use msmae_train::figures;
use msmae_train::maps::{Maps, attention_pass, write_maps};
use msmae_train::model;
use msmae_train::runtime::{self, Runtime};
use msmae_train::support::{check_image_compat, config_error, defaults, open_table, write_json};
use msmae_vit::VisionTransformer;
use msmae_vit::attention_map::{MapMethod, MapReading, Smoothing};

msmae_train::classifier_stage!(TrainSupervised, "attention/train-supervised", ClassifierKind::Supervised, "label-supervised ViT (CLS head) whose attention guides MSMAE masking", pretrained: false);

/// Which splits to process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SplitSelect {
    #[default]
    All,
    Train,
    Val,
    Test,
}

fn d_overlays() -> usize {
    16
}

/// `with:` of `attention/extract`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtractConfig {
    #[serde(default)]
    pub split: SplitSelect,
    #[serde(default = "defaults::batch_size")]
    pub batch_size: usize,
    /// Overlay PNGs of the first images of the test split (of the chosen split otherwise).
    #[serde(default = "d_overlays")]
    pub overlays: usize,
    /// Fraction of patches counted as "top attention" in the lesion-coverage summary.
    #[serde(default = "d_top")]
    pub top_fraction: f64,
    /// How the map is read: `cls` (the paper's last-block CLS attention), `rollout`
    /// (attention rollout across the blocks) or `gradient` (gradient-weighted attention
    /// relevance to the predicted class; needs a classifier checkpoint).
    #[serde(default)]
    pub method: MapMethod,
    /// Spatial smoothing on the patch grid before the patches are ranked
    /// (`{ op: max, size: 3 }`): `attention.parquet`, the coverage figures and the
    /// overlays use the smoothed map; the raw map is kept in `attention_raw.parquet`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smooth: Option<Smoothing>,
}

fn d_top() -> f64 {
    0.25
}

/// `attention/extract`.
#[derive(Debug, Default, Clone, Copy)]
pub struct AttentionExtract;

impl Stage for AttentionExtract {
    type Config = ExtractConfig;
    const KIND: &'static str = "attention/extract";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str =
        "CLS-attention maps of every image from a ViT or MAE checkpoint → Parquet, overlays, lesion coverage";
    const USES_BACKEND: bool = true;

    fn code_fingerprint(&self) -> &'static str {
        msmae_core::code_fingerprint!()
    }
    fn validate(&self, c: &ExtractConfig) -> Result<(), ConfigError> {
        if c.batch_size == 0 {
            return config_error("batch_size", "must be at least 1");
        }
        if !(c.top_fraction > 0.0 && c.top_fraction <= 1.0) {
            return config_error("top_fraction", "must be in (0, 1]");
        }
        if let Some(Err(m)) = c.smooth.map(|s| s.check()) {
            return config_error("smooth", m);
        }
        Ok(())
    }
    fn inputs(&self, _: &ExtractConfig) -> Vec<InputSlot> {
        vec![
            InputSlot::one("model", "vit-checkpoint", "the model whose attention is read").or_kind("mae-checkpoint"),
            InputSlot::one("data", "image-table", "the images"),
        ]
    }
    fn output(&self, c: &ExtractConfig) -> OutputDecl {
        let files: &[&str] = if c.smooth.is_some() {
            &["attention.parquet", "attention_raw.parquet", "summary.json", "overlays/*.png"]
        } else {
            &["attention.parquet", "summary.json", "overlays/*.png"]
        };
        OutputDecl::new("attention-maps", files)
            .metric("lesion_coverage", "summary.json", "/lesion_coverage")
            .metric("lesion_hit_rate", "summary.json", "/lesion_hit_rate")
            .metric("top_fraction", "summary.json", "/top_fraction")
            .metric("lesion_coverage_correct", "summary.json", "/by_prediction/correct/lesion_coverage")
            .metric("lesion_coverage_wrong", "summary.json", "/by_prediction/wrong/lesion_coverage")
            .table("coverage by top fraction", "summary.json", "/coverage_curve")
            .figure("attention overlays (image, attention map, lesion outline)", "overlays/*.png")
    }
    fn resources(&self, _: &ExtractConfig) -> Resources {
        Resources::Exclusive
    }
    fn run(&self, c: &ExtractConfig, ctx: &mut StageContext<'_>) -> Result<(), StageError> {
        let rt = runtime::runtime(ctx)?;
        let table = open_table(ctx, "data")?;
        let input = ctx.input("model")?.clone();
        let (loaded, meta) = model::load(&input.dir, &rt.device)?;
        check_image_compat(&meta, &table, &input.dir.join(model::META_FILE))?;
        let vit = loaded.into_encoder();
        if c.method == MapMethod::Gradient && vit.head.is_none() {
            return Err(StageError::config(
                "method",
                format!(
                    "`gradient` weighs attention by the gradient of the predicted class, but `{}` has no classification head (an MAE encoder?); use `cls` or `rollout`, or a classifier checkpoint",
                    input.stage
                ),
            ));
        }
        let p = meta.vit.patch_size;
        let grid = [table.height() / p, table.width() / p];
        let rows: Vec<usize> = match c.split {
            SplitSelect::All => (0..table.rows.len()).collect(),
            SplitSelect::Train => table.rows_of(Split::Train),
            SplitSelect::Val => table.rows_of(Split::Val),
            SplitSelect::Test => table.rows_of(Split::Test),
        };
        let pass = extract_pass(c, ctx, &vit, &table, &rows, &meta.normalizer, grid, &rt)?;
        let provenance = serde_json::json!({
            "stage": Self::KIND, "name": ctx.name, "model": input.digest, "model_stage": input.stage, "trained_by": meta.trained_by,
        });
        let reading = MapReading { method: c.method, smooth: c.smooth };
        let mut ranked_provenance = provenance.clone();
        if let Some(s) = c.smooth {
            let mut p = provenance;
            p["smoothing"] = serde_json::json!({ "applied": false, "note": format!("the raw maps; attention.parquet holds them smoothed ({})", s.label()) });
            write_maps(&ctx.output_path("attention_raw.parquet")?, &table, &pass.raw, grid, p)?;
            ranked_provenance["smoothing"] =
                serde_json::json!({ "applied": true, "op": s.op.as_str(), "size": s.size });
        }
        write_maps(&ctx.output_path("attention.parquet")?, &table, pass.ranking(), grid, ranked_provenance)?;
        // Coverage where the model classifies the image right and where it does not: how
        // much of the miss is the classifier's (a model that has not found the lesion
        // cannot point at it).
        let by_prediction = if vit.head.is_some() && !table.meta.multi_label && !pass.lesions.is_empty() {
            let lesion_rows: Vec<usize> = pass.lesions.iter().map(|l| l.row).collect();
            let (scores, _) = predict(&vit, &table, &lesion_rows, &meta.normalizer, c.batch_size, &rt, ctx)?;
            let right: Vec<bool> = lesion_rows
                .iter()
                .zip(&scores)
                .map(|(r, s)| {
                    let arg =
                        s.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(k, _)| k as i64).unwrap_or(-1);
                    table.rows[*r].label.map(i64::from) == Some(arg)
                })
                .collect();
            Some(ByPrediction::split(&pass.lesions, &right))
        } else {
            None
        };
        let summary = ExtractSummary::new(c, &pass, grid, &input.digest, by_prediction);
        if let Some(cov) = summary.lesion_coverage {
            tracing::info!(
                "`{}` ({}): top {:.0} % attention patches cover {:.1} % of lesion pixels ({} images with lesions; uniform attention would cover {:.0} %)",
                ctx.name,
                reading.label(),
                c.top_fraction * 100.0,
                100.0 * cov,
                summary.images_with_lesion,
                c.top_fraction * 100.0
            );
        }
        write_json(ctx, "summary.json", &summary)
    }
}

/// The number of patches in the top `fraction` of a grid (at least one).
fn top_patches(grid: [usize; 2], fraction: f64) -> usize {
    ((grid[0] * grid[1]) as f64 * fraction).round().max(1.0) as usize
}

/// One image with a lesion: its table row, its coverage at `top_fraction` and along [`CURVE`].
#[derive(Debug, Clone)]
struct LesionImage {
    row: usize,
    coverage: f64,
    curve: Vec<f64>,
}

/// What one pass over the images gives: the raw maps, the smoothed ones when asked for,
/// the coverage summed over the images with a lesion, and each such image.
#[derive(Debug, Default)]
struct ExtractPass {
    raw: Maps,
    smoothed: Option<Maps>,
    coverage: Coverage,
    lesions: Vec<LesionImage>,
}

impl ExtractPass {
    /// The maps the patches are ranked by.
    fn ranking(&self) -> &Maps {
        self.smoothed.as_ref().unwrap_or(&self.raw)
    }
}

/// One pass: maps, lesion coverage and overlays from the same batches.
#[allow(clippy::too_many_arguments)]
fn extract_pass(
    c: &ExtractConfig,
    ctx: &StageContext<'_>,
    vit: &VisionTransformer,
    table: &Arc<ImageTable>,
    rows: &[usize],
    normalizer: &Normalizer,
    grid: [usize; 2],
    rt: &Runtime,
) -> Result<ExtractPass, StageError> {
    let mut show: Vec<usize> =
        table.rows_of(Split::Test).into_iter().filter(|r| rows.binary_search(r).is_ok()).collect();
    if show.is_empty() {
        show = rows.to_vec();
    }
    show.truncate(c.overlays);
    let mut spec = LoaderSpec::eval(c.batch_size);
    spec.lesion_masks = true;
    let (h, w, ch) = (table.height(), table.width(), table.channels());
    let top = top_patches(grid, c.top_fraction);
    let mut out = ExtractPass { smoothed: c.smooth.map(|_| Maps::new()), ..ExtractPass::default() };
    let raw = attention_pass(vit, table, rows, normalizer, spec, c.method, rt, ctx, |batch, i, map| {
        let r = batch.rows[i];
        let smoothed = c.smooth.map(|s| s.apply(map, grid));
        let ranked: &[f32] = smoothed.as_deref().unwrap_or(map);
        let lesion = batch.lesions.get(i).and_then(Option::as_ref);
        if let Some(m) = lesion.filter(|m| m.iter().any(|&v| v > 0)) {
            let (coverage, hit) = lesion_coverage(ranked, grid, m, h, w, top);
            out.coverage.add(table.rows[r].split.as_str(), coverage, hit);
            let curve = CURVE.iter().map(|&f| lesion_coverage(ranked, grid, m, h, w, top_patches(grid, f)).0).collect();
            out.lesions.push(LesionImage { row: r, coverage, curve });
        }
        if let Some(k) = show.iter().position(|&x| x == r) {
            let chw = &batch.images[i * ch * h * w..(i + 1) * ch * h * w];
            let img = figures::denormalize(chw, ch, h, w, normalizer);
            let fig = figures::overlay(&img, ranked, grid, lesion.map(Vec::as_slice), 4);
            let path = ctx.output_path(&format!("overlays/{k:03}_{}.png", sanitize(&table.rows[r].id)))?;
            fig.save(&path).map_err(|e| StageError::write(&path, e))?;
        }
        if let (Some(all), Some(m)) = (out.smoothed.as_mut(), smoothed) {
            all.insert(r, m);
        }
        Ok(())
    })?;
    out.raw = raw;
    Ok(out)
}

/// `summary.json` of `attention/extract`: every figure the stage's metric pointers name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExtractSummary {
    /// The map method (`cls`, `rollout`, `gradient`).
    pub method: String,
    /// The smoothing applied before ranking (absent: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smooth: Option<Smoothing>,
    /// Images whose maps were extracted.
    pub images: usize,
    pub grid: [usize; 2],
    /// Digest of the model artifact read.
    pub model: String,
    pub top_fraction: f64,
    pub top_patches: usize,
    pub images_with_lesion: usize,
    /// Mean fraction of lesion pixels inside the top-attention patches (none without lesions).
    pub lesion_coverage: Option<f64>,
    /// Fraction of lesions whose most-covered patch is a top-attention patch.
    pub lesion_hit_rate: Option<f64>,
    pub per_split: std::collections::BTreeMap<String, SplitCoverage>,
    pub coverage_curve: Vec<CurvePoint>,
    /// The same over the images with a lesion that the model classifies right / wrong
    /// (classifier checkpoints of single-label tables only).
    pub by_prediction: Option<ByPrediction>,
    pub note: String,
}

/// Coverage over one split's images with a lesion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitCoverage {
    pub images: usize,
    pub lesion_coverage: f64,
}

/// Mean coverage at one top fraction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CurvePoint {
    pub top_fraction: f64,
    pub lesion_coverage: f64,
}

/// Coverage over the images a classifier gets right, and over those it gets wrong.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ByPrediction {
    pub correct: PredictionCoverage,
    pub wrong: PredictionCoverage,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PredictionCoverage {
    pub images: usize,
    pub lesion_coverage: f64,
    pub curve: Vec<CurvePoint>,
}

/// The mean curve of `images` (zeros for none).
fn mean_curve(images: &[&LesionImage]) -> Vec<CurvePoint> {
    CURVE
        .iter()
        .enumerate()
        .map(|(k, &f)| CurvePoint {
            top_fraction: f,
            lesion_coverage: images.iter().map(|l| l.curve[k]).sum::<f64>() / images.len().max(1) as f64,
        })
        .collect()
}

impl ByPrediction {
    fn split(lesions: &[LesionImage], right: &[bool]) -> Self {
        let part = |want: bool| {
            let part: Vec<&LesionImage> =
                lesions.iter().zip(right).filter(|(_, ok)| **ok == want).map(|(l, _)| l).collect();
            PredictionCoverage {
                images: part.len(),
                lesion_coverage: part.iter().map(|l| l.coverage).sum::<f64>() / part.len().max(1) as f64,
                curve: mean_curve(&part),
            }
        };
        Self { correct: part(true), wrong: part(false) }
    }
}

impl ExtractSummary {
    fn new(
        c: &ExtractConfig,
        pass: &ExtractPass,
        grid: [usize; 2],
        model: &str,
        by_prediction: Option<ByPrediction>,
    ) -> Self {
        let n = pass.coverage.images;
        let mean = |x: f64| (n > 0).then(|| x / n as f64);
        let all: Vec<&LesionImage> = pass.lesions.iter().collect();
        Self {
            method: c.method.as_str().to_string(),
            smooth: c.smooth,
            images: pass.raw.len(),
            grid,
            model: model.to_string(),
            top_fraction: c.top_fraction,
            top_patches: top_patches(grid, c.top_fraction),
            images_with_lesion: n,
            lesion_coverage: mean(pass.coverage.sum),
            lesion_hit_rate: mean(pass.coverage.hits as f64),
            per_split: pass.coverage.per_split(),
            coverage_curve: mean_curve(&all),
            by_prediction,
            note: "lesion_coverage: mean fraction of lesion pixels inside the top-attention patches (a uniform map gives top_fraction); lesion_hit_rate: fraction of lesions whose most-covered patch is a top-attention patch; coverage_curve: the coverage at other top fractions; by_prediction: the same over the images with a lesion that the model classifies right / wrong; with `smooth`, all of them for the smoothed map".into(),
        }
    }
}

/// The top fractions of the coverage curve (`summary.json` → `coverage_curve`).
pub const CURVE: [f64; 8] = [0.05, 0.10, 0.15, 0.25, 0.35, 0.50, 0.75, 1.0];

/// Lesion coverage summed over the images that have a lesion, overall and per split.
#[derive(Debug, Default)]
struct Coverage {
    sum: f64,
    hits: usize,
    images: usize,
    by_split: std::collections::BTreeMap<&'static str, (f64, usize)>,
}

impl Coverage {
    fn add(&mut self, split: &'static str, coverage: f64, hit: bool) {
        self.sum += coverage;
        self.hits += usize::from(hit);
        self.images += 1;
        let e = self.by_split.entry(split).or_default();
        e.0 += coverage;
        e.1 += 1;
    }

    fn per_split(&self) -> std::collections::BTreeMap<String, SplitCoverage> {
        self.by_split
            .iter()
            .map(|(k, (s, n))| (k.to_string(), SplitCoverage { images: *n, lesion_coverage: s / *n as f64 }))
            .collect()
    }
}

fn sanitize(id: &str) -> String {
    id.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).take(60).collect()
}

/// Fraction of lesion pixels inside the `top` highest-weight patches, and whether the
/// patch holding most lesion pixels is among them.
pub fn lesion_coverage(map: &[f32], grid: [usize; 2], lesion: &[u8], h: usize, w: usize, top: usize) -> (f64, bool) {
    let mut order: Vec<usize> = (0..map.len()).collect();
    order.sort_by(|&a, &b| map[b].total_cmp(&map[a]).then(a.cmp(&b)));
    let mut is_top = vec![false; map.len()];
    for &i in order.iter().take(top) {
        is_top[i] = true;
    }
    let mut per_patch = vec![0usize; map.len()];
    let (ph, pw) = (h / grid[0], w / grid[1]);
    for y in 0..h {
        for x in 0..w {
            if lesion[y * w + x] > 0 {
                let cell = (y / ph).min(grid[0] - 1) * grid[1] + (x / pw).min(grid[1] - 1);
                per_patch[cell] += 1;
            }
        }
    }
    let total: usize = per_patch.iter().sum();
    let inside: usize = per_patch.iter().zip(&is_top).filter(|(_, t)| **t).map(|(n, _)| n).sum();
    let peak =
        per_patch.iter().enumerate().max_by_key(|(i, n)| (**n, std::cmp::Reverse(*i))).map(|(i, _)| i).unwrap_or(0);
    (if total > 0 { inside as f64 / total as f64 } else { 0.0 }, is_top[peak])
}

/// Every stage kind of this crate.
pub fn register(r: &mut msmae_core::Registry) {
    r.register(TrainSupervised).register(AttentionExtract);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coverage_counts_lesion_pixels_inside_the_top_patches() {
        // 8×8 image on a 2×2 grid; a lesion of 6 pixels in patch 0 and 2 in patch 3.
        let mut lesion = vec![0u8; 64];
        for (y, x) in [(0, 0), (0, 1), (1, 0), (1, 1), (2, 2), (3, 3), (7, 7), (6, 6)] {
            lesion[y * 8 + x] = 1;
        }
        let on_lesion = [0.9, 0.1, 0.2, 0.3];
        assert_eq!(lesion_coverage(&on_lesion, [2, 2], &lesion, 8, 8, 1), (0.75, true));
        assert_eq!(lesion_coverage(&on_lesion, [2, 2], &lesion, 8, 8, 2), (1.0, true));
        let elsewhere = [0.1, 0.9, 0.8, 0.2];
        assert_eq!(lesion_coverage(&elsewhere, [2, 2], &lesion, 8, 8, 2), (0.0, false));
        assert_eq!(lesion_coverage(&elsewhere, [2, 2], &[0; 64], 8, 8, 2), (0.0, false), "no lesion: nothing covered");
    }

    #[test]
    fn coverage_summaries_average_per_split() {
        let mut c = Coverage::default();
        c.add("test", 0.5, true);
        c.add("test", 1.0, false);
        c.add("val", 0.25, true);
        assert_eq!((c.images, c.hits), (3, 2));
        let s = c.per_split();
        assert_eq!(s["test"].lesion_coverage, 0.75);
        assert_eq!(s["val"].images, 1);
    }
}
