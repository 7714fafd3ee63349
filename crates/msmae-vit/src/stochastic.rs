//! Per-sample randomness inside the model, keyed by sample rather than by the backend's RNG.
//!
//! Stochastic depth drops a residual branch per sample. Drawn from the device RNG, a sample's
//! draws would depend on where it sits in the batch and on how the batch is split across
//! data-parallel replicas; the training loop instead hands the model one key per sample
//! ([`with_sample_keys`], derived from the seed, the epoch and the table row), and the `c`-th
//! stochastic call of a forward pass draws sample `i`'s value from `(key_i, c)`. The same
//! seed then drops the same branches of the same images whatever the replica count, the
//! shard a sample lands in, or the backend.
//!
//! Outside [`with_sample_keys`] (a model used directly, in tests), or when the batch is not
//! the keyed one, the device RNG is used as before.

use std::cell::RefCell;

struct Keys {
    keys: Vec<u64>,
    /// Stochastic calls made so far in this scope.
    calls: u64,
}

thread_local! {
    static KEYS: RefCell<Option<Keys>> = const { RefCell::new(None) };
}

/// Run `f` (one training forward pass) with one random key per sample of its batch, in
/// batch order; the previous keys (normally none) are restored afterwards, also on panic.
pub fn with_sample_keys<T>(keys: Vec<u64>, f: impl FnOnce() -> T) -> T {
    struct Restore(Option<Keys>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let prev = self.0.take();
            KEYS.with(|k| *k.borrow_mut() = prev);
        }
    }
    let prev = KEYS.with(|k| k.borrow_mut().replace(Keys { keys, calls: 0 }));
    let _restore = Restore(prev);
    f()
}

/// SplitMix64's finaliser: a bijective 64-bit mix (Steele, Lea & Flood 2014).
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Uniform in [0, 1) for sample key `key` at stochastic call `call`.
fn uniform(key: u64, call: u64) -> f64 {
    let z = mix(key ^ mix(call.wrapping_add(0x9e37_79b9_7f4a_7c15)));
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// Bernoulli(`keep`) draws, 1.0 or 0.0, one per sample of a batch of `n`, from the keys in
/// scope; `None` outside [`with_sample_keys`] or when `n` is not the keyed batch's size.
pub fn keep_mask(n: usize, keep: f64) -> Option<Vec<f32>> {
    KEYS.with(|k| {
        let mut k = k.borrow_mut();
        let state = k.as_mut().filter(|s| s.keys.len() == n)?;
        let call = state.calls;
        state.calls += 1;
        Some(state.keys.iter().map(|&key| if uniform(key, call) < keep { 1.0 } else { 0.0 }).collect())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_follow_the_sample_not_its_position_or_batch() {
        let (a, b, c) = (11u64, 22u64, 33u64);
        let whole = with_sample_keys(vec![a, b, c], || (keep_mask(3, 0.5), keep_mask(3, 0.5)));
        let tail = with_sample_keys(vec![b, c], || (keep_mask(2, 0.5), keep_mask(2, 0.5)));
        let (w0, w1) = (whole.0.expect("keyed"), whole.1.expect("keyed"));
        let (t0, t1) = (tail.0.expect("keyed"), tail.1.expect("keyed"));
        assert_eq!((&w0[1..], &w1[1..]), (&t0[..], &t1[..]), "a sample draws the same in any shard");
        assert_eq!(keep_mask(3, 0.5), None, "no keys outside the scope");
        assert_eq!(with_sample_keys(vec![a], || keep_mask(2, 0.5)), None, "another batch size is not the keyed batch");
    }

    #[test]
    fn the_keep_rate_is_the_requested_one() {
        let keys: Vec<u64> = (0..20_000).collect();
        let kept: f32 = with_sample_keys(keys, || keep_mask(20_000, 0.8)).expect("keyed").iter().sum();
        assert!((kept / 20_000.0 - 0.8).abs() < 0.01, "{kept}");
    }
}
