//! The fine-tuning stages (docs/method.md §5), both trained by the shared classifier loop of
//! `msmae-train`:
//!
//! - `finetune/msmae`: MSMAE fine-tuning on the 25 % of tokens an attention-guided plan
//!   keeps visible, maps refreshed from the model being fine-tuned (≈74 % fewer FLOPs);
//! - `finetune/full`: MAE-style fine-tuning on all tokens (the baseline), optionally from a
//!   pre-trained encoder;
//! - `finetune/linear`: linear probing of a frozen pre-trained encoder (MAE's reference
//!   recipe: batch norm without affine + linear head, LARS), saved as a ViT classifier.
//!
//! The first two use layer-wise lr decay, drop-path, label smoothing, warm-up + cosine,
//! early stopping; all three write val/test predictions for `eval/*`.

use msmae_core::{ConfigError, InputSlot, OutputDecl, Resources, Stage, StageContext, StageError};
use msmae_train::classifier::{ClassifierKind, classifier_output};
use msmae_train::linprobe::{LinearProbeConfig, run_linear_probe, validate_linear_probe};

msmae_train::classifier_stage!(FinetuneFull, "finetune/full", ClassifierKind::Full, "MAE-style fine-tuning on all tokens (baseline), optionally from a pre-trained encoder", pretrained: true);
msmae_train::classifier_stage!(FinetuneMsmae, "finetune/msmae", ClassifierKind::Msmae, "MSMAE fine-tuning: attention-guided masking keeps 25 % of the tokens, maps refreshed from the model", pretrained: true);

/// `finetune/linear`.
#[derive(Debug, Default, Clone, Copy)]
pub struct FinetuneLinear;

impl Stage for FinetuneLinear {
    type Config = LinearProbeConfig;
    const KIND: &'static str = "finetune/linear";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str =
        "linear probe of a frozen pre-trained encoder (BatchNorm + linear head, LARS), saved as a ViT classifier";
    const USES_BACKEND: bool = true;
    const RUN_ONLY: &'static [&'static str] = &["checkpoint_every", "encoder_batch"];

    fn code_fingerprint(&self) -> &'static str {
        msmae_core::code_fingerprint!()
    }
    fn validate(&self, c: &LinearProbeConfig) -> Result<(), ConfigError> {
        validate_linear_probe(c)
    }
    fn inputs(&self, _: &LinearProbeConfig) -> Vec<InputSlot> {
        vec![
            InputSlot::one("data", "image-table", "the image table to train and validate on"),
            InputSlot::one("pretrained", "mae-checkpoint", "the encoder to probe (kept frozen)")
                .or_kind("vit-checkpoint"),
        ]
    }
    fn output(&self, _: &LinearProbeConfig) -> OutputDecl {
        classifier_output()
    }
    fn resources(&self, _: &LinearProbeConfig) -> Resources {
        Resources::Exclusive
    }
    fn run(&self, c: &LinearProbeConfig, ctx: &mut StageContext<'_>) -> Result<(), StageError> {
        run_linear_probe(Self::KIND, c, ctx)
    }
}

/// Every stage kind of this crate.
pub fn register(r: &mut msmae_core::Registry) {
    r.register(FinetuneFull).register(FinetuneMsmae).register(FinetuneLinear);
}
