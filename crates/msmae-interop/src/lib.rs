//! Models to and from PyTorch, under the names the PyTorch ecosystem uses.
//!
//! `export/pytorch` writes a trained model so it is used there unchanged:
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
//! normalisation).
//!
//! `import/pytorch` reads such a state dict (an export, MAE's released checkpoints
//! converted to safetensors, a timm ViT with sin-cos positions) into a checkpoint artifact
//! the other stages take: fine-tune from ImageNet MAE weights, extract attention from a
//! timm classifier. Every tensor must fit the declared architecture, nothing may be left
//! over, and position tables must be the fixed sin-cos ones msmae computes (learned
//! position embeddings are refused, not silently replaced).

pub mod pth;

use std::collections::BTreeMap;
use std::path::PathBuf;

use burn::prelude::*;
use burn::store::{BurnToPyTorchAdapter, ModuleSnapshot, PyTorchToBurnAdapter, SafetensorsStore};
use serde::{Deserialize, Serialize};

use msmae_core::{ConfigError, InputSlot, ListedFiles, OutputDecl, Stage, StageContext, StageError};
use msmae_vit::VitConfig;

use msmae_train::data::Normalizer;
use msmae_train::model::{self, CheckpointKind, CheckpointMeta, Loaded, ModelSpec};
use msmae_train::support::config_error as err;

/// MAE nests its encoder's keys at the top level; msmae under `encoder.`.
const MAE_ENCODER_KEYS: &str = r"^(patch_embed\.|cls_token|blocks\.|norm\.|head\.)";

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
    const SUMMARY: &'static str =
        "a ViT or MAE checkpoint as PyTorch safetensors under timm/MAE names, with its constructor arguments";

    fn code_fingerprint(&self) -> &'static str {
        msmae_core::code_fingerprint!()
    }
    fn inputs(&self, _: &ExportConfig) -> Vec<InputSlot> {
        vec![InputSlot::one("model", "vit-checkpoint", "the model to export").or_kind("mae-checkpoint")]
    }
    fn output(&self, _: &ExportConfig) -> OutputDecl {
        OutputDecl::new("pytorch-weights", &[WEIGHTS_FILE, CONFIG_FILE])
    }
    fn run(&self, _: &ExportConfig, ctx: &mut StageContext<'_>) -> Result<(), StageError> {
        let input = ctx.input("model")?.clone();
        let (loaded, meta) = model::load(&input.dir, &cpu()?)?;
        let weights = ctx.output_path(WEIGHTS_FILE)?;
        let (bytes, config) = export(&loaded, &meta, &input.digest)
            .map_err(|e| StageError::data(input.dir.join(model::MODEL_FILE), None, e))?;
        std::fs::write(&weights, bytes).map_err(|e| StageError::io(&weights, e))?;
        let cfg = ctx.output_path(CONFIG_FILE)?;
        let text = serde_json::to_vec_pretty(&config).map_err(|e| StageError::other(e.to_string()))?;
        std::fs::write(&cfg, text).map_err(|e| StageError::io(&cfg, e))?;
        tracing::info!(
            "`{}`: {} tensors under {} names → {}",
            ctx.name,
            config["tensors"],
            config["library"],
            weights.display()
        );
        Ok(())
    }
}

/// Weights are moved, not computed: the CPU reference backend does, whatever the run's.
fn cpu() -> Result<Device, StageError> {
    Ok(msmae_backend::select(msmae_backend::BackendRequest::Flex, msmae_backend::DeviceRequest::Cpu)
        .map_err(|e| StageError::other(e.to_string()))?
        .device)
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

/// Add a fixed position table under its PyTorch name (msmae does not store it).
fn add_table(tensors: &mut BTreeMap<String, (Vec<usize>, Vec<u8>)>, name: &str, t: &Tensor<3>) -> Result<(), String> {
    let v =
        t.to_data().convert::<f32>().try_into_vec::<f32>().map_err(|e| format!("position table `{name}`: {e:?}"))?;
    tensors.insert(name.to_string(), (t.dims().to_vec(), v.iter().flat_map(|x| x.to_le_bytes()).collect()));
    Ok(())
}

/// The safetensors bytes and `config.json` of a loaded checkpoint. `source` is the
/// checkpoint artifact's digest (recorded in the config).
pub fn export(loaded: &Loaded, meta: &CheckpointMeta, source: &str) -> Result<(Vec<u8>, serde_json::Value), String> {
    // burn's adapter does the PyTorch conventions (linear weights transposed, LayerNorm
    // gamma/beta → weight/bias); the MAE's `encoder.` nesting is flattened as in MAE.
    let mut store =
        SafetensorsStore::from_bytes(None).with_to_adapter(BurnToPyTorchAdapter).with_key_remapping(r"^encoder\.", "");
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
    // timm and MAE size the MLP as int(dim · mlp_ratio); msmae rounds.
    let hidden = meta.vit.embed_dim as f64 * meta.vit.mlp_ratio;
    if hidden.round() != hidden.floor() {
        return Err(format!(
            "mlp_ratio {} gives an MLP of {} here but int({hidden}) = {} in timm/MAE: the weights would not load there",
            meta.vit.mlp_ratio,
            hidden.round(),
            hidden.floor()
        ));
    }
    let mut notes: Vec<&str> = vec![
        "LayerNorm eps is 1e-6 (timm's ViT default; for models_mae.py pass norm_layer=partial(nn.LayerNorm, eps=1e-6))",
    ];
    let config = match loaded {
        Loaded::Vit(m) => {
            // timm: with fc_norm the final `norm` is an Identity (no parameters).
            if m.global_pool {
                tensors.remove("norm.weight");
                tensors.remove("norm.bias");
            }
            add_table(&mut tensors, "pos_embed", &m.pos_embed)?;
            serde_json::json!({ "library": "timm", "class": "timm.models.vision_transformer.VisionTransformer", "model_args": timm_args(&meta.vit) })
        }
        Loaded::Mae(m) => {
            let mae = meta.mae.as_ref().ok_or("an MAE checkpoint without its `mae` config")?;
            if meta.vit.image_size[0] != meta.vit.image_size[1] {
                notes.push(
                    "MAE's models_mae.py assumes a square patch grid; this model's is not, so rebuild it from `encoder_timm_args` (timm takes [height, width])",
                );
            }
            add_table(&mut tensors, "pos_embed", &m.encoder.pos_embed)?;
            add_table(&mut tensors, "decoder_pos_embed", &m.decoder_pos_embed)?;
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
            serde_json::json!({ "library": "mae", "class": "models_mae.MaskedAutoencoderViT", "model_args": args, "encoder_timm_args": timm_args(&enc) })
        }
    };
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(k, (shape, data))| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                .map(|v| (k.clone(), v))
                .map_err(|e| format!("tensor `{k}`: {e}"))
        })
        .collect::<Result<_, _>>()?;
    let info = Some(std::collections::HashMap::from([("format".to_string(), "pt".to_string())]));
    let out = safetensors::serialize(views, info).map_err(|e| format!("writing the weights: {e}"))?;
    let mut config = config;
    let o = config.as_object_mut().ok_or("config is an object")?;
    o.insert("tensors".into(), tensors.len().into());
    o.insert("label_names".into(), serde_json::json!(meta.label_names));
    o.insert("multi_label".into(), meta.multi_label.into());
    o.insert(
        "input".into(),
        serde_json::json!({
            "image_size": meta.vit.image_size, "channels": meta.vit.in_chans,
            "normalisation": "pixels / 255, then (x - mean) / std per channel",
            "mean": meta.normalizer.mean, "std": meta.normalizer.std,
        }),
    );
    o.insert("notes".into(), serde_json::json!(notes));
    o.insert("trained_by".into(), meta.trained_by.clone().into());
    o.insert("source_artifact".into(), source.into());
    Ok((out, config))
}

/// Image size in a config: one number (square) or `[height, width]`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ImageSize {
    Square(usize),
    Rect([usize; 2]),
}

impl ImageSize {
    pub fn hw(self) -> [usize; 2] {
        match self {
            ImageSize::Square(s) => [s, s],
            ImageSize::Rect(r) => r,
        }
    }
}

fn d_channels() -> usize {
    3
}

/// `with:` of `import/pytorch`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportConfig {
    /// The weights under timm/MAE names, relative to the pipeline file: a `.safetensors`
    /// state dict, or a `torch.save` checkpoint (`.pth`, `.pt`: a state dict, or one under
    /// `model` or `state_dict` as MAE's and MSMAE's checkpoints keep it; f32, f16 or bf16).
    pub weights: PathBuf,
    /// What it is: `mae` (encoder + decoder, as `mae/pretrain` writes) or `vit` (an encoder
    /// or classifier, as `finetune/*` writes).
    pub checkpoint: CheckpointKind,
    /// Architecture (preset and overrides, as in the training stages); every tensor's
    /// shape is checked against it. The head's size and the pooling are read from the
    /// file: `fc_norm.*` present → mean of the patch tokens + `fc_norm` (timm's
    /// `global_pool="avg"`, MAE's fine-tuning), absent → the normed CLS token. (timm's
    /// `global_pool="avg", fc_norm=False` has no msmae counterpart and reads as the latter.)
    #[serde(default)]
    pub model: ModelSpec,
    /// Input size the weights are for: one number or `[height, width]`.
    pub image_size: ImageSize,
    #[serde(default = "d_channels")]
    pub channels: usize,
    /// Pixel normalisation the weights were trained with (`(x/255 − mean) / std` per
    /// channel); default: that of the `config.json` an export wrote beside the weights,
    /// else ImageNet's (3 channels; other channel counts must give it).
    #[serde(default)]
    pub mean: Option<Vec<f32>>,
    #[serde(default)]
    pub std: Option<Vec<f32>>,
    /// Names of the head's outputs in order (default `class0`, `class1`, …).
    #[serde(default)]
    pub label_names: Option<Vec<String>>,
    #[serde(default)]
    pub multi_label: bool,
    /// For an MAE: whether its targets were per-patch normalised (continuing pre-training).
    #[serde(default)]
    pub norm_pix_loss: bool,
}

const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

#[derive(Debug)]
pub struct ImportPytorch;

impl Stage for ImportPytorch {
    type Config = ImportConfig;
    const KIND: &'static str = "import/pytorch";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "timm/MAE-named PyTorch weights (safetensors, or torch.save .pth: exports, MAE's released weights) as a ViT or MAE checkpoint";

    fn code_fingerprint(&self) -> &'static str {
        msmae_core::code_fingerprint!()
    }
    fn validate(&self, c: &ImportConfig) -> Result<(), ConfigError> {
        if c.channels == 0 {
            return err("channels", "must be at least 1");
        }
        if let Err(e) = c.model.check(c.image_size.hw(), c.channels) {
            return err("model", e);
        }
        for (field, v) in [("mean", &c.mean), ("std", &c.std)] {
            match v {
                Some(v) if v.len() != c.channels => {
                    return err(field, format!("needs one value per channel ({}), found {}", c.channels, v.len()));
                }
                _ => {}
            }
        }
        if c.std.as_ref().is_some_and(|s| s.iter().any(|x| x.is_nan() || *x <= 0.0)) {
            return err("std", "must be positive");
        }
        if !matches!(c.weights.extension().and_then(|e| e.to_str()), Some("safetensors" | "pth" | "pt")) {
            return err("weights", "must be a .safetensors file or a torch.save checkpoint (.pth, .pt)");
        }
        Ok(())
    }
    fn inputs(&self, _: &ImportConfig) -> Vec<InputSlot> {
        Vec::new()
    }
    fn output(&self, c: &ImportConfig) -> OutputDecl {
        match c.checkpoint {
            CheckpointKind::Vit => OutputDecl::new("vit-checkpoint", &[model::MODEL_FILE, model::META_FILE]),
            CheckpointKind::Mae => OutputDecl::new("mae-checkpoint", &[model::MODEL_FILE, model::META_FILE]),
        }
    }
    fn external_inputs(&self, c: &ImportConfig) -> Vec<PathBuf> {
        vec![c.weights.clone()]
    }
    /// The `config.json` an export writes beside its weights (tracked whether or not it
    /// is there): its normalisation and label names are the defaults.
    fn listed_inputs(&self, c: &ImportConfig, base: &std::path::Path) -> Result<Option<ListedFiles>, StageError> {
        let weights = base.join(&c.weights);
        Ok(Some(ListedFiles { files: vec![weights.with_file_name(CONFIG_FILE)], list: weights }))
    }
    fn run(&self, c: &ImportConfig, ctx: &mut StageContext<'_>) -> Result<(), StageError> {
        let path = ctx.resolve(&c.weights);
        let bytes = if path.extension().is_some_and(|e| e == "pth" || e == "pt") {
            pth::to_safetensors(&path).map_err(|m| StageError::data(&path, None, m))?
        } else {
            std::fs::read(&path).map_err(|e| StageError::io(&path, e))?
        };
        let beside = path.with_file_name(CONFIG_FILE);
        let exported: Option<serde_json::Value> = match std::fs::read(&beside) {
            Ok(b) => Some(
                serde_json::from_slice(&b).map_err(|e| StageError::data(&beside, None, format!("not JSON: {e}")))?,
            ),
            Err(_) => None,
        };
        let (loaded, meta) = import(bytes, c, exported.as_ref()).map_err(|m| StageError::data(&path, None, m))?;
        let out = ctx.out_dir().to_path_buf();
        match &loaded {
            Loaded::Vit(m) => model::save(&out, m, &meta)?,
            Loaded::Mae(m) => model::save(&out, m, &meta)?,
        }
        tracing::info!(
            "`{}`: {:?} checkpoint ({} classes) from {}",
            ctx.name,
            c.checkpoint,
            meta.vit.num_classes,
            path.display()
        );
        Ok(())
    }
}

/// Compare a position table in the file with the one msmae computes.
fn check_table(st: &safetensors::SafeTensors<'_>, name: &str, dim: usize, grid: [usize; 2]) -> Result<(), String> {
    let Ok(t) = st.tensor(name) else {
        return Err(format!(
            "no `{name}`: without the position table the weights were trained with, msmae cannot tell they used its fixed sin-cos one"
        ));
    };
    let want = msmae_vit::pos_embed::sincos_2d(dim, grid[0], grid[1]);
    let shape = [1, 1 + grid[0] * grid[1], dim];
    if t.shape() != shape || t.dtype() != safetensors::Dtype::F32 {
        return Err(format!(
            "`{name}` is {:?} {:?}; the model needs f32 {shape:?} ({}×{} patches of dim {dim})",
            t.dtype(),
            t.shape(),
            grid[0],
            grid[1]
        ));
    }
    let got = t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let diff = got.zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    // Within bfloat16's rounding of values in [-1, 1] (2⁻⁸): a table saved in f16 or bf16
    // is still the fixed one (msmae computes its own); a learned table differs by far more.
    if diff > 4e-3 {
        return Err(format!(
            "`{name}` is not the fixed 2-D sin-cos table (differs by up to {diff:.3}): learned position embeddings are not supported, msmae's ViT uses MAE's fixed tables"
        ));
    }
    Ok(())
}

/// Build the model `c` declares and fill it from the safetensors `bytes`. `exported` is
/// the `config.json` an `export/pytorch` wrote beside them, if any: its normalisation,
/// label names and multi-label flag are the defaults of the fields `c` leaves out.
pub fn import(
    bytes: Vec<u8>,
    c: &ImportConfig,
    exported: Option<&serde_json::Value>,
) -> Result<(Loaded, CheckpointMeta), String> {
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| format!("not a safetensors file: {e}"))?;
    // burn loads a float tensor at the width the file stores: anything but f32 would make
    // a mixed-precision checkpoint.
    if let Some((name, t)) = st.tensors().into_iter().find(|(_, t)| t.dtype() != safetensors::Dtype::F32) {
        return Err(format!(
            "tensor `{name}` is {:?}; msmae's checkpoints are f32 (convert with `{{k: v.float() for k, v in state.items()}}` before saving)",
            t.dtype()
        ));
    }
    let names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    let has = |n: &str| names.iter().any(|k| k == n);
    let has_decoder = names.iter().any(|k| k.starts_with("decoder_"));
    match (c.checkpoint, has_decoder) {
        (CheckpointKind::Mae, false) => {
            return Err("no `decoder_*` tensors: this is an encoder, import it with `checkpoint: vit`".into());
        }
        (CheckpointKind::Vit, true) => {
            return Err("holds an MAE decoder (`decoder_*`): import it with `checkpoint: mae`".into());
        }
        _ => {}
    }
    let num_classes = match st.tensor("head.weight") {
        Ok(t) if t.shape().len() == 2 => t.shape()[0],
        Ok(t) => return Err(format!("`head.weight` has shape {:?}, expected [classes, dim]", t.shape())),
        Err(_) => 0,
    };
    let from_export = |key: &str| {
        exported.and_then(|e| e.get(key)).cloned().and_then(|v| serde_json::from_value::<Vec<String>>(v).ok())
    };
    let from_input = |key: &str| {
        exported
            .and_then(|e| e.get("input"))
            .and_then(|i| i.get(key))
            .cloned()
            .and_then(|v| serde_json::from_value::<Vec<f32>>(v).ok())
    };
    let label_names = match c.label_names.clone().or_else(|| from_export("label_names")) {
        Some(v) if v.len() != num_classes => {
            return Err(format!("label_names lists {} names, the head has {num_classes} outputs", v.len()));
        }
        Some(v) => v,
        None => (0..num_classes).map(|i| format!("class{i}")).collect(),
    };
    let hw = c.image_size.hw();
    let mut vit = c.model.vit(hw, c.channels);
    vit.num_classes = num_classes;
    vit.global_pool = c.checkpoint == CheckpointKind::Vit && has("fc_norm.weight");
    let grid = vit.grid();
    check_table(&st, "pos_embed", vit.embed_dim, grid)?;
    let mae = (c.checkpoint == CheckpointKind::Mae).then(|| {
        let mut cfg = c.model.mae(hw, c.channels);
        cfg.encoder = vit.clone();
        cfg.norm_pix_loss = c.norm_pix_loss;
        cfg
    });
    if let Some(cfg) = &mae {
        check_table(&st, "decoder_pos_embed", cfg.decoder_embed_dim, grid)?;
    }
    // The file's bytes move into burn's store (a ViT-B file is ~350 MB: no copy).
    let device = cpu().map_err(|e| e.to_string())?;
    let mut store = SafetensorsStore::from_bytes(Some(bytes))
        .with_from_adapter(PyTorchToBurnAdapter)
        .allow_partial(true)
        .validate(false);
    let (loaded, result) = match &mae {
        None => {
            let mut m = vit.init(&device);
            let r = m.load_from(&mut store).map_err(|e| e.to_string())?;
            (Loaded::Vit(m), r)
        }
        Some(cfg) => {
            let mut m = cfg.init(&device);
            let r = m
                .load_from(&mut store.with_key_remapping(MAE_ENCODER_KEYS, "encoder.$1"))
                .map_err(|e| e.to_string())?;
            (Loaded::Mae(m), r)
        }
    };
    if !result.errors.is_empty() {
        let errs: Vec<String> = result.errors.iter().map(|e| e.to_string()).collect();
        return Err(format!(
            "tensors do not fit the declared architecture (check `model` and `image_size`): {}",
            errs.join("; ")
        ));
    }
    // A global-pool classifier has no final `norm` in timm (an Identity); msmae keeps the
    // module (unused on that path) at its initial value.
    let missing: Vec<&str> = result
        .missing
        .iter()
        .map(|(k, _)| k.as_str())
        .filter(|k| !(vit.global_pool && k.starts_with("norm.")))
        .collect();
    if !missing.is_empty() {
        return Err(format!("tensors missing for the declared architecture: {missing:?}"));
    }
    let unused: Vec<&str> =
        result.unused.iter().map(String::as_str).filter(|k| !matches!(*k, "pos_embed" | "decoder_pos_embed")).collect();
    if !unused.is_empty() {
        return Err(format!("tensors the declared architecture has no place for: {unused:?}"));
    }
    let mean = c.mean.clone().or_else(|| from_input("mean")).unwrap_or_else(|| IMAGENET_MEAN.to_vec());
    let std = c.std.clone().or_else(|| from_input("std")).unwrap_or_else(|| IMAGENET_STD.to_vec());
    if mean.len() != c.channels || std.len() != c.channels || std.iter().any(|s| s.is_nan() || *s <= 0.0) {
        return Err(format!(
            "normalisation for {} channels with positive std expected, found mean {mean:?} std {std:?}",
            c.channels
        ));
    }
    let multi_label = c.multi_label
        || exported.and_then(|e| e.get("multi_label")).and_then(serde_json::Value::as_bool).unwrap_or(false);
    let meta = CheckpointMeta {
        format: 1,
        kind: c.checkpoint,
        vit,
        mae,
        normalizer: Normalizer { mean, std },
        label_names,
        multi_label,
        trained_by: ImportPytorch::KIND.into(),
    };
    Ok((loaded, meta))
}

/// Every stage kind of this crate.
pub fn register(r: &mut msmae_core::Registry) {
    r.register(ExportPytorch).register(ImportPytorch);
}
