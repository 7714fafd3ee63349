//! Linear probing (`finetune/linear`), the standard evaluation of a self-supervised encoder
//! as MAE's reference recipe runs it: the encoder frozen and run without autodiff, its
//! pooled features (normed CLS token, or the mean of the patch tokens) through a
//! `BatchNorm` without affine parameters and a linear head, trained with LARS, light
//! augmentation (random resized crops and flips), warm-up + cosine. The result is saved as
//! an ordinary ViT classifier: the batch norm's running statistics folded into the head, so
//! `eval/*`, `attention/extract` and `export/pytorch` take it like any fine-tuned model.

use std::sync::Arc;

use burn::nn::{BatchNorm, BatchNormConfig, Initializer, Linear, LinearConfig};
use burn::optim::ModuleOptimizer;
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use msmae_core::{ConfigError, StageContext, StageError};
use msmae_data::table::Split;
use msmae_vit::layers::LayerNorm;
use msmae_vit::loss::classification_loss;
use msmae_vit::optim::Lars;
use msmae_vit::{VisionTransformer, VitConfig};

use crate::classifier::{SelectOn, class_targets, validate_classifier_on, write_preds};
use crate::data::{Batch, ImageTable, LoaderSpec, Normalizer};
use crate::fit::{self, EpochPlan, FitOptions, StepLoss, TrainData, TrainStep, Validation};
use crate::model::{self, CheckpointMeta, Schedule};
use crate::runtime::{self, Runtime, images};
use crate::support::{check_image_compat, config_error, open_table, write_history};

/// Which features of the frozen encoder the head reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbePool {
    /// The CLS token after the encoder's final norm (the reference's default).
    #[default]
    Cls,
    /// The mean of the patch tokens, layer-normed without learned scale (the reference's
    /// `--global_pool`).
    Mean,
}

fn d_epochs() -> usize {
    90
}
fn d_blr() -> f64 {
    0.1
}
fn d_warmup() -> f64 {
    10.0
}
fn d_momentum() -> f64 {
    0.9
}
fn d_trust() -> f64 {
    0.001
}
fn d_crop() -> [f64; 2] {
    [0.08, 1.0]
}

::msmae_train::training_config! {
/// `with:` of `finetune/linear` (defaults: MAE's `main_linprobe.py`). Its `weight_decay` is
/// LARS's, on matrices only; the reference probes with 0.
pub struct LinearProbeConfig, defaults: {
        epochs: "d_epochs",
        blr: "d_blr",
        min_lr: "Default::default",
        warmup_epochs: "d_warmup",
        weight_decay: "Default::default",
        crop_scale: "d_crop",
    } {
    #[serde(default = "d_momentum")]
    pub momentum: f64,
    #[serde(default = "d_trust")]
    pub trust_coefficient: f64,
    #[serde(default)]
    pub pool: ProbePool,
    /// Images the frozen encoder embeds at once (memory only: features are the same).
    #[serde(default = "d_encoder_batch")]
    pub encoder_batch: usize,
    #[serde(default)]
    pub select_on: SelectOn,
    #[serde(default)]
    pub patience: Option<usize>,
}
}

fn d_encoder_batch() -> usize {
    256
}

pub fn validate_linear_probe(c: &LinearProbeConfig) -> Result<(), ConfigError> {
    c.schedule().check()?;
    if c.batch_size < 2 {
        return config_error(
            "batch_size",
            "must be at least 2: the batch norm before the head normalises over the batch",
        );
    }
    if !(0.0..1.0).contains(&c.momentum) {
        return config_error("momentum", "must be in [0, 1)");
    }
    if !(c.trust_coefficient > 0.0 && c.trust_coefficient.is_finite()) {
        return config_error("trust_coefficient", "must be a positive number");
    }
    if !(c.weight_decay >= 0.0 && c.weight_decay.is_finite()) {
        return config_error("weight_decay", "must be ≥ 0");
    }
    if c.encoder_batch == 0 {
        return config_error("encoder_batch", "must be at least 1");
    }
    Ok(())
}

/// The trained part: `BatchNorm` (γ = 1 and β = 0, not trained) and the linear head.
#[derive(Module, Debug)]
pub struct LinearProbe {
    pub bn: BatchNorm,
    pub head: Linear,
}

/// The batch norm's epsilon (the reference's `BatchNorm1d(eps=1e-6)`).
const BN_EPS: f64 = 1e-6;

impl LinearProbe {
    pub fn new(dim: usize, classes: usize, device: &Device) -> Self {
        let mut bn = BatchNormConfig::new(dim).with_epsilon(BN_EPS).init(device);
        bn.gamma = bn.gamma.set_require_grad(false);
        bn.beta = bn.beta.set_require_grad(false);
        let head =
            LinearConfig::new(dim, classes).with_initializer(Initializer::Normal { mean: 0.0, std: 0.01 }).init(device);
        Self { bn, head }
    }

    /// # Shapes
    /// - features: `[batch, dim]` → logits `[batch, classes]`
    pub fn forward(&self, features: Tensor<2>) -> Tensor<2> {
        self.head.forward(self.bn.forward(features))
    }

    /// The head with the batch norm's running statistics folded in, on `device`:
    /// `W' = W / √(σ² + ε)` row by row and `b' = b − μ/√(σ² + ε) · W` (burn's `[in, out]`
    /// weight layout), the same logits in eval mode.
    pub fn folded_head(&self, device: &Device) -> Linear {
        let mean = self.bn.running_mean.value().inner().to_device(device);
        let var = self.bn.running_var.value().inner().to_device(device);
        let w = self.head.weight.val().inner().to_device(device);
        let [d, k] = w.dims();
        let inv = (var + BN_EPS).sqrt().recip();
        let w2 = w.clone() * inv.clone().reshape([d, 1]);
        let shift = (mean * inv).reshape([1, d]).matmul(w).reshape([k]);
        let b = match &self.head.bias {
            Some(b) => b.val().inner().to_device(device),
            None => Tensor::zeros([k], device),
        };
        Linear { weight: burn::module::Param::from_tensor(w2), bias: Some(burn::module::Param::from_tensor(b - shift)) }
    }
}

/// One linear-probe step: features of the frozen encoder (no autodiff, in chunks of
/// `encoder_batch`), then the probe's cross-entropy (BCE for multi-label tables).
#[derive(Debug)]
pub struct LinearProbeStep {
    pub rt: Runtime,
    pub table: Arc<ImageTable>,
    pub norm: Normalizer,
    /// The frozen encoder as a classifier without head: eval mode, on the plain device,
    /// pooling as the probe reads it.
    pub encoder: VisionTransformer,
    pub batch_size: usize,
    pub encoder_batch: usize,
    pub augment: Option<(f64, f64)>,
    pub select_on: SelectOn,
    pub arch: VitConfig,
    val_rows: Vec<usize>,
}

impl LinearProbeStep {
    /// The pooled features of a batch's images, on the plain device.
    fn features(&self, batch: &mut Batch) -> Tensor<2> {
        let x = images(batch, &self.table, &self.rt.device);
        let [n, _, _, _] = x.dims();
        let chunks: Vec<Tensor<2>> = (0..n)
            .step_by(self.encoder_batch)
            .map(|s| {
                let part = x.clone().narrow(0, s, self.encoder_batch.min(n - s));
                let tokens = self.encoder.with_cls(self.encoder.embed(part));
                let (tokens, _, _) = self.encoder.blocks_forward(tokens, false, &[]);
                self.encoder.pool(tokens)
            })
            .collect();
        Tensor::cat(chunks, 0)
    }

    /// The probe as a ViT classifier: the frozen encoder with the folded head.
    pub fn classifier(&self, probe: &LinearProbe) -> VisionTransformer {
        let mut vit = self.encoder.clone();
        vit.head = Some(probe.folded_head(&self.rt.device));
        vit
    }
}

impl TrainStep for LinearProbeStep {
    type Model = LinearProbe;

    fn epoch_plan(
        &mut self,
        _epoch: usize,
        _model: &LinearProbe,
        _ctx: &StageContext<'_>,
    ) -> Result<EpochPlan, StageError> {
        let spec = LoaderSpec::train(self.batch_size, self.augment);
        let tokens = self.arch.grid()[0] * self.arch.grid()[1] + 1;
        Ok(EpochPlan { spec, masking: "none (frozen encoder)".into(), tokens, refreshed_maps: false })
    }

    fn step(&mut self, model: &LinearProbe, batch: &mut Batch, device: &Device) -> Result<StepLoss, StageError> {
        let features = self.features(batch).to_device(&device.clone().inner()).autodiff();
        let logits = model.forward(features);
        Ok(StepLoss {
            loss: classification_loss(logits, class_targets(batch, &self.table, device), 0.0),
            reconstruction: None,
        })
    }

    fn validate(&mut self, model: &LinearProbe, ctx: &StageContext<'_>) -> Result<Validation, StageError> {
        let vit = self.classifier(model);
        validate_classifier_on(
            &vit,
            &self.table,
            &self.val_rows,
            &self.norm,
            self.batch_size,
            self.select_on,
            &self.rt,
            ctx,
        )
    }
}

/// What `Stage::run` of `finetune/linear` does: load the encoder, train the probe through
/// [`fit::fit`], save the folded classifier, val/test predictions and the history.
pub fn run_linear_probe(stage_kind: &str, c: &LinearProbeConfig, ctx: &mut StageContext<'_>) -> Result<(), StageError> {
    let rt = runtime::runtime(ctx)?;
    let table = open_table(ctx, "data")?;
    let k = table.num_classes();
    if k < 2 {
        return Err(StageError::data(&table.path, None, format!("{k} classes: a classifier needs at least 2")));
    }
    runtime::seed_backend(&rt, ctx.seed, "init", 0);
    let input = ctx.input("pretrained")?.clone();
    let (loaded, meta) = model::load(&input.dir, &rt.device)?;
    check_image_compat(&meta, &table, &input.dir.join(model::META_FILE))?;
    let mut encoder = loaded.into_encoder().valid();
    let arch = VitConfig { num_classes: k, drop_path: 0.0, global_pool: c.pool == ProbePool::Mean, ..meta.vit.clone() };
    encoder.head = None;
    encoder.global_pool = arch.global_pool;
    encoder.fc_norm = arch.global_pool.then(|| LayerNorm::new(arch.embed_dim, arch.norm_eps, &rt.device));
    for b in &mut encoder.blocks {
        b.drop_path = 0.0;
    }
    let probe = LinearProbe::new(arch.embed_dim, k, &rt.train);
    let mut step = LinearProbeStep {
        rt: rt.clone(),
        table: table.clone(),
        norm: meta.normalizer.clone(),
        encoder,
        batch_size: c.batch_size,
        encoder_batch: c.encoder_batch,
        augment: c.augment.then_some((c.crop_scale[0], c.crop_scale[1])),
        select_on: c.select_on,
        arch: arch.clone(),
        val_rows: table.labelled_rows_of(Split::Val),
    };
    let lr = c.blr * c.batch_size as f64 / 256.0;
    let data =
        TrainData { table: table.clone(), rows: table.labelled_rows_of(Split::Train), norm: meta.normalizer.clone() };
    let opts = FitOptions {
        epochs: c.epochs,
        batch_size: c.batch_size,
        schedule: Schedule::warmup_cosine(lr, c.min_lr, c.warmup_epochs, c.epochs),
        checkpoint_every: c.checkpoint_every,
        patience: c.patience,
        accum_steps: 1,
    };
    let lars = Lars { momentum: c.momentum, weight_decay: c.weight_decay, trust_coefficient: c.trust_coefficient };
    let res = fit::fit(ctx, &rt, &data, &mut step, probe, |_| ModuleOptimizer::from(lars), &opts)?;
    let vit = step.classifier(&res.model);
    let ck = CheckpointMeta::classifier(arch, meta.normalizer.clone(), &table, stage_kind);
    model::save(ctx.out_dir(), &vit, &ck)?;
    let provenance = serde_json::json!({ "stage": stage_kind, "name": ctx.name, "seed": ctx.seed, "pretrained": input.digest, "best_epoch": res.best_epoch, "pool": c.pool });
    write_preds(
        ctx,
        &rt,
        &table,
        &vit,
        &meta.normalizer,
        c.batch_size.max(64),
        provenance.clone(),
        "predictions.parquet",
    )?;
    if let Some(last) = &res.last {
        write_preds(
            ctx,
            &rt,
            &table,
            &step.classifier(last),
            &meta.normalizer,
            c.batch_size.max(64),
            provenance,
            "predictions_last.parquet",
        )?;
    }
    let train_seconds: f64 = res.history.iter().map(|h| h.seconds).sum();
    tracing::info!(
        "`{}`: linear probe, {} epochs, {:.1} s of training steps ({:.2} s/epoch)",
        ctx.name,
        res.history.len(),
        train_seconds,
        train_seconds / res.history.len().max(1) as f64
    );
    write_history(ctx, &res.history, serde_json::json!({ "best_epoch": res.best_epoch, "lr": lr, "pool": c.pool }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The schedule fields every training kind shares read at the top level of `with:`
    /// beside the kind's own, each kind with its defaults; the config serialises flat (as
    /// the cache key has always seen it); misspelt keys are refused by name.
    #[test]
    fn the_shared_schedule_reads_at_the_top_level_with_each_kinds_defaults() {
        use crate::classifier::ClassifierConfig;
        let probe: LinearProbeConfig = serde_json::from_value(serde_json::json!({})).expect("defaults");
        let s = probe.schedule();
        assert_eq!((s.epochs, s.blr, s.min_lr, s.warmup_epochs, s.weight_decay), (90, 0.1, 0.0, 10.0, 0.0));
        assert_eq!((s.batch_size, s.augment, s.crop_scale, s.checkpoint_every), (64, true, [0.08, 1.0], 5));
        let cls: ClassifierConfig = serde_json::from_value(serde_json::json!({})).expect("defaults");
        let s = cls.schedule();
        assert_eq!((s.epochs, s.blr, s.min_lr, s.warmup_epochs, s.weight_decay), (30, 1e-3, 1e-6, 5.0, 0.05));
        assert_eq!(s.crop_scale, [0.2, 1.0]);
        let set = serde_json::json!({
            "epochs": 7, "batch_size": 32, "blr": 0.5, "min_lr": 0.001, "warmup_epochs": 1.5,
            "weight_decay": 0.01, "augment": false, "crop_scale": [0.3, 0.9], "checkpoint_every": 2,
            "momentum": 0.8, "pool": "mean",
        });
        let probe: LinearProbeConfig = serde_json::from_value(set.clone()).expect("every shared field");
        let back = serde_json::to_value(&probe).expect("json");
        for (k, v) in set.as_object().expect("object") {
            assert_eq!(&back[k], v, "`{k}` at the top level");
        }
        assert_eq!(probe.schedule().check(), Ok(()));
        for bad in ["epoch", "warmup", "crop"] {
            let e = serde_json::from_value::<LinearProbeConfig>(serde_json::json!({ bad: 1 }))
                .expect_err("unknown")
                .to_string();
            assert!(e.contains(&format!("unknown field `{bad}`")), "{e}");
        }
        let bad: LinearProbeConfig =
            serde_json::from_value(serde_json::json!({ "crop_scale": [0.9, 0.2] })).expect("parses");
        assert_eq!(bad.schedule().check().expect_err("min > max").path, "crop_scale");
    }

    /// The folded head gives the probe's eval-mode logits.
    #[test]
    fn folding_the_batch_norm_into_the_head_keeps_the_logits() {
        let dev = Device::flex();
        let train = dev.clone().autodiff();
        let probe = LinearProbe::new(4, 3, &train);
        // running statistics from two training-mode passes
        for s in [1.0f32, 3.0] {
            let x =
                Tensor::<2>::from_floats([[0.1 * s, 2.0, -1.0, 0.5], [0.4, -s, 0.3, 2.0], [1.5, 0.2, s, -0.7]], &train);
            let _ = probe.forward(x);
        }
        let probe_eval = probe.valid();
        let x = Tensor::<2>::from_floats([[0.3, -0.2, 1.1, 0.0], [2.0, 1.0, -1.0, 0.25]], &dev);
        let want = probe_eval.forward(x.clone()).into_data().try_to_vec::<f32>().expect("want");
        let got = probe.folded_head(&dev).forward(x).into_data().try_to_vec::<f32>().expect("got");
        for (a, b) in want.iter().zip(&got) {
            assert!((a - b).abs() < 1e-5, "{want:?} vs {got:?}");
        }
        let mean = probe.bn.running_mean.value().into_data().try_to_vec::<f32>().expect("mean");
        assert!(mean.iter().any(|m| m.abs() > 1e-3), "training passes moved the running mean: {mean:?}");
    }

    #[test]
    fn the_batch_norm_has_no_trained_affine_parameters() {
        let probe = LinearProbe::new(4, 2, &Device::flex().autodiff());
        assert!(!probe.bn.gamma.is_require_grad() && !probe.bn.beta.is_require_grad());
        assert!(probe.head.weight.is_require_grad());
    }
}
