//! Which patches a training step encodes, reconstructs or drops (docs/method.md §3).
//!
//! Every strategy returns a [`MaskPlan`]: three disjoint index sets over the `L` patches of
//! one sample — **masked** (not encoded; reconstructed and in the loss), **thrown** (not
//! encoded, not decoded, not in the loss) and **visible** (encoded) — in the order the
//! strategy chose them. Shared by pre-training (masked + thrown + visible) and fine-tuning
//! (only the visible tokens are kept).
//!
//! - [`msmae_select`]: multinomial sampling *without replacement* over attention weights
//!   (MSMAE / AMT rule): high-attention patches tend to come first, i.e. be masked.
//! - [`random_select`]: MAE's uniform random masking.
//! - [`attmask_select`]: AttMask-style deterministic top-k of the weights, optional hints.
//!
//! [`augment`] moves a weight map through the same RandomResizedCrop and flip as the image.
//! Randomness always comes from [`sample_rng`] keyed by (seed, epoch, sample id).
//!
//! A library, no stages: the `mask/*` stage kinds that turn attention maps into a
//! [`MaskPolicy`] and per-image weights live in `msmae-mask-stages`, so that the training
//! stages, which mask with this code, do not compute with (or key on) theirs.

pub mod augment;

use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// The three index sets of one sample (indices into the patch grid, row-major).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaskPlan {
    pub masked: Vec<usize>,
    pub thrown: Vec<usize>,
    pub visible: Vec<usize>,
}

impl MaskPlan {
    /// Number of patches.
    pub fn len(&self) -> usize {
        self.masked.len() + self.thrown.len() + self.visible.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// MAE's `ids_shuffle`: visible first, then masked, then thrown.
    pub fn ids_shuffle(&self) -> Vec<usize> {
        self.visible.iter().chain(&self.masked).chain(&self.thrown).copied().collect()
    }

    /// MAE's `ids_restore`: the inverse permutation of [`Self::ids_shuffle`].
    pub fn ids_restore(&self) -> Vec<usize> {
        let shuffle = self.ids_shuffle();
        let mut restore = vec![0; shuffle.len()];
        for (rank, &patch) in shuffle.iter().enumerate() {
            restore[patch] = rank;
        }
        restore
    }

    /// Per-patch state: 0 visible, 1 masked, 2 thrown (for figures and audits).
    pub fn states(&self) -> Vec<u8> {
        let mut s = vec![0u8; self.len()];
        self.masked.iter().for_each(|&i| s[i] = 1);
        self.thrown.iter().for_each(|&i| s[i] = 2);
        s
    }
}

/// How many patches are masked and thrown, exactly as docs/method.md §3.2 states:
/// `floor(L·mask)` masked, `floor(L·(mask+throw)) − floor(L·mask)` thrown.
pub fn counts(len: usize, mask_ratio: f64, throw_ratio: f64) -> (usize, usize) {
    assert!(
        (0.0..=1.0).contains(&mask_ratio) && throw_ratio >= 0.0 && mask_ratio + throw_ratio <= 1.0 + 1e-12,
        "ratios out of range: mask {mask_ratio}, throw {throw_ratio}"
    );
    // A tiny epsilon keeps exact products (196 × 0.75 = 147) from flooring to 146.
    let m = ((len as f64) * mask_ratio + 1e-9).floor() as usize;
    let mt = (((len as f64) * (mask_ratio + throw_ratio) + 1e-9).floor() as usize).min(len);
    (m, mt - m)
}

fn split(order: Vec<usize>, n_mask: usize, n_throw: usize) -> MaskPlan {
    let mut it = order.into_iter();
    let masked: Vec<usize> = it.by_ref().take(n_mask).collect();
    let thrown: Vec<usize> = it.by_ref().take(n_throw).collect();
    let mut visible: Vec<usize> = it.collect();
    visible.sort_unstable();
    MaskPlan { masked, thrown, visible }
}

/// A random order of all patches in which patch `i` comes first with probability
/// proportional to `weights[i]`, then the next among the rest, and so on — sequential
/// multinomial sampling without replacement (`torch.multinomial(w, L)`), computed in one
/// pass with Efraimidis–Spirakis keys `ln(u)/w`. Zero (or negative, or NaN) weights come
/// after every positive one, in uniformly random order among themselves.
pub fn weighted_order(weights: &[f32], rng: &mut ChaCha8Rng) -> Vec<usize> {
    let mut keyed: Vec<(f64, f64, usize)> = weights
        .iter()
        .enumerate()
        .map(|(i, &w)| {
            let u: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
            let w = f64::from(w);
            if w > 0.0 && w.is_finite() { (0.0, u.ln() / w, i) } else { (-1.0, u, i) }
        })
        .collect();
    // Positive weights first (class 0.0 > -1.0), larger key first.
    keyed.sort_by(|a, b| b.0.total_cmp(&a.0).then(b.1.total_cmp(&a.1)));
    keyed.into_iter().map(|(_, _, i)| i).collect()
}

/// MSMAE masking and throwing (docs/method.md §3): order the patches by multinomial sampling
/// over `weights`; the first `floor(L·mask_ratio)` are masked, the next ones up to
/// `floor(L·(mask_ratio+throw_ratio))` thrown, the rest visible.
pub fn msmae_select(weights: &[f32], mask_ratio: f64, throw_ratio: f64, rng: &mut ChaCha8Rng) -> MaskPlan {
    let (m, t) = counts(weights.len(), mask_ratio, throw_ratio);
    split(weighted_order(weights, rng), m, t)
}

/// MAE random masking: a uniformly random `floor(L·mask_ratio)` patches masked, none
/// thrown. (MAE keeps `int(L·(1−ratio))`; for 196 patches at 0.75 both give 49 visible.)
pub fn random_select(len: usize, mask_ratio: f64, rng: &mut ChaCha8Rng) -> MaskPlan {
    let (m, _) = counts(len, mask_ratio, 0.0);
    let mut order: Vec<usize> = (0..len).collect();
    rand::seq::SliceRandom::shuffle(order.as_mut_slice(), rng);
    split(order, m, 0)
}

/// AttMask-style masking: the `floor(L·mask_ratio)` highest-weight patches are masked
/// (ties broken by index); with `hints > 0`, that fraction of the masked count is revealed
/// again, drawn at random from the top 10 % of patches (AttMask's "hints").
pub fn attmask_select(weights: &[f32], mask_ratio: f64, hints: f64, rng: &mut ChaCha8Rng) -> MaskPlan {
    let len = weights.len();
    let (m, _) = counts(len, mask_ratio, 0.0);
    let mut order: Vec<usize> = (0..len).collect();
    order.sort_by(|&a, &b| weights[b].total_cmp(&weights[a]).then(a.cmp(&b)));
    let mut masked: Vec<usize> = order[..m].to_vec();
    if hints > 0.0 && m > 0 {
        let top = ((len as f64 * 0.1).ceil() as usize).clamp(1, m);
        let n_hint = ((m as f64 * hints).round() as usize).min(top);
        let mut pool: Vec<usize> = order[..top].to_vec();
        rand::seq::SliceRandom::shuffle(pool.as_mut_slice(), rng);
        let reveal: Vec<usize> = pool[..n_hint].to_vec();
        masked.retain(|i| !reveal.contains(i));
    }
    let mut visible: Vec<usize> = (0..len).filter(|i| !masked.contains(i)).collect();
    visible.sort_unstable();
    MaskPlan { masked, thrown: Vec::new(), visible }
}

/// How a training stage draws each step's masks: the strategy and its ratios. Written by
/// the `mask/*` stages as `policy.json` beside the per-image weights, read by pre-training
/// (and usable by fine-tuning), so the policy travels with the weights it applies to.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "strategy", rename_all = "lowercase", deny_unknown_fields)]
pub enum MaskPolicy {
    /// MAE: uniform random masking, nothing thrown; needs no weights.
    Random { mask_ratio: f64 },
    /// MSMAE/AMT masking and throwing by multinomial sampling over the weights.
    Msmae { mask_ratio: f64, throw_ratio: f64 },
    /// AttMask: deterministic top-k of the weights, optional random hints.
    Attmask { mask_ratio: f64, hints: f64 },
    /// MSMAE's counts with the order reversed (an ablation of fine-tuning's token
    /// selection): multinomial sampling over the complemented weights `max(w) − w + ε`, so
    /// the low-weight patches are masked and thrown and the highest-attention ones stay
    /// visible.
    Highest { mask_ratio: f64, throw_ratio: f64 },
}

impl MaskPolicy {
    /// Whether [`Self::select`] needs a weight map.
    pub fn needs_weights(&self) -> bool {
        !matches!(self, MaskPolicy::Random { .. })
    }

    /// Patches kept visible out of `len`.
    pub fn visible_count(&self, len: usize) -> usize {
        match *self {
            MaskPolicy::Random { mask_ratio } | MaskPolicy::Attmask { mask_ratio, .. } => {
                len - counts(len, mask_ratio, 0.0).0
            }
            MaskPolicy::Msmae { mask_ratio, throw_ratio } | MaskPolicy::Highest { mask_ratio, throw_ratio } => {
                let (m, t) = counts(len, mask_ratio, throw_ratio);
                len - m - t
            }
        }
    }

    /// Check the ratios; returns a description of the first problem.
    pub fn check(&self) -> Result<(), String> {
        let unit = |name: &str, v: f64| {
            if (0.0..=1.0).contains(&v) { Ok(()) } else { Err(format!("{name} must be within [0, 1], got {v}")) }
        };
        match *self {
            MaskPolicy::Random { mask_ratio } => unit("mask_ratio", mask_ratio),
            MaskPolicy::Msmae { mask_ratio, throw_ratio } | MaskPolicy::Highest { mask_ratio, throw_ratio } => {
                unit("mask_ratio", mask_ratio)?;
                unit("throw_ratio", throw_ratio)?;
                if mask_ratio + throw_ratio >= 1.0 {
                    return Err(format!(
                        "mask_ratio + throw_ratio must leave patches visible, got {mask_ratio} + {throw_ratio}"
                    ));
                }
                Ok(())
            }
            MaskPolicy::Attmask { mask_ratio, hints } => {
                unit("mask_ratio", mask_ratio)?;
                unit("hints", hints)
            }
        }
    }

    /// One sample's plan. `weights` (aligned with the augmented image) is required by the
    /// attention strategies.
    ///
    /// # Panics
    /// When an attention strategy gets no weights, or `weights.len() != len`.
    pub fn select(&self, weights: Option<&[f32]>, len: usize, rng: &mut ChaCha8Rng) -> MaskPlan {
        let w = || {
            let w = weights.unwrap_or_else(|| panic!("mask strategy {self:?} needs a weight map"));
            assert_eq!(w.len(), len, "weight map of {} patches for a grid of {len}", w.len());
            w
        };
        match *self {
            MaskPolicy::Random { mask_ratio } => random_select(len, mask_ratio, rng),
            MaskPolicy::Msmae { mask_ratio, throw_ratio } => msmae_select(w(), mask_ratio, throw_ratio, rng),
            MaskPolicy::Attmask { mask_ratio, hints } => attmask_select(w(), mask_ratio, hints, rng),
            MaskPolicy::Highest { mask_ratio, throw_ratio } => {
                msmae_select(&complement(w()), mask_ratio, throw_ratio, rng)
            }
        }
    }
}

/// `max(w) − w + ε` with ε a thousandth of the range (at least 1e-6): the weights' order
/// reversed, every patch still drawable.
pub fn complement(w: &[f32]) -> Vec<f32> {
    let finite = || w.iter().copied().filter(|v| v.is_finite());
    let max = finite().fold(f32::MIN, f32::max);
    let min = finite().fold(f32::MAX, f32::min);
    let eps = ((max - min) * 1e-3).max(1e-6);
    w.iter().map(|&v| if v.is_finite() { max - v + eps } else { eps }).collect()
}

/// The RNG for one sample's draws in one epoch (docs/method.md §3.5): independent of batch
/// composition, thread scheduling and how many draws other samples made.
pub fn sample_rng(seed: u64, purpose: &str, epoch: u64, sample_id: u64) -> ChaCha8Rng {
    msmae_core::seeded_rng(seed, &[purpose.into(), epoch.into(), sample_id.into()])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rng(s: u64) -> ChaCha8Rng {
        sample_rng(s, "test", 0, 0)
    }

    #[test]
    fn counts_match_the_paper_at_vit_b() {
        assert_eq!(counts(196, 0.45, 0.30), (88, 59));
        assert_eq!(196 - 88 - 59, 49);
        assert_eq!(counts(196, 0.75, 0.0), (147, 0));
        assert_eq!(counts(64, 0.45, 0.30), (28, 20));
    }

    #[test]
    fn zero_weights_come_last() {
        let w = [0.0, 1.0, 0.0, 2.0, f32::NAN, 0.5];
        for s in 0..50 {
            let o = weighted_order(&w, &mut rng(s));
            let mut head: Vec<usize> = o[..3].to_vec();
            head.sort_unstable();
            assert_eq!(head, [1, 3, 5], "{o:?}");
        }
    }

    /// Over many draws, the probability that a patch is masked increases with its weight.
    /// Groups of patches with weights 1, 2, 4, 8 (16 patches each, L = 64, 28 masked): the
    /// expected masked fractions differ by > 0.08 between neighbours; with 4000 draws the
    /// Hoeffding bound puts P(observed order inverted) below 2·exp(−2·4000·16·0.04²) < 1e-40
    /// per pair, so the test fails spuriously with negligible probability.
    #[test]
    fn selection_frequency_is_monotone_in_weight() {
        let w: Vec<f32> = (0..64).map(|i| [1.0, 2.0, 4.0, 8.0][i / 16]).collect();
        let mut freq = [0u64; 4];
        for s in 0..4000 {
            let p = msmae_select(&w, 0.45, 0.30, &mut sample_rng(11, "mask", 0, s));
            for &i in &p.masked {
                freq[i / 16] += 1;
            }
        }
        let f: Vec<f64> = freq.iter().map(|&c| c as f64 / (4000.0 * 16.0)).collect();
        assert!(f.windows(2).all(|x| x[1] > x[0] + 0.04), "masked fraction per weight group: {f:?}");
        // uniform weights: every patch equally likely (within 0.05 of 28/64)
        let mut c = [0u64; 64];
        for s in 0..4000 {
            for &i in &msmae_select(&[1.0; 64], 0.45, 0.30, &mut sample_rng(12, "mask", 0, s)).masked {
                c[i] += 1;
            }
        }
        assert!(c.iter().all(|&n| (n as f64 / 4000.0 - 28.0 / 64.0).abs() < 0.05), "{c:?}");
    }

    #[test]
    fn first_pick_probability_is_proportional_to_weight() {
        // P(first = i) = w_i / Σw: weights 1 and 3 → 0.25 / 0.75 (±0.02 at 20000 draws:
        // the standard error is 0.003, so the bound is over 6 sigma).
        let mut first1 = 0;
        for s in 0..20000 {
            if weighted_order(&[1.0, 3.0], &mut sample_rng(3, "w", 0, s))[0] == 1 {
                first1 += 1;
            }
        }
        assert!((f64::from(first1) / 20000.0 - 0.75).abs() < 0.02, "{first1}");
    }

    #[test]
    fn highest_keeps_the_high_weight_patches_visible() {
        // 16 patches, weights rising with the index: MSMAE's order keeps the low end
        // visible, the reversed order the high end; same counts either way.
        let w: Vec<f32> = (0..16).map(|i| (i as f32 + 1.0) / 16.0).collect();
        let (mut low, mut high) = (0.0, 0.0);
        for s in 0..200 {
            let a = MaskPolicy::Msmae { mask_ratio: 0.45, throw_ratio: 0.30 }.select(Some(&w), 16, &mut rng(s));
            let b = MaskPolicy::Highest { mask_ratio: 0.45, throw_ratio: 0.30 }.select(Some(&w), 16, &mut rng(s));
            assert_eq!((a.visible.len(), b.visible.len()), (4, 4));
            low += a.visible.iter().map(|&i| i as f64).sum::<f64>() / 4.0;
            high += b.visible.iter().map(|&i| i as f64).sum::<f64>() / 4.0;
        }
        let (low, high) = (low / 200.0, high / 200.0);
        assert!(low < 5.0 && high > 10.0, "mean visible index: MSMAE {low:.2}, highest {high:.2}");
        assert_eq!(complement(&[0.0, 0.5, 1.0])[2], 1e-3);
    }

    #[test]
    fn attmask_masks_the_top_weights_and_hints_reveal_some() {
        let w: Vec<f32> = (0..20).map(|i| i as f32).collect();
        let p = attmask_select(&w, 0.5, 0.0, &mut rng(1));
        let mut m = p.masked.clone();
        m.sort_unstable();
        assert_eq!(m, (10..20).collect::<Vec<_>>());
        let h = attmask_select(&w, 0.5, 0.2, &mut rng(1));
        assert_eq!(h.masked.len(), 8);
        assert!(h.masked.iter().all(|i| *i >= 10));
    }

    proptest! {
        #[test]
        fn plans_partition_the_patches(
            weights in prop::collection::vec(0.0f32..10.0, 1..300),
            mask in 0.0f64..0.9,
            throw_frac in 0.0f64..1.0,
            seed in any::<u64>(),
        ) {
            let throw = (1.0 - mask) * throw_frac;
            let l = weights.len();
            let (m, t) = counts(l, mask, throw);
            for p in [msmae_select(&weights, mask, throw, &mut rng(seed)), random_select(l, mask, &mut rng(seed)), attmask_select(&weights, mask, 0.0, &mut rng(seed))] {
                let mut all: Vec<usize> = p.ids_shuffle();
                all.sort_unstable();
                prop_assert_eq!(all, (0..l).collect::<Vec<_>>());
                prop_assert_eq!(p.masked.len(), m);
                prop_assert!(p.thrown.len() == t || p.thrown.is_empty());
                prop_assert_eq!(p.visible.len(), l - p.masked.len() - p.thrown.len());
                // ids_restore inverts ids_shuffle
                let (sh, re) = (p.ids_shuffle(), p.ids_restore());
                for (rank, &patch) in sh.iter().enumerate() {
                    prop_assert_eq!(re[patch], rank);
                }
            }
            prop_assert_eq!(msmae_select(&weights, mask, throw, &mut rng(seed)), msmae_select(&weights, mask, throw, &mut rng(seed)));
        }
    }
}
