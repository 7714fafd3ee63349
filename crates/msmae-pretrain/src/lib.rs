//! `mae/pretrain`: MAE pre-training (docs/method.md §4). Without `masks` it is MAE with
//! random masking; with the weights of a `mask/*` stage it is MSMAE: random masking for a
//! warm-up, then attention-guided masking and throwing, the `cls_weight` classification
//! term, and the maps refreshed from the model being trained every `refresh_every` epochs.
//! Training runs through `msmae-train`'s one loop with a [`PretrainStep`]; the artifact
//! holds the checkpoint, history, loss chart and a reconstructions figure.

use std::collections::HashMap;
use std::sync::Arc;

use burn::prelude::*;

use msmae_core::{ConfigError, InputArtifact, InputSlot, OutputDecl, Resources, Stage, StageContext, StageError};
use msmae_data::table::Split;
use msmae_mask::MaskPolicy;
use msmae_train::classifier::class_targets;
use msmae_train::data::{self, Batch, ImageTable, LoaderSpec, MaskSpec, Normalizer};
use msmae_train::figures;
use msmae_train::fit::{self, EpochPlan, FitOptions, StepLoss, TrainData, TrainStep};
use msmae_train::maps::{MapState, Maps, attention_maps, read_maps, write_maps};
use msmae_train::model::{self, CheckpointKind, CheckpointMeta, Loaded, ModelSpec, Schedule, adamw};
use msmae_train::runtime::{self, Runtime, images, to_vec};
use msmae_train::support::{
    check_image_compat, clip_to_run, config_error, defaults, open_table, validate_accumulation, write_history,
};
use msmae_vit::attention_map::{MapMethod, MapReading, Smoothing};
use msmae_vit::patch::{gather_tokens, index_tensor, patchify};
use msmae_vit::{MaeConfig, MaskedAutoencoder};

fn d_epochs() -> usize {
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
fn d_min_lr() -> f64 {
    0.0
}

::msmae_train::training_config! {
/// `with:` of `mae/pretrain`.
pub struct PretrainConfig, defaults: {
        epochs: "d_epochs",
        blr: "::msmae_train::support::defaults::blr",
        min_lr: "d_min_lr",
        warmup_epochs: "::msmae_train::support::defaults::warmup_epochs",
        weight_decay: "::msmae_train::support::defaults::weight_decay",
        crop_scale: "::msmae_train::support::defaults::crop_scale",
    } {
    #[serde(default)]
    pub model: ModelSpec,
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
    /// How the refreshed maps are read from the model being trained: `cls` (the paper's
    /// last-block CLS attention, default), `rollout` or `gradient` (as `attention/extract`'s
    /// `method`; `gradient` needs the CLS head that `cls_weight` > 0 trains).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub map_method: Option<MapMethod>,
    /// Spatial smoothing of the refreshed maps on the patch grid before masking
    /// (`{ op: max, size: 3 }`; default none, the paper's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub map_smooth: Option<Smoothing>,
    /// Weight of the CLS-head cross-entropy (the supervision; 0 = plain MAE).
    #[serde(default = "d_cls_weight")]
    pub cls_weight: f64,
    #[serde(default)]
    pub norm_pix_loss: bool,
    /// Micro-batches each device computes a global batch in, summing their gradients
    /// before one optimiser step: memory falls with the micro-batch, the result does not
    /// change (up to float rounding), so it is not part of the cache key. `batch_size`
    /// stays the effective batch of every step (MAE's `batch_size × accum_iter × GPUs`).
    #[serde(default = "defaults::accum_steps")]
    pub accum_steps: usize,
    /// Validation images in `reconstructions.png`.
    #[serde(default = "defaults::figure_images")]
    pub figure_images: usize,
}
}

/// Attention-guided masking after the warm-up, from `maps` (refreshed in the loop).
#[derive(Debug, Clone)]
pub struct Guided {
    pub policy: MaskPolicy,
    pub warmup_mask_epochs: usize,
    /// Recompute the maps from the model every this many epochs after the warm-up (0: never).
    pub refresh_every: usize,
    /// How refreshed maps are read from the model (method, smoothing).
    pub reading: MapReading,
    pub maps: MapState,
}

/// One MAE pre-training step: [`MaskedAutoencoder::forward`]'s loss (reconstruction of the
/// masked patches + `cls_weight` × the CLS head's classification loss), the very loss the
/// PyTorch parity test checks.
#[derive(Debug)]
pub struct PretrainStep {
    pub rt: Runtime,
    pub table: Arc<ImageTable>,
    pub norm: Normalizer,
    pub rows: Vec<usize>,
    pub batch_size: usize,
    pub augment: Option<(f64, f64)>,
    pub cls_weight: f64,
    /// MAE random masking (the warm-up, or throughout without guidance).
    pub random: MaskPolicy,
    pub guided: Option<Guided>,
    pub grid: [usize; 2],
}

impl PretrainStep {
    /// The policy of epoch `epoch`.
    fn policy(&self, epoch: usize) -> MaskPolicy {
        match &self.guided {
            Some(g) if epoch >= g.warmup_mask_epochs => g.policy.clone(),
            _ => self.random.clone(),
        }
    }
}

impl TrainStep for PretrainStep {
    type Model = MaskedAutoencoder;

    fn epoch_plan(
        &mut self,
        epoch: usize,
        model: &MaskedAutoencoder,
        ctx: &StageContext<'_>,
    ) -> Result<EpochPlan, StageError> {
        let mut refreshed = false;
        if let Some(g) = &mut self.guided
            && epoch >= g.warmup_mask_epochs
        {
            let since = epoch - g.warmup_mask_epochs;
            if g.refresh_every > 0 && since > 0 && since.is_multiple_of(g.refresh_every) {
                g.maps.current = Some(Arc::new(attention_maps(
                    &model.encoder,
                    &self.table,
                    &self.rows,
                    &self.norm,
                    self.batch_size.max(64),
                    g.reading,
                    &self.rt,
                    ctx,
                )?));
                refreshed = true;
            }
        }
        let policy = self.policy(epoch);
        let mut spec = LoaderSpec::train(self.batch_size, self.augment);
        let weights =
            if policy.needs_weights() { self.guided.as_ref().and_then(|g| g.maps.current.clone()) } else { None };
        spec.masks = Some(MaskSpec { policy: policy.clone(), weights, grid: self.grid });
        let l = self.grid[0] * self.grid[1];
        Ok(EpochPlan {
            spec,
            masking: format!("{policy:?}"),
            tokens: policy.visible_count(l) + 1,
            refreshed_maps: refreshed,
        })
    }

    fn step(&mut self, model: &MaskedAutoencoder, batch: &mut Batch, device: &Device) -> Result<StepLoss, StageError> {
        let x = images(batch, &self.table, device);
        let vis: Vec<Vec<usize>> = batch.plans.iter().map(|p| p.visible.clone()).collect();
        let msk: Vec<Vec<usize>> = batch.plans.iter().map(|p| p.masked.clone()).collect();
        let cls = (self.cls_weight > 0.0).then(|| (class_targets(batch, &self.table, device), self.cls_weight));
        let out = model.forward(x, index_tensor(&vis, device), index_tensor(&msk, device), cls);
        Ok(StepLoss { loss: out.loss, reconstruction: Some(out.reconstruction_loss) })
    }

    fn maps(&mut self) -> Option<&mut MapState> {
        self.guided.as_mut().map(|g| &mut g.maps)
    }
}

/// `mae/pretrain`.
#[derive(Debug, Default, Clone, Copy)]
pub struct MaePretrain;

impl Stage for MaePretrain {
    type Config = PretrainConfig;
    const KIND: &'static str = "mae/pretrain";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str =
        "MAE pre-training; with `masks`: MSMAE attention-guided masking/throwing, CLS supervision, map refresh";
    const USES_BACKEND: bool = true;
    const DATA_PARALLEL: bool = true;
    const RUN_ONLY: &'static [&'static str] = &["checkpoint_every", "accum_steps"];

    fn code_fingerprint(&self) -> &'static str {
        msmae_core::code_fingerprint!()
    }
    fn validate(&self, c: &PretrainConfig) -> Result<(), ConfigError> {
        c.schedule().check()?;
        validate_accumulation(c.batch_size, c.accum_steps)?;
        if !(c.mask_ratio > 0.0 && c.mask_ratio < 1.0) {
            return config_error("mask_ratio", "must be in (0, 1): something must be masked and something visible");
        }
        if c.cls_weight < 0.0 {
            return config_error("cls_weight", "must be ≥ 0");
        }
        if c.map_method == Some(MapMethod::Gradient) && c.cls_weight == 0.0 {
            return config_error(
                "map_method",
                "`gradient` weighs attention by the gradient of the predicted class, and with `cls_weight: 0` the encoder has no classification head; use `cls` or `rollout`, or a `cls_weight` above 0",
            );
        }
        if let Some(Err(m)) = c.map_smooth.map(|s| s.check()) {
            return config_error("map_smooth", m);
        }
        Ok(())
    }
    fn inputs(&self, _: &PretrainConfig) -> Vec<InputSlot> {
        vec![
            InputSlot::one("data", "image-table", "the images (labels used only by the cls_weight term)"),
            InputSlot::optional(
                "masks",
                "mask-weights",
                "attention weights + policy from a mask/* stage (none: MAE random masking)",
            ),
            InputSlot::optional(
                "init",
                "mae-checkpoint",
                "continue from this MAE (a previous round of a `repeat:` group; none: fresh weights)",
            ),
        ]
    }
    fn output(&self, _: &PretrainConfig) -> OutputDecl {
        OutputDecl::new(
            "mae-checkpoint",
            &["model.safetensors", "model.json", "history.json", "reconstructions.png", "attention*.parquet", "*.png"],
        )
        .metric("epochs", "history.json", "/epochs/#")
        .metric("train_loss", "history.json", "/epochs/-1/train_loss")
        .metric("reconstruction_loss", "history.json", "/epochs/-1/reconstruction_loss")
        .figure("reconstructions (original, masked input, reconstruction)", "reconstructions.png")
        .figure("loss per epoch", "loss.png")
    }
    fn resources(&self, _: &PretrainConfig) -> Resources {
        Resources::Exclusive
    }
    fn run(&self, c: &PretrainConfig, ctx: &mut StageContext<'_>) -> Result<(), StageError> {
        let rt = runtime::runtime(ctx)?;
        let table = open_table(ctx, "data")?;
        c.model.check([table.height(), table.width()], table.channels()).map_err(|m| StageError::config("model", m))?;
        let init = ctx.inputs("init").first().cloned();
        let (model, norm, arch) = match &init {
            Some(i) => from_init(i, &table, c, &rt)?,
            None => fresh(&table, c, &rt, ctx.seed)?,
        };
        let grid = arch.encoder.grid();
        let masks = ctx.inputs("masks").first().cloned();
        let (random_ratio, guided) = match &masks {
            Some(m) => guidance(m, &table, grid, c)?,
            None => (c.mask_ratio, None),
        };
        runtime::materialise(&model);
        let rows = if c.cls_weight > 0.0 { table.labelled_rows_of(Split::Train) } else { table.rows_of(Split::Train) };
        let guided = guided.map(|(policy, maps)| Guided {
            policy,
            // At least the last epoch uses the attention-guided masks it was given.
            warmup_mask_epochs: clip_to_run(
                "warmup_mask_epochs",
                c.warmup_mask_epochs as f64,
                c.epochs.saturating_sub(1) as f64,
            ) as usize,
            refresh_every: c.refresh_every,
            reading: MapReading { method: c.map_method.unwrap_or_default(), smooth: c.map_smooth },
            maps: MapState { table: table.clone(), grid, current: Some(Arc::new(maps)) },
        });
        let augment = c.augment.then_some((c.crop_scale[0], c.crop_scale[1]));
        let random = MaskPolicy::Random { mask_ratio: random_ratio };
        let mut step = PretrainStep {
            rt: rt.clone(),
            table: table.clone(),
            norm: norm.clone(),
            rows: rows.clone(),
            batch_size: c.batch_size,
            augment,
            cls_weight: c.cls_weight,
            random,
            guided,
            grid,
        };
        let lr = c.blr * c.batch_size as f64 / 256.0;
        let opts = FitOptions {
            epochs: c.epochs,
            batch_size: c.batch_size,
            schedule: Schedule::warmup_cosine(lr, c.min_lr, c.warmup_epochs, c.epochs),
            checkpoint_every: c.checkpoint_every,
            patience: None,
            accum_steps: c.accum_steps,
        };
        let data = TrainData { table: table.clone(), rows, norm: norm.clone() };
        let res = fit::fit(ctx, &rt, &data, &mut step, model, |m| adamw(m, 0.95, c.weight_decay), &opts)?;
        let meta = CheckpointMeta {
            format: 1,
            kind: CheckpointKind::Mae,
            vit: arch.encoder.clone(),
            mae: Some(arch.clone()),
            normalizer: norm.clone(),
            label_names: table.meta.label_names.clone(),
            multi_label: table.meta.multi_label,
            trained_by: Self::KIND.into(),
        };
        model::save(ctx.out_dir(), &res.model, &meta)?;
        let maps = step.guided.as_ref().and_then(|g| g.maps.current.clone());
        if let Some(m) = maps.as_deref().filter(|m| c.refresh_every > 0 && !m.is_empty()) {
            write_maps(
                &ctx.output_path("attention.parquet")?,
                &table,
                m,
                grid,
                serde_json::json!({ "stage": Self::KIND, "name": ctx.name, "what": "maps in use at the end of pre-training" }),
            )?;
        }
        // The figure shows the masking of the last epoch that ran.
        let final_policy = step.policy(res.history.last().map_or(0, |h| h.epoch));
        reconstructions(ctx, &step, &res.model, &final_policy, maps.as_deref(), c.figure_images)?;
        let train_seconds: f64 = res.history.iter().map(|h| h.seconds).sum();
        tracing::info!("`{}`: {} epochs, {:.1} s of training steps", ctx.name, res.history.len(), train_seconds);
        write_history(ctx, &res.history, serde_json::json!({ "lr": lr, "policy": final_policy }))
    }
}

/// A fresh MAE for the table's images (with a CLS head over its classes when `cls_weight`
/// is on), initialised right after seeding the backend.
fn fresh(
    table: &ImageTable,
    c: &PretrainConfig,
    rt: &Runtime,
    seed: u64,
) -> Result<(MaskedAutoencoder, Normalizer, MaeConfig), StageError> {
    let mut arch = c.model.mae([table.height(), table.width()], table.channels()).with_norm_pix_loss(c.norm_pix_loss);
    if c.cls_weight > 0.0 {
        arch.encoder.num_classes = table.num_classes();
    }
    let norm = table.channel_stats(&table.rows_of(Split::Train))?;
    runtime::seed_backend(rt, seed, "init", 0);
    Ok((arch.init(&rt.train), norm, arch))
}

/// The MAE of `init` (a previous round), checked to fit the table and, with `cls_weight`,
/// to have a CLS head over the table's labels.
fn from_init(
    i: &InputArtifact,
    table: &ImageTable,
    c: &PretrainConfig,
    rt: &Runtime,
) -> Result<(MaskedAutoencoder, Normalizer, MaeConfig), StageError> {
    let what = i.dir.join(model::META_FILE);
    let (loaded, meta) = model::load(&i.dir, &rt.train)?;
    check_image_compat(&meta, table, &what)?;
    let (Loaded::Mae(mut m), Some(mut a)) = (loaded, meta.mae.clone()) else {
        return Err(StageError::data(&what, None, "`init` must be an MAE checkpoint (from mae/pretrain)"));
    };
    let k = table.num_classes();
    if c.cls_weight > 0.0 && (meta.label_names != table.meta.label_names || meta.multi_label != table.meta.multi_label)
    {
        return Err(StageError::data(
            &what,
            None,
            format!(
                "cls_weight {} needs the checkpoint's CLS head to mean the table's labels; it was trained on {:?}, the table has {:?}",
                c.cls_weight, meta.label_names, table.meta.label_names
            ),
        ));
    }
    if c.cls_weight > 0.0 && a.encoder.num_classes != k {
        return Err(StageError::data(
            &what,
            None,
            format!(
                "cls_weight {} needs a CLS head over the table's {k} classes; this checkpoint has {} (pre-train its first round with cls_weight > 0)",
                c.cls_weight, a.encoder.num_classes
            ),
        ));
    }
    a.norm_pix_loss = c.norm_pix_loss;
    m.norm_pix_loss = c.norm_pix_loss;
    Ok((m, meta.normalizer, a))
}

/// What a `mask/*` artifact asks for: the random-masking ratio, and for attention-guided
/// policies the policy with its starting maps (`mask/random`: MAE masking with the mask
/// stage's ratio throughout, no maps).
fn guidance(
    m: &InputArtifact,
    table: &ImageTable,
    grid: [usize; 2],
    c: &PretrainConfig,
) -> Result<(f64, Option<(MaskPolicy, Maps)>), StageError> {
    let pp = m.path("policy.json");
    let text = std::fs::read(&pp).map_err(|e| StageError::io(&pp, e))?;
    let policy: MaskPolicy = serde_json::from_slice(&text).map_err(|e| StageError::data(&pp, None, e.to_string()))?;
    policy.check().map_err(|e| StageError::data(&pp, None, e))?;
    if !policy.needs_weights() {
        let ratio = if let MaskPolicy::Random { mask_ratio } = policy { mask_ratio } else { c.mask_ratio };
        return Ok((ratio, None));
    }
    Ok((c.mask_ratio, Some((policy, read_maps(&m.path("weights.parquet"), table, grid)?))))
}

/// `reconstructions.png`: validation images (test if none) under the final policy.
fn reconstructions(
    ctx: &StageContext<'_>,
    step: &PretrainStep,
    mae: &MaskedAutoencoder,
    policy: &MaskPolicy,
    maps: Option<&Maps>,
    images_in_figure: usize,
) -> Result<(), StageError> {
    let (table, norm, rt) = (&step.table, &step.norm, &step.rt);
    let mut rows = table.rows_of(Split::Val);
    if rows.is_empty() {
        rows = table.rows_of(Split::Test);
    }
    rows.truncate(images_in_figure);
    if rows.is_empty() {
        return Ok(());
    }
    let model = mae.valid();
    let needs = policy.needs_weights();
    let weights: Maps = if needs {
        match maps.filter(|m| rows.iter().all(|r| m.contains_key(r))) {
            Some(m) => rows.iter().map(|r| (*r, m[r].clone())).collect(),
            None => attention_maps(
                &mae.encoder,
                table,
                &rows,
                norm,
                rows.len(),
                step.guided.as_ref().map(|g| g.reading).unwrap_or_default(),
                rt,
                ctx,
            )?,
        }
    } else {
        HashMap::new()
    };
    let mut spec = LoaderSpec::eval(rows.len());
    spec.masks = Some(MaskSpec { policy: policy.clone(), weights: needs.then(|| Arc::new(weights)), grid: step.grid });
    let (h, w, ch) = (table.height(), table.width(), table.channels());
    let p = mae.patch_size;
    let mut figure_rows = Vec::new();
    for batch in data::stream(table.clone(), &rows, spec, norm.clone(), ctx.seed, u64::MAX) {
        let mut batch = batch?;
        let imgs_host = batch.images.clone();
        let x = images(&mut batch, table, &rt.device);
        let vis: Vec<Vec<usize>> = batch.plans.iter().map(|p| p.visible.clone()).collect();
        let msk: Vec<Vec<usize>> = batch.plans.iter().map(|p| p.masked.clone()).collect();
        let (vt, mt) = (index_tensor(&vis, &rt.device), index_tensor(&msk, &rt.device));
        let latent = model.forward_encoder(x.clone(), vt.clone());
        let mut pred = model.forward_decoder(latent, vt, mt.clone());
        if model.norm_pix_loss {
            // Back from per-patch normalised targets to pixels, with the true patch stats.
            let target = gather_tokens(patchify(x, p), mt);
            let mean = target.clone().mean_dim(2);
            let var = target.var(2);
            pred = pred * (var + 1e-6).sqrt() + mean;
        }
        let [_, nm, pd] = pred.dims();
        let flat = to_vec(pred)?;
        for (i, plan) in batch.plans.iter().enumerate() {
            let chw = &imgs_host[i * ch * h * w..(i + 1) * ch * h * w];
            figure_rows.push(figures::reconstruction_row(
                chw,
                ch,
                h,
                w,
                p,
                plan,
                &flat[i * nm * pd..(i + 1) * nm * pd],
                norm,
            ));
        }
    }
    figures::save_sheet(&ctx.output_path("reconstructions.png")?, &figure_rows, 3)
}

/// Every stage kind of this crate.
pub fn register(r: &mut msmae_core::Registry) {
    r.register(MaePretrain);
}
