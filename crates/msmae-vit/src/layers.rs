//! Transformer pieces: multi-head self-attention with a fused qkv projection, the GELU
//! MLP, stochastic depth, and the pre-norm block (docs/method.md §1).

use burn::module::Param;
use burn::nn::{Gelu, Initializer, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::Distribution;
use burn::tensor::activation::softmax;
use msmae_backend::fused;

fn new_linear(d_in: usize, d_out: usize, device: &Device) -> Linear {
    // MAE initialises every Linear with xavier_uniform and zero bias.
    LinearConfig::new(d_in, d_out).with_initializer(Initializer::XavierUniform { gain: 1.0 }).init(device)
}

/// `x · w (+ b)` for `x` `[rows, d_in]`, `w` `[d_in, d_out]`: with a bias one fused op
/// (libtorch: `addmm`, the bias in the GEMM). In the thread's compute precision.
pub fn affine(x: Tensor<2>, w: Tensor<2>, b: Option<Tensor<1>>) -> Tensor<2> {
    match b {
        Some(b) => fused::linear(x, w, b),
        None => fused::matmul(x, w),
    }
}

/// `layer.forward(x)` with every leading dimension folded into the rows of one GEMM.
/// burn's `linear` keeps a broadcast batched matmul for some shapes (ViT-B/16 at batch 16:
/// sixteen GEMMs of 197 rows instead of one of 3152), which made the libtorch train step
/// 0.90× PyTorch there; folded, the forward and both backward GEMMs are single 2-D ones.
///
/// # Shapes
/// - x: `[..., d_in]` → `[..., d_out]`
pub fn linear<const D: usize>(layer: &Linear, x: Tensor<D>) -> Tensor<D> {
    if D < 2 {
        return layer.forward(x);
    }
    let dims = x.dims();
    let d_in = dims[D - 1];
    let rows: usize = dims[..D - 1].iter().product();
    let y = affine(x.reshape([rows, d_in]), layer.weight.val(), layer.bias.as_ref().map(|b| b.val()));
    let mut out = dims;
    out[D - 1] = y.dims()[1];
    y.reshape(out)
}

/// Multi-head self-attention (`attn.qkv`, `attn.proj` as in timm).
#[derive(Module, Debug)]
pub struct Attention {
    pub qkv: Linear,
    pub proj: Linear,
    pub num_heads: usize,
}

impl Attention {
    pub fn new(dim: usize, num_heads: usize, device: &Device) -> Self {
        Self { qkv: new_linear(dim, dim * 3, device), proj: new_linear(dim, dim, device), num_heads }
    }

    /// Self-attention; also returns the softmaxed weights when `keep` is set.
    ///
    /// # Shapes
    /// - x: `[batch, tokens, dim]` → `[batch, tokens, dim]`, weights `[batch, heads, tokens, tokens]`
    pub fn forward(&self, x: Tensor<3>, keep: bool) -> (Tensor<3>, Option<Tensor<4>>) {
        let h = self.num_heads;
        let scale = 1.0 / ((x.dims()[2] / h) as f64).sqrt();
        if !keep {
            let qkv = linear(&self.qkv, x); // [b, n, 3d]: q, k, v, each h × hd
            // One fused op: head split, attention (libtorch: the flash-attention kernel)
            // and head merge, forward and backward.
            return (linear(&self.proj, fused::self_attention(qkv, h, scale)), None);
        }
        let (y, attn) = self.forward_probed(x, None);
        (y, Some(attn))
    }

    /// Self-attention that returns its softmaxed weights, with `probe` (same shape as the
    /// weights) added to them before they weigh the values. A zero probe that requires
    /// grad changes nothing in the forward, and its gradient is the gradient of whatever
    /// the output feeds with respect to this block's attention (gradient-weighted maps).
    ///
    /// # Shapes
    /// - x: `[batch, tokens, dim]`, probe `[batch, heads, tokens, tokens]` → `[batch, tokens, dim]`, weights `[batch, heads, tokens, tokens]`
    pub fn forward_probed(&self, x: Tensor<3>, probe: Option<Tensor<4>>) -> (Tensor<3>, Tensor<4>) {
        let [b, n, d] = x.dims();
        let h = self.num_heads;
        let hd = d / h;
        let scale = 1.0 / (hd as f64).sqrt();
        let qkv = linear(&self.qkv, x); // [b, n, 3d]: q, k, v, each h × hd
        let qkv = qkv.reshape([b, n, 3, h, hd]).permute([2, 0, 3, 1, 4]); // [3, b, h, n, hd]
        let q = qkv.clone().narrow(0, 0, 1).reshape([b, h, n, hd]);
        let k = qkv.clone().narrow(0, 1, 1).reshape([b, h, n, hd]);
        let v = qkv.narrow(0, 2, 1).reshape([b, h, n, hd]);
        // Scale q ([b, h, n, hd]) rather than the scores ([b, h, n, n]): fewer elements.
        let scores = fused::matmul(q * scale, k.swap_dims(2, 3)); // [b, h, n, n], float32
        let attn = softmax(scores, 3);
        let weights = match probe {
            Some(p) => attn.clone() + p,
            None => attn.clone(),
        };
        let out = fused::matmul(weights, v).swap_dims(1, 2).reshape([b, n, d]); // [b, n, d]
        (linear(&self.proj, out), attn)
    }
}

/// LayerNorm over the last dimension, run as one fused backend op (forward and backward;
/// burn's `nn::LayerNorm` is a dozen autodiff nodes). Same parameters and names as
/// `burn::nn::LayerNorm` (`gamma`, `beta`; `weight`/`bias` through the PyTorch adapter),
/// so checkpoints are unchanged.
#[derive(Module, Debug)]
pub struct LayerNorm {
    pub gamma: Param<Tensor<1>>,
    pub beta: Option<Param<Tensor<1>>>,
    pub epsilon: f64,
}

impl LayerNorm {
    /// γ = 1, β = 0.
    pub fn new(dim: usize, epsilon: f64, device: &Device) -> Self {
        Self {
            gamma: Initializer::Ones.init([dim], device),
            beta: Some(Initializer::Zeros.init([dim], device)),
            epsilon,
        }
    }

    /// # Shapes
    /// - x: `[..., dim]` → same
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let gamma = self.gamma.val();
        let beta = match &self.beta {
            Some(b) => b.val(),
            None => gamma.zeros_like(),
        };
        fused::layer_norm(x, gamma, beta, self.epsilon)
    }
}

/// The MLP of a block (`mlp.fc1`, `mlp.fc2`), exact (erf) GELU.
#[derive(Module, Debug)]
pub struct Mlp {
    pub fc1: Linear,
    pub fc2: Linear,
    pub act: Gelu,
}

impl Mlp {
    pub fn new(dim: usize, hidden: usize, device: &Device) -> Self {
        Self { fc1: new_linear(dim, hidden, device), fc2: new_linear(hidden, dim, device), act: Gelu::new() }
    }

    /// # Shapes
    /// - x: `[batch, tokens, dim]` → same
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        linear(&self.fc2, self.act.forward(linear(&self.fc1, x)))
    }
}

/// Stochastic depth: drops a residual branch per sample while training (on an autodiff
/// device); the identity in evaluation. Draws come from the samples' keys when the training
/// loop set them ([`crate::stochastic`]), else from the device RNG.
pub fn drop_path(x: Tensor<3>, prob: f64) -> Tensor<3> {
    if prob <= 0.0 || !x.device().is_autodiff() {
        return x;
    }
    let [b, _, _] = x.dims();
    let keep = 1.0 - prob;
    let mask = match crate::stochastic::keep_mask(b, keep) {
        Some(m) => Tensor::<3>::from_data(TensorData::new(m, [b, 1, 1]), &x.device()),
        None => Tensor::<3>::random([b, 1, 1], Distribution::Bernoulli(keep), &x.device()),
    };
    x * mask * (1.0 / keep)
}

/// Pre-norm transformer block: `x + attn(norm1(x))`, then `x + mlp(norm2(x))`.
#[derive(Module, Debug)]
pub struct Block {
    pub norm1: LayerNorm,
    pub attn: Attention,
    pub norm2: LayerNorm,
    pub mlp: Mlp,
    pub drop_path: f64,
}

impl Block {
    pub fn new(dim: usize, heads: usize, mlp_ratio: f64, eps: f64, drop_path: f64, device: &Device) -> Self {
        Self {
            norm1: LayerNorm::new(dim, eps, device),
            attn: Attention::new(dim, heads, device),
            norm2: LayerNorm::new(dim, eps, device),
            mlp: Mlp::new(dim, (dim as f64 * mlp_ratio).round() as usize, device),
            drop_path,
        }
    }

    /// # Shapes
    /// - x: `[batch, tokens, dim]` → same, and the attention weights if `keep`
    pub fn forward(&self, x: Tensor<3>, keep: bool) -> (Tensor<3>, Option<Tensor<4>>) {
        let (a, w) = self.attn.forward(self.norm1.forward(x.clone()), keep);
        (self.rest(x, a), w)
    }

    /// [`Block::forward`] keeping the attention, with a probe added to it
    /// ([`Attention::forward_probed`]).
    pub fn forward_probed(&self, x: Tensor<3>, probe: Option<Tensor<4>>) -> (Tensor<3>, Tensor<4>) {
        let (a, w) = self.attn.forward_probed(self.norm1.forward(x.clone()), probe);
        (self.rest(x, a), w)
    }

    /// The residual around attention output `a`, then the MLP branch.
    fn rest(&self, x: Tensor<3>, a: Tensor<3>) -> Tensor<3> {
        let x = x + drop_path(a, self.drop_path);
        let m = self.mlp.forward(self.norm2.forward(x.clone()));
        x + drop_path(m, self.drop_path)
    }
}
