//! The fine-tuning stages (docs/method.md §5), both trained by the shared classifier loop of
//! `msmae-train`:
//!
//! - `finetune/msmae`: MSMAE fine-tuning on the 25 % of tokens an attention-guided plan
//!   keeps visible, maps refreshed from the model being fine-tuned (≈74 % fewer FLOPs);
//! - `finetune/full`: MAE-style fine-tuning on all tokens (the baseline), optionally from a
//!   pre-trained encoder.
//!
//! Both use layer-wise lr decay, drop-path, label smoothing, warm-up + cosine, early
//! stopping, and write val/test predictions for `eval/*`.

use msmae_train::classifier::ClassifierKind;

msmae_train::classifier_stage!(FinetuneFull, "finetune/full", ClassifierKind::Full, "MAE-style fine-tuning on all tokens (baseline), optionally from a pre-trained encoder", pretrained: true);
msmae_train::classifier_stage!(FinetuneMsmae, "finetune/msmae", ClassifierKind::Msmae, "MSMAE fine-tuning: attention-guided masking keeps 25 % of the tokens, maps refreshed from the model", pretrained: true);

/// Every stage kind of this crate.
pub fn register(r: &mut msmae_core::Registry) {
    r.register(FinetuneFull).register(FinetuneMsmae);
}
