//! The models of MSMAE (docs/method.md §1, §2, §4, §5) on burn 0.22: a ViT encoder with CLS
//! token and fixed 2-D sin-cos positions, the MAE encoder/decoder with masked and thrown
//! patches, the supervised CLS-attention map, and an analytic FLOPs counter.
//!
//! Names follow timm/MAE (`patch_embed.proj`, `blocks.N.attn.qkv`, `mlp.fc1`, `norm`,
//! `head`; `patchify`, `forward_encoder`, `forward_decoder`, `forward_loss`) so that
//! PyTorch checkpoints and the paper's code map onto this one with few renames.

pub mod attention_map;
pub mod config;
pub mod flops;
pub mod layers;
pub mod loss;
pub mod mae;
pub mod optim;
pub mod patch;
pub mod pos_embed;
pub mod stochastic;
pub mod vit;

pub use config::{MaeConfig, VitConfig};
pub use loss::ClassTargets;
pub use mae::MaskedAutoencoder;
pub use vit::VisionTransformer;
