//! Segmentation transfer (docs/method.md §6): the pre-trained ViT encoder, features from four
//! evenly spread blocks (4, 6, 8, 12 of 12), a SETR-PUP head per feature
//! (conv3×3 → BatchNorm → ReLU → bilinear ×2, repeated until the patch grid is back at
//! pixel resolution, then a 1×1 conv to the logit), loss 0.5·BCE + Dice, Adam with weight
//! decay and cosine decay, Dice and IoU at threshold 0.5.
//!
//! The stage `segment/setr-pup` trains on the lesion masks of an image table (the synthetic
//! source's masks, BUSI's, and the image/mask pairs of a manifest) and
//! evaluates on its test split.

pub mod metrics;

use std::sync::Arc;

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::interpolate::{Interpolate2d, Interpolate2dConfig, InterpolateMode};
use burn::nn::{BatchNorm, BatchNormConfig, PaddingConfig2d};
use burn::optim::AdamConfig;
use burn::optim::decay::WeightDecayConfig;
use burn::prelude::*;
use burn::tensor::activation::{log_softmax, relu, sigmoid, softmax};
use image::{Rgb, RgbImage};
use serde::{Deserialize, Serialize};

use msmae_core::{ConfigError, InputSlot, OutputDecl, Resources, Stage, StageContext, StageError};
use msmae_data::table::Split;
use msmae_train::data::{self, ImageTable, LoaderSpec, Normalizer};
use msmae_train::fit::{self, EpochPlan, FitOptions, StepLoss, TrainData, TrainStep, logged};
use msmae_train::model::{self as ckpt, ModelSpec, Schedule};
use msmae_train::runtime::{self, Runtime, images, to_vec};
use msmae_train::support::{config_error, defaults, write_json};
use msmae_vit::{VisionTransformer, VitConfig};

/// One SETR-PUP head: `n` × (conv3×3 → BN → ReLU → bilinear ×2), then a 1×1 conv.
#[derive(Module, Debug)]
pub struct PupHead {
    pub convs: Vec<Conv2d>,
    pub norms: Vec<BatchNorm>,
    pub cls: Conv2d,
    pub up: Interpolate2d,
}

impl PupHead {
    pub fn new(dim: usize, channels: usize, ups: usize, classes: usize, device: &Device) -> Self {
        let conv = |i: usize| {
            Conv2dConfig::new([if i == 0 { dim } else { channels }, channels], [3, 3])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(device)
        };
        Self {
            convs: (0..ups).map(conv).collect(),
            norms: (0..ups).map(|_| BatchNormConfig::new(channels).init(device)).collect(),
            cls: Conv2dConfig::new([channels, classes], [1, 1]).init(device),
            up: Interpolate2dConfig::new()
                .with_scale_factor(Some([2.0, 2.0]))
                .with_mode(InterpolateMode::Linear)
                .with_align_corners(false)
                .init(),
        }
    }

    /// # Shapes
    /// - x: `[batch, dim, gh, gw]` → `[batch, classes, gh·2^n, gw·2^n]`
    pub fn forward(&self, mut x: Tensor<4>) -> Tensor<4> {
        for (c, n) in self.convs.iter().zip(&self.norms) {
            x = self.up.forward(relu(n.forward(c.forward(x))));
        }
        self.cls.forward(x)
    }
}

/// Encoder + one head per selected block; the logits are the mean of the heads'.
#[derive(Module, Debug)]
pub struct SetrPup {
    pub encoder: VisionTransformer,
    pub heads: Vec<PupHead>,
    /// 1-based block numbers the heads read.
    pub blocks: Vec<usize>,
    pub grid: [usize; 2],
}

/// Four evenly spread blocks of `depth` (docs/method.md §6: 4, 6, 8, 12 of 12), 1-based,
/// distinct.
pub fn spread_blocks(depth: usize) -> Vec<usize> {
    let mut v: Vec<usize> = [1.0 / 3.0, 0.5, 2.0 / 3.0, 1.0]
        .iter()
        .map(|f| ((depth as f64 * f).round() as usize).clamp(1, depth))
        .collect();
    v.dedup();
    v
}

impl SetrPup {
    /// `classes`: 1 for a binary lesion mask (one logit), else the number of mask classes
    /// including background.
    pub fn new(
        encoder: VisionTransformer,
        cfg: &VitConfig,
        blocks: Vec<usize>,
        channels: usize,
        classes: usize,
        device: &Device,
    ) -> Self {
        let ups = (cfg.patch_size as f64).log2().round() as usize;
        let heads = blocks.iter().map(|_| PupHead::new(cfg.embed_dim, channels, ups, classes.max(1), device)).collect();
        Self { encoder, heads, blocks, grid: cfg.grid() }
    }

    /// # Shapes
    /// - imgs: `[batch, C, H, W]` → logits `[batch, classes, H, W]`
    pub fn forward(&self, imgs: Tensor<4>) -> Tensor<4> {
        let feats = self.encoder.forward_intermediates(imgs, &self.blocks);
        let n = feats.len() as f64;
        let [gh, gw] = self.grid;
        let mut sum: Option<Tensor<4>> = None;
        for (f, h) in feats.into_iter().zip(&self.heads) {
            let [b, l, d] = f.dims();
            debug_assert_eq!(l, gh * gw);
            let y = h.forward(f.swap_dims(1, 2).reshape([b, d, gh, gw]));
            sum = Some(match sum {
                Some(s) => s + y,
                None => y,
            });
        }
        sum.map(|s| s / n).unwrap_or_else(|| unreachable!("at least one head"))
    }
}

/// 0.5·BCE + soft Dice on logits (binary).
///
/// # Shapes
/// - logits, target: `[batch, 1, H, W]` → `[1]`
pub fn seg_loss(logits: Tensor<4>, target: Tensor<4>) -> Tensor<1> {
    let bce = (logits.clone().clamp_min(0.0) - logits.clone() * target.clone()
        + (logits.clone().abs().neg().exp() + 1.0).log())
    .mean();
    let p = sigmoid(logits);
    let [b, _, _, _] = p.dims();
    let inter = (p.clone() * target.clone()).reshape([b as i32, -1]).sum_dim(1);
    let denom = p.reshape([b as i32, -1]).sum_dim(1) + target.reshape([b as i32, -1]).sum_dim(1);
    let dice = ((inter * 2.0 + 1.0) / (denom + 1.0)).mean();
    bce * 0.5 + (dice.neg() + 1.0)
}

/// Multi-class: cross-entropy + (1 − mean soft Dice over the foreground classes).
///
/// # Shapes
/// - logits, one-hot target: `[batch, K, H, W]` → `[1]`
pub fn seg_loss_multi(logits: Tensor<4>, target: Tensor<4>) -> Tensor<1> {
    let [b, k, h, w] = logits.dims();
    let ce = (log_softmax(logits.clone(), 1) * target.clone()).sum_dim(1).mean().neg();
    let p = softmax(logits, 1).slice([0..b, 1..k, 0..h, 0..w]);
    let t = target.slice([0..b, 1..k, 0..h, 0..w]);
    let inter = (p.clone() * t.clone()).sum_dim(3).sum_dim(2);
    let denom = p.sum_dim(3).sum_dim(2) + t.sum_dim(3).sum_dim(2);
    let dice = ((inter * 2.0 + 1.0) / (denom + 1.0)).mean();
    ce + (dice.neg() + 1.0)
}

fn d_epochs() -> usize {
    20
}
fn d_batch() -> usize {
    16
}
fn d_lr() -> f64 {
    1e-4
}
fn d_min_lr() -> f64 {
    1e-5
}
fn d_wd() -> f64 {
    1e-4
}
fn d_channels() -> usize {
    256
}
fn d_scale() -> [f64; 2] {
    [0.5, 1.0]
}

/// `with:` of `segment/setr-pup`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentConfig {
    /// Encoder architecture without a `pretrained` input (the random-init baseline).
    #[serde(default)]
    pub model: ModelSpec,
    #[serde(default = "d_epochs")]
    pub epochs: usize,
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    #[serde(default = "d_lr")]
    pub lr: f64,
    #[serde(default = "d_min_lr")]
    pub min_lr: f64,
    #[serde(default = "d_wd")]
    pub weight_decay: f64,
    /// Channels of the head convolutions (SETR: 256).
    #[serde(default = "d_channels")]
    pub head_channels: usize,
    /// 1-based encoder blocks the heads read; default four evenly spread ones.
    #[serde(default)]
    pub blocks: Option<Vec<usize>>,
    /// The same crop and flip on image and mask.
    #[serde(default = "defaults::augment")]
    pub augment: bool,
    #[serde(default = "d_scale")]
    pub crop_scale: [f64; 2],
    /// Test images in `predictions.png`.
    #[serde(default = "defaults::figure_images")]
    pub figure_images: usize,
    /// Epochs between checkpoints a killed run resumes from (and always the last).
    #[serde(default = "defaults::checkpoint_every")]
    pub checkpoint_every: usize,
    /// Micro-batches each device computes a global batch in, summing their gradients
    /// before one optimiser step: memory falls with the micro-batch, the result does not
    /// change (up to float rounding), so it is not part of the cache key. `batch_size`
    /// stays the effective batch of every step (MAE's `batch_size × accum_iter × GPUs`).
    #[serde(default = "defaults::accum_steps")]
    pub accum_steps: usize,
}

/// `segment/setr-pup`.
#[derive(Debug, Default, Clone, Copy)]
pub struct SetrPupStage;

impl Stage for SetrPupStage {
    type Config = SegmentConfig;
    const KIND: &'static str = "segment/setr-pup";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str =
        "SETR-PUP segmentation on a pre-trained (or random) ViT encoder; Dice/IoU on the test split";
    const USES_BACKEND: bool = true;
    const DATA_PARALLEL: bool = true;
    const RUN_ONLY: &'static [&'static str] = &["checkpoint_every", "accum_steps"];

    fn code_fingerprint(&self) -> &'static str {
        msmae_core::code_fingerprint!()
    }
    fn validate(&self, c: &SegmentConfig) -> Result<(), ConfigError> {
        if c.epochs == 0 || c.batch_size == 0 || c.head_channels == 0 {
            return config_error("epochs", "epochs, batch_size and head_channels must be at least 1");
        }
        if c.lr.is_nan() || c.lr <= 0.0 || c.min_lr < 0.0 || c.min_lr > c.lr {
            return config_error("lr", "lr must be positive and min_lr within [0, lr]");
        }
        msmae_train::support::validate_accumulation(c.batch_size, c.accum_steps)?;
        if !(c.crop_scale[0] > 0.0 && c.crop_scale[0] <= c.crop_scale[1] && c.crop_scale[1] <= 1.0) {
            return config_error("crop_scale", "must be [min, max] with 0 < min ≤ max ≤ 1");
        }
        if let Some(b) = &c.blocks
            && (b.is_empty() || b.contains(&0))
        {
            return config_error("blocks", "1-based block numbers, at least one");
        }
        Ok(())
    }
    fn inputs(&self, _: &SegmentConfig) -> Vec<InputSlot> {
        vec![
            InputSlot::one("data", "image-table", "images with lesion masks"),
            InputSlot::optional("pretrained", "mae-checkpoint", "pre-trained encoder (none: random initialisation)")
                .or_kind("vit-checkpoint"),
        ]
    }
    fn output(&self, _: &SegmentConfig) -> OutputDecl {
        OutputDecl::new(
            "segmentation",
            &["model.safetensors", "model.json", "metrics.json", "history.json", "predictions.png", "*.png"],
        )
        .metric("dice", "metrics.json", "/dice")
        .metric("iou", "metrics.json", "/iou")
        .metric("dice_all_images", "metrics.json", "/dice_all_images")
        .metric("train_loss", "history.json", "/epochs/-1/train_loss")
        .figure("test predictions (image, truth, prediction)", "predictions.png")
        .figure("loss per epoch", "loss.png")
    }
    fn resources(&self, _: &SegmentConfig) -> Resources {
        Resources::Exclusive
    }
    fn run(&self, c: &SegmentConfig, ctx: &mut StageContext<'_>) -> Result<(), StageError> {
        run(c, ctx)
    }
}

fn run(c: &SegmentConfig, ctx: &mut StageContext<'_>) -> Result<(), StageError> {
    let rt = runtime::runtime(ctx)?;
    let table = Arc::new(ImageTable::open(&ctx.input("data")?.path("images.parquet"))?);
    if !table.meta.has_masks {
        return Err(StageError::data(
            &table.path,
            None,
            "this image table has no lesion masks (segmentation needs image/mask pairs)",
        ));
    }
    let size = [table.height(), table.width()];
    runtime::seed_backend(&rt, ctx.seed, "init", 0);
    let pretrained = ctx.inputs("pretrained").first().cloned();
    let (encoder, norm, vit_cfg) = match &pretrained {
        Some(p) => {
            let (loaded, meta) = ckpt::load(&p.dir, &rt.train)?;
            if meta.vit.image_size != size || meta.vit.in_chans != table.channels() {
                return Err(StageError::data(
                    p.dir.join(ckpt::META_FILE),
                    None,
                    format!(
                        "model expects {:?}×{} images, the table holds {:?}×{}",
                        meta.vit.image_size,
                        meta.vit.in_chans,
                        size,
                        table.channels()
                    ),
                ));
            }
            (loaded.into_encoder(), meta.normalizer, meta.vit)
        }
        None => {
            c.model.check(size, table.channels()).map_err(|m| StageError::config("model", m))?;
            let cfg = c.model.vit(size, table.channels());
            (cfg.init(&rt.train), table.channel_stats(&table.rows_of(Split::Train))?, cfg)
        }
    };
    let blocks = c.blocks.clone().unwrap_or_else(|| spread_blocks(vit_cfg.depth));
    if let Some(b) = blocks.iter().find(|b| **b > vit_cfg.depth) {
        return Err(StageError::config(
            "blocks",
            format!("block {b} does not exist in a {}-block encoder", vit_cfg.depth),
        ));
    }
    if !vit_cfg.patch_size.is_power_of_two() {
        return Err(StageError::config(
            "model.patch_size",
            format!("SETR-PUP upsamples by 2 per stage: patch size {} must be a power of two", vit_cfg.patch_size),
        ));
    }
    // Multi-class masks (class indices, `mask_classes` in the table) or one binary lesion mask.
    let classes = table.meta.mask_classes.len();
    let multi = classes >= 2;
    let model =
        SetrPup::new(encoder, &vit_cfg, blocks.clone(), c.head_channels, if multi { classes } else { 1 }, &rt.train);
    runtime::materialise(&model);
    let new_optim = || AdamConfig::new().with_weight_decay(Some(WeightDecayConfig::new(c.weight_decay as f32))).init();
    let mut step = SegStep {
        table: table.clone(),
        batch_size: c.batch_size,
        augment: c.augment.then_some((c.crop_scale[0], c.crop_scale[1])),
        classes: if multi { classes } else { 1 },
    };
    let data = TrainData { table: table.clone(), rows: table.rows_of(Split::Train), norm: norm.clone() };
    let opts = FitOptions {
        epochs: c.epochs,
        batch_size: c.batch_size,
        schedule: Schedule { lr: c.lr, min_lr: c.min_lr, warmup_epochs: 0.0, epochs: c.epochs as f64 },
        checkpoint_every: c.checkpoint_every,
        patience: None,
        accum_steps: c.accum_steps,
    };
    // A killed run continues from its last checkpoint: batches, crops and the backend RNG
    // are keyed by (seed, epoch), so the result is the uninterrupted run's, bit for bit.
    let res = fit::fit(ctx, &rt, &data, &mut step, model, |_| new_optim(), &opts)?;
    let history = res.history;
    let train_seconds: f64 = history.iter().map(|h| h.seconds).sum();
    tracing::info!(
        "`{}`: {} epochs, {:.2} s per epoch of training steps",
        ctx.name,
        c.epochs,
        train_seconds / history.len().max(1) as f64
    );
    let (per_image, figure) = evaluate(ctx, &res.model, &table, &norm, &rt, classes, c.figure_images)?;
    let model = res.model.valid();
    let meta = ckpt::CheckpointMeta {
        format: 1,
        kind: ckpt::CheckpointKind::Vit,
        vit: vit_cfg.clone(),
        mae: None,
        normalizer: norm.clone(),
        label_names: if multi { table.meta.mask_classes.clone() } else { vec!["lesion".into()] },
        multi_label: false,
        trained_by: SetrPupStage::KIND.into(),
    };
    ckpt::save(ctx.out_dir(), &model, &meta)?;
    let provenance = serde_json::json!({ "pretrained": pretrained.as_ref().map(|p| &p.digest), "blocks": blocks });
    write_json(ctx, "metrics.json", &metrics_json(ctx, &table, per_image, provenance))?;
    let epochs: Vec<serde_json::Value> =
        history.iter().map(|h| serde_json::json!({ "epoch": h.epoch, "train_loss": h.train_loss })).collect();
    write_json(ctx, "history.json", &serde_json::json!({ "epochs": epochs }))?;
    let pts: Vec<(f64, f64)> = history.iter().map(|h| ((h.epoch + 1) as f64, h.train_loss)).collect();
    msmae_metrics::plot::line_chart(
        &ctx.output_path("loss.png")?,
        &format!("{}: loss per epoch", ctx.name),
        "epoch",
        "0.5 BCE + Dice",
        &[msmae_metrics::plot::Series::new("train loss", pts)],
    )?;
    msmae_train::figures::save_sheet(&ctx.output_path("predictions.png")?, &figure, 3)
}

/// `metrics.json`: Dice/IoU over the test split, per image class, per mask class, and per
/// image. `provenance` holds `pretrained` and `blocks`.
fn metrics_json(
    ctx: &StageContext<'_>,
    table: &ImageTable,
    per_image: Vec<serde_json::Value>,
    provenance: serde_json::Value,
) -> serde_json::Value {
    let summary = metrics::summarize(&per_image);
    // Multi-class: per mask class, over the test images whose truth contains it.
    let per_mask_class: serde_json::Map<String, serde_json::Value> = table
        .meta
        .mask_classes
        .iter()
        .skip(1)
        .map(|name| {
            let v: Vec<(f64, f64)> = per_image
                .iter()
                .filter_map(|r| {
                    Some((r["mask_classes"][name]["dice"].as_f64()?, r["mask_classes"][name]["iou"].as_f64()?))
                })
                .collect();
            let mean = |f: fn(&(f64, f64)) -> f64| {
                if v.is_empty() { None } else { Some(logged(v.iter().map(f).sum::<f64>() / v.len() as f64)) }
            };
            (name.clone(), serde_json::json!({ "dice": mean(|x| x.0), "iou": mean(|x| x.1), "images": v.len() }))
        })
        .collect();
    // Per image class (BUSI: benign / malignant / normal), on single-label tables.
    let per_class: serde_json::Map<String, serde_json::Value> = metrics::summarize_by(&per_image, "class")
        .into_iter()
        .map(|(k, s)| {
            let v = serde_json::json!({ "dice": finite(s.dice_lesion), "iou": finite(s.iou_lesion), "images_with_lesion": s.n_lesion, "dice_all_images": finite(s.dice_all), "iou_all_images": finite(s.iou_all), "images": s.n });
            (k, v)
        })
        .collect();
    tracing::info!(
        "`{}`: test Dice {:.4}, IoU {:.4} over {} images with lesions ({} images in all)",
        ctx.name,
        summary.dice_lesion,
        summary.iou_lesion,
        summary.n_lesion,
        summary.n
    );
    serde_json::json!({
        "split": "test",
        "threshold": 0.5,
        "pretrained": provenance["pretrained"],
        "blocks": provenance["blocks"],
        "dice": logged(summary.dice_lesion),
        "iou": logged(summary.iou_lesion),
        "images_with_lesion": summary.n_lesion,
        "dice_all_images": logged(summary.dice_all),
        "iou_all_images": logged(summary.iou_all),
        "images": summary.n,
        "per_class": per_class,
        "per_mask_class": per_mask_class,
        "note": "dice/iou: mean over test images with a lesion; *_all_images: over every test image, an empty prediction of an empty mask scoring 1",
        "per_image": per_image,
    })
}

/// One segmentation training step: 0.5·BCE + Dice on the binary lesion mask, or CE + Dice
/// on one-hot class masks, of the SETR-PUP heads' logits.
#[derive(Debug)]
struct SegStep {
    table: Arc<ImageTable>,
    batch_size: usize,
    augment: Option<(f64, f64)>,
    /// 1: one binary lesion mask; ≥ 2: class-index masks.
    classes: usize,
}

impl TrainStep for SegStep {
    type Model = SetrPup;

    fn epoch_plan(
        &mut self,
        _epoch: usize,
        _model: &SetrPup,
        _ctx: &StageContext<'_>,
    ) -> Result<EpochPlan, StageError> {
        let mut spec = LoaderSpec::train(self.batch_size, self.augment);
        spec.lesion_masks = true;
        let l = self.table.height() * self.table.width();
        Ok(EpochPlan { spec, masking: "none".into(), tokens: l, refreshed_maps: false })
    }

    fn step(&mut self, model: &SetrPup, batch: &mut data::Batch, device: &Device) -> Result<StepLoss, StageError> {
        let target = masks_tensor(batch, &self.table, self.classes, device)?;
        let x = images(batch, &self.table, device);
        let loss = if self.classes >= 2 {
            seg_loss_multi(model.forward(x), target)
        } else {
            seg_loss(model.forward(x), target)
        };
        Ok(StepLoss { loss, reconstruction: None })
    }
}

/// Dice and IoU per test image at threshold 0.5 (argmax over class maps for class-index
/// masks), and the rows of the prediction figure.
fn evaluate(
    ctx: &StageContext<'_>,
    model: &SetrPup,
    table: &Arc<ImageTable>,
    norm: &Normalizer,
    rt: &Runtime,
    classes: usize,
    figure_images: usize,
) -> Result<(Vec<serde_json::Value>, Vec<RgbImage>), StageError> {
    let model = model.valid();
    let (h, w, ch) = (table.height(), table.width(), table.channels());
    let mut spec = LoaderSpec::eval(32);
    spec.lesion_masks = true;
    let mut per_image = Vec::new();
    let mut figure = Vec::new();
    for batch in data::stream(table.clone(), &table.rows_of(Split::Test), spec, norm.clone(), ctx.seed, 0) {
        ctx.cancel.check()?;
        let mut batch = batch?;
        let host = batch.images.clone();
        let x = images(&mut batch, table, &rt.device);
        let logits = model.forward(x);
        let probs = to_vec(if classes >= 2 { softmax(logits, 1) } else { sigmoid(logits) })?;
        let per = classes.max(1) * h * w;
        for (i, &r) in batch.rows.iter().enumerate() {
            let gt = batch.lesions.get(i).and_then(Option::as_ref).ok_or_else(|| {
                StageError::data(
                    &table.path,
                    Some(format!("row `{}`, column `mask`", table.rows[r].id)),
                    "no lesion mask",
                )
            })?;
            let (pred, record) = image_record(table, r, gt, &probs[i * per..(i + 1) * per], classes);
            per_image.push(record);
            if figure.len() < figure_images && gt.iter().any(|v| *v > 0) {
                let img =
                    msmae_train::figures::denormalize(&host[i * ch * h * w..(i + 1) * ch * h * w], ch, h, w, norm);
                figure.push(prediction_row(&img, gt, &pred));
            }
        }
    }
    Ok((per_image, figure))
}

/// The predicted mask of table row `r` from its class probabilities `probs` (`[classes, H·W]`,
/// one map when binary) and its metrics record: Dice/IoU (per foreground class present in
/// the truth for class-index masks, their mean overall).
fn image_record(
    table: &ImageTable,
    r: usize,
    gt: &[u8],
    probs: &[f32],
    classes: usize,
) -> (Vec<u8>, serde_json::Value) {
    let hw = gt.len();
    let class = table.rows[r].label.and_then(|l| table.meta.label_names.get(l as usize)).cloned();
    let id = &table.rows[r].id;
    let lesion_pixels = gt.iter().filter(|v| **v > 0).count();
    if classes < 2 {
        let pred: Vec<u8> = probs.iter().map(|p| u8::from(*p >= 0.5)).collect();
        let (dice, iou) = metrics::dice_iou(&pred, gt);
        return (
            pred,
            serde_json::json!({ "id": id, "class": class, "dice": logged(dice), "iou": logged(iou), "lesion_pixels": lesion_pixels }),
        );
    }
    let at = |k: usize, px: usize| probs[k * hw + px];
    let pred: Vec<u8> =
        (0..hw).map(|px| (0..classes).max_by(|&a, &b| at(a, px).total_cmp(&at(b, px))).unwrap_or(0) as u8).collect();
    let mut per = serde_json::Map::new();
    let (mut ds, mut is) = (Vec::new(), Vec::new());
    for k in 1..classes {
        let (g, p): (Vec<u8>, Vec<u8>) =
            gt.iter().zip(&pred).map(|(&g, &p)| (u8::from(usize::from(g) == k), u8::from(usize::from(p) == k))).unzip();
        if g.contains(&1) {
            let (d, iu) = metrics::dice_iou(&p, &g);
            ds.push(d);
            is.push(iu);
            per.insert(table.meta.mask_classes[k].clone(), serde_json::json!({ "dice": logged(d), "iou": logged(iu) }));
        }
    }
    let mean = |v: &[f64]| if v.is_empty() { 1.0 } else { v.iter().sum::<f64>() / v.len() as f64 };
    (
        pred,
        serde_json::json!({ "id": id, "class": class, "dice": logged(mean(&ds)), "iou": logged(mean(&is)), "lesion_pixels": lesion_pixels, "mask_classes": per }),
    )
}

/// A metric for JSON: rounded like every logged number, `null` when undefined (NaN).
fn finite(v: f64) -> Option<f64> {
    v.is_finite().then(|| logged(v))
}

/// Targets: `[batch, 1, H, W]` 0/1 (binary, `classes` 1) or one-hot `[batch, K, H, W]`.
fn masks_tensor(
    batch: &data::Batch,
    table: &ImageTable,
    classes: usize,
    device: &Device,
) -> Result<Tensor<4>, StageError> {
    let (h, w) = (table.height(), table.width());
    let mut v = Vec::with_capacity(batch.len() * classes * h * w);
    for (i, r) in batch.rows.iter().enumerate() {
        let m = batch.lesions.get(i).and_then(Option::as_ref).ok_or_else(|| {
            StageError::data(&table.path, Some(format!("row `{}`, column `mask`", table.rows[*r].id)), "no lesion mask")
        })?;
        if classes == 1 {
            v.extend(m.iter().map(|x| f32::from(u8::from(*x > 0))));
        } else {
            for k in 0..classes {
                v.extend(m.iter().map(|x| f32::from(u8::from(usize::from(*x) == k))));
            }
        }
    }
    Ok(Tensor::from_data(TensorData::new(v, [batch.len(), classes, h, w]), device))
}

/// image | ground truth (green) | prediction (red) over the image.
fn prediction_row(img: &RgbImage, gt: &[u8], pred: &[u8]) -> RgbImage {
    let (w, h) = img.dimensions();
    let gap = 2;
    let mut row = RgbImage::from_pixel(3 * w + 2 * gap, h, Rgb([255, 255, 255]));
    for y in 0..h {
        for x in 0..w {
            let p = img.get_pixel(x, y).0;
            let i = (y * w + x) as usize;
            row.put_pixel(x, y, Rgb(p));
            let tint = |on: bool, c: [u8; 3]| {
                if on {
                    Rgb([
                        (p[0] / 2).saturating_add(c[0] / 2),
                        (p[1] / 2).saturating_add(c[1] / 2),
                        (p[2] / 2).saturating_add(c[2] / 2),
                    ])
                } else {
                    Rgb(p)
                }
            };
            row.put_pixel(w + gap + x, y, tint(gt[i] > 0, [0, 255, 0]));
            row.put_pixel(2 * (w + gap) + x, y, tint(pred[i] > 0, [255, 0, 0]));
        }
    }
    row
}

/// Every stage kind of this crate.
pub fn register(r: &mut msmae_core::Registry) {
    r.register(SetrPupStage);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_spread_like_the_paper() {
        assert_eq!(spread_blocks(12), [4, 6, 8, 12]);
        assert_eq!(spread_blocks(4), [1, 2, 3, 4]);
        assert_eq!(spread_blocks(1), [1]);
    }

    #[test]
    fn heads_restore_pixel_resolution_and_the_loss_prefers_the_truth() {
        let dev = Device::flex();
        let cfg = VitConfig::new([16, 16], 4, 1, 16, 2, 2);
        let m = SetrPup::new(cfg.init(&dev), &cfg, vec![1, 2], 8, 1, &dev);
        let y = m.forward(Tensor::zeros([2, 1, 16, 16], &dev));
        assert_eq!(y.dims(), [2, 1, 16, 16]);
        let t = Tensor::<4>::from_data(
            TensorData::new((0..256).map(|i| f32::from(u8::from(i % 3 == 0))).collect::<Vec<_>>(), [1, 1, 16, 16]),
            &dev,
        );
        let good = seg_loss((t.clone() - 0.5) * 20.0, t.clone()).into_scalar::<f32>();
        let bad = seg_loss((t.clone() - 0.5) * -20.0, t).into_scalar::<f32>();
        assert!(good < 0.01 && bad > 1.0, "{good} {bad}");
        // multi-class: 3 class heads, CE + Dice prefers the true class map
        let m3 = SetrPup::new(cfg.init(&dev), &cfg, vec![2], 8, 3, &dev);
        assert_eq!(m3.forward(Tensor::zeros([2, 1, 16, 16], &dev)).dims(), [2, 3, 16, 16]);
        let cls: Vec<usize> = (0..256).map(|i| i % 3).collect();
        let onehot: Vec<f32> = (0..3).flat_map(|k| cls.iter().map(move |&c| f32::from(u8::from(c == k)))).collect();
        let t = Tensor::<4>::from_data(TensorData::new(onehot, [1, 3, 16, 16]), &dev);
        let good = seg_loss_multi((t.clone() - 0.5) * 20.0, t.clone()).into_scalar::<f32>();
        let bad = seg_loss_multi((t.clone() - 0.5) * -20.0, t).into_scalar::<f32>();
        assert!(good < 0.01 && bad > 1.0, "{good} {bad}");
    }
}
