//! What the training stages share around the loop: opening the image table, checking a
//! checkpoint fits it, the schedule checks and defaults of their configs, and writing
//! JSON, `history.json` and the loss chart into the artifact.

use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use msmae_core::{ConfigError, StageContext, StageError};

use crate::data::ImageTable;
use crate::fit::EpochLog;
use crate::model::CheckpointMeta;

/// The image table file of an `image-table` artifact.
pub const TABLE: &str = "images.parquet";

/// A config error at `path` (a `with:` field).
pub fn config_error(path: &str, message: impl Into<String>) -> Result<(), ConfigError> {
    Err(ConfigError { path: path.into(), message: message.into() })
}

/// The image table bound to input slot `slot`.
pub fn open_table(ctx: &StageContext<'_>, slot: &str) -> Result<Arc<ImageTable>, StageError> {
    Ok(Arc::new(ImageTable::open(&ctx.input(slot)?.path(TABLE))?))
}

/// Write `v` as pretty JSON to the declared output file `rel`.
pub fn write_json(ctx: &StageContext<'_>, rel: &str, v: &impl Serialize) -> Result<(), StageError> {
    let p = ctx.output_path(rel)?;
    let bytes = serde_json::to_vec_pretty(v).map_err(|e| StageError::write(&p, e))?;
    std::fs::write(&p, bytes).map_err(|e| StageError::io(&p, e))
}

/// `history.json` without wall times (timing is not content: two identical runs must
/// produce identical artifacts); the times are in the log and the lock file's run time.
pub fn write_history(ctx: &StageContext<'_>, history: &[EpochLog], extra: serde_json::Value) -> Result<(), StageError> {
    let epochs: Vec<serde_json::Value> = history
        .iter()
        .map(|h| {
            let mut v = serde_json::to_value(h).unwrap_or_default();
            if let Some(o) = v.as_object_mut() {
                o.remove("seconds");
                o.remove("comm_seconds");
            }
            v
        })
        .collect();
    write_json(ctx, "history.json", &serde_json::json!({ "epochs": epochs, "summary": extra }))?;
    loss_chart(ctx, history)
}

/// `loss.png`: training loss (and reconstruction / validation loss where logged) per epoch.
fn loss_chart(ctx: &StageContext<'_>, history: &[EpochLog]) -> Result<(), StageError> {
    use msmae_metrics::plot::{Series, line_chart};
    let x = |h: &EpochLog| (h.epoch + 1) as f64;
    let mut series = vec![Series::new("train loss", history.iter().map(|h| (x(h), h.train_loss)).collect())];
    let rec: Vec<(f64, f64)> = history.iter().filter_map(|h| h.reconstruction_loss.map(|v| (x(h), v))).collect();
    if !rec.is_empty() && history.iter().any(|h| h.reconstruction_loss != Some(h.train_loss)) {
        series.push(Series::new("reconstruction", rec));
    }
    let val: Vec<(f64, f64)> = history.iter().filter_map(|h| h.val_loss.map(|v| (x(h), v))).collect();
    if !val.is_empty() {
        series.push(Series::new("validation loss", val));
    }
    let acc: Vec<(f64, f64)> = history.iter().filter_map(|h| h.val_accuracy.map(|v| (x(h), v))).collect();
    line_chart(&ctx.output_path("loss.png")?, &format!("{}: loss per epoch", ctx.name), "epoch", "loss", &series)?;
    if !acc.is_empty() {
        line_chart(
            &ctx.output_path("accuracy.png")?,
            &format!("{}: validation accuracy", ctx.name),
            "epoch",
            "accuracy",
            &[Series::new("validation accuracy", acc)],
        )?;
    }
    Ok(())
}

pub fn check_image_compat(meta: &CheckpointMeta, table: &ImageTable, what: &Path) -> Result<(), StageError> {
    let n = &meta.normalizer;
    if n.mean.len() != meta.vit.in_chans
        || n.std.len() != meta.vit.in_chans
        || n.std.iter().any(|s| s.is_nan() || *s <= 0.0)
    {
        return Err(StageError::data(
            what,
            None,
            format!(
                "normalizer for {} channels with positive std expected, found mean {:?} std {:?}",
                meta.vit.in_chans, n.mean, n.std
            ),
        ));
    }
    let want = [table.height(), table.width()];
    if meta.vit.image_size != want || meta.vit.in_chans != table.channels() {
        return Err(StageError::data(
            what,
            None,
            format!(
                "model expects {}×{} images with {} channels, the image table {} holds {}×{}×{}",
                meta.vit.image_size[0],
                meta.vit.image_size[1],
                meta.vit.in_chans,
                table.path.display(),
                want[0],
                want[1],
                table.channels()
            ),
        ));
    }
    Ok(())
}

/// Defaults of the training stages' configs (serde `default = "…"`).
pub mod defaults {
    pub fn batch_size() -> usize {
        64
    }
    /// Base learning rate (docs/method.md §4–§5: 1e-3).
    pub fn blr() -> f64 {
        1e-3
    }
    pub fn warmup_epochs() -> f64 {
        5.0
    }
    pub fn weight_decay() -> f64 {
        0.05
    }
    pub fn augment() -> bool {
        true
    }
    /// RandomResizedCrop scale range.
    pub fn crop_scale() -> [f64; 2] {
        [0.2, 1.0]
    }
    pub fn checkpoint_every() -> usize {
        5
    }
    pub fn accum_steps() -> usize {
        1
    }
    /// Images in a figure.
    pub fn figure_images() -> usize {
        8
    }
}

/// A warm-up longer than the run it belongs to, clipped to `limit` and said so in the log:
/// defaults stay valid for any `epochs` a user writes (a 1-epoch trial included).
pub fn clip_to_run(field: &str, value: f64, limit: f64) -> f64 {
    if value > limit {
        tracing::warn!("{field}: {value} is longer than this run allows; using {limit}");
        limit
    } else {
        value
    }
}

/// Declares a training kind's `with:` struct: the kind's own fields as given, then the
/// schedule every training kind shares — `epochs`, `batch_size`, `blr`, `min_lr`,
/// `warmup_epochs`, `weight_decay`, `augment`, `crop_scale`, `checkpoint_every` — with the
/// kind's defaults for the six that differ between kinds (function paths, as serde's
/// `default = "…"` takes them), and [`schedule`](TrainingSchedule) to read them. The shared
/// fields are written out in each struct rather than flattened from one (serde's `flatten`
/// does not combine with `deny_unknown_fields`): a misspelt key is still refused with its
/// path, and the config serialises — and keys the cache — as the fields say.
#[macro_export]
macro_rules! training_config {
    (
        $(#[$meta:meta])*
        pub struct $name:ident, defaults: {
            epochs: $epochs:literal,
            blr: $blr:literal,
            min_lr: $min_lr:literal,
            warmup_epochs: $warmup:literal,
            weight_decay: $wd:literal,
            crop_scale: $crop:literal $(,)?
        } {
            $($fields:tt)*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, ::serde::Serialize, ::serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            $($fields)*
            /// Passes over the training split.
            #[serde(default = $epochs)]
            pub epochs: usize,
            /// Images per optimiser step, over every device and accumulated micro-batch.
            #[serde(default = "::msmae_train::support::defaults::batch_size")]
            pub batch_size: usize,
            /// Base learning rate: the peak lr is `blr · batch_size / 256`.
            #[serde(default = $blr)]
            pub blr: f64,
            /// The lr the cosine decay ends at.
            #[serde(default = $min_lr)]
            pub min_lr: f64,
            /// Epochs of linear warm-up (clipped to the run when longer).
            #[serde(default = $warmup)]
            pub warmup_epochs: f64,
            /// Decoupled weight decay (none on biases, norms and tokens).
            #[serde(default = $wd)]
            pub weight_decay: f64,
            /// RandomResizedCrop of `crop_scale` and horizontal flips.
            #[serde(default = "::msmae_train::support::defaults::augment")]
            pub augment: bool,
            /// `[min, max]` fraction of the image area a random crop covers.
            #[serde(default = $crop)]
            pub crop_scale: [f64; 2],
            /// Epochs between resumable checkpoints (run-only: not part of the cache key).
            #[serde(default = "::msmae_train::support::defaults::checkpoint_every")]
            pub checkpoint_every: usize,
        }

        impl $name {
            /// The training schedule of this config.
            pub fn schedule(&self) -> $crate::support::TrainingSchedule {
                $crate::support::TrainingSchedule {
                    epochs: self.epochs,
                    batch_size: self.batch_size,
                    blr: self.blr,
                    min_lr: self.min_lr,
                    warmup_epochs: self.warmup_epochs,
                    weight_decay: self.weight_decay,
                    augment: self.augment,
                    crop_scale: self.crop_scale,
                    checkpoint_every: self.checkpoint_every,
                }
            }
        }
    };
}

/// The schedule every training kind takes (see [`training_config!`](crate::training_config)).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainingSchedule {
    pub epochs: usize,
    pub batch_size: usize,
    pub blr: f64,
    pub min_lr: f64,
    pub warmup_epochs: f64,
    pub weight_decay: f64,
    pub augment: bool,
    pub crop_scale: [f64; 2],
    pub checkpoint_every: usize,
}

impl TrainingSchedule {
    /// The checks every training kind shares ([`validate_schedule`]).
    pub fn check(&self) -> Result<(), ConfigError> {
        validate_schedule(self.epochs, self.batch_size, self.blr, self.min_lr, self.warmup_epochs, self.crop_scale)
    }
}

/// Checks every training stage shares: epochs, batch, learning rates, warm-up, crop.
pub fn validate_schedule(
    epochs: usize,
    batch_size: usize,
    blr: f64,
    min_lr: f64,
    warmup_epochs: f64,
    crop_scale: [f64; 2],
) -> Result<(), ConfigError> {
    if epochs == 0 {
        return config_error("epochs", "must be at least 1");
    }
    if batch_size == 0 {
        return config_error("batch_size", "must be at least 1");
    }
    if !(blr > 0.0 && blr.is_finite()) {
        return config_error("blr", "must be positive");
    }
    if min_lr < 0.0 || min_lr > blr * batch_size as f64 / 256.0 {
        return config_error("min_lr", "must be between 0 and the peak lr (blr · batch_size / 256)");
    }
    // Longer than the run is clipped to it when the stage runs ([`clip_to_run`]).
    if !(warmup_epochs >= 0.0 && warmup_epochs.is_finite()) {
        return config_error("warmup_epochs", "must be a number of epochs ≥ 0");
    }
    if !(crop_scale[0] > 0.0 && crop_scale[0] <= crop_scale[1] && crop_scale[1] <= 1.0) {
        return config_error("crop_scale", "must be [min, max] with 0 < min ≤ max ≤ 1");
    }
    Ok(())
}

/// `accum_steps` splits every global batch into that many micro-batches (per device).
pub fn validate_accumulation(batch_size: usize, accum_steps: usize) -> Result<(), ConfigError> {
    if accum_steps == 0 {
        return config_error("accum_steps", "must be at least 1");
    }
    if !batch_size.is_multiple_of(accum_steps) {
        return config_error(
            "accum_steps",
            format!(
                "the batch of {batch_size} does not split into {accum_steps} equal micro-batches; use a divisor of batch_size"
            ),
        );
    }
    Ok(())
}
