//! Seeded randomness. Every random draw in msmae (crops, flips, mask sampling, weight
//! init, shuffles) comes from an RNG derived from the run seed and a path of labels such
//! as `("masks", epoch, sample_id)`, so results do not depend on thread scheduling or on
//! how many draws happened elsewhere (docs/method.md §3.5).

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// One component of a seed path.
#[derive(Debug, Clone, Copy)]
pub enum SeedPath<'a> {
    Str(&'a str),
    U64(u64),
}

impl<'a> From<&'a str> for SeedPath<'a> {
    fn from(s: &'a str) -> Self {
        SeedPath::Str(s)
    }
}
impl From<u64> for SeedPath<'_> {
    fn from(v: u64) -> Self {
        SeedPath::U64(v)
    }
}
impl From<u32> for SeedPath<'_> {
    fn from(v: u32) -> Self {
        SeedPath::U64(v.into())
    }
}
impl From<usize> for SeedPath<'_> {
    fn from(v: usize) -> Self {
        SeedPath::U64(v as u64)
    }
}

/// A 64-bit seed derived from `seed` and a path; distinct paths give independent streams.
pub fn derive_seed(seed: u64, path: &[SeedPath<'_>]) -> u64 {
    let mut h = blake3::Hasher::new_derive_key("msmae seed v1");
    h.update(&seed.to_le_bytes());
    for p in path {
        match p {
            SeedPath::Str(s) => {
                h.update(&[0]);
                h.update(&(s.len() as u64).to_le_bytes());
                h.update(s.as_bytes());
            }
            SeedPath::U64(v) => {
                h.update(&[1]);
                h.update(&v.to_le_bytes());
            }
        }
    }
    let out = h.finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&out.as_bytes()[..8]);
    u64::from_le_bytes(b)
}

/// A ChaCha8 RNG for `(seed, path)`: portable and stable across platforms and releases.
pub fn seeded_rng(seed: u64, path: &[SeedPath<'_>]) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(derive_seed(seed, path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    #[test]
    fn same_path_same_stream_and_paths_are_independent() {
        let a: u64 = seeded_rng(7, &["masks".into(), 3u64.into(), 11u64.into()]).random();
        let b: u64 = seeded_rng(7, &["masks".into(), 3u64.into(), 11u64.into()]).random();
        let c: u64 = seeded_rng(7, &["masks".into(), 3u64.into(), 12u64.into()]).random();
        let d: u64 = seeded_rng(8, &["masks".into(), 3u64.into(), 11u64.into()]).random();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
    }

    #[test]
    fn string_and_number_components_do_not_collide() {
        assert_ne!(derive_seed(1, &["1".into()]), derive_seed(1, &[1u64.into()]));
        assert_ne!(derive_seed(1, &["ab".into(), "c".into()]), derive_seed(1, &["a".into(), "bc".into()]));
    }

    const PINNED: u64 = 6811234501451416547;

    #[test]
    fn derived_seed_is_stable_across_releases() {
        // A changed value here means every cached artifact and published number moves.
        let v = derive_seed(17, &["quickstart".into(), 3u64.into()]);
        assert_eq!(v, PINNED);
    }
}
