//! The training library of msmae (docs/method.md §2–§5) on burn 0.22; no stage lives here.
//!
//! - [`fit`]: the one training loop (resume, seeding, schedule, divergence check, optimiser
//!   step, best model, early stopping, history, checkpoints), driven by a [`fit::TrainStep`];
//! - [`classifier`]: the classifier step and the shared body of the classifier stages
//!   (`attention/train-supervised`, `finetune/full`, `finetune/msmae`);
//! - [`data`]: batches streamed from the Parquet image table (augmentation, mask plans);
//! - [`model`]: model specs, checkpoints, AdamW, the learning-rate schedule, layer decay;
//! - [`dist`]: gradients summed and parameters broadcast across the processes of a
//!   multi-process data-parallel run;
//! - [`maps`]: attention maps of a split from the model being trained (MSMAE's refresh);
//! - [`resume`]: checkpoints a killed run continues from bit-identically;
//! - [`runtime`]: the backend/device a stage computes on;
//! - [`support`], [`figures`]: what the stages write (JSON, history, charts, figures);
//! - [`tensorboard`]: scalar event files in the run-log directory, outside the artifact.
//!
//! The stage kinds live in `msmae-attention`, `msmae-pretrain`, `msmae-finetune`,
//! `msmae-segment` and `msmae-interop`.

// `training_config!` names this crate by its absolute path, from here as from the stage crates.
extern crate self as msmae_train;

pub mod classifier;
pub mod data;
pub mod dist;
pub mod figures;
pub mod fit;
pub mod linprobe;
pub mod maps;
pub mod model;
pub mod resume;
pub mod runtime;
pub mod support;
pub mod tensorboard;
