//! `export/pytorch`: a trained model as PyTorch weights under the names the PyTorch
//! ecosystem uses, so a model pre-trained or fine-tuned here is used there unchanged:
//!
//! - a ViT checkpoint (`attention/train-supervised`, `finetune/*`) becomes the state dict
//!   of timm's `VisionTransformer` (`global_pool="avg", fc_norm=True` after fine-tuning,
//!   `"token"` otherwise), loadable with `strict=True`;
//! - an MAE checkpoint (`mae/pretrain`) becomes the state dict of the MAE reference code
//!   (`models_mae.MaskedAutoencoderViT`): the encoder keys a timm ViT or MAE's fine-tuning
//!   code loads, plus `decoder_*` and `mask_token` (`head.*` too when the CLS term was on).
//!
//! Files: `model.safetensors` (f32; linear weights `[out, in]`; LayerNorm `weight`/`bias`;
//! the fixed sin-cos `pos_embed` tables written out, as PyTorch modules keep them in their
//! state dict) and `config.json` (the constructor arguments, label names and pixel
//! normalisation, and a two-line recipe).

use std::collections::BTreeMap;

use burn::prelude::*;
use burn::store::{BurnToPyTorchAdapter, ModuleSnapshot, SafetensorsStore};
use serde::{Deserialize, Serialize};

use msmae_core::{ConfigError, InputSlot, OutputDecl, Stage, StageContext, StageError};
use msmae_vit::VitConfig;

use crate::model::{self, CheckpointMeta, Loaded};

pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const CONFIG_FILE: &str = "config.json";

/// `with:` of `export/pytorch` (nothing to choose yet: the layout follows the checkpoint).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ExportConfig {}

#[derive(Debug)]
pub struct ExportPytorch;

impl Stage for ExportPytorch {
    type Config = ExportConfig;
    const KIND: &'static str = "export/pytorch";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "a ViT or MAE checkpoint as PyTorch safetensors under timm/MAE names, with its constructor arguments";

    fn code_fingerprint(&self) -> &'static str {
        msmae_core::code_fingerprint!()
    }
    fn validate(&self, _: &ExportConfig) -> Result<(), ConfigError> {
        Ok(())
    }
    fn inputs(&self, _: &ExportConfig) -> Vec<InputSlot> {
        vec![InputSlot::one("model", "vit-checkpoint", "the model to export").or_kind("mae-checkpoint")]
    }
    fn output(&self, _: &ExportConfig) -> OutputDecl {
        OutputDecl::new("pytorch-weights", &[WEIGHTS_FILE, CONFIG_FILE])
    }
    fn run(&self, _: &ExportConfig, ctx: &mut StageContext<'_>) -> Result<(), StageError> {
        let input = ctx.input("model")?.clone();
        // Weights are moved, not computed: the CPU reference backend is enough, whatever
        // the run's backend.
        let device = msmae_backend::select(msmae_backend::BackendRequest::Flex, msmae_backend::DeviceRequest::Cpu).map_err(|e| StageError::other(e.to_string()))?.device;
        let (loaded, meta) = model::load(&input.dir, &device)?;
        let weights = ctx.output_path(WEIGHTS_FILE)?;
        let (bytes, config) = export(&loaded, &meta, &input.digest).map_err(|e| StageError::data(&input.dir.join(model::MODEL_FILE), None, e))?;
        std::fs::write(&weights, bytes).map_err(|e| StageError::io(&weights, e))?;
        let cfg = ctx.output_path(CONFIG_FILE)?;
        let text = serde_json::to_vec_pretty(&config).map_err(|e| StageError::other(e.to_string()))?;
        std::fs::write(&cfg, text).map_err(|e| StageError::io(&cfg, e))?;
        tracing::info!("`{}`: {} tensors under {} names → {}", ctx.name, config["tensors"], config["library"], weights.display());
        Ok(())
    }
}

/// The constructor arguments of timm's `VisionTransformer` for `v`.
fn timm_args(v: &VitConfig) -> serde_json::Value {
    serde_json::json!({
        "img_size": v.image_size,
        "patch_size": v.patch_size,
        "in_chans": v.in_chans,
        "num_classes": v.num_classes,
        "global_pool": if v.global_pool { "avg" } else { "token" },
        "fc_norm": v.global_pool,
        "embed_dim": v.embed_dim,
        "depth": v.depth,
        "num_heads": v.num_heads,
        "mlp_ratio": v.mlp_ratio,
        "qkv_bias": true,
        "class_token": true,
    })
}

fn f32_view(name: &str, shape: Vec<usize>, values: Vec<f32>) -> (String, (Vec<usize>, Vec<u8>)) {
    (name.to_string(), (shape, values.iter().flat_map(|v| v.to_le_bytes()).collect()))
}

fn table(t: &Tensor<3>) -> Result<(Vec<usize>, Vec<f32>), String> {
    let shape = t.dims().to_vec();
    let v = t.to_data().convert::<f32>().try_into_vec::<f32>().map_err(|e| format!("position table: {e:?}"))?;
    Ok((shape, v))
}

/// The safetensors bytes and `config.json` of a loaded checkpoint. `source` is the
/// checkpoint artifact's digest (recorded in the config).
pub fn export(loaded: &Loaded, meta: &CheckpointMeta, source: &str) -> Result<(Vec<u8>, serde_json::Value), String> {
    // burn's adapter does the PyTorch conventions (linear weights transposed, LayerNorm
    // gamma/beta → weight/bias); the MAE's `encoder.` nesting is flattened as in MAE.
    let mut store = SafetensorsStore::from_bytes(None).with_to_adapter(BurnToPyTorchAdapter).with_key_remapping(r"^encoder\.", "");
    match loaded {
        Loaded::Vit(m) => m.save_into(&mut store),
        Loaded::Mae(m) => m.save_into(&mut store),
    }
    .map_err(|e| format!("collecting the weights: {e}"))?;
    let bytes = store.get_bytes().map_err(|e| format!("collecting the weights: {e}"))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| format!("reading back the weights: {e}"))?;
    let mut tensors: BTreeMap<String, (Vec<usize>, Vec<u8>)> = BTreeMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(format!("tensor `{name}` is {:?}, expected f32", view.dtype()));
        }
        tensors.insert(name, (view.shape().to_vec(), view.data().to_vec()));
    }
    let (vit, config) = match loaded {
        Loaded::Vit(m) => {
            // timm: with fc_norm the final `norm` is an Identity (no parameters).
            if m.global_pool {
                tensors.remove("norm.weight");
                tensors.remove("norm.bias");
            }
            let (s, v) = table(&m.pos_embed)?;
            tensors.extend([f32_view("pos_embed", s, v)]);
            (&meta.vit, serde_json::json!({ "library": "timm", "class": "timm.models.vision_transformer.VisionTransformer", "model_args": timm_args(&meta.vit) }))
        }
        Loaded::Mae(m) => {
            let mae = meta.mae.as_ref().ok_or("an MAE checkpoint without its `mae` config")?;
            let (s, v) = table(&m.encoder.pos_embed)?;
            tensors.extend([f32_view("pos_embed", s, v)]);
            let (s, v) = table(&m.decoder_pos_embed)?;
            tensors.extend([f32_view("decoder_pos_embed", s, v)]);
            let e = &meta.vit;
            let args = serde_json::json!({
                "img_size": e.image_size, "patch_size": e.patch_size, "in_chans": e.in_chans,
                "embed_dim": e.embed_dim, "depth": e.depth, "num_heads": e.num_heads,
                "decoder_embed_dim": mae.decoder_embed_dim, "decoder_depth": mae.decoder_depth, "decoder_num_heads": mae.decoder_num_heads,
                "mlp_ratio": e.mlp_ratio, "norm_pix_loss": mae.norm_pix_loss,
            });
            // The encoder alone, as timm builds it for MAE fine-tuning (strict=False: the
            // decoder keys are extra, `fc_norm`/`head` new).
            let enc = VitConfig { global_pool: false, num_classes: e.num_classes, ..e.clone() };
            (&meta.vit, serde_json::json!({ "library": "mae", "class": "models_mae.MaskedAutoencoderViT", "model_args": args, "encoder_timm_args": timm_args(&enc) }))
        }
    };
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(k, (shape, data))| safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data).map(|v| (k.clone(), v)).map_err(|e| format!("tensor `{k}`: {e}")))
        .collect::<Result<_, _>>()?;
    let info = Some(std::collections::HashMap::from([("format".to_string(), "pt".to_string())]));
    let out = safetensors::serialize(views, info).map_err(|e| format!("writing the weights: {e}"))?;
    let mut config = config;
    let o = config.as_object_mut().ok_or("config is an object")?;
    o.insert("tensors".into(), tensors.len().into());
    o.insert("label_names".into(), serde_json::json!(meta.label_names));
    o.insert("multi_label".into(), meta.multi_label.into());
    o.insert("input".into(), serde_json::json!({
        "image_size": vit.image_size, "channels": vit.in_chans,
        "normalisation": "pixels / 255, then (x - mean) / std per channel",
        "mean": meta.normalizer.mean, "std": meta.normalizer.std,
    }));
    o.insert("trained_by".into(), meta.trained_by.clone().into());
    o.insert("source_artifact".into(), source.into());
    Ok((out, config))
}
