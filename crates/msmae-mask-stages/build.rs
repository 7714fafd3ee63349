//! Exports this crate's code fingerprint for the stages' cache keys.
fn main() {
    msmae_fingerprint::emit();
}
