//! Model configurations and presets (docs/method.md §1).

use burn::config::Config;

/// A ViT encoder.
#[derive(Config, Debug, PartialEq)]
pub struct VitConfig {
    /// Input height and width in pixels (non-square allowed; both divisible by the patch).
    pub image_size: [usize; 2],
    pub patch_size: usize,
    /// Image channels: 1 for X-ray and MRI, 3 for dermoscopy and fundus.
    pub in_chans: usize,
    pub embed_dim: usize,
    pub depth: usize,
    pub num_heads: usize,
    #[config(default = 4.0)]
    pub mlp_ratio: f64,
    /// Stochastic depth at the last block (linearly increasing from 0 at the first).
    #[config(default = 0.0)]
    pub drop_path: f64,
    #[config(default = 1e-6)]
    pub norm_eps: f64,
    /// Classes of the linear head on the pooled features (0: no head).
    #[config(default = 0)]
    pub num_classes: usize,
    /// Fine-tuning style pooling: mean of the patch tokens + `fc_norm`, instead of the
    /// normed CLS token.
    #[config(default = false)]
    pub global_pool: bool,
}

impl VitConfig {
    /// Patch grid (rows, columns).
    pub fn grid(&self) -> [usize; 2] {
        [self.image_size[0] / self.patch_size, self.image_size[1] / self.patch_size]
    }

    /// Number of patches.
    pub fn num_patches(&self) -> usize {
        let [h, w] = self.grid();
        h * w
    }

    /// Values per patch (`p·p·C`), the MAE reconstruction target size.
    pub fn patch_dim(&self) -> usize {
        self.patch_size * self.patch_size * self.in_chans
    }

    /// Check divisibility and head split; returns a description of the first problem.
    pub fn check(&self) -> Result<(), String> {
        let p = self.patch_size;
        if p == 0 || self.image_size.iter().any(|s| *s == 0 || s % p != 0) {
            return Err(format!("image size {:?} must be a positive multiple of the patch size {p}", self.image_size));
        }
        if self.num_heads == 0 || !self.embed_dim.is_multiple_of(self.num_heads) {
            return Err(format!("embed_dim {} must be divisible by num_heads {}", self.embed_dim, self.num_heads));
        }
        if !self.embed_dim.is_multiple_of(4) {
            return Err(format!("embed_dim {} must be divisible by 4 (2-D sin-cos positions)", self.embed_dim));
        }
        if self.depth == 0 || self.in_chans == 0 {
            return Err("depth and in_chans must be positive".into());
        }
        Ok(())
    }

    /// ViT-B/16 at 224 px (paper scale): dim 768, depth 12, 12 heads.
    pub fn vit_base_patch16(in_chans: usize) -> Self {
        Self::new([224, 224], 16, in_chans, 768, 12, 12)
    }

    /// A CPU-sized model for tests and the quickstart (e.g. 64 px, patch 8, dim 128).
    pub fn tiny(image: usize, patch: usize, in_chans: usize) -> Self {
        Self::new([image, image], patch, in_chans, 128, 4, 4)
    }
}

/// An MAE: encoder plus a lighter decoder.
#[derive(Config, Debug, PartialEq)]
pub struct MaeConfig {
    pub encoder: VitConfig,
    pub decoder_embed_dim: usize,
    pub decoder_depth: usize,
    pub decoder_num_heads: usize,
    /// Reconstruct per-patch normalised pixels (MAE's `norm_pix_loss`).
    #[config(default = false)]
    pub norm_pix_loss: bool,
}

impl MaeConfig {
    /// The paper's MAE decoder on ViT-B/16: dim 512, depth 8, 16 heads.
    pub fn vit_base_patch16(in_chans: usize) -> Self {
        Self::new(VitConfig::vit_base_patch16(in_chans), 512, 8, 16)
    }

    /// A CPU-sized MAE around [`VitConfig::tiny`].
    pub fn tiny(image: usize, patch: usize, in_chans: usize) -> Self {
        Self::new(VitConfig::tiny(image, patch, in_chans), 64, 2, 4)
    }
}
