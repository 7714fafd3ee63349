//! Model specs in stage configs, checkpoints (burnpack record + JSON description), and the
//! optimiser plumbing shared by every training stage: AdamW with no weight decay on
//! biases, norms and tokens; per-step warm-up + cosine learning rate; layer-wise lr decay.

use std::path::Path;

use burn::module::{Module, ModuleVisitor, Param, ParamGroup, ParamId};
use burn::optim::ModuleOptimizer;
use burn::optim::lr_scheduler::module_lr_scheduler::{ModuleLearningRate, ModuleLrScheduler};
use burn::prelude::*;
use burn::store::{ModuleSnapshot, SafetensorsStore};
use serde::{Deserialize, Serialize};

use msmae_core::StageError;
use msmae_vit::{MaeConfig, MaskedAutoencoder, VisionTransformer, VitConfig};

use crate::data::{ImageTable, Normalizer};

/// Model size presets (docs/method.md §1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// CPU-sized: patch 8, dim 128, depth 4, 4 heads; decoder 64 × 2, 4 heads.
    #[default]
    Tiny,
    /// ViT-S: patch 16, dim 384, depth 12, 6 heads; decoder 256 × 4, 8 heads.
    Small,
    /// ViT-B/16 (paper scale): dim 768, depth 12, 12 heads; decoder 512 × 8, 16 heads.
    Base,
}

/// The `model:` block of a training stage: a preset, any field overridable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSpec {
    pub preset: Preset,
    pub patch_size: Option<usize>,
    pub embed_dim: Option<usize>,
    pub depth: Option<usize>,
    pub num_heads: Option<usize>,
    pub mlp_ratio: Option<f64>,
    pub decoder_dim: Option<usize>,
    pub decoder_depth: Option<usize>,
    pub decoder_heads: Option<usize>,
}

impl ModelSpec {
    /// The encoder for images of `image_size` with `in_chans` channels.
    pub fn vit(&self, image_size: [usize; 2], in_chans: usize) -> VitConfig {
        let (p, d, l, h) = match self.preset {
            Preset::Tiny => (8, 128, 4, 4),
            Preset::Small => (16, 384, 12, 6),
            Preset::Base => (16, 768, 12, 12),
        };
        let mut c = VitConfig::new(
            image_size,
            self.patch_size.unwrap_or(p),
            in_chans,
            self.embed_dim.unwrap_or(d),
            self.depth.unwrap_or(l),
            self.num_heads.unwrap_or(h),
        );
        if let Some(r) = self.mlp_ratio {
            c.mlp_ratio = r;
        }
        c
    }

    /// The MAE around [`Self::vit`].
    pub fn mae(&self, image_size: [usize; 2], in_chans: usize) -> MaeConfig {
        let (dd, dl, dh) = match self.preset {
            Preset::Tiny => (64, 2, 4),
            Preset::Small => (256, 4, 8),
            Preset::Base => (512, 8, 16),
        };
        MaeConfig::new(
            self.vit(image_size, in_chans),
            self.decoder_dim.unwrap_or(dd),
            self.decoder_depth.unwrap_or(dl),
            self.decoder_heads.unwrap_or(dh),
        )
    }

    /// Check the spec against an image size (divisibility, heads).
    pub fn check(&self, image_size: [usize; 2], in_chans: usize) -> Result<(), String> {
        let m = self.mae(image_size, in_chans);
        m.encoder.check()?;
        if m.decoder_num_heads == 0
            || !m.decoder_embed_dim.is_multiple_of(m.decoder_num_heads)
            || !m.decoder_embed_dim.is_multiple_of(4)
        {
            return Err(format!(
                "decoder_dim {} must be divisible by decoder_heads {} and by 4",
                m.decoder_embed_dim, m.decoder_num_heads
            ));
        }
        Ok(())
    }
}

/// What a checkpoint holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckpointKind {
    /// A [`VisionTransformer`] (classifier).
    Vit,
    /// A [`MaskedAutoencoder`] (pre-training).
    Mae,
}

/// `model.json`: everything needed to rebuild and use the weights file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub format: u32,
    pub kind: CheckpointKind,
    pub vit: VitConfig,
    pub mae: Option<MaeConfig>,
    pub normalizer: Normalizer,
    pub label_names: Vec<String>,
    pub multi_label: bool,
    /// Kind of the stage that trained it.
    pub trained_by: String,
}

impl CheckpointMeta {
    /// The metadata of a ViT classifier trained on `table` by `trained_by`.
    pub fn classifier(vit: VitConfig, normalizer: Normalizer, table: &ImageTable, trained_by: &str) -> Self {
        Self {
            format: 1,
            kind: CheckpointKind::Vit,
            vit,
            mae: None,
            normalizer,
            label_names: table.meta.label_names.clone(),
            multi_label: table.meta.multi_label,
            trained_by: trained_by.to_string(),
        }
    }
}

/// Weights as safetensors (burn parameter names). Not burnpack: burnpack stores the random
/// per-process parameter ids, which would make two identical runs differ byte-wise.
pub const MODEL_FILE: &str = "model.safetensors";
pub const META_FILE: &str = "model.json";

/// A loaded checkpoint (built once per stage and unpacked at once: the size difference
/// between the variants costs nothing).
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Loaded {
    Vit(VisionTransformer),
    Mae(MaskedAutoencoder),
}

impl Loaded {
    /// The encoder (of an MAE: its encoder).
    pub fn into_encoder(self) -> VisionTransformer {
        match self {
            Loaded::Vit(v) => v,
            Loaded::Mae(m) => m.encoder,
        }
    }
}

fn json_err(path: &Path, e: impl std::fmt::Display) -> StageError {
    StageError::data(path, None, e.to_string())
}

/// Read `model.json` of a checkpoint directory.
pub fn read_meta(dir: &Path) -> Result<CheckpointMeta, StageError> {
    let p = dir.join(META_FILE);
    let bytes = std::fs::read(&p).map_err(|e| StageError::io(&p, e))?;
    let meta: CheckpointMeta = serde_json::from_slice(&bytes).map_err(|e| json_err(&p, e))?;
    if meta.format != 1 {
        return Err(json_err(&p, format!("checkpoint format {} is not supported (expected 1)", meta.format)));
    }
    Ok(meta)
}

fn load_weights<M: Module>(mut model: M, p: &Path) -> Result<M, StageError> {
    let mut store = SafetensorsStore::from_file(p);
    let r = model.load_from(&mut store).map_err(|e| json_err(p, format!("cannot load weights: {e}")))?;
    if !r.missing.is_empty() || !r.errors.is_empty() {
        let missing: Vec<&str> = r.missing.iter().map(|(k, _)| k.as_str()).collect();
        return Err(json_err(p, format!("weights do not fit the model: missing {missing:?}, errors {:?}", r.errors)));
    }
    Ok(model)
}

/// Load a checkpoint directory onto `device`.
pub fn load(dir: &Path, device: &Device) -> Result<(Loaded, CheckpointMeta), StageError> {
    let meta = read_meta(dir)?;
    let p = dir.join(MODEL_FILE);
    let loaded = match (meta.kind, &meta.mae) {
        (CheckpointKind::Vit, _) => Loaded::Vit(load_weights(meta.vit.init(device), &p)?),
        (CheckpointKind::Mae, Some(m)) => Loaded::Mae(load_weights(m.init(device), &p)?),
        (CheckpointKind::Mae, None) => {
            return Err(json_err(&dir.join(META_FILE), "an MAE checkpoint without its `mae` config"));
        }
    };
    Ok((loaded, meta))
}

/// Write the weights and `model.json` into `dir` (files named as declared by the stages).
pub fn save<M: Module>(dir: &Path, model: &M, meta: &CheckpointMeta) -> Result<(), StageError> {
    let p = dir.join(MODEL_FILE);
    // One metadata entry: the default three live in a HashMap, so their order (and the
    // file bytes) would change from run to run.
    let mut store =
        SafetensorsStore::from_file(&p).overwrite(true).clear_metadata().metadata("producer", "msmae (burn 0.22.1)");
    model.save_into(&mut store).map_err(|e| StageError::write(&p, e.to_string()))?;
    let j = dir.join(META_FILE);
    let bytes = serde_json::to_vec_pretty(meta).map_err(|e| json_err(&j, e))?;
    std::fs::write(&j, bytes).map_err(|e| StageError::io(&j, e))
}

/// Parameters that get no weight decay: every 1-D tensor (biases, norm scales/shifts) and
/// the learned tokens (`cls_token`, `mask_token`) — MAE/timm's rule.
struct NoDecay(Vec<ParamId>);

impl ModuleVisitor for NoDecay {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let shape = param.lazy_shape();
        let token = D == 3 && shape[0] == 1 && shape[1] == 1;
        if D == 1 || token {
            self.0.push(param.id);
        }
    }
}

/// The parameters [`adamw`] exempts from weight decay.
pub fn no_decay_ids<M: Module>(model: &M) -> Vec<ParamId> {
    let mut v = NoDecay(Vec::new());
    model.visit(&mut v);
    v.0
}

/// AdamW (β 0.9/`beta2`, ε 1e-8, PyTorch's defaults otherwise) with `weight_decay` on
/// weight matrices only ([`msmae_vit::optim::LeanAdamW`]: burn's update with fewer buffers).
pub fn adamw<M: Module>(model: &M, beta2: f64, weight_decay: f64) -> ModuleOptimizer {
    let opt = msmae_vit::optim::LeanAdamW { beta_1: 0.9, beta_2: beta2, epsilon: 1e-8, weight_decay };
    ModuleOptimizer::from(opt).with_group(
        ParamGroup::from_ids(no_decay_ids(model)),
        msmae_vit::optim::LeanAdamW { weight_decay: 0.0, ..opt },
        None,
    )
}

/// Linear warm-up then half-cosine to `min_lr`, evaluated per step with fractional epochs
/// (MAE's `adjust_learning_rate`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_epochs: f64,
    pub epochs: f64,
}

impl Schedule {
    /// Warm-up to `lr` then cosine to `min_lr` over `epochs`, the warm-up clipped to the run
    /// (with a warning naming the field) — the schedule of every training stage.
    pub fn warmup_cosine(lr: f64, min_lr: f64, warmup_epochs: f64, epochs: usize) -> Self {
        let epochs = epochs as f64;
        Self { lr, min_lr, warmup_epochs: crate::support::clip_to_run("warmup_epochs", warmup_epochs, epochs), epochs }
    }

    /// Learning rate at fractional epoch `e`.
    pub fn at(&self, e: f64) -> f64 {
        if e < self.warmup_epochs {
            self.lr * e / self.warmup_epochs
        } else {
            let span = (self.epochs - self.warmup_epochs).max(1e-12);
            let t = ((e - self.warmup_epochs) / span).clamp(0.0, 1.0);
            self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
        }
    }
}

/// Layer-wise learning-rate decay for a ViT (BEiT/MAE fine-tuning): layer 0 is the patch
/// embedding and CLS token, layer i+1 block i, layer depth+1 everything after the blocks;
/// the scale of layer `l` is `decay^(depth + 1 − l)`.
#[derive(Debug, Clone)]
pub struct LayerDecay {
    groups: Vec<(ParamGroup, f64)>,
}

impl LayerDecay {
    pub fn new(vit: &VisionTransformer, decay: f64) -> Self {
        let depth = vit.blocks.len();
        let top = (depth + 1) as i32;
        let mut groups = Vec::new();
        if (decay - 1.0).abs() > 1e-12 {
            let mut embed = Vec::new();
            struct Ids<'a>(&'a mut Vec<ParamId>);
            impl ModuleVisitor for Ids<'_> {
                fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                    self.0.push(param.id);
                }
            }
            vit.patch_embed.visit(&mut Ids(&mut embed));
            embed.push(vit.cls_token.id);
            groups.push((ParamGroup::from_ids(embed), decay.powi(top)));
            for (i, b) in vit.blocks.iter().enumerate() {
                let mut ids = Vec::new();
                b.visit(&mut Ids(&mut ids));
                groups.push((ParamGroup::from_ids(ids), decay.powi(top - 1 - i as i32)));
            }
        }
        Self { groups }
    }

    /// The per-parameter learning rates for a step at base rate `lr`.
    pub fn rates(&self, lr: f64) -> ModuleLearningRate {
        let mut s = ModuleLrScheduler::new(lr);
        for (g, scale) in &self.groups {
            s = s.with_group(g.clone(), lr * scale);
        }
        s.step()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_min() {
        let s = Schedule { lr: 1e-3, min_lr: 1e-6, warmup_epochs: 5.0, epochs: 50.0 };
        assert_eq!(s.at(0.0), 0.0);
        assert!((s.at(2.5) - 5e-4).abs() < 1e-12);
        assert!((s.at(5.0) - 1e-3).abs() < 1e-12);
        assert!((s.at(50.0) - 1e-6).abs() < 1e-12);
        assert!(s.at(20.0) > s.at(30.0));
    }

    #[test]
    fn presets_and_overrides() {
        let s = ModelSpec { preset: Preset::Base, ..Default::default() };
        let v = s.vit([224, 224], 3);
        assert_eq!((v.patch_size, v.embed_dim, v.depth, v.num_heads), (16, 768, 12, 12));
        let t = ModelSpec { depth: Some(2), ..Default::default() };
        assert_eq!(t.vit([64, 64], 1).depth, 2);
        assert!(ModelSpec { patch_size: Some(7), ..Default::default() }.check([64, 64], 1).is_err());
    }
}
