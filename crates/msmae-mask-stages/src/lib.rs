//! The `mask/msmae`, `mask/attmask` and `mask/random` stage kinds (docs/method.md §3):
//! attention maps → a [`msmae_mask::MaskPolicy`] and per-image sampling weights
//! ([`stages`]), and the audit table and figure of exported mask plans ([`export`]). The
//! masking itself is the library `msmae-mask`, which the training stages share.

pub mod export;
pub mod stages;

pub use stages::{AttmaskMask, MsmaeMask, RandomMask};

/// Every mask stage kind of this crate.
pub fn register(r: &mut msmae_core::Registry) {
    r.register(MsmaeMask).register(AttmaskMask).register(RandomMask);
}
