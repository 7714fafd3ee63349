//! Fused ops for the ViT's hot paths: LayerNorm, attention, linear layers and the AdamW
//! update, each one backend op with a hand-written backward instead of a graph of small
//! autodiff nodes.
//!
//! Why: burn 0.22's autodiff decomposes LayerNorm (mean, centre, variance, rsqrt, scale,
//! shift) and softmax attention into a dozen elementwise nodes each, forward and backward;
//! on libtorch every node is a kernel launch and a full pass over memory. PyTorch eager
//! runs `native_layer_norm` and, in a timm ViT, `scaled_dot_product_attention` instead.
//!
//! - [`FusedKernels`]: the backend kernels (forward with the statistics the backward needs,
//!   and the backward). Their default bodies compose burn primitives (exact, any backend:
//!   that is what flex runs). libtorch on the CPU overrides them with `native_layer_norm`,
//!   the flash-attention CPU kernel (forward and backward), and two Rust loops written
//!   here: the LayerNorm backward (tch 0.22 binds no `native_layer_norm_backward`) and a
//!   one-pass AdamW update (tch binds no `_fused_adamw_`). On CUDA, LayerNorm's forward is
//!   `native_layer_norm` too; attention is composed by default, or libtorch's
//!   memory-efficient kernel (forward and backward) with `MSMAE_CUDA_ATTENTION=efficient`;
//!   the LayerNorm backward and AdamW are composed.
//!
//! Under `--precision bf16` the public functions cast the matmul operands to bfloat16 and
//! the results back (see [`crate::precision`]); the kernels see bfloat16 tensors and take
//! the composed path (or the CUDA kernel, which takes bfloat16).
//! - [`FusedOps`]: the `#[backend_extension]` trait dispatched on the tensor's device,
//!   whose autodiff implementation records one node per op.
//! - [`layer_norm`], [`attention`], [`adamw_update`]: the `Tensor` API models call.
//!
//! Every kernel is deterministic: reductions run in a fixed order that does not depend on
//! the thread count.

// burn 0.22 marks burn-tch deprecated (it is dropped in 0.23); it is the backend this
// project pins and these kernels exist for.
#![allow(deprecated)]

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, Shape, Slice, TensorMetadata, backend_extension};
use burn::tensor::{DType, FloatDType, Tensor};

use crate::precision::{lower, raise};

/// Hyper-parameters of one AdamW update (bias corrections precomputed for the step).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWHyper {
    pub lr: f64,
    pub beta_1: f64,
    pub beta_2: f64,
    pub epsilon: f64,
    pub weight_decay: f64,
    /// `1 - beta_1^t`
    pub bias_correction_1: f64,
    /// `1 - beta_2^t`
    pub bias_correction_2: f64,
}

/// Backend kernels. The defaults compose burn primitives; backends override what they can
/// do in one pass.
pub trait FusedKernels: Backend {
    /// LayerNorm over the last dimension; returns `(out, mean, rstd)` with `mean` and
    /// `rstd = 1/sqrt(var + eps)` shaped `[..., 1]`.
    fn layer_norm_forward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        generic::layer_norm_forward::<Self>(x, gamma, beta, eps)
    }

    /// Gradients `(dx, dgamma, dbeta)` of [`Self::layer_norm_forward`].
    fn layer_norm_backward(
        grad: FloatTensor<Self>,
        x: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        rstd: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        generic::layer_norm_backward::<Self>(grad, x, mean, rstd, gamma)
    }

    /// `softmax(q kᵀ · scale) v` over `[batch, heads, tokens, head_dim]`; returns the output
    /// and what the backward needs (backend-specific: the probabilities in the composed
    /// kernel, the log-sum-exp rows in libtorch's flash kernel).
    fn attention_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        generic::attention_forward::<Self>(q, k, v, scale)
    }

    /// Gradients `(dq, dk, dv)` of [`Self::attention_forward`].
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        grad: FloatTensor<Self>,
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        out: FloatTensor<Self>,
        aux: FloatTensor<Self>,
        scale: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let _ = out;
        generic::attention_backward::<Self>(grad, q, k, v, aux, scale)
    }

    /// Multi-head self-attention from the fused qkv projection: `qkv` `[batch, tokens,
    /// 3·dim]` (q, k, v, each `heads × head_dim`, as timm lays them out) → `[batch, tokens,
    /// dim]` with the heads merged, plus the backward's state. Views in, views out: no
    /// split/merge copies, and the backward writes the three gradients into one buffer
    /// (instead of three zero-padded slices summed).
    fn self_attention_forward(
        qkv: FloatTensor<Self>,
        heads: usize,
        scale: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (q, k, v) = generic::split_heads::<Self>(qkv, heads);
        let (out, aux) = Self::attention_forward(q, k, v, scale);
        (generic::merge_heads::<Self>(out), aux)
    }

    /// Gradient of [`Self::self_attention_forward`] with respect to `qkv`.
    fn self_attention_backward(
        grad: FloatTensor<Self>,
        qkv: FloatTensor<Self>,
        out: FloatTensor<Self>,
        aux: FloatTensor<Self>,
        heads: usize,
        scale: f64,
    ) -> FloatTensor<Self> {
        let (q, k, v) = generic::split_heads::<Self>(qkv, heads);
        let (dq, dk, dv) = Self::attention_backward(
            generic::unmerge_heads::<Self>(grad, heads),
            q,
            k,
            v,
            generic::unmerge_heads::<Self>(out, heads),
            aux,
            scale,
        );
        generic::stack_heads::<Self>(dq, dk, dv)
    }

    /// `x · w + b` for `x` `[rows, d_in]`, `w` `[d_in, d_out]` (burn's layout), `b` `[d_out]`.
    fn linear_forward(x: FloatTensor<Self>, w: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self> {
        let d_out = w.shape()[1];
        Self::float_add(Self::float_matmul(x, w), Self::float_reshape(b, Shape::new([1, d_out])))
    }

    /// One AdamW step: returns the new `(param, moment_1, moment_2)`.
    fn adamw_update(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        m: FloatTensor<Self>,
        v: FloatTensor<Self>,
        h: AdamWHyper,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        generic::adamw_update::<Self>(param, grad, m, v, h)
    }
}

/// The ops models call, dispatched on the tensors' device.
#[backend_extension(Flex, LibTorch: cfg(feature = "tch"), Autodiff)]
pub trait FusedOps: Backend {
    fn fused_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self>;
    fn fused_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self>;
    fn fused_self_attention(qkv: FloatTensor<Self>, heads: usize, scale: f64) -> FloatTensor<Self>;
    fn fused_linear(x: FloatTensor<Self>, w: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self>;
    fn fused_adamw(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        m: FloatTensor<Self>,
        v: FloatTensor<Self>,
        h: AdamWHyper,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// Inference/concrete backends: the forward kernel, statistics dropped.
macro_rules! concrete_fused_ops {
    ($backend:ty) => {
        impl FusedOps for $backend {
            fn fused_layer_norm(
                x: FloatTensor<Self>,
                gamma: FloatTensor<Self>,
                beta: FloatTensor<Self>,
                eps: f64,
            ) -> FloatTensor<Self> {
                Self::layer_norm_forward(x, gamma, beta, eps).0
            }
            fn fused_attention(
                q: FloatTensor<Self>,
                k: FloatTensor<Self>,
                v: FloatTensor<Self>,
                scale: f64,
            ) -> FloatTensor<Self> {
                Self::attention_forward(q, k, v, scale).0
            }
            fn fused_self_attention(qkv: FloatTensor<Self>, heads: usize, scale: f64) -> FloatTensor<Self> {
                Self::self_attention_forward(qkv, heads, scale).0
            }
            fn fused_linear(x: FloatTensor<Self>, w: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self> {
                Self::linear_forward(x, w, b)
            }
            fn fused_adamw(
                param: FloatTensor<Self>,
                grad: FloatTensor<Self>,
                m: FloatTensor<Self>,
                v: FloatTensor<Self>,
                h: AdamWHyper,
            ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
                Self::adamw_update(param, grad, m, v, h)
            }
        }
    };
}

impl FusedKernels for Flex {}
concrete_fused_ops!(Flex);
#[cfg(feature = "tch")]
concrete_fused_ops!(burn::backend::LibTorch);

/// Autodiff: one node per op, its backward the backend's backward kernel.
impl<B: FusedKernels, C: CheckpointStrategy> FusedOps for Autodiff<B, C> {
    fn fused_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct LayerNormBackward;

        impl<B: FusedKernels> Backward<B, 3> for LayerNormBackward {
            /// x, mean, rstd, gamma
            type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

            fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
                let [node_x, node_gamma, node_beta] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (x, mean, rstd, gamma) = ops.state;
                let (dx, dgamma, dbeta) = B::layer_norm_backward(grad, x, mean, rstd, gamma);
                for (node, g) in [node_x, node_gamma, node_beta].into_iter().zip([dx, dgamma, dbeta]) {
                    if let Some(node) = node {
                        grads.register::<B>(node.id, g);
                    }
                }
            }
        }

        match LayerNormBackward.prepare::<C>([x.node(), gamma.node(), beta.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (x, gamma, beta) = (x.into_primitive(), gamma.into_primitive(), beta.into_primitive());
                let (out, mean, rstd) = B::layer_norm_forward(x.clone(), gamma.clone(), beta, eps);
                prep.finish((x, mean, rstd, gamma), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(
                B::layer_norm_forward(x.into_primitive(), gamma.into_primitive(), beta.into_primitive(), eps).0,
            ),
        }
    }

    fn fused_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct AttentionBackward;

        impl<B: FusedKernels> Backward<B, 3> for AttentionBackward {
            /// q, k, v, out, aux, scale
            type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, f64);

            fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
                let [node_q, node_k, node_v] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (q, k, v, out, aux, scale) = ops.state;
                let (dq, dk, dv) = B::attention_backward(grad, q, k, v, out, aux, scale);
                for (node, g) in [node_q, node_k, node_v].into_iter().zip([dq, dk, dv]) {
                    if let Some(node) = node {
                        grads.register::<B>(node.id, g);
                    }
                }
            }
        }

        match AttentionBackward.prepare::<C>([q.node(), k.node(), v.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (q, k, v) = (q.into_primitive(), k.into_primitive(), v.into_primitive());
                let (out, aux) = B::attention_forward(q.clone(), k.clone(), v.clone(), scale);
                prep.finish((q, k, v, out.clone(), aux, scale), out)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::attention_forward(q.into_primitive(), k.into_primitive(), v.into_primitive(), scale).0)
            }
        }
    }

    fn fused_self_attention(qkv: FloatTensor<Self>, heads: usize, scale: f64) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct SelfAttentionBackward;

        impl<B: FusedKernels> Backward<B, 1> for SelfAttentionBackward {
            /// qkv, out, aux, heads, scale
            type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, usize, f64);

            fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
                let [node_qkv] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (qkv, out, aux, heads, scale) = ops.state;
                if let Some(node) = node_qkv {
                    grads.register::<B>(node.id, B::self_attention_backward(grad, qkv, out, aux, heads, scale));
                }
            }
        }

        match SelfAttentionBackward.prepare::<C>([qkv.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let qkv = qkv.into_primitive();
                let (out, aux) = B::self_attention_forward(qkv.clone(), heads, scale);
                prep.finish((qkv, out.clone(), aux, heads, scale), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::self_attention_forward(qkv.into_primitive(), heads, scale).0),
        }
    }

    fn fused_linear(x: FloatTensor<Self>, w: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct LinearBackward;

        impl<B: FusedKernels> Backward<B, 3> for LinearBackward {
            /// x, w
            type State = (FloatTensor<B>, FloatTensor<B>);

            fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
                let [node_x, node_w, node_b] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (x, w) = ops.state;
                let d_out = w.shape()[1];
                if let Some(node) = node_b {
                    grads.register::<B>(
                        node.id,
                        B::float_reshape(B::float_sum_dim(grad.clone(), 0), Shape::new([d_out])),
                    );
                }
                if let Some(node) = node_w {
                    grads.register::<B>(node.id, B::float_matmul(B::float_transpose(x), grad.clone()));
                }
                if let Some(node) = node_x {
                    grads.register::<B>(node.id, B::float_matmul(grad, B::float_transpose(w)));
                }
            }
        }

        match LinearBackward.prepare::<C>([x.node(), w.node(), b.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (x, w, b) = (x.into_primitive(), w.into_primitive(), b.into_primitive());
                let out = B::linear_forward(x.clone(), w.clone(), b);
                prep.finish((x, w), out)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::linear_forward(x.into_primitive(), w.into_primitive(), b.into_primitive()))
            }
        }
    }

    fn fused_adamw(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        m: FloatTensor<Self>,
        v: FloatTensor<Self>,
        h: AdamWHyper,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        // Optimisers run on the inner (non-autodiff) tensors; on autodiff ones this is the
        // composed, differentiable update.
        generic::adamw_update::<Self>(param, grad, m, v, h)
    }
}

/// LayerNorm over the last dimension (`gamma`, `beta`: `[d]`).
pub fn layer_norm<const D: usize>(x: Tensor<D>, gamma: Tensor<1>, beta: Tensor<1>, eps: f64) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_layer_norm(
        x.into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
        eps,
    ))
}

/// `softmax(q kᵀ · scale) v`, in the thread's [`precision`](crate::precision).
///
/// # Shapes
/// - q, k, v: `[batch, heads, tokens, head_dim]` → `[batch, heads, tokens, head_dim]`
pub fn attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, scale: f64) -> Tensor<4> {
    let (q, k, v) = (lower(q), lower(k), lower(v));
    raise(Tensor::from_dispatch(<Dispatch as FusedOps>::fused_attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        scale,
    )))
}

/// Multi-head self-attention on the output of a fused qkv projection (timm layout: q, k,
/// v along the last dimension, each `heads × head_dim`).
///
/// # Shapes
/// - qkv: `[batch, tokens, 3·dim]` → `[batch, tokens, dim]`
pub fn self_attention(qkv: Tensor<3>, heads: usize, scale: f64) -> Tensor<3> {
    raise(Tensor::from_dispatch(<Dispatch as FusedOps>::fused_self_attention(lower(qkv).into_dispatch(), heads, scale)))
}

/// `x · w + b` as one op (libtorch: `addmm`, the bias in the GEMM's accumulator; burn's
/// `linear` is a matmul node and a broadcast add node).
///
/// # Shapes
/// - x: `[rows, d_in]`, w: `[d_in, d_out]`, b: `[d_out]` → `[rows, d_out]`
pub fn linear(x: Tensor<2>, w: Tensor<2>, b: Tensor<1>) -> Tensor<2> {
    let (x, w, b) = (lower(x), lower(w), lower(b));
    raise(Tensor::from_dispatch(<Dispatch as FusedOps>::fused_linear(
        x.into_dispatch(),
        w.into_dispatch(),
        b.into_dispatch(),
    )))
}

/// `a · b` (batched over leading dimensions) in the thread's [`precision`](crate::precision).
pub fn matmul<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> Tensor<D> {
    raise(lower(a).matmul(lower(b)))
}

/// One AdamW step on a parameter; returns `(param, moment_1, moment_2)`. Buffers that
/// nothing else references are updated in place where the backend can.
pub fn adamw_update<const D: usize>(
    param: Tensor<D>,
    grad: Tensor<D>,
    m: Tensor<D>,
    v: Tensor<D>,
    h: AdamWHyper,
) -> (Tensor<D>, Tensor<D>, Tensor<D>) {
    let (p, m, v) = <Dispatch as FusedOps>::fused_adamw(
        param.into_dispatch(),
        grad.into_dispatch(),
        m.into_dispatch(),
        v.into_dispatch(),
        h,
    );
    (Tensor::from_dispatch(p), Tensor::from_dispatch(m), Tensor::from_dispatch(v))
}

/// How many buffers the AdamW kernel has had to copy on this thread because another tensor
/// shared them (libtorch/CPU; 0 elsewhere). The optimiser path should never copy.
pub fn adamw_buffer_copies() -> usize {
    #[cfg(feature = "tch")]
    {
        torch::BUFFER_COPIES.with(|c| c.get())
    }
    #[cfg(not(feature = "tch"))]
    {
        0
    }
}

/// The composed kernels, in burn primitives (any backend, any device).
pub mod generic {
    use super::*;

    fn last_dim<B: Backend>(t: &FloatTensor<B>) -> (usize, usize) {
        let shape = t.shape();
        let rank = shape.num_dims();
        (rank - 1, shape[rank - 1])
    }

    /// `[d]` → `[1, …, 1, d]` of rank `rank`.
    fn broadcast_row<B: Backend>(t: FloatTensor<B>, rank: usize, d: usize) -> FloatTensor<B> {
        let mut dims = vec![1; rank];
        dims[rank - 1] = d;
        B::float_reshape(t, Shape::from(dims))
    }

    /// `[b, n, 3·h·hd]` → q, k, v `[b, h, n, hd]` (views).
    pub fn split_heads<B: Backend>(
        qkv: FloatTensor<B>,
        heads: usize,
    ) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
        let [b, n, d3] = qkv.shape().dims();
        let hd = d3 / 3 / heads;
        let x = B::float_permute(B::float_reshape(qkv, Shape::new([b, n, 3, heads, hd])), &[2, 0, 3, 1, 4]);
        let part = |i: usize| {
            B::float_reshape(
                B::float_slice(
                    x.clone(),
                    &[
                        Slice::from(i..i + 1),
                        Slice::from(0..b),
                        Slice::from(0..heads),
                        Slice::from(0..n),
                        Slice::from(0..hd),
                    ],
                ),
                Shape::new([b, heads, n, hd]),
            )
        };
        (part(0), part(1), part(2))
    }

    /// `[b, h, n, hd]` → `[b, n, h·hd]`.
    pub fn merge_heads<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
        let [b, h, n, hd] = x.shape().dims();
        B::float_reshape(B::float_swap_dims(x, 1, 2), Shape::new([b, n, h * hd]))
    }

    /// `[b, n, h·hd]` → `[b, h, n, hd]` (a view).
    pub fn unmerge_heads<B: Backend>(x: FloatTensor<B>, heads: usize) -> FloatTensor<B> {
        let [b, n, d] = x.shape().dims();
        B::float_swap_dims(B::float_reshape(x, Shape::new([b, n, heads, d / heads])), 1, 2)
    }

    /// dq, dk, dv `[b, h, n, hd]` → `[b, n, 3·h·hd]`, the layout of `qkv`.
    pub fn stack_heads<B: Backend>(dq: FloatTensor<B>, dk: FloatTensor<B>, dv: FloatTensor<B>) -> FloatTensor<B> {
        let [b, h, n, hd] = dq.shape().dims();
        let all = B::float_cat(
            vec![dq, dk, dv].into_iter().map(|t| B::float_reshape(t, Shape::new([1, b, h, n, hd]))).collect(),
            0,
        ); // [3, b, h, n, hd]
        B::float_reshape(B::float_permute(all, &[1, 3, 0, 2, 4]), Shape::new([b, n, 3 * h * hd]))
    }

    pub fn layer_norm_forward<B: Backend>(
        x: FloatTensor<B>,
        gamma: FloatTensor<B>,
        beta: FloatTensor<B>,
        eps: f64,
    ) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
        let (last, d) = last_dim::<B>(&x);
        let rank = last + 1;
        let mean = B::float_mean_dim(x.clone(), last);
        let centered = B::float_sub(x, mean.clone());
        let var = B::float_mean_dim(B::float_mul(centered.clone(), centered.clone()), last);
        let rstd = B::float_recip(B::float_sqrt(B::float_add_scalar(var, eps.into())));
        let normed = B::float_mul(centered, rstd.clone());
        let out =
            B::float_add(B::float_mul(normed, broadcast_row::<B>(gamma, rank, d)), broadcast_row::<B>(beta, rank, d));
        (out, mean, rstd)
    }

    pub fn layer_norm_backward<B: Backend>(
        grad: FloatTensor<B>,
        x: FloatTensor<B>,
        mean: FloatTensor<B>,
        rstd: FloatTensor<B>,
        gamma: FloatTensor<B>,
    ) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
        let (last, d) = last_dim::<B>(&x);
        let rank = last + 1;
        let rows = x.shape().num_elements() / d;
        let xhat = B::float_mul(B::float_sub(x, mean), rstd.clone());
        let rows_2d = |t: FloatTensor<B>| B::float_reshape(t, Shape::from(vec![rows, d]));
        let dgamma = B::float_reshape(
            B::float_sum_dim(rows_2d(B::float_mul(grad.clone(), xhat.clone())), 0),
            Shape::from(vec![d]),
        );
        let dbeta = B::float_reshape(B::float_sum_dim(rows_2d(grad.clone()), 0), Shape::from(vec![d]));
        // dx = rstd · (g·γ − mean(g·γ) − x̂ · mean(g·γ·x̂))
        let gg = B::float_mul(grad, broadcast_row::<B>(gamma, rank, d));
        let a = B::float_mean_dim(gg.clone(), last);
        let b = B::float_mean_dim(B::float_mul(gg.clone(), xhat.clone()), last);
        let dx = B::float_mul(B::float_sub(B::float_sub(gg, a), B::float_mul(xhat, b)), rstd);
        (dx, dgamma, dbeta)
    }

    /// Returns `(out, probabilities)`.
    pub fn attention_forward<B: Backend>(
        q: FloatTensor<B>,
        k: FloatTensor<B>,
        v: FloatTensor<B>,
        scale: f64,
    ) -> (FloatTensor<B>, FloatTensor<B>) {
        let scores = B::float_matmul(B::float_mul_scalar(q, scale.into()), B::float_transpose(k));
        // Softmax in float32 whatever the matmuls' precision (as autocast does).
        let dtype = scores.dtype();
        let probs = if dtype == DType::F32 {
            B::softmax(scores, 3)
        } else {
            B::float_cast(B::softmax(B::float_cast(scores, FloatDType::F32), 3), FloatDType::from(dtype))
        };
        (B::float_matmul(probs.clone(), v), probs)
    }

    pub fn attention_backward<B: Backend>(
        grad: FloatTensor<B>,
        q: FloatTensor<B>,
        k: FloatTensor<B>,
        v: FloatTensor<B>,
        probs: FloatTensor<B>,
        scale: f64,
    ) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
        let dv = B::float_matmul(B::float_transpose(probs.clone()), grad.clone());
        let dp = B::float_matmul(grad, B::float_transpose(v));
        // softmax backward: ds = p · (dp − Σ_j p·dp)
        let row = B::float_sum_dim(B::float_mul(dp.clone(), probs.clone()), 3);
        let ds = B::float_mul_scalar(B::float_mul(probs, B::float_sub(dp, row)), scale.into());
        let dq = B::float_matmul(ds.clone(), k);
        let dk = B::float_matmul(B::float_transpose(ds), q);
        (dq, dk, dv)
    }

    pub fn adamw_update<B: Backend>(
        param: FloatTensor<B>,
        grad: FloatTensor<B>,
        m: FloatTensor<B>,
        v: FloatTensor<B>,
        h: AdamWHyper,
    ) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
        let m = B::float_add(
            B::float_mul_scalar(m, h.beta_1.into()),
            B::float_mul_scalar(grad.clone(), (1.0 - h.beta_1).into()),
        );
        let v = B::float_add(
            B::float_mul_scalar(v, h.beta_2.into()),
            B::float_mul_scalar(B::float_mul(grad.clone(), grad), (1.0 - h.beta_2).into()),
        );
        // update = lr · (m / bc1) / (sqrt(v / bc2) + eps)
        let denom = B::float_add_scalar(
            B::float_sqrt(B::float_div_scalar(v.clone(), h.bias_correction_2.into())),
            h.epsilon.into(),
        );
        let update =
            B::float_mul_scalar(B::float_mul(B::float_recip(denom), m.clone()), (h.lr / h.bias_correction_1).into());
        let decayed = if h.weight_decay == 0.0 {
            param
        } else {
            B::float_mul_scalar(param, (1.0 - h.lr * h.weight_decay).into())
        };
        (B::float_sub(decayed, update), m, v)
    }
}

/// libtorch CPU kernels. The Rust loops read and write libtorch's CPU storage directly
/// (the only `unsafe` in the workspace): copying through `copy_data`/`from_slice` would
/// double the memory traffic these kernels exist to save.
#[cfg(feature = "tch")]
#[allow(unsafe_code)]
mod torch {
    use burn::backend::LibTorch;
    use burn::backend::libtorch::TchTensor;
    use rayon::prelude::*;
    use tch::{Device as TDevice, Kind};

    use super::*;

    fn cpu_f32(t: &tch::Tensor) -> bool {
        t.device() == TDevice::Cpu && t.kind() == Kind::Float
    }

    /// Rows per work item of the row-parallel kernels: fixed, so that partial sums are
    /// combined in the same order whatever the thread count.
    const ROWS_PER_CHUNK: usize = 16;
    /// Elements per work item of the elementwise kernels.
    const ELEMS_PER_CHUNK: usize = 1 << 15;

    /// # Safety
    /// `t` must be a contiguous f32 CPU tensor that outlives the slice.
    unsafe fn slice(t: &tch::Tensor) -> &[f32] {
        unsafe { std::slice::from_raw_parts(t.data_ptr() as *const f32, t.numel()) }
    }

    /// # Safety
    /// As [`slice`], and nothing else may read or write `t` while the slice lives.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice_mut(t: &tch::Tensor) -> &mut [f32] {
        unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut f32, t.numel()) }
    }

    /// A buffer this op may overwrite: the tensor itself when nothing else shares its
    /// storage and it is contiguous, else a fresh copy.
    fn owned_buffer(t: TchTensor) -> TchTensor {
        if t.can_mut() && t.tensor.is_contiguous() {
            t
        } else {
            BUFFER_COPIES.with(|c| c.set(c.get() + 1));
            TchTensor::new(t.tensor.contiguous().copy())
        }
    }

    thread_local! {
        pub(super) static BUFFER_COPIES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    /// LayerNorm backward, one pass over each row (`g`, `x`: `[rows, d]`).
    fn layer_norm_backward_cpu(
        g: &tch::Tensor,
        x: &tch::Tensor,
        mean: &tch::Tensor,
        rstd: &tch::Tensor,
        gamma: &tch::Tensor,
    ) -> (tch::Tensor, tch::Tensor, tch::Tensor) {
        let (g, x, mean, rstd, gamma) =
            (g.contiguous(), x.contiguous(), mean.contiguous(), rstd.contiguous(), gamma.contiguous());
        let d = gamma.numel();
        let dx = tch::Tensor::empty(x.size(), (Kind::Float, TDevice::Cpu));
        // SAFETY: all are contiguous f32 CPU tensors alive until the end of this function;
        // `dx` is fresh and only written here.
        let (gs, xs, ms, rstds, gms, dxs) =
            unsafe { (slice(&g), slice(&x), slice(&mean), slice(&rstd), slice(&gamma), slice_mut(&dx)) };
        let partials: Vec<(Vec<f32>, Vec<f32>)> = dxs
            .par_chunks_mut(ROWS_PER_CHUNK * d)
            .enumerate()
            .map(|(c, dx_chunk)| {
                let mut dgamma = vec![0f32; d];
                let mut dbeta = vec![0f32; d];
                for (r, dx_row) in dx_chunk.chunks_mut(d).enumerate() {
                    let row = c * ROWS_PER_CHUNK + r;
                    let (gr, xr) = (&gs[row * d..(row + 1) * d], &xs[row * d..(row + 1) * d]);
                    let (mu, rs) = (ms[row], rstds[row]);
                    let (mut sum_gg, mut sum_ggx) = (0f32, 0f32);
                    // Iterators rather than indices: no bounds checks in the inner loops.
                    for (((&g, &x), &gm), (dg, db)) in
                        gr.iter().zip(xr).zip(gms).zip(dgamma.iter_mut().zip(dbeta.iter_mut()))
                    {
                        let xhat = (x - mu) * rs;
                        let gg = g * gm;
                        sum_gg += gg;
                        sum_ggx += gg * xhat;
                        *dg += g * xhat;
                        *db += g;
                    }
                    let (a, b) = (sum_gg / d as f32, sum_ggx / d as f32);
                    for (((dx, &g), &x), &gm) in dx_row.iter_mut().zip(gr).zip(xr).zip(gms) {
                        *dx = rs * (g * gm - a - (x - mu) * rs * b);
                    }
                }
                (dgamma, dbeta)
            })
            .collect();
        let mut dgamma = vec![0f32; d];
        let mut dbeta = vec![0f32; d];
        for (pg, pb) in &partials {
            for j in 0..d {
                dgamma[j] += pg[j];
                dbeta[j] += pb[j];
            }
        }
        (dx, tch::Tensor::from_slice(&dgamma), tch::Tensor::from_slice(&dbeta))
    }

    /// AdamW in one pass: reads param, grad and both moments once, writes them once.
    fn adamw_cpu(
        param: TchTensor,
        grad: &tch::Tensor,
        m: TchTensor,
        v: TchTensor,
        h: AdamWHyper,
    ) -> (TchTensor, TchTensor, TchTensor) {
        let (param, m, v) = (owned_buffer(param), owned_buffer(m), owned_buffer(v));
        let grad = grad.contiguous();
        let (b1, b2) = (h.beta_1 as f32, h.beta_2 as f32);
        let (lr_bc1, bc2, eps) = ((h.lr / h.bias_correction_1) as f32, h.bias_correction_2 as f32, h.epsilon as f32);
        let decay = (1.0 - h.lr * h.weight_decay) as f32;
        // SAFETY: contiguous f32 CPU buffers of one length, owned by this op (owned_buffer),
        // alive until the end of this function; `grad` is only read.
        let (ps, gs, mst, vst) =
            unsafe { (slice_mut(&param.tensor), slice(&grad), slice_mut(&m.tensor), slice_mut(&v.tensor)) };
        ps.par_chunks_mut(ELEMS_PER_CHUNK)
            .zip(mst.par_chunks_mut(ELEMS_PER_CHUNK))
            .zip(vst.par_chunks_mut(ELEMS_PER_CHUNK))
            .zip(gs.par_chunks(ELEMS_PER_CHUNK))
            .for_each(|(((p, m), v), g)| {
                // Iterators rather than indices: no bounds checks, so the loop vectorises.
                for (((p, m), v), &g) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
                    let mi = b1 * *m + (1.0 - b1) * g;
                    let vi = b2 * *v + (1.0 - b2) * (g * g);
                    *m = mi;
                    *v = vi;
                    // decay = 1 without weight decay: exact.
                    *p = *p * decay - (1.0 / ((vi / bc2).sqrt() + eps)) * mi * lr_bc1;
                }
            });
        (param, m, v)
    }

    /// libtorch's memory-efficient attention kernels on CUDA (what PyTorch's
    /// `scaled_dot_product_attention` picks for float32, and for bf16 where flash attention
    /// is not bound in tch). Chosen by `MSMAE_CUDA_ATTENTION`: `efficient`, or `composed`
    /// (the default until a device check has compared both on a GPU: the composed kernel's
    /// matmul + softmax + matmul is exact and runs everywhere).
    pub(super) mod cuda {
        use std::sync::OnceLock;

        use tch::Kind;

        /// Whether `MSMAE_CUDA_ATTENTION=efficient` asks for the libtorch kernel.
        pub fn enabled() -> bool {
            static ON: OnceLock<bool> = OnceLock::new();
            *ON.get_or_init(|| {
                std::env::var("MSMAE_CUDA_ATTENTION").is_ok_and(|v| v.trim().eq_ignore_ascii_case("efficient"))
            })
        }

        /// The kernel takes `[batch, heads, tokens, head_dim]` CUDA tensors of one float
        /// kind, the last dimension contiguous and a multiple of 8 (PyTorch's own condition
        /// for it, the strictest over float32/bf16).
        pub fn use_efficient(q: &tch::Tensor, k: &tch::Tensor, v: &tch::Tensor) -> bool {
            let kind = q.kind();
            enabled()
                && matches!(kind, Kind::Float | Kind::BFloat16 | Kind::Half)
                && [q, k, v]
                    .iter()
                    .all(|t| t.device().is_cuda() && t.kind() == kind && t.dim() == 4 && t.stride()[3] == 1)
                && q.size()[3] % 8 == 0
        }

        /// `aux` is the kernel's log-sum-exp (`[batch, heads, padded tokens]`), not the
        /// composed kernel's probabilities (`[batch, heads, tokens, tokens]`).
        pub fn is_logsumexp(q: &tch::Tensor, aux: &tch::Tensor) -> bool {
            q.device().is_cuda() && aux.dim() == 3
        }

        /// Returns `(out, logsumexp)`.
        pub fn efficient_forward(
            q: &tch::Tensor,
            k: &tch::Tensor,
            v: &tch::Tensor,
            scale: f64,
        ) -> (tch::Tensor, tch::Tensor) {
            let (out, lse, _seed, _offset) = tch::Tensor::internal_scaled_dot_product_efficient_attention(
                q,
                k,
                v,
                None::<tch::Tensor>,
                true,
                0.0,
                false,
                scale,
            );
            (out, lse)
        }

        /// `(dq, dk, dv)`, as PyTorch's `_scaled_dot_product_efficient_attention_backward`
        /// computes them: the low-level kernel takes `[batch, tokens, heads, head_dim]`
        /// (q, k, v: last dimension contiguous; grad is made contiguous inside). Without
        /// dropout the kernel reads no random state, so the seed and offset are empty.
        /// Checked against PyTorch's `attention_backward.cu` by reading it; not yet run on
        /// a GPU (scripts/gpu-check.sh compares it with the CPU).
        pub fn efficient_backward(
            grad: &tch::Tensor,
            q: &tch::Tensor,
            k: &tch::Tensor,
            v: &tch::Tensor,
            out: &tch::Tensor,
            lse: &tch::Tensor,
            scale: f64,
        ) -> (tch::Tensor, tch::Tensor, tch::Tensor) {
            let t = |x: &tch::Tensor| x.transpose(1, 2);
            let (max_q, max_k) = (q.size()[2], k.size()[2]);
            let none = tch::Tensor::empty([0], (Kind::Int64, q.device()));
            // The kernel casts grad's and out's pointers to q's element type unchecked, and
            // (bf16) takes out's row stride to be heads × head_dim: make both hold.
            let grad = grad.to_kind(q.kind());
            let out = t(out).contiguous().to_kind(q.kind());
            let (dq, dk, dv, _dbias) = tch::Tensor::internal_efficient_attention_backward(
                &t(&grad),
                &t(q),
                &t(k),
                &t(v),
                None::<tch::Tensor>,
                &out,
                None::<tch::Tensor>,
                None::<tch::Tensor>,
                max_q,
                max_k,
                lse,
                0.0,
                &none,
                &none,
                0,
                false,
                scale,
                None::<i64>,
                None::<i64>,
                false,
            );
            (t(&dq), t(&dk), t(&dv))
        }
    }

    impl FusedKernels for LibTorch {
        fn layer_norm_forward(
            x: TchTensor,
            gamma: TchTensor,
            beta: TchTensor,
            eps: f64,
        ) -> (TchTensor, TchTensor, TchTensor) {
            let d = *x.tensor.size().last().expect("LayerNorm input has at least one dimension");
            let (out, mean, rstd) = x.tensor.native_layer_norm([d], Some(&gamma.tensor), Some(&beta.tensor), eps);
            (TchTensor::new(out), TchTensor::new(mean), TchTensor::new(rstd))
        }

        fn layer_norm_backward(
            grad: TchTensor,
            x: TchTensor,
            mean: TchTensor,
            rstd: TchTensor,
            gamma: TchTensor,
        ) -> (TchTensor, TchTensor, TchTensor) {
            if [&grad, &x, &mean, &rstd, &gamma].iter().all(|t| cpu_f32(&t.tensor)) {
                let (dx, dgamma, dbeta) =
                    layer_norm_backward_cpu(&grad.tensor, &x.tensor, &mean.tensor, &rstd.tensor, &gamma.tensor);
                (TchTensor::new(dx), TchTensor::new(dgamma), TchTensor::new(dbeta))
            } else {
                generic::layer_norm_backward::<Self>(grad, x, mean, rstd, gamma)
            }
        }

        fn attention_forward(q: TchTensor, k: TchTensor, v: TchTensor, scale: f64) -> (TchTensor, TchTensor) {
            if [&q, &k, &v].iter().all(|t| cpu_f32(&t.tensor)) {
                let (out, lse) = tch::Tensor::internal_scaled_dot_product_flash_attention_for_cpu(
                    &q.tensor,
                    &k.tensor,
                    &v.tensor,
                    0.0,
                    false,
                    None::<tch::Tensor>,
                    scale,
                );
                (TchTensor::new(out), TchTensor::new(lse))
            } else if cuda::use_efficient(&q.tensor, &k.tensor, &v.tensor) {
                let (out, lse) = cuda::efficient_forward(&q.tensor, &k.tensor, &v.tensor, scale);
                (TchTensor::new(out), TchTensor::new(lse))
            } else {
                generic::attention_forward::<Self>(q, k, v, scale)
            }
        }

        fn attention_backward(
            grad: TchTensor,
            q: TchTensor,
            k: TchTensor,
            v: TchTensor,
            out: TchTensor,
            aux: TchTensor,
            scale: f64,
        ) -> (TchTensor, TchTensor, TchTensor) {
            if [&q, &k, &v].iter().all(|t| cpu_f32(&t.tensor)) {
                let (dq, dk, dv) = tch::Tensor::internal_scaled_dot_product_flash_attention_for_cpu_backward(
                    &grad.tensor,
                    &q.tensor,
                    &k.tensor,
                    &v.tensor,
                    &out.tensor,
                    &aux.tensor,
                    0.0,
                    false,
                    None::<tch::Tensor>,
                    scale,
                );
                (TchTensor::new(dq), TchTensor::new(dk), TchTensor::new(dv))
            } else if cuda::is_logsumexp(&q.tensor, &aux.tensor) {
                let (dq, dk, dv) = cuda::efficient_backward(
                    &grad.tensor,
                    &q.tensor,
                    &k.tensor,
                    &v.tensor,
                    &out.tensor,
                    &aux.tensor,
                    scale,
                );
                (TchTensor::new(dq), TchTensor::new(dk), TchTensor::new(dv))
            } else {
                generic::attention_backward::<Self>(grad, q, k, v, aux, scale)
            }
        }

        fn linear_forward(x: TchTensor, w: TchTensor, b: TchTensor) -> TchTensor {
            TchTensor::new(b.tensor.addmm(&x.tensor, &w.tensor))
        }

        fn adamw_update(
            param: TchTensor,
            grad: TchTensor,
            m: TchTensor,
            v: TchTensor,
            h: AdamWHyper,
        ) -> (TchTensor, TchTensor, TchTensor) {
            if [&param, &grad, &m, &v].iter().all(|t| cpu_f32(&t.tensor)) {
                adamw_cpu(param, &grad.tensor, m, v, h)
            } else {
                generic::adamw_update::<Self>(param, grad, m, v, h)
            }
        }
    }
}
