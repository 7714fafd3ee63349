//! The ViT encoder (docs/method.md §1) with the forwards every stage needs: all tokens
//! (evaluation), visible tokens only (MSMAE fine-tuning, §5), the last block's attention
//! (§2), and intermediate block outputs (segmentation, §6).

use burn::module::Param;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::Distribution;

use crate::config::VitConfig;
use crate::layers::{Block, LayerNorm, affine};
use crate::patch::gather_tokens;
use crate::pos_embed::sincos_2d;

/// Non-overlapping patch projection (`patch_embed.proj`, a conv with stride = kernel = p).
#[derive(Module, Debug)]
pub struct PatchEmbed {
    pub proj: Conv2d,
}

impl PatchEmbed {
    /// The conv with stride = kernel = p, computed as what it is: a linear map of each
    /// patch (pixels in `(channel, row, column)` order, the conv weight's own layout).
    /// Same numbers and parameters as `proj.forward`, but the weight gradient is one GEMM
    /// (burn derives a conv's weight gradient as a dilated convolution): forward + backward
    /// at ViT-B/16, batch 4, 6.8 vs 9.4 ms on libtorch and 13.8 vs 21.2 ms on flex (2 cores).
    ///
    /// # Shapes
    /// - imgs: `[batch, channels, height, width]` → `[batch, patches, dim]`
    pub fn forward(&self, imgs: Tensor<4>) -> Tensor<3> {
        let [b, c, h, w] = imgs.dims();
        let [p, q] = self.proj.kernel_size;
        let [gh, gw] = [h / p, w / q];
        let [d, _, _, _] = self.proj.weight.dims();
        let patches = imgs
            .narrow(2, 0, gh * p)
            .narrow(3, 0, gw * q)
            .reshape([b, c, gh, p, gw, q])
            .permute([0, 2, 4, 1, 3, 5])
            .reshape([b * gh * gw, c * p * q]);
        let weight = self.proj.weight.val().reshape([d, c * p * q]).transpose(); // [c·p·q, d]
        affine(patches, weight, self.proj.bias.as_ref().map(|b| b.val())).reshape([b, gh * gw, d])
    }
}

/// A Vision Transformer with CLS token and fixed sin-cos positions.
#[derive(Module, Debug)]
pub struct VisionTransformer {
    pub patch_embed: PatchEmbed,
    pub cls_token: Param<Tensor<3>>,
    /// `[1, 1 + L, dim]`, constant (not trained, not saved).
    pub pos_embed: Tensor<3>,
    pub blocks: Vec<Block>,
    /// Final norm of the CLS-token path (and of the MAE encoder).
    pub norm: LayerNorm,
    /// Norm after global average pooling (fine-tuning, `global_pool`).
    pub fc_norm: Option<LayerNorm>,
    pub head: Option<Linear>,
    pub global_pool: bool,
    pub embed_dim: usize,
}

impl VitConfig {
    /// Build the encoder on `device`.
    ///
    /// # Panics
    /// On an inconsistent config; call [`VitConfig::check`] first to get the message as an
    /// error instead.
    pub fn init(&self, device: &Device) -> VisionTransformer {
        if let Err(e) = self.check() {
            panic!("invalid ViT config: {e}");
        }
        let d = self.embed_dim;
        let [gh, gw] = self.grid();
        let pos = sincos_2d(d, gh, gw);
        let dpr = |i: usize| {
            if self.depth > 1 { self.drop_path * i as f64 / (self.depth - 1) as f64 } else { self.drop_path }
        };
        VisionTransformer {
            patch_embed: PatchEmbed {
                proj: Conv2dConfig::new([self.in_chans, d], [self.patch_size, self.patch_size])
                    .with_stride([self.patch_size, self.patch_size])
                    .with_initializer(Initializer::XavierUniform { gain: 1.0 })
                    .init(device),
            },
            cls_token: Param::from_tensor(Tensor::random([1, 1, d], Distribution::Normal(0.0, 0.02), device)),
            pos_embed: Tensor::<3>::from_data(TensorData::new(pos, [1, 1 + gh * gw, d]), device),
            blocks: (0..self.depth)
                .map(|i| Block::new(d, self.num_heads, self.mlp_ratio, self.norm_eps, dpr(i), device))
                .collect(),
            norm: LayerNorm::new(d, self.norm_eps, device),
            fc_norm: self.global_pool.then(|| LayerNorm::new(d, self.norm_eps, device)),
            head: (self.num_classes > 0).then(|| {
                LinearConfig::new(d, self.num_classes)
                    .with_initializer(Initializer::Normal { mean: 0.0, std: 0.01 })
                    .init(device)
            }),
            global_pool: self.global_pool,
            embed_dim: d,
        }
    }
}

impl VisionTransformer {
    /// Patch tokens with their positions, no CLS.
    ///
    /// # Shapes
    /// - imgs: `[batch, channels, height, width]` → `[batch, L, dim]`
    pub fn embed(&self, imgs: Tensor<4>) -> Tensor<3> {
        let x = self.patch_embed.forward(imgs);
        let [_, l, d] = x.dims();
        x + self.pos_embed.clone().narrow(1, 1, l).reshape([1, l, d])
    }

    /// Prepend the CLS token (with its position).
    ///
    /// # Shapes
    /// - x: `[batch, n, dim]` → `[batch, 1 + n, dim]`
    pub fn with_cls(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, _, d] = x.dims();
        let cls = (self.cls_token.val() + self.pos_embed.clone().narrow(1, 0, 1)).expand([b, 1, d]);
        Tensor::cat(vec![cls, x], 1)
    }

    /// Run the blocks; returns the output, the last block's attention (if asked) and the
    /// outputs of the (0-based) `collect` blocks.
    pub fn blocks_forward(
        &self,
        mut x: Tensor<3>,
        last_attention: bool,
        collect: &[usize],
    ) -> (Tensor<3>, Option<Tensor<4>>, Vec<Tensor<3>>) {
        let mut attn = None;
        let mut inter = Vec::new();
        let n = self.blocks.len();
        for (i, blk) in self.blocks.iter().enumerate() {
            let (y, a) = blk.forward(x, last_attention && i + 1 == n);
            x = y;
            if a.is_some() {
                attn = a;
            }
            if collect.contains(&i) {
                inter.push(x.clone());
            }
        }
        (x, attn, inter)
    }

    /// Pooled features: mean of the patch tokens + `fc_norm` (`global_pool`), or the normed
    /// CLS token.
    ///
    /// # Shapes
    /// - x: `[batch, 1 + n, dim]` (block output) → `[batch, dim]`
    pub fn pool(&self, x: Tensor<3>) -> Tensor<2> {
        let [b, t, d] = x.dims();
        match (&self.fc_norm, self.global_pool) {
            (Some(fc), true) => fc.forward(x.narrow(1, 1, t - 1).mean_dim(1).reshape([b, d])),
            _ => self.norm.forward(x).narrow(1, 0, 1).reshape([b, d]),
        }
    }

    /// Class logits from pooled features.
    ///
    /// # Panics
    /// When the model was built with `num_classes = 0`.
    pub fn head_forward(&self, pooled: Tensor<2>) -> Tensor<2> {
        match &self.head {
            Some(h) => h.forward(pooled),
            None => panic!("this ViT has no classification head (num_classes = 0)"),
        }
    }

    /// Evaluation/inference forward: all tokens (docs/method.md §5).
    ///
    /// # Shapes
    /// - imgs: `[batch, channels, height, width]` → logits `[batch, classes]`
    pub fn forward(&self, imgs: Tensor<4>) -> Tensor<2> {
        let x = self.with_cls(self.embed(imgs));
        let (x, _, _) = self.blocks_forward(x, false, &[]);
        self.head_forward(self.pool(x))
    }

    /// MSMAE fine-tuning forward: only the `visible` patches enter the blocks.
    ///
    /// # Shapes
    /// - imgs: `[batch, channels, height, width]`, visible: `[batch, n]` → logits `[batch, classes]`
    pub fn forward_visible(&self, imgs: Tensor<4>, visible: Tensor<2, Int>) -> Tensor<2> {
        let x = self.with_cls(gather_tokens(self.embed(imgs), visible));
        let (x, _, _) = self.blocks_forward(x, false, &[]);
        self.head_forward(self.pool(x))
    }

    /// All tokens; returns the final-normed tokens and the last block's softmaxed attention.
    ///
    /// # Shapes
    /// - imgs → tokens `[batch, 1 + L, dim]`, attention `[batch, heads, 1 + L, 1 + L]`
    pub fn forward_with_attention(&self, imgs: Tensor<4>) -> (Tensor<3>, Tensor<4>) {
        let x = self.with_cls(self.embed(imgs));
        let (x, attn, _) = self.blocks_forward(x, true, &[]);
        let attn = attn.unwrap_or_else(|| unreachable!("the last block always returns its attention when asked"));
        (self.norm.forward(x), attn)
    }

    /// Every block's softmaxed attention, in block order, and the last block's output
    /// (what [`Self::pool`] takes).
    /// With `probes` (one per block, shaped like its attention), each is added to its
    /// block's attention ([`crate::layers::Attention::forward_probed`]): zero probes that
    /// require grad on an autodiff device give, after a backward, the gradient of the
    /// output with respect to each block's attention.
    ///
    /// # Shapes
    /// - imgs → block output `[batch, 1 + L, dim]`, one `[batch, heads, 1 + L, 1 + L]` per block
    pub fn forward_attentions(&self, imgs: Tensor<4>, probes: Option<Vec<Tensor<4>>>) -> (Tensor<3>, Vec<Tensor<4>>) {
        let mut x = self.with_cls(self.embed(imgs));
        let mut probes = probes.map(Vec::into_iter);
        let mut attns = Vec::with_capacity(self.blocks.len());
        for blk in &self.blocks {
            let (y, a) = blk.forward_probed(x, probes.as_mut().and_then(Iterator::next));
            x = y;
            attns.push(a);
        }
        (x, attns)
    }

    /// Patch-token outputs of the given blocks (1-based, as docs/method.md §6 numbers them).
    ///
    /// # Shapes
    /// - imgs → one `[batch, L, dim]` per requested block, in block order
    pub fn forward_intermediates(&self, imgs: Tensor<4>, blocks_1based: &[usize]) -> Vec<Tensor<3>> {
        let collect: Vec<usize> = blocks_1based.iter().map(|b| b.saturating_sub(1)).collect();
        let x = self.with_cls(self.embed(imgs));
        let (_, _, inter) = self.blocks_forward(x, false, &collect);
        inter
            .into_iter()
            .map(|t| {
                let [_, n, _] = t.dims();
                t.narrow(1, 1, n - 1)
            })
            .collect()
    }
}
