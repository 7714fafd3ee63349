//! Analytic FLOPs of a ViT forward, for any config and token count (docs/method.md §5).
//!
//! Counted as multiply-accumulates (one MAC = one "FLOP", the convention of fvcore and of
//! the paper's 16.87 G for ViT-B/16). Two totals are given: `linear` (patch embedding,
//! qkv/proj/MLP projections, head — what the paper's counter reports) and `attention`
//! (the `q·kᵀ` and `attn·v` products, which the paper's figure leaves out).

use crate::config::{MaeConfig, VitConfig};

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Flops {
    pub patch_embed: f64,
    /// qkv, proj and MLP of every block.
    pub blocks_linear: f64,
    /// `q·kᵀ` and `attn·v` of every block.
    pub attention: f64,
    pub decoder: f64,
    pub head: f64,
}

impl Flops {
    /// Without the attention products: the paper's convention.
    pub fn linear(&self) -> f64 {
        self.patch_embed + self.blocks_linear + self.decoder + self.head
    }
    pub fn total(&self) -> f64 {
        self.linear() + self.attention
    }
}

fn block(tokens: f64, dim: f64, mlp_ratio: f64, depth: f64) -> (f64, f64) {
    let linear = tokens * dim * 3.0 * dim + tokens * dim * dim + 2.0 * tokens * dim * dim * mlp_ratio;
    let attention = 2.0 * tokens * tokens * dim;
    (linear * depth, attention * depth)
}

/// An encoder forward where `kept` patches (of all `L`, which are all embedded) plus the
/// CLS token enter the blocks.
pub fn encoder(c: &VitConfig, kept: usize) -> Flops {
    let l = c.num_patches() as f64;
    let d = c.embed_dim as f64;
    let (bl, at) = block(kept as f64 + 1.0, d, c.mlp_ratio, c.depth as f64);
    Flops {
        patch_embed: l * c.patch_dim() as f64 * d,
        blocks_linear: bl,
        attention: at,
        decoder: 0.0,
        head: d * c.num_classes as f64,
    }
}

/// An MAE pre-training forward: `visible` patches encoded, `visible + masked` decoded.
pub fn mae(c: &MaeConfig, visible: usize, masked: usize) -> Flops {
    let mut f = encoder(&c.encoder, visible);
    let dd = c.decoder_embed_dim as f64;
    let t = (visible + masked) as f64 + 1.0;
    let (bl, at) = block(t, dd, c.encoder.mlp_ratio, c.decoder_depth as f64);
    f.decoder = (visible as f64 + 1.0) * c.encoder.embed_dim as f64 * dd + bl + t * dd * c.encoder.patch_dim() as f64;
    f.attention += at;
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vit_b16_fine_tuning_matches_the_paper() {
        let c = VitConfig::vit_base_patch16(3);
        let full = encoder(&c, 196);
        let msmae = encoder(&c, 49);
        // paper: 16.87 G (MAE-style fine-tuning) vs 4.37 G (MSMAE), −74.08 %
        assert!((full.linear() / 1e9 - 16.87).abs() < 0.05, "{}", full.linear() / 1e9);
        assert!((msmae.linear() / 1e9 - 4.37).abs() < 0.02, "{}", msmae.linear() / 1e9);
        let cut = 1.0 - msmae.linear() / full.linear();
        assert!((cut - 0.7408).abs() < 0.005, "reduction {cut}");
        // counting the attention products too, the saving is larger still
        assert!(1.0 - msmae.total() / full.total() > cut);
    }

    #[test]
    fn small_configs_count_what_they_should() {
        let c = VitConfig::new([16, 24], 4, 3, 32, 2, 4).with_num_classes(3);
        let f = encoder(&c, 6);
        // 24 patches × 48 values × 32 dims; 7 tokens through 2 blocks; head 32 × 3
        assert_eq!(f.patch_embed, 24.0 * 48.0 * 32.0);
        assert_eq!(f.blocks_linear, 2.0 * 7.0 * (32.0 * 96.0 + 32.0 * 32.0 + 2.0 * 32.0 * 128.0));
        assert_eq!(f.attention, 2.0 * 2.0 * 49.0 * 32.0);
        assert_eq!(f.head, 96.0);
    }
}
