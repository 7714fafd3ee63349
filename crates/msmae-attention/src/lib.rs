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
use msmae_train::data::LoaderSpec;
use msmae_train::figures;
use msmae_train::maps::{attention_pass, write_maps};
use msmae_train::model;
use msmae_train::runtime;
use msmae_train::support::{check_image_compat, config_error, defaults, open_table, write_json};
use msmae_vit::attention_map::MapMethod;

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
    const SUMMARY: &'static str = "CLS-attention maps of every image from a ViT or MAE checkpoint → Parquet, overlays, lesion coverage";
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
        Ok(())
    }
    fn inputs(&self, _: &ExtractConfig) -> Vec<InputSlot> {
        vec![
            InputSlot::one("model", "vit-checkpoint", "the model whose attention is read").or_kind("mae-checkpoint"),
            InputSlot::one("data", "image-table", "the images"),
        ]
    }
    fn output(&self, _: &ExtractConfig) -> OutputDecl {
        OutputDecl::new("attention-maps", &["attention.parquet", "summary.json", "overlays/*.png"])
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
        // One pass: maps, lesion coverage and overlays from the same batches.
        let mut show: Vec<usize> = table.rows_of(Split::Test).into_iter().filter(|r| rows.binary_search(r).is_ok()).collect();
        if show.is_empty() {
            show = rows.clone();
        }
        show.truncate(c.overlays);
        let mut spec = LoaderSpec::eval(c.batch_size);
        spec.lesion_masks = true;
        let (h, w, ch) = (table.height(), table.width(), table.channels());
        let top = ((grid[0] * grid[1]) as f64 * c.top_fraction).round().max(1.0) as usize;
        let mut coverage = Coverage::default();
        // per image with a lesion: (row, coverage at `top`, coverage at each CURVE fraction)
        let mut curve: Vec<(usize, f64, Vec<f64>)> = Vec::new();
        let patches = grid[0] * grid[1];
        let maps = attention_pass(&vit, &table, &rows, &meta.normalizer, spec, c.method, &rt, ctx, |batch, i, map| {
            let r = batch.rows[i];
            let lesion = batch.lesions.get(i).and_then(Option::as_ref);
            if let Some(m) = lesion.filter(|m| m.iter().any(|&v| v > 0)) {
                let (cov, hit) = lesion_coverage(map, grid, m, h, w, top);
                coverage.add(table.rows[r].split.as_str(), cov, hit);
                let at = |f: f64| lesion_coverage(map, grid, m, h, w, ((patches as f64 * f).round() as usize).max(1)).0;
                curve.push((r, cov, CURVE.iter().map(|&f| at(f)).collect()));
            }
            if let Some(k) = show.iter().position(|&x| x == r) {
                let chw = &batch.images[i * ch * h * w..(i + 1) * ch * h * w];
                let img = figures::denormalize(chw, ch, h, w, &meta.normalizer);
                let fig = figures::overlay(&img, map, grid, lesion.map(Vec::as_slice), 4);
                let path = ctx.output_path(&format!("overlays/{k:03}_{}.png", sanitize(&table.rows[r].id)))?;
                fig.save(&path).map_err(|e| StageError::other(format!("writing {}: {e}", path.display())))?;
            }
            Ok(())
        })?;
        let provenance =
            serde_json::json!({ "stage": Self::KIND, "name": ctx.name, "model": input.digest, "model_stage": input.stage, "trained_by": meta.trained_by });
        write_maps(&ctx.output_path("attention.parquet")?, &table, &maps, grid, provenance)?;
        let n = coverage.images;
        let mean = |x: f64| if n > 0 { serde_json::json!(x / n as f64) } else { serde_json::Value::Null };
        let curve_json = |of: &[&Vec<f64>]| -> serde_json::Value {
            CURVE
                .iter()
                .enumerate()
                .map(|(k, f)| serde_json::json!({ "top_fraction": f, "lesion_coverage": of.iter().map(|v| v[k]).sum::<f64>() / of.len().max(1) as f64 }))
                .collect()
        };
        let all: Vec<&Vec<f64>> = curve.iter().map(|(_, _, v)| v).collect();
        // Coverage where the model classifies the image right and where it does not: how
        // much of the miss is the classifier's (a model that has not found the lesion
        // cannot point at it).
        let by_prediction = if vit.head.is_some() && !table.meta.multi_label && !curve.is_empty() {
            let lesion_rows: Vec<usize> = curve.iter().map(|(r, _, _)| *r).collect();
            let (scores, _) = predict(&vit, &table, &lesion_rows, &meta.normalizer, c.batch_size, &rt, ctx)?;
            let right: Vec<bool> = lesion_rows
                .iter()
                .zip(&scores)
                .map(|(r, s)| {
                    let arg = s.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(k, _)| k as i64).unwrap_or(-1);
                    table.rows[*r].label.map(i64::from) == Some(arg)
                })
                .collect();
            let part = |want: bool| -> serde_json::Value {
                let part: Vec<&(usize, f64, Vec<f64>)> = curve.iter().zip(&right).filter(|(_, ok)| **ok == want).map(|(x, _)| x).collect();
                let v: Vec<&Vec<f64>> = part.iter().map(|(_, _, v)| v).collect();
                serde_json::json!({
                    "images": part.len(),
                    "lesion_coverage": part.iter().map(|(_, cov, _)| cov).sum::<f64>() / part.len().max(1) as f64,
                    "curve": curve_json(&v),
                })
            };
            serde_json::json!({ "correct": part(true), "wrong": part(false) })
        } else {
            serde_json::Value::Null
        };
        let summary = serde_json::json!({
            "method": c.method.as_str(),
            "images": maps.len(),
            "grid": grid,
            "model": input.digest,
            "top_fraction": c.top_fraction,
            "top_patches": top,
            "images_with_lesion": n,
            "lesion_coverage": mean(coverage.sum),
            "lesion_hit_rate": mean(coverage.hits as f64),
            "per_split": coverage.per_split(),
            "coverage_curve": curve_json(&all),
            "by_prediction": by_prediction,
            "note": "lesion_coverage: mean fraction of lesion pixels inside the top-attention patches (a uniform map gives top_fraction); lesion_hit_rate: fraction of lesions whose most-covered patch is a top-attention patch; coverage_curve: the coverage at other top fractions; by_prediction: the same over the images with a lesion that the model classifies right / wrong",
        });
        if n > 0 {
            tracing::info!(
                "`{}` ({}): top {:.0} % attention patches cover {:.1} % of lesion pixels ({n} images with lesions; uniform attention would cover {:.0} %)",
                ctx.name,
                c.method.as_str(),
                c.top_fraction * 100.0,
                100.0 * coverage.sum / n as f64,
                c.top_fraction * 100.0
            );
        }
        write_json(ctx, "summary.json", &summary)
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

    fn per_split(&self) -> serde_json::Map<String, serde_json::Value> {
        self.by_split.iter().map(|(k, (s, n))| (k.to_string(), serde_json::json!({ "images": n, "lesion_coverage": s / *n as f64 }))).collect()
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
    let peak = per_patch.iter().enumerate().max_by_key(|(i, n)| (**n, std::cmp::Reverse(*i))).map(|(i, _)| i).unwrap_or(0);
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
        let s = serde_json::Value::Object(c.per_split());
        assert_eq!(s["test"]["lesion_coverage"], 0.75);
        assert_eq!(s["val"]["images"], 1);
    }
}
