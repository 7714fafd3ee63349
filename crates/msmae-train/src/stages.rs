//! The training stage kinds: `attention/train-supervised`, `attention/extract`,
//! `mae/pretrain`, `finetune/msmae` and `finetune/full`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use burn::module::Module;
use serde::{Deserialize, Serialize};

use msmae_core::{ConfigError, InputArtifact, InputSlot, OutputDecl, Resources, Stage, StageContext, StageError};
use msmae_data::predictions::{PREDICTIONS_SCHEMA_VERSION, PredictionMeta, PredictionRow, write_predictions};
use msmae_data::table::Split;
use msmae_mask::MaskPolicy;
use msmae_vit::VisionTransformer;

use crate::data::{ImageTable, LoaderSpec, Normalizer};
use crate::figures;
use crate::model::{self, CheckpointKind, CheckpointMeta, Loaded, ModelSpec};
use crate::train::{self, ClassifierOpts, EpochLog, PretrainOpts, Runtime};

const TABLE: &str = "images.parquet";

pub(crate) fn err(path: &str, message: impl Into<String>) -> Result<(), ConfigError> {
    Err(ConfigError { path: path.into(), message: message.into() })
}

fn open_table(ctx: &StageContext<'_>, slot: &str) -> Result<Arc<ImageTable>, StageError> {
    Ok(Arc::new(ImageTable::open(&ctx.input(slot)?.path(TABLE))?))
}

/// Write `v` as pretty JSON to the declared output file `rel`.
pub fn write_json(ctx: &StageContext<'_>, rel: &str, v: &impl Serialize) -> Result<(), StageError> {
    let p = ctx.output_path(rel)?;
    let bytes = serde_json::to_vec_pretty(v).map_err(|e| StageError::other(e.to_string()))?;
    std::fs::write(&p, bytes).map_err(|e| StageError::io(&p, e))
}

/// `history.json` without wall times (timing is not content: two identical runs must
/// produce identical artifacts); the times are in the log and the lock file's run time.
fn write_history(ctx: &StageContext<'_>, history: &[EpochLog], extra: serde_json::Value) -> Result<(), StageError> {
    let epochs: Vec<serde_json::Value> = history
        .iter()
        .map(|h| {
            let mut v = serde_json::to_value(h).unwrap_or_default();
            if let Some(o) = v.as_object_mut() {
                o.remove("seconds");
            }
            v
        })
        .collect();
    write_json(ctx, "history.json", &serde_json::json!({ "epochs": epochs, "summary": extra }))?;
    loss_chart(ctx, history)
}

/// `loss.png`: training loss (and reconstruction / validation loss where logged) per epoch.
fn loss_chart(ctx: &StageContext<'_>, history: &[EpochLog]) -> Result<(), StageError> {
    use msmae_eval::plot::{Series, line_chart};
    let x = |h: &EpochLog| (h.epoch + 1) as f64;
    let mut series = vec![Series::new("train loss", history.iter().map(|h| (x(h), h.train_loss)).collect())];
    let rec: Vec<(f64, f64)> = history.iter().filter_map(|h| h.reconstruction_loss.map(|v| (x(h), v))).collect();
    if !rec.is_empty() && history.iter().any(|h| h.reconstruction_loss != Some(h.train_loss)) {
        series.push(Series::new("reconstruction", rec));
    }
    let val: Vec<(f64, f64)> = history.iter().filter_map(|h| h.val_loss.map(|v| (x(h), v))).collect();
    if !val.is_empty() {
        series.push(Series::new("validation loss", val));
    }
    let acc: Vec<(f64, f64)> = history.iter().filter_map(|h| h.val_accuracy.map(|v| (x(h), v))).collect();
    line_chart(&ctx.output_path("loss.png")?, &format!("{}: loss per epoch", ctx.name), "epoch", "loss", &series)?;
    if !acc.is_empty() {
        line_chart(&ctx.output_path("accuracy.png")?, &format!("{}: validation accuracy", ctx.name), "epoch", "accuracy", &[Series::new("validation accuracy", acc)])?;
    }
    Ok(())
}

fn check_image_compat(meta: &CheckpointMeta, table: &ImageTable, what: &Path) -> Result<(), StageError> {
    let n = &meta.normalizer;
    if n.mean.len() != meta.vit.in_chans || n.std.len() != meta.vit.in_chans || n.std.iter().any(|s| !(*s > 0.0)) {
        return Err(StageError::data(what, None, format!("normalizer for {} channels with positive std expected, found mean {:?} std {:?}", meta.vit.in_chans, n.mean, n.std)));
    }
    let want = [table.height(), table.width()];
    if meta.vit.image_size != want || meta.vit.in_chans != table.channels() {
        return Err(StageError::data(
            what,
            None,
            format!(
                "model expects {}×{} images with {} channels, the image table {} holds {}×{}×{}",
                meta.vit.image_size[0],
                meta.vit.image_size[1],
                meta.vit.in_chans,
                table.path.display(),
                want[0],
                want[1],
                table.channels()
            ),
        ));
    }
    Ok(())
}

/// Scores of the val and test images with `vit`, as a predictions table.
fn write_preds(ctx: &StageContext<'_>, rt: &Runtime, table: &Arc<ImageTable>, vit: &VisionTransformer, norm: &Normalizer, batch: usize, provenance: serde_json::Value) -> Result<(), StageError> {
    let mut rows = table.rows_of(Split::Val);
    rows.extend(table.rows_of(Split::Test));
    let (scores, _) = train::predict(vit, table, &rows, norm, batch, rt, ctx)?;
    let out: Vec<PredictionRow> = rows
        .iter()
        .zip(scores)
        .map(|(&r, s)| {
            let row = &table.rows[r];
            PredictionRow { id: row.id.clone(), split: row.split, label: row.label, labels: row.labels.clone(), scores: s }
        })
        .collect();
    let meta = PredictionMeta { schema_version: PREDICTIONS_SCHEMA_VERSION, label_names: table.meta.label_names.clone(), multi_label: table.meta.multi_label, provenance };
    write_predictions(&ctx.output_path("predictions.parquet")?, &meta, &out).map_err(|e| StageError::other(e.to_string()))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Classifier stages.

fn d_epochs() -> usize {
    30
}
fn d_batch() -> usize {
    64
}
fn d_blr() -> f64 {
    1e-3
}
fn d_min_lr() -> f64 {
    1e-6
}
fn d_warmup() -> f64 {
    5.0
}
fn d_wd() -> f64 {
    0.05
}
fn d_smoothing() -> f64 {
    0.1
}
fn d_drop_path() -> f64 {
    0.1
}
fn d_true() -> bool {
    true
}
fn d_scale() -> [f64; 2] {
    [0.2, 1.0]
}
fn d_ckpt() -> usize {
    5
}

/// `with:` of the classifier stages (`attention/train-supervised`, `finetune/full`,
/// `finetune/msmae`). Fields that do not apply to a kind are rejected by its validation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifierConfig {
    /// Architecture when training from scratch (ignored with a `pretrained` input, whose
    /// architecture is used).
    #[serde(default)]
    pub model: ModelSpec,
    #[serde(default = "d_epochs")]
    pub epochs: usize,
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    /// Base learning rate: lr = blr · batch_size / 256.
    #[serde(default = "d_blr")]
    pub blr: f64,
    #[serde(default = "d_min_lr")]
    pub min_lr: f64,
    #[serde(default = "d_warmup")]
    pub warmup_epochs: f64,
    #[serde(default = "d_wd")]
    pub weight_decay: f64,
    /// Layer-wise lr decay (fine-tuning: 0.75; 1 = none).
    #[serde(default)]
    pub layer_decay: Option<f64>,
    #[serde(default = "d_smoothing")]
    pub label_smoothing: f64,
    #[serde(default = "d_drop_path")]
    pub drop_path: f64,
    /// RandomResizedCrop + flip.
    #[serde(default = "d_true")]
    pub augment: bool,
    #[serde(default = "d_scale")]
    pub crop_scale: [f64; 2],
    /// Early stopping: epochs without a better validation score.
    #[serde(default)]
    pub patience: Option<usize>,
    /// The validation score that picks the best epoch: `auto` (accuracy; mean per-label
    /// AUC for multi-label data), `accuracy`, `loss` or `auc`.
    #[serde(default)]
    pub select_on: train::SelectOn,
    #[serde(default = "d_ckpt")]
    pub checkpoint_every: usize,
    /// `finetune/msmae` only (default 0.45).
    #[serde(default)]
    pub mask_ratio: Option<f64>,
    /// `finetune/msmae` only (default 0.30).
    #[serde(default)]
    pub throw_ratio: Option<f64>,
    /// `finetune/msmae` only: recompute the maps from the fine-tuning model every this many
    /// epochs, from epoch 0 (default 20; 0 = only at the start).
    #[serde(default)]
    pub refresh_every: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClassifierKind {
    Supervised,
    Full,
    Msmae,
}

/// Checks every training stage shares: epochs, batch, learning rates, warm-up, crop.
fn validate_schedule(epochs: usize, batch_size: usize, blr: f64, min_lr: f64, warmup_epochs: f64, crop_scale: [f64; 2]) -> Result<(), ConfigError> {
    if epochs == 0 {
        return err("epochs", "must be at least 1");
    }
    if batch_size == 0 {
        return err("batch_size", "must be at least 1");
    }
    if !(blr > 0.0 && blr.is_finite()) {
        return err("blr", "must be positive");
    }
    if min_lr < 0.0 || min_lr > blr * batch_size as f64 / 256.0 {
        return err("min_lr", "must be between 0 and the peak lr (blr · batch_size / 256)");
    }
    if warmup_epochs < 0.0 || warmup_epochs > epochs as f64 {
        return err("warmup_epochs", "must be between 0 and epochs");
    }
    if !(crop_scale[0] > 0.0 && crop_scale[0] <= crop_scale[1] && crop_scale[1] <= 1.0) {
        return err("crop_scale", "must be [min, max] with 0 < min ≤ max ≤ 1");
    }
    Ok(())
}

fn validate_classifier(c: &ClassifierConfig, kind: ClassifierKind) -> Result<(), ConfigError> {
    validate_schedule(c.epochs, c.batch_size, c.blr, c.min_lr, c.warmup_epochs, c.crop_scale)?;
    if !(0.0..1.0).contains(&c.label_smoothing) {
        return err("label_smoothing", "must be in [0, 1)");
    }
    if !(0.0..1.0).contains(&c.drop_path) {
        return err("drop_path", "must be in [0, 1)");
    }
    if let Some(d) = c.layer_decay {
        if !(d > 0.0 && d <= 1.0) {
            return err("layer_decay", "must be in (0, 1]");
        }
    }
    if kind != ClassifierKind::Msmae {
        for (name, set) in [("mask_ratio", c.mask_ratio.is_some()), ("throw_ratio", c.throw_ratio.is_some()), ("refresh_every", c.refresh_every.is_some())] {
            if set {
                return err(name, "only `finetune/msmae` masks tokens; use that kind");
            }
        }
    } else if let Err(m) = msmae_policy(c).check() {
        return err("mask_ratio", m);
    }
    Ok(())
}

fn msmae_policy(c: &ClassifierConfig) -> MaskPolicy {
    MaskPolicy::Msmae { mask_ratio: c.mask_ratio.unwrap_or(0.45), throw_ratio: c.throw_ratio.unwrap_or(0.30) }
}

fn classifier_output() -> OutputDecl {
    OutputDecl::new("vit-checkpoint", &["model.safetensors", "model.json", "history.json", "predictions.parquet", "*.png"])
}

fn run_classifier(kind: ClassifierKind, stage_kind: &str, c: &ClassifierConfig, ctx: &mut StageContext<'_>) -> Result<(), StageError> {
    let rt = train::runtime(ctx)?;
    let table = open_table(ctx, "data")?;
    let k = table.num_classes();
    if k < 2 {
        return Err(StageError::data(&table.path, None, format!("{k} classes: a classifier needs at least 2")));
    }
    train::seed_backend(&rt, ctx.seed, "init", 0);
    let pretrained = ctx.inputs("pretrained").first().cloned();
    let (model, norm, arch) = match &pretrained {
        Some(p) => from_pretrained(p, &table, c, &rt)?,
        None => {
            let spec_check = c.model.check([table.height(), table.width()], table.channels());
            if let Err(m) = spec_check {
                return Err(StageError::other(format!("model: {m}")));
            }
            let cfg = c.model.vit([table.height(), table.width()], table.channels()).with_num_classes(k).with_drop_path(c.drop_path).with_global_pool(kind != ClassifierKind::Supervised);
            let norm = table.channel_stats(&table.rows_of(Split::Train))?;
            let m = cfg.init(&rt.train);
            (m, norm, cfg)
        }
    };
    train::materialise(&model);
    let layer_decay = c.layer_decay.unwrap_or(if pretrained.is_some() { 0.75 } else { 1.0 });
    let opts = ClassifierOpts {
        epochs: c.epochs,
        batch_size: c.batch_size,
        lr: c.blr * c.batch_size as f64 / 256.0,
        min_lr: c.min_lr,
        warmup_epochs: c.warmup_epochs,
        weight_decay: c.weight_decay,
        layer_decay,
        label_smoothing: if table.meta.multi_label { 0.0 } else { c.label_smoothing },
        augment: c.augment.then_some((c.crop_scale[0], c.crop_scale[1])),
        msmae: (kind == ClassifierKind::Msmae).then(|| (msmae_policy(c), c.refresh_every.unwrap_or(20))),
        patience: c.patience,
        select_on: c.select_on,
        checkpoint_every: c.checkpoint_every,
    };
    let res = train::train_classifier(ctx, &rt, &table, &norm, model, &opts)?;
    let meta = CheckpointMeta { format: 1, kind: CheckpointKind::Vit, vit: arch, mae: None, normalizer: norm.clone(), label_names: table.meta.label_names.clone(), multi_label: table.meta.multi_label, trained_by: stage_kind.to_string() };
    model::save(ctx.out_dir(), &res.model, &meta)?;
    let provenance = serde_json::json!({ "stage": stage_kind, "name": ctx.name, "seed": ctx.seed, "pretrained": pretrained.as_ref().map(|p| &p.digest), "best_epoch": res.best_epoch });
    write_preds(ctx, &rt, &table, &res.model, &norm, c.batch_size.max(64), provenance)?;
    let train_seconds: f64 = res.history.iter().map(|h| h.seconds).sum();
    tracing::info!("`{}`: {} epochs, {:.1} s of training steps ({:.2} s/epoch), {} tokens per sample", ctx.name, res.history.len(), train_seconds, train_seconds / res.history.len().max(1) as f64, res.history.last().map(|h| h.tokens).unwrap_or(0));
    write_history(ctx, &res.history, serde_json::json!({ "best_epoch": res.best_epoch, "layer_decay": layer_decay, "lr": opts.lr }))?;
    Ok(())
}

/// A classifier initialised from a pre-trained encoder (MAE or ViT checkpoint): patch
/// embedding, CLS token and blocks are taken over; `fc_norm` and the head are new.
fn from_pretrained(p: &InputArtifact, table: &ImageTable, c: &ClassifierConfig, rt: &Runtime) -> Result<(VisionTransformer, Normalizer, msmae_vit::VitConfig), StageError> {
    let (loaded, meta) = model::load(&p.dir, &rt.train)?;
    check_image_compat(&meta, table, &p.dir.join(model::META_FILE))?;
    let enc = loaded.into_encoder();
    let cfg = msmae_vit::VitConfig { num_classes: table.num_classes(), drop_path: c.drop_path, global_pool: true, ..meta.vit.clone() };
    let mut vit = cfg.init(&rt.train);
    let depth = enc.blocks.len();
    vit.patch_embed = enc.patch_embed;
    vit.cls_token = enc.cls_token;
    vit.norm = enc.norm;
    vit.blocks = enc
        .blocks
        .into_iter()
        .enumerate()
        .map(|(i, mut b)| {
            b.drop_path = if depth > 1 { c.drop_path * i as f64 / (depth - 1) as f64 } else { c.drop_path };
            b
        })
        .collect();
    Ok((vit, meta.normalizer, cfg))
}

macro_rules! classifier_stage {
    ($name:ident, $kind:expr, $ck:expr, $summary:expr, $pretrained:expr) => {
        #[doc = $summary]
        #[derive(Debug, Default, Clone, Copy)]
        pub struct $name;

        impl Stage for $name {
            type Config = ClassifierConfig;
            const KIND: &'static str = $kind;
            const VERSION: u32 = 1;
            const SUMMARY: &'static str = $summary;
            const USES_BACKEND: bool = true;
            const RUN_ONLY: &'static [&'static str] = &["checkpoint_every"];

            fn code_fingerprint(&self) -> &'static str {
                msmae_core::code_fingerprint!()
            }
            fn validate(&self, c: &ClassifierConfig) -> Result<(), ConfigError> {
                validate_classifier(c, $ck)
            }
            fn inputs(&self, _: &ClassifierConfig) -> Vec<InputSlot> {
                let mut v = vec![InputSlot::one("data", "image-table", "the image table to train and validate on")];
                if $pretrained {
                    v.push(InputSlot::optional("pretrained", "mae-checkpoint", "pre-trained encoder (none: from scratch)").or_kind("vit-checkpoint"));
                }
                v
            }
            fn output(&self, _: &ClassifierConfig) -> OutputDecl {
                classifier_output()
            }
            fn resources(&self, _: &ClassifierConfig) -> Resources {
                Resources::Exclusive
            }
            fn run(&self, c: &ClassifierConfig, ctx: &mut StageContext<'_>) -> Result<(), StageError> {
                run_classifier($ck, $kind, c, ctx)
            }
        }
    };
}

classifier_stage!(TrainSupervised, "attention/train-supervised", ClassifierKind::Supervised, "label-supervised ViT (CLS head) whose attention guides MSMAE masking", false);
classifier_stage!(FinetuneFull, "finetune/full", ClassifierKind::Full, "MAE-style fine-tuning on all tokens (baseline), optionally from a pre-trained encoder", true);
classifier_stage!(FinetuneMsmae, "finetune/msmae", ClassifierKind::Msmae, "MSMAE fine-tuning: attention-guided masking keeps 25 % of the tokens, maps refreshed from the model", true);

// ---------------------------------------------------------------------------------------
// attention/extract

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
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    /// Overlay PNGs of the first images of the test split (of the chosen split otherwise).
    #[serde(default = "d_overlays")]
    pub overlays: usize,
    /// Fraction of patches counted as "top attention" in the lesion-coverage summary.
    #[serde(default = "d_top")]
    pub top_fraction: f64,
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
            return err("batch_size", "must be at least 1");
        }
        if !(c.top_fraction > 0.0 && c.top_fraction <= 1.0) {
            return err("top_fraction", "must be in (0, 1]");
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
    }
    fn resources(&self, _: &ExtractConfig) -> Resources {
        Resources::Exclusive
    }
    fn run(&self, c: &ExtractConfig, ctx: &mut StageContext<'_>) -> Result<(), StageError> {
        let rt = train::runtime(ctx)?;
        let table = open_table(ctx, "data")?;
        let input = ctx.input("model")?.clone();
        let (loaded, meta) = model::load(&input.dir, &rt.device)?;
        check_image_compat(&meta, &table, &input.dir.join(model::META_FILE))?;
        let vit = loaded.into_encoder();
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
        let (mut cov_sum, mut hits, mut with_lesion) = (0f64, 0usize, 0usize);
        let mut by_split: std::collections::BTreeMap<&'static str, (f64, usize)> = Default::default();
        let maps = train::attention_pass(&vit, &table, &rows, &meta.normalizer, spec, &rt, ctx, |batch, i, map| {
            let r = batch.rows[i];
            let lesion = batch.lesions.get(i).and_then(Option::as_ref);
            if let Some(m) = lesion.filter(|m| m.iter().any(|&v| v > 0)) {
                let (cov, hit) = lesion_coverage(map, grid, m, h, w, top);
                cov_sum += cov;
                hits += usize::from(hit);
                with_lesion += 1;
                let e = by_split.entry(table.rows[r].split.as_str()).or_default();
                e.0 += cov;
                e.1 += 1;
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
        let provenance = serde_json::json!({ "stage": Self::KIND, "name": ctx.name, "model": input.digest, "model_stage": input.stage, "trained_by": meta.trained_by });
        train::write_maps(&ctx.output_path("attention.parquet")?, &table, &maps, grid, provenance)?;
        let per_split: serde_json::Map<String, serde_json::Value> = by_split.iter().map(|(k, (s, n))| (k.to_string(), serde_json::json!({ "images": n, "lesion_coverage": s / *n as f64 }))).collect();
        let summary = serde_json::json!({
            "images": maps.len(),
            "grid": grid,
            "model": input.digest,
            "top_fraction": c.top_fraction,
            "top_patches": top,
            "images_with_lesion": with_lesion,
            "lesion_coverage": if with_lesion > 0 { serde_json::json!(cov_sum / with_lesion as f64) } else { serde_json::Value::Null },
            "lesion_hit_rate": if with_lesion > 0 { serde_json::json!(hits as f64 / with_lesion as f64) } else { serde_json::Value::Null },
            "per_split": per_split,
            "note": "lesion_coverage: mean fraction of lesion pixels inside the top-attention patches (a uniform map gives top_fraction); lesion_hit_rate: fraction of lesions whose most-covered patch is a top-attention patch",
        });
        if with_lesion > 0 {
            tracing::info!("`{}`: top {:.0} % attention patches cover {:.1} % of lesion pixels ({} images with lesions; uniform attention would cover {:.0} %)", ctx.name, c.top_fraction * 100.0, 100.0 * cov_sum / with_lesion as f64, with_lesion, c.top_fraction * 100.0);
        }
        write_json(ctx, "summary.json", &summary)
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

// ---------------------------------------------------------------------------------------
// mae/pretrain

fn d_pt_epochs() -> usize {
    40
}
fn d_mask_ratio() -> f64 {
    0.75
}
fn d_warm_mask() -> usize {
    10
}
fn d_cls_weight() -> f64 {
    0.1
}
fn d_pt_min_lr() -> f64 {
    0.0
}
fn d_figures() -> usize {
    8
}

/// `with:` of `mae/pretrain`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PretrainConfig {
    #[serde(default)]
    pub model: ModelSpec,
    #[serde(default = "d_pt_epochs")]
    pub epochs: usize,
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    /// lr = blr · batch_size / 256 (METHOD.md §4: 1e-3).
    #[serde(default = "d_blr")]
    pub blr: f64,
    #[serde(default = "d_pt_min_lr")]
    pub min_lr: f64,
    #[serde(default = "d_warmup")]
    pub warmup_epochs: f64,
    #[serde(default = "d_wd")]
    pub weight_decay: f64,
    /// MAE random masking ratio: the warm-up phase, or the whole run without `masks`.
    #[serde(default = "d_mask_ratio")]
    pub mask_ratio: f64,
    /// Epochs of random masking before attention-guided masking (with `masks`).
    #[serde(default = "d_warm_mask")]
    pub warmup_mask_epochs: usize,
    /// Recompute the maps from the model being trained every this many epochs after the
    /// warm-up (0: keep the input maps).
    #[serde(default)]
    pub refresh_every: usize,
    /// Weight of the CLS-head cross-entropy (the supervision; 0 = plain MAE).
    #[serde(default = "d_cls_weight")]
    pub cls_weight: f64,
    #[serde(default)]
    pub norm_pix_loss: bool,
    #[serde(default = "d_true")]
    pub augment: bool,
    #[serde(default = "d_scale")]
    pub crop_scale: [f64; 2],
    #[serde(default = "d_ckpt")]
    pub checkpoint_every: usize,
    /// Validation images in `reconstructions.png`.
    #[serde(default = "d_figures")]
    pub figure_images: usize,
}

/// `mae/pretrain`.
#[derive(Debug, Default, Clone, Copy)]
pub struct MaePretrain;

impl Stage for MaePretrain {
    type Config = PretrainConfig;
    const KIND: &'static str = "mae/pretrain";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "MAE pre-training; with `masks`: MSMAE attention-guided masking/throwing, CLS supervision, map refresh";
    const USES_BACKEND: bool = true;
    const RUN_ONLY: &'static [&'static str] = &["checkpoint_every"];

    fn code_fingerprint(&self) -> &'static str {
        msmae_core::code_fingerprint!()
    }
    fn validate(&self, c: &PretrainConfig) -> Result<(), ConfigError> {
        validate_schedule(c.epochs, c.batch_size, c.blr, c.min_lr, c.warmup_epochs, c.crop_scale)?;
        if !(c.mask_ratio > 0.0 && c.mask_ratio < 1.0) {
            return err("mask_ratio", "must be in (0, 1): something must be masked and something visible");
        }
        if c.cls_weight < 0.0 {
            return err("cls_weight", "must be ≥ 0");
        }
        Ok(())
    }
    fn inputs(&self, _: &PretrainConfig) -> Vec<InputSlot> {
        vec![
            InputSlot::one("data", "image-table", "the images (labels used only by the cls_weight term)"),
            InputSlot::optional("masks", "mask-weights", "attention weights + policy from a mask/* stage (none: MAE random masking)"),
            InputSlot::optional("init", "mae-checkpoint", "continue from this MAE (a previous round of a `repeat:` group; none: fresh weights)"),
        ]
    }
    fn output(&self, _: &PretrainConfig) -> OutputDecl {
        OutputDecl::new("mae-checkpoint", &["model.safetensors", "model.json", "history.json", "reconstructions.png", "attention*.parquet", "*.png"])
    }
    fn resources(&self, _: &PretrainConfig) -> Resources {
        Resources::Exclusive
    }
    fn run(&self, c: &PretrainConfig, ctx: &mut StageContext<'_>) -> Result<(), StageError> {
        let rt = train::runtime(ctx)?;
        let table = open_table(ctx, "data")?;
        let size = [table.height(), table.width()];
        c.model.check(size, table.channels()).map_err(|m| StageError::other(format!("model: {m}")))?;
        let k = table.num_classes();
        let init = ctx.inputs("init").first().cloned();
        let (model, norm, arch) = match &init {
            Some(i) => {
                let what = i.dir.join(model::META_FILE);
                let (loaded, meta) = model::load(&i.dir, &rt.train)?;
                check_image_compat(&meta, &table, &what)?;
                let (Loaded::Mae(mut m), Some(mut a)) = (loaded, meta.mae.clone()) else {
                    return Err(StageError::data(&what, None, "`init` must be an MAE checkpoint (from mae/pretrain)"));
                };
                if c.cls_weight > 0.0 && (meta.label_names != table.meta.label_names || meta.multi_label != table.meta.multi_label) {
                    return Err(StageError::data(&what, None, format!("cls_weight {} needs the checkpoint's CLS head to mean the table's labels; it was trained on {:?}, the table has {:?}", c.cls_weight, meta.label_names, table.meta.label_names)));
                }
                if c.cls_weight > 0.0 && a.encoder.num_classes != k {
                    return Err(StageError::data(&what, None, format!("cls_weight {} needs a CLS head over the table's {k} classes; this checkpoint has {} (pre-train its first round with cls_weight > 0)", c.cls_weight, a.encoder.num_classes)));
                }
                a.norm_pix_loss = c.norm_pix_loss;
                m.norm_pix_loss = c.norm_pix_loss;
                (m, meta.normalizer, a)
            }
            None => {
                let mut arch = c.model.mae(size, table.channels()).with_norm_pix_loss(c.norm_pix_loss);
                if c.cls_weight > 0.0 {
                    arch.encoder.num_classes = k;
                }
                let norm = table.channel_stats(&table.rows_of(Split::Train))?;
                train::seed_backend(&rt, ctx.seed, "init", 0);
                (arch.init(&rt.train), norm, arch)
            }
        };
        let grid = arch.encoder.grid();
        let mut random_ratio = c.mask_ratio;
        let masks = ctx.inputs("masks").first().cloned();
        let guided = match &masks {
            Some(m) => {
                let pp = m.path("policy.json");
                let text = std::fs::read(&pp).map_err(|e| StageError::io(&pp, e))?;
                let policy: MaskPolicy = serde_json::from_slice(&text).map_err(|e| StageError::data(&pp, None, e.to_string()))?;
                policy.check().map_err(|e| StageError::data(&pp, None, e))?;
                if policy.needs_weights() {
                    if c.warmup_mask_epochs >= c.epochs {
                        return Err(StageError::other(format!("warmup_mask_epochs ({}) ≥ epochs ({}): the attention-guided masks from `{}` would never be used", c.warmup_mask_epochs, c.epochs, m.stage)));
                    }
                    Some((policy, train::read_maps(&m.path("weights.parquet"), &table, grid)?))
                } else {
                    // mask/random: MAE masking with the mask stage's ratio throughout, no maps.
                    if let MaskPolicy::Random { mask_ratio: r } = policy {
                        random_ratio = r;
                    }
                    None
                }
            }
            None => None,
        };
        train::materialise(&model);
        let opts = PretrainOpts {
            epochs: c.epochs,
            batch_size: c.batch_size,
            lr: c.blr * c.batch_size as f64 / 256.0,
            min_lr: c.min_lr,
            warmup_epochs: c.warmup_epochs,
            weight_decay: c.weight_decay,
            augment: c.augment.then_some((c.crop_scale[0], c.crop_scale[1])),
            mask_ratio: random_ratio,
            guided,
            warmup_mask_epochs: c.warmup_mask_epochs,
            refresh_every: c.refresh_every,
            cls_weight: c.cls_weight,
            checkpoint_every: c.checkpoint_every,
        };
        let res = train::pretrain(ctx, &rt, &table, &norm, model, &opts)?;
        let meta = CheckpointMeta { format: 1, kind: CheckpointKind::Mae, vit: arch.encoder.clone(), mae: Some(arch.clone()), normalizer: norm.clone(), label_names: table.meta.label_names.clone(), multi_label: table.meta.multi_label, trained_by: Self::KIND.into() };
        model::save(ctx.out_dir(), &res.model, &meta)?;
        if let Some(m) = &res.maps {
            if opts.refresh_every > 0 && !m.is_empty() {
                train::write_maps(&ctx.output_path("attention.parquet")?, &table, m, grid, serde_json::json!({ "stage": Self::KIND, "name": ctx.name, "what": "maps in use at the end of pre-training" }))?;
            }
        }
        // The figure shows the masking of the last epoch that ran.
        let final_policy = match (&opts.guided, res.history.last().map(|h| h.masking.starts_with("Random"))) {
            (Some((p, _)), Some(false)) => p.clone(),
            _ => MaskPolicy::Random { mask_ratio: random_ratio },
        };
        reconstructions(ctx, &rt, &table, &res.model, &norm, &final_policy, res.maps.as_ref(), grid, c)?;
        let train_seconds: f64 = res.history.iter().map(|h| h.seconds).sum();
        tracing::info!("`{}`: {} epochs, {:.1} s of training steps", ctx.name, res.history.len(), train_seconds);
        write_history(ctx, &res.history, serde_json::json!({ "lr": opts.lr, "policy": final_policy }))
    }
}

/// `reconstructions.png`: validation images (test if none) under the final policy.
#[allow(clippy::too_many_arguments)]
fn reconstructions(ctx: &StageContext<'_>, rt: &Runtime, table: &Arc<ImageTable>, mae: &msmae_vit::MaskedAutoencoder, norm: &Normalizer, policy: &MaskPolicy, maps: Option<&HashMap<usize, Vec<f32>>>, grid: [usize; 2], c: &PretrainConfig) -> Result<(), StageError> {
    let mut rows = table.rows_of(Split::Val);
    if rows.is_empty() {
        rows = table.rows_of(Split::Test);
    }
    rows.truncate(c.figure_images);
    if rows.is_empty() {
        return Ok(());
    }
    let model = mae.valid();
    let needs = policy.needs_weights();
    let weights: HashMap<usize, Vec<f32>> = if needs {
        match maps.filter(|m| rows.iter().all(|r| m.contains_key(r))) {
            Some(m) => rows.iter().map(|r| (*r, m[r].clone())).collect(),
            None => train::attention_maps(&mae.encoder, table, &rows, norm, rows.len(), rt, ctx)?,
        }
    } else {
        HashMap::new()
    };
    let mut spec = LoaderSpec::eval(rows.len());
    spec.masks = Some(crate::data::MaskSpec { policy: policy.clone(), weights: needs.then(|| Arc::new(weights)), grid });
    let (h, w, ch) = (table.height(), table.width(), table.channels());
    let p = mae.patch_size;
    let mut figure_rows = Vec::new();
    for batch in crate::data::stream(table.clone(), &rows, spec, norm.clone(), ctx.seed, u64::MAX) {
        let mut batch = batch?;
        let imgs_host = batch.images.clone();
        let x = train::images(&mut batch, table, &rt.device);
        let vis: Vec<Vec<usize>> = batch.plans.iter().map(|p| p.visible.clone()).collect();
        let msk: Vec<Vec<usize>> = batch.plans.iter().map(|p| p.masked.clone()).collect();
        let (vt, mt) = (msmae_vit::patch::index_tensor(&vis, &rt.device), msmae_vit::patch::index_tensor(&msk, &rt.device));
        let latent = model.forward_encoder(x.clone(), vt.clone());
        let mut pred = model.forward_decoder(latent, vt, mt.clone());
        if model.norm_pix_loss {
            // Back from per-patch normalised targets to pixels, with the true patch stats.
            let target = msmae_vit::patch::gather_tokens(msmae_vit::patch::patchify(x, p), mt);
            let mean = target.clone().mean_dim(2);
            let var = target.var(2);
            pred = pred * (var + 1e-6).sqrt() + mean;
        }
        let [_, nm, pd] = pred.dims();
        let flat = train::to_vec(pred)?;
        for (i, plan) in batch.plans.iter().enumerate() {
            let chw = &imgs_host[i * ch * h * w..(i + 1) * ch * h * w];
            figure_rows.push(figures::reconstruction_row(chw, ch, h, w, p, plan, &flat[i * nm * pd..(i + 1) * nm * pd], norm));
        }
    }
    figures::save_sheet(&ctx.output_path("reconstructions.png")?, &figure_rows, 3)
}

/// Every stage kind of this crate.
pub fn register(r: &mut msmae_core::Registry) {
    r.register(TrainSupervised).register(AttentionExtract).register(MaePretrain).register(FinetuneFull).register(FinetuneMsmae).register(crate::pytorch::ExportPytorch).register(crate::pytorch::ImportPytorch);
}
