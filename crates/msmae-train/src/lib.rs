//! Training stages of msmae (METHOD.md §2–§5) on burn 0.22:
//!
//! - `attention/train-supervised`: the label-supervised ViT whose CLS attention guides
//!   masking;
//! - `attention/extract`: CLS-attention maps of every image from any ViT/MAE checkpoint,
//!   with overlays and, where lesion masks exist, how much of each lesion the top
//!   attention covers;
//! - `mae/pretrain`: MAE pre-training, with MSMAE masking/throwing, CLS supervision and
//!   in-loop map refresh when given `mask/*` weights;
//! - `finetune/msmae` / `finetune/full`: fine-tuning on 25 % attention-selected tokens, or
//!   on all tokens (baseline), with layer-wise lr decay, drop-path, label smoothing, early
//!   stopping, and val/test predictions for `eval/*`;
//! - `export/pytorch`, `import/pytorch`: checkpoints to and from timm/MAE-named PyTorch safetensors ([`pytorch`]).
//!
//! Batches stream from the Parquet image table ([`data`]); long stages checkpoint into the
//! runner's resume directory and continue bit-identically after a kill ([`train`]).

pub mod data;
pub mod pytorch;
pub mod figures;
pub mod model;
pub mod stages;
pub mod train;

pub use pytorch::{ExportPytorch, ImportPytorch};
pub use stages::{AttentionExtract, FinetuneFull, FinetuneMsmae, MaePretrain, TrainSupervised, register};
