//! The masked autoencoder of MSMAE pre-training (docs/method.md §4): the encoder sees only the
//! visible patches; the decoder sees them plus a mask token for every *masked* patch —
//! thrown patches are neither encoded nor decoded — and the loss is the MSE on the masked
//! patches, plus `cls_weight` × cross-entropy of a linear head on the final-norm CLS token.

use burn::module::Param;
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::Distribution;

use crate::config::{MaeConfig, VitConfig};
use crate::layers::{Block, LayerNorm, linear};
use crate::loss::{ClassTargets, classification_loss};
use crate::patch::{gather_tokens, patchify};
use crate::pos_embed::sincos_2d;
use crate::vit::VisionTransformer;

#[derive(Module, Debug)]
pub struct MaskedAutoencoder {
    pub encoder: VisionTransformer,
    pub decoder_embed: Linear,
    pub mask_token: Param<Tensor<3>>,
    /// `[1, 1 + L, decoder_dim]`, constant.
    pub decoder_pos_embed: Tensor<3>,
    pub decoder_blocks: Vec<Block>,
    pub decoder_norm: LayerNorm,
    pub decoder_pred: Linear,
    pub patch_size: usize,
    pub norm_pix_loss: bool,
}

/// What one MAE forward produced.
#[derive(Debug, Clone)]
pub struct MaeOutput {
    /// MSE on the masked patches (+ `cls_weight` × CE when labels are given).
    pub loss: Tensor<1>,
    pub reconstruction_loss: Tensor<1>,
    /// Predicted patches for the masked positions, `[batch, n_masked, p·p·C]`.
    pub pred: Tensor<3>,
    /// CLS-head logits when the encoder has a head.
    pub logits: Option<Tensor<2>>,
}

impl MaeConfig {
    pub fn init(&self, device: &Device) -> MaskedAutoencoder {
        let enc = &self.encoder;
        let dd = self.decoder_embed_dim;
        let [gh, gw] = enc.grid();
        let lin =
            |a, b| LinearConfig::new(a, b).with_initializer(Initializer::XavierUniform { gain: 1.0 }).init(device);
        MaskedAutoencoder {
            // The MAE encoder never pools globally: its CLS head reads the final-norm CLS token.
            encoder: VitConfig { global_pool: false, ..enc.clone() }.init(device),
            decoder_embed: lin(enc.embed_dim, dd),
            mask_token: Param::from_tensor(Tensor::random([1, 1, dd], Distribution::Normal(0.0, 0.02), device)),
            decoder_pos_embed: Tensor::<3>::from_data(
                TensorData::new(sincos_2d(dd, gh, gw), [1, 1 + gh * gw, dd]),
                device,
            ),
            decoder_blocks: (0..self.decoder_depth)
                .map(|_| Block::new(dd, self.decoder_num_heads, enc.mlp_ratio, enc.norm_eps, 0.0, device))
                .collect(),
            decoder_norm: LayerNorm::new(dd, enc.norm_eps, device),
            decoder_pred: lin(dd, enc.patch_dim()),
            patch_size: enc.patch_size,
            norm_pix_loss: self.norm_pix_loss,
        }
    }
}

impl MaskedAutoencoder {
    /// Encode the visible patches: `[batch, 1 + n_visible, dim]`, final-normed.
    ///
    /// # Shapes
    /// - imgs: `[batch, channels, height, width]`, visible: `[batch, n_visible]`
    pub fn forward_encoder(&self, imgs: Tensor<4>, visible: Tensor<2, Int>) -> Tensor<3> {
        let e = &self.encoder;
        let x = e.with_cls(gather_tokens(e.embed(imgs), visible));
        let (x, _, _) = e.blocks_forward(x, false, &[]);
        e.norm.forward(x)
    }

    /// Decode: the encoded visible tokens plus one mask token per masked patch, each with
    /// its own position; returns predictions for the masked patches, in `masked` order.
    ///
    /// # Shapes
    /// - latent: `[batch, 1 + n_visible, dim]`, visible: `[batch, n_visible]`,
    ///   masked: `[batch, n_masked]` → `[batch, n_masked, p·p·C]`
    pub fn forward_decoder(&self, latent: Tensor<3>, visible: Tensor<2, Int>, masked: Tensor<2, Int>) -> Tensor<3> {
        let x = linear(&self.decoder_embed, latent);
        let [b, t, dd] = x.dims();
        let [_, nm] = masked.dims();
        let [_, lp, _] = self.decoder_pos_embed.dims();
        let patch_pos = self.decoder_pos_embed.clone().narrow(1, 1, lp - 1).expand([b, lp - 1, dd]);
        let positions = Tensor::cat(vec![visible, masked], 1); // [b, nv + nm]
        let tokens = Tensor::cat(vec![x.clone().narrow(1, 1, t - 1), self.mask_token.val().expand([b, nm, dd])], 1);
        let tokens = tokens + gather_tokens(patch_pos, positions);
        let cls = x.narrow(1, 0, 1) + self.decoder_pos_embed.clone().narrow(1, 0, 1);
        let mut h = Tensor::cat(vec![cls, tokens], 1);
        for blk in &self.decoder_blocks {
            h = blk.forward(h, false).0;
        }
        let h = linear(&self.decoder_pred, self.decoder_norm.forward(h)); // [b, 1 + nv + nm, pd]
        let [_, n, _] = h.dims();
        h.narrow(1, n - nm, nm)
    }

    /// MSE between predictions and the (optionally per-patch normalised) pixels of the
    /// masked patches, averaged over masked patches.
    ///
    /// # Shapes
    /// - imgs: `[batch, channels, height, width]`, pred: `[batch, n_masked, p·p·C]`,
    ///   masked: `[batch, n_masked]` → `[1]`
    pub fn forward_loss(&self, imgs: Tensor<4>, pred: Tensor<3>, masked: Tensor<2, Int>) -> Tensor<1> {
        let mut target = gather_tokens(patchify(imgs, self.patch_size), masked);
        if self.norm_pix_loss {
            let mean = target.clone().mean_dim(2);
            let var = target.clone().var(2); // unbiased, as torch.var in MAE
            target = (target - mean) / (var + 1e-6).sqrt();
        }
        let diff = pred - target;
        (diff.clone() * diff).mean()
    }

    /// The whole pre-training forward for one batch: the loss MSMAE pre-training trains on.
    ///
    /// `cls` (the batch's targets and `cls_weight`) adds `cls_weight` × the CLS head's
    /// classification loss on plain logits — cross-entropy on class indices, binary
    /// cross-entropy on multi-hot targets (the reference code applies softmax twice;
    /// docs/method.md §4).
    pub fn forward(
        &self,
        imgs: Tensor<4>,
        visible: Tensor<2, Int>,
        masked: Tensor<2, Int>,
        cls: Option<(ClassTargets, f64)>,
    ) -> MaeOutput {
        let latent = self.forward_encoder(imgs.clone(), visible.clone());
        let pred = self.forward_decoder(latent.clone(), visible, masked.clone());
        let rec = self.forward_loss(imgs, pred.clone(), masked);
        let logits = self.encoder.head.as_ref().map(|h| {
            let [b, _, d] = latent.dims();
            h.forward(latent.narrow(1, 0, 1).reshape([b, d]))
        });
        let loss = match (&logits, cls) {
            (Some(lg), Some((targets, w))) if w > 0.0 => {
                rec.clone() + classification_loss(lg.clone(), targets, 0.0) * w
            }
            _ => rec.clone(),
        };
        MaeOutput { loss, reconstruction_loss: rec, pred, logits }
    }
}
