//! Classifier training, shared by `attention/train-supervised` (the label-supervised ViT
//! whose attention guides masking, docs/method.md §2), `finetune/full` and `finetune/msmae`
//! (§5): their config, the [`ClassifierStep`] that plugs into [`crate::fit`], validation
//! and prediction, and [`run_classifier`], which the stage crates call from their
//! `Stage::run`.

use std::sync::Arc;

use burn::optim::lr_scheduler::module_lr_scheduler::ModuleLearningRate;
use burn::prelude::*;
use burn::tensor::activation::{sigmoid, softmax};
use serde::{Deserialize, Serialize};

use msmae_core::{ConfigError, InputArtifact, OutputDecl, StageContext, StageError};
use msmae_data::predictions::{PREDICTIONS_SCHEMA_VERSION, PredictionMeta, PredictionRow, write_predictions};
use msmae_data::table::Split;
use msmae_mask::MaskPolicy;
use msmae_vit::attention_map::{MapMethod, MapReading, Smoothing};
use msmae_vit::loss::{ClassTargets, classification_loss};
use msmae_vit::patch::index_tensor;
use msmae_vit::{VisionTransformer, VitConfig};

use crate::data::{self, Batch, ImageTable, LoaderSpec, MaskSpec, Normalizer};
use crate::fit::{self, EpochPlan, FitOptions, StepLoss, TrainData, TrainStep, Validation};
use crate::maps::{MapState, attention_maps};
use crate::model::{self, CheckpointMeta, LayerDecay, ModelSpec, Schedule, adamw};
use crate::runtime::{self, Runtime, images, to_vec};
use crate::support::{check_image_compat, config_error, defaults, open_table, validate_accumulation, write_history};

fn d_epochs() -> usize {
    30
}
fn d_min_lr() -> f64 {
    1e-6
}
fn d_smoothing() -> f64 {
    0.1
}
fn d_drop_path() -> f64 {
    0.1
}

/// The validation score that picks the best model (and drives early stopping).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SelectOn {
    /// Accuracy for single-label data, mean per-label AUC for multi-label data (the
    /// ChestX-ray14 convention).
    #[default]
    Auto,
    /// Validation accuracy (single-label only).
    Accuracy,
    /// Validation loss (lower is better).
    Loss,
    /// Macro one-vs-rest AUC (single-label) or mean per-label AUC (multi-label).
    Auc,
}

::msmae_train::training_config! {
/// `with:` of the classifier stages (`attention/train-supervised`, `finetune/full`,
/// `finetune/msmae`). Fields that do not apply to a kind are rejected by its validation.
pub struct ClassifierConfig, defaults: {
        epochs: "d_epochs",
        blr: "::msmae_train::support::defaults::blr",
        min_lr: "d_min_lr",
        warmup_epochs: "::msmae_train::support::defaults::warmup_epochs",
        weight_decay: "::msmae_train::support::defaults::weight_decay",
        crop_scale: "::msmae_train::support::defaults::crop_scale",
    } {
    /// Architecture when training from scratch (ignored with a `pretrained` input, whose
    /// architecture is used).
    #[serde(default)]
    pub model: ModelSpec,
    /// Layer-wise lr decay (fine-tuning: 0.75; 1 = none).
    #[serde(default)]
    pub layer_decay: Option<f64>,
    #[serde(default = "d_smoothing")]
    pub label_smoothing: f64,
    #[serde(default = "d_drop_path")]
    pub drop_path: f64,
    /// Early stopping: epochs without a better validation score.
    #[serde(default)]
    pub patience: Option<usize>,
    /// The validation score that picks the best epoch: `auto` (accuracy; mean per-label
    /// AUC for multi-label data), `accuracy`, `loss` or `auc`.
    #[serde(default)]
    pub select_on: SelectOn,
    /// Micro-batches each device computes a global batch in, summing their gradients
    /// before one optimiser step: memory falls with the micro-batch, the result does not
    /// change (up to float rounding), so it is not part of the cache key. `batch_size`
    /// stays the effective batch of every step (MAE's `batch_size × accum_iter × GPUs`).
    #[serde(default = "defaults::accum_steps")]
    pub accum_steps: usize,
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
    /// `finetune/msmae` only: where the visible tokens come from — `lowest` (the paper:
    /// the high-attention patches are masked and thrown, the tail stays), `uniform` (the
    /// same number at random) or `highest` (the reversed order). An ablation switch.
    #[serde(default)]
    pub visible: Option<VisibleFrom>,
    /// `finetune/msmae` only: how the refreshed maps are read from the model — `cls` (the
    /// paper's last-block CLS attention, default), `rollout` or `gradient` (as
    /// `attention/extract`'s `method`).
    #[serde(default)]
    pub map_method: Option<MapMethod>,
    /// `finetune/msmae` only: spatial smoothing of the refreshed maps on the patch grid
    /// before the tokens are ranked (`{ op: max, size: 3 }`; default none, the paper's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub map_smooth: Option<Smoothing>,
}
}

/// Where `finetune/msmae`'s visible tokens come from (see [`ClassifierConfig::visible`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VisibleFrom {
    #[default]
    Lowest,
    Uniform,
    Highest,
}

/// Which of the three classifier stages runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClassifierKind {
    /// `attention/train-supervised`: from scratch, CLS-token head (its CLS attention is read).
    Supervised,
    /// `finetune/full`: all tokens, global-pool head, optionally from a pre-trained encoder.
    Full,
    /// `finetune/msmae`: 25 % attention-selected tokens, maps refreshed from the model.
    Msmae,
}

pub fn validate_classifier(c: &ClassifierConfig, kind: ClassifierKind) -> Result<(), ConfigError> {
    c.schedule().check()?;
    validate_accumulation(c.batch_size, c.accum_steps)?;
    if !(0.0..1.0).contains(&c.label_smoothing) {
        return config_error("label_smoothing", "must be in [0, 1)");
    }
    if !(0.0..1.0).contains(&c.drop_path) {
        return config_error("drop_path", "must be in [0, 1)");
    }
    if let Some(d) = c.layer_decay
        && !(d > 0.0 && d <= 1.0)
    {
        return config_error("layer_decay", "must be in (0, 1]");
    }
    if kind != ClassifierKind::Msmae {
        for (name, set) in [
            ("mask_ratio", c.mask_ratio.is_some()),
            ("throw_ratio", c.throw_ratio.is_some()),
            ("refresh_every", c.refresh_every.is_some()),
            ("visible", c.visible.is_some()),
            ("map_method", c.map_method.is_some()),
            ("map_smooth", c.map_smooth.is_some()),
        ] {
            if set {
                return config_error(name, "only `finetune/msmae` masks tokens; use that kind");
            }
        }
    } else if let Err(m) = msmae_policy(c).check() {
        return config_error("mask_ratio", m);
    } else if let Some(Err(m)) = c.map_smooth.map(|s| s.check()) {
        return config_error("map_smooth", m);
    }
    Ok(())
}

fn msmae_policy(c: &ClassifierConfig) -> MaskPolicy {
    let (mask_ratio, throw_ratio) = (c.mask_ratio.unwrap_or(0.45), c.throw_ratio.unwrap_or(0.30));
    match c.visible.unwrap_or_default() {
        VisibleFrom::Lowest => MaskPolicy::Msmae { mask_ratio, throw_ratio },
        VisibleFrom::Uniform => MaskPolicy::Random { mask_ratio: mask_ratio + throw_ratio },
        VisibleFrom::Highest => MaskPolicy::Highest { mask_ratio, throw_ratio },
    }
}

pub fn classifier_output() -> OutputDecl {
    OutputDecl::new(
        "vit-checkpoint",
        &[
            "model.safetensors",
            "model.json",
            "history.json",
            "predictions.parquet",
            "predictions_last*.parquet",
            "*.png",
        ],
    )
    .metric("epochs", "history.json", "/epochs/#")
    .metric("train_loss", "history.json", "/epochs/-1/train_loss")
    .metric("val_accuracy", "history.json", "/epochs/-1/val_accuracy")
    .metric("val_auc", "history.json", "/epochs/-1/val_auc")
    .figure("loss per epoch", "loss.png")
    .figure("accuracy per epoch", "accuracy.png")
}

/// What `Stage::run` of a classifier stage does: build or load the model, train it through
/// [`fit::fit`], write the checkpoint, val/test predictions, history and charts.
pub fn run_classifier(
    kind: ClassifierKind,
    stage_kind: &str,
    c: &ClassifierConfig,
    ctx: &mut StageContext<'_>,
) -> Result<(), StageError> {
    let rt = runtime::runtime(ctx)?;
    let table = open_table(ctx, "data")?;
    let k = table.num_classes();
    if k < 2 {
        return Err(StageError::data(&table.path, None, format!("{k} classes: a classifier needs at least 2")));
    }
    runtime::seed_backend(&rt, ctx.seed, "init", 0);
    let pretrained = ctx.inputs("pretrained").first().cloned();
    let (model, norm, arch) = match &pretrained {
        Some(p) => from_pretrained(p, &table, c, &rt)?,
        None => {
            c.model
                .check([table.height(), table.width()], table.channels())
                .map_err(|m| StageError::config("model", m))?;
            let cfg = c
                .model
                .vit([table.height(), table.width()], table.channels())
                .with_num_classes(k)
                .with_drop_path(c.drop_path)
                .with_global_pool(kind != ClassifierKind::Supervised);
            let norm = table.channel_stats(&table.rows_of(Split::Train))?;
            let m = cfg.init(&rt.train);
            (m, norm, cfg)
        }
    };
    runtime::materialise(&model);
    let layer_decay = c.layer_decay.unwrap_or(if pretrained.is_some() { 0.75 } else { 1.0 });
    let lr = c.blr * c.batch_size as f64 / 256.0;
    let selection = (kind == ClassifierKind::Msmae).then(|| TokenSelection {
        policy: msmae_policy(c),
        refresh_every: c.refresh_every.unwrap_or(20),
        reading: MapReading { method: c.map_method.unwrap_or_default(), smooth: c.map_smooth },
        maps: MapState { table: table.clone(), grid: arch.grid(), current: None },
    });
    let mut step = ClassifierStep::new(rt.clone(), table.clone(), norm.clone(), c, layer_decay, selection);
    let data = TrainData { table: table.clone(), rows: table.labelled_rows_of(Split::Train), norm: norm.clone() };
    let opts = FitOptions {
        epochs: c.epochs,
        batch_size: c.batch_size,
        schedule: Schedule::warmup_cosine(lr, c.min_lr, c.warmup_epochs, c.epochs),
        checkpoint_every: c.checkpoint_every,
        patience: c.patience,
        accum_steps: c.accum_steps,
    };
    let res = fit::fit(ctx, &rt, &data, &mut step, model, |m| adamw(m, 0.999, c.weight_decay), &opts)?;
    let meta = CheckpointMeta::classifier(arch, norm.clone(), &table, stage_kind);
    model::save(ctx.out_dir(), &res.model, &meta)?;
    let provenance = serde_json::json!({ "stage": stage_kind, "name": ctx.name, "seed": ctx.seed, "pretrained": pretrained.as_ref().map(|p| &p.digest), "best_epoch": res.best_epoch });
    write_preds(ctx, &rt, &table, &res.model, &norm, c.batch_size.max(64), provenance.clone(), "predictions.parquet")?;
    // The last epoch's model too, where validation picked an earlier one: test figures
    // under both selection rules (eval/classify reports both).
    if let Some(last) = &res.last {
        write_preds(ctx, &rt, &table, last, &norm, c.batch_size.max(64), provenance, "predictions_last.parquet")?;
    }
    let train_seconds: f64 = res.history.iter().map(|h| h.seconds).sum();
    tracing::info!(
        "`{}`: {} epochs, {:.1} s of training steps ({:.2} s/epoch), {} tokens per sample",
        ctx.name,
        res.history.len(),
        train_seconds,
        train_seconds / res.history.len().max(1) as f64,
        res.history.last().map(|h| h.tokens).unwrap_or(0)
    );
    write_history(
        ctx,
        &res.history,
        serde_json::json!({ "best_epoch": res.best_epoch, "layer_decay": layer_decay, "lr": lr }),
    )
}

/// A classifier initialised from a pre-trained encoder (MAE or ViT checkpoint): patch
/// embedding, CLS token and blocks are taken over; `fc_norm` and the head are new.
fn from_pretrained(
    p: &InputArtifact,
    table: &ImageTable,
    c: &ClassifierConfig,
    rt: &Runtime,
) -> Result<(VisionTransformer, Normalizer, VitConfig), StageError> {
    let (loaded, meta) = model::load(&p.dir, &rt.train)?;
    check_image_compat(&meta, table, &p.dir.join(model::META_FILE))?;
    let enc = loaded.into_encoder();
    let cfg =
        VitConfig { num_classes: table.num_classes(), drop_path: c.drop_path, global_pool: true, ..meta.vit.clone() };
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

/// Scores of the val and test images with `vit`, as a predictions table in `file`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn write_preds(
    ctx: &StageContext<'_>,
    rt: &Runtime,
    table: &Arc<ImageTable>,
    vit: &VisionTransformer,
    norm: &Normalizer,
    batch: usize,
    provenance: serde_json::Value,
    file: &str,
) -> Result<(), StageError> {
    let mut rows = table.rows_of(Split::Val);
    rows.extend(table.rows_of(Split::Test));
    let (scores, _) = predict(vit, table, &rows, norm, batch, rt, ctx)?;
    let out: Vec<PredictionRow> = rows
        .iter()
        .zip(scores)
        .map(|(&r, s)| {
            let row = &table.rows[r];
            PredictionRow {
                id: row.id.clone(),
                split: row.split,
                label: row.label,
                labels: row.labels.clone(),
                scores: s,
            }
        })
        .collect();
    let meta = PredictionMeta {
        schema_version: PREDICTIONS_SCHEMA_VERSION,
        label_names: table.meta.label_names.clone(),
        multi_label: table.meta.multi_label,
        provenance,
    };
    write_predictions(&ctx.output_path(file)?, &meta, &out).map_err(StageError::from)?;
    Ok(())
}

/// MSMAE fine-tuning's token selection: the policy and how often the maps are recomputed
/// from the model itself (every `refresh_every` epochs from epoch 0; 0: only at the start).
#[derive(Debug, Clone)]
pub struct TokenSelection {
    pub policy: MaskPolicy,
    pub refresh_every: usize,
    /// How the maps are read from the model (method, smoothing).
    pub reading: MapReading,
    pub maps: MapState,
}

/// One classifier training step: cross-entropy (or BCE for multi-label tables) of the
/// ViT's logits on all tokens, or on the visible tokens of an attention-guided plan.
#[derive(Debug)]
pub struct ClassifierStep {
    pub rt: Runtime,
    pub table: Arc<ImageTable>,
    pub norm: Normalizer,
    pub batch_size: usize,
    pub augment: Option<(f64, f64)>,
    pub label_smoothing: f64,
    pub layer_decay: f64,
    pub select_on: SelectOn,
    pub selection: Option<TokenSelection>,
    val_rows: Vec<usize>,
    decay: Option<LayerDecay>,
}

impl ClassifierStep {
    pub fn new(
        rt: Runtime,
        table: Arc<ImageTable>,
        norm: Normalizer,
        c: &ClassifierConfig,
        layer_decay: f64,
        selection: Option<TokenSelection>,
    ) -> Self {
        let val_rows = table.labelled_rows_of(Split::Val);
        let label_smoothing = if table.meta.multi_label { 0.0 } else { c.label_smoothing };
        let augment = c.augment.then_some((c.crop_scale[0], c.crop_scale[1]));
        Self {
            rt,
            table,
            norm,
            batch_size: c.batch_size,
            augment,
            label_smoothing,
            layer_decay,
            select_on: c.select_on,
            selection,
            val_rows,
            decay: None,
        }
    }

    fn grid(model: &VisionTransformer, table: &ImageTable) -> [usize; 2] {
        [table.height() / model.patch_embed.proj.stride[0], table.width() / model.patch_embed.proj.stride[1]]
    }
}

impl TrainStep for ClassifierStep {
    type Model = VisionTransformer;

    fn start(&mut self, model: &VisionTransformer) {
        self.decay = Some(LayerDecay::new(model, self.layer_decay));
    }

    fn epoch_plan(
        &mut self,
        epoch: usize,
        model: &VisionTransformer,
        ctx: &StageContext<'_>,
    ) -> Result<EpochPlan, StageError> {
        let mut spec = LoaderSpec::train(self.batch_size, self.augment);
        let grid = Self::grid(model, &self.table);
        let l = grid[0] * grid[1];
        let Some(sel) = &mut self.selection else {
            return Ok(EpochPlan { spec, masking: "none".into(), tokens: l + 1, refreshed_maps: false });
        };
        let mut refreshed = false;
        if sel.maps.current.is_none() || (sel.refresh_every > 0 && epoch.is_multiple_of(sel.refresh_every)) {
            let rows = self.table.labelled_rows_of(Split::Train);
            sel.maps.current = Some(Arc::new(attention_maps(
                model,
                &self.table,
                &rows,
                &self.norm,
                self.batch_size.max(64),
                sel.reading,
                &self.rt,
                ctx,
            )?));
            refreshed = true;
        }
        spec.masks = Some(MaskSpec { policy: sel.policy.clone(), weights: sel.maps.current.clone(), grid });
        Ok(EpochPlan {
            spec,
            masking: format!("{:?}", sel.policy),
            tokens: sel.policy.visible_count(l) + 1,
            refreshed_maps: refreshed,
        })
    }

    fn step(&mut self, model: &VisionTransformer, batch: &mut Batch, device: &Device) -> Result<StepLoss, StageError> {
        let x = images(batch, &self.table, device);
        let logits = match &self.selection {
            Some(_) => {
                let vis: Vec<Vec<usize>> = batch.plans.iter().map(|p| p.visible.clone()).collect();
                model.forward_visible(x, index_tensor(&vis, device))
            }
            None => model.forward(x),
        };
        let loss = classification_loss(logits, class_targets(batch, &self.table, device), self.label_smoothing);
        Ok(StepLoss { loss, reconstruction: None })
    }

    fn learning_rates(&self, lr: f64) -> ModuleLearningRate {
        match &self.decay {
            Some(d) => d.rates(lr),
            None => lr.into(),
        }
    }

    fn validate(&mut self, model: &VisionTransformer, ctx: &StageContext<'_>) -> Result<Validation, StageError> {
        validate_classifier_on(
            model,
            &self.table,
            &self.val_rows,
            &self.norm,
            self.batch_size,
            self.select_on,
            &self.rt,
            ctx,
        )
    }

    fn maps(&mut self) -> Option<&mut MapState> {
        self.selection.as_mut().map(|s| &mut s.maps)
    }
}

/// Validation of a classifier on `rows`: loss, accuracy, AUC, and the score `select_on`
/// picks (higher is better; a score the split cannot give, AUC with one class present,
/// falls back to minus the loss). No rows: no validation.
#[allow(clippy::too_many_arguments)]
pub(crate) fn validate_classifier_on(
    model: &VisionTransformer,
    table: &Arc<ImageTable>,
    rows: &[usize],
    norm: &Normalizer,
    batch_size: usize,
    select_on: SelectOn,
    rt: &Runtime,
    ctx: &StageContext<'_>,
) -> Result<Validation, StageError> {
    if rows.is_empty() {
        return Ok(Validation::default());
    }
    let (s, loss) = predict(model, table, rows, norm, batch_size.max(64), rt, ctx)?;
    let (accuracy, auc) = (accuracy(&s, rows, table), auc(&s, rows, table));
    let chosen = match (select_on, table.meta.multi_label) {
        (SelectOn::Auto, false) | (SelectOn::Accuracy, _) => accuracy,
        (SelectOn::Auto, true) | (SelectOn::Auc, _) => auc,
        (SelectOn::Loss, _) => None,
    };
    let score = chosen.or(Some(loss).filter(|v| v.is_finite()).map(|v| -v));
    Ok(Validation { loss: Some(loss), accuracy, auc, score })
}

/// The targets of a batch: class indices, or multi-hot rows for multi-label tables.
pub fn class_targets(batch: &Batch, table: &ImageTable, device: &Device) -> ClassTargets {
    let n = batch.len();
    if table.meta.multi_label {
        ClassTargets::MultiHot(Tensor::<2>::from_data(
            TensorData::new(batch.targets.clone(), [n, table.num_classes()]),
            device,
        ))
    } else {
        ClassTargets::Classes(Tensor::<1, Int>::from_data(TensorData::new(batch.labels.clone(), [n]), device))
    }
}

/// Scores (softmax or sigmoid) and mean loss of `rows`, all tokens, eval mode.
pub fn predict(
    vit: &VisionTransformer,
    table: &Arc<ImageTable>,
    rows: &[usize],
    norm: &Normalizer,
    batch_size: usize,
    rt: &Runtime,
    ctx: &StageContext<'_>,
) -> Result<(Vec<Vec<f32>>, f64), StageError> {
    let model = vit.valid();
    let mut scores = Vec::with_capacity(rows.len());
    let (mut loss_sum, mut n) = (0f64, 0usize);
    let bar = ctx.progress.bar(Some(rows.len() as u64), &format!("{}: predicting", ctx.name));
    for batch in data::stream(table.clone(), rows, LoaderSpec::eval(batch_size), norm.clone(), ctx.seed, 0) {
        ctx.cancel.check()?;
        let mut batch = batch?;
        bar.inc(batch.len() as u64);
        let x = images(&mut batch, table, &rt.device);
        let logits = model.forward(x);
        let [b, k] = logits.dims();
        // Unlabelled images (a test set without labels) get scores but no loss.
        if table.meta.multi_label || batch.labels.iter().all(|l| *l >= 0) {
            let loss = classification_loss(logits.clone(), class_targets(&batch, table, &rt.device), 0.0);
            loss_sum += f64::from(loss.into_scalar::<f32>()) * b as f64;
            n += b;
        }
        let p = if table.meta.multi_label { sigmoid(logits) } else { softmax(logits, 1) };
        let flat = to_vec(p)?;
        scores.extend(flat.chunks(k).map(<[f32]>::to_vec));
    }
    if scores.len() != rows.len() {
        return Err(StageError::other(format!("predicted {} of {} images", scores.len(), rows.len())));
    }
    Ok((scores, if n > 0 { loss_sum / n as f64 } else { f64::NAN }))
}

fn accuracy(scores: &[Vec<f32>], rows: &[usize], table: &ImageTable) -> Option<f64> {
    if table.meta.multi_label || rows.is_empty() {
        return None;
    }
    let hits = scores
        .iter()
        .zip(rows)
        .filter(|(s, r)| {
            let arg = s.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i as i32);
            arg == table.rows[**r].label
        })
        .count();
    Some(hits as f64 / rows.len() as f64)
}

/// Macro one-vs-rest AUC (single-label) or mean per-label AUC (multi-label) of `scores`.
fn auc(scores: &[Vec<f32>], rows: &[usize], table: &ImageTable) -> Option<f64> {
    let probs: Vec<Vec<f64>> = scores.iter().map(|s| s.iter().map(|&v| f64::from(v)).collect()).collect();
    let k = table.num_classes();
    if table.meta.multi_label {
        let truth: Vec<Vec<u8>> =
            rows.iter().map(|&r| table.rows[r].labels.clone().unwrap_or_else(|| vec![0; k])).collect();
        msmae_metrics::metrics::multilabel_auc(&truth, &probs, k).mean_auc
    } else {
        let truth: Vec<usize> = rows.iter().map(|&r| table.rows[r].label.unwrap_or(0).max(0) as usize).collect();
        msmae_metrics::metrics::ovr_auc(&truth, &probs, k).macro_auc
    }
}

/// The input slots of a classifier stage: the image table, and for fine-tuning an optional
/// pre-trained encoder.
pub fn classifier_inputs(pretrained: bool) -> Vec<msmae_core::InputSlot> {
    use msmae_core::InputSlot;
    let mut v = vec![InputSlot::one("data", "image-table", "the image table to train and validate on")];
    if pretrained {
        v.push(
            InputSlot::optional("pretrained", "mae-checkpoint", "pre-trained encoder (none: from scratch)")
                .or_kind("vit-checkpoint"),
        );
    }
    v
}

/// Defines a classifier stage kind in the calling crate: a unit struct whose `Stage` impl
/// validates with [`validate_classifier`] and runs [`run_classifier`]. Its code
/// fingerprint is the calling crate's (which covers this crate's sources too).
///
/// `classifier_stage!(FinetuneFull, "finetune/full", ClassifierKind::Full, "summary", pretrained: true);`
#[macro_export]
macro_rules! classifier_stage {
    ($name:ident, $kind:expr, $ck:expr, $summary:expr, pretrained: $pretrained:expr) => {
        #[doc = $summary]
        #[derive(Debug, Default, Clone, Copy)]
        pub struct $name;

        impl ::msmae_core::Stage for $name {
            type Config = $crate::classifier::ClassifierConfig;
            const KIND: &'static str = $kind;
            const VERSION: u32 = 1;
            const SUMMARY: &'static str = $summary;
            const USES_BACKEND: bool = true;
            const DATA_PARALLEL: bool = true;
            const RUN_ONLY: &'static [&'static str] = &["checkpoint_every", "accum_steps"];

            fn code_fingerprint(&self) -> &'static str {
                ::msmae_core::code_fingerprint!()
            }
            fn validate(&self, c: &Self::Config) -> Result<(), ::msmae_core::ConfigError> {
                $crate::classifier::validate_classifier(c, $ck)
            }
            fn inputs(&self, _: &Self::Config) -> Vec<::msmae_core::InputSlot> {
                $crate::classifier::classifier_inputs($pretrained)
            }
            fn output(&self, _: &Self::Config) -> ::msmae_core::OutputDecl {
                $crate::classifier::classifier_output()
            }
            fn resources(&self, _: &Self::Config) -> ::msmae_core::Resources {
                ::msmae_core::Resources::Exclusive
            }
            fn run(
                &self,
                c: &Self::Config,
                ctx: &mut ::msmae_core::StageContext<'_>,
            ) -> Result<(), ::msmae_core::StageError> {
                $crate::classifier::run_classifier($ck, $kind, c, ctx)
            }
        }
    };
}
