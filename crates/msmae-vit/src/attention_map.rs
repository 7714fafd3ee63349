//! The supervised attention map (METHOD.md §2): the last block's softmaxed attention, CLS
//! row over the patches, min-max normalised per head, averaged over heads.

use burn::prelude::*;

/// # Shapes
/// - attn: `[batch, heads, 1 + L, 1 + L]` → `[batch, L]`, each row in [0, 1]
pub fn cls_attention_map(attn: Tensor<4>) -> Tensor<2> {
    let [b, h, t, _] = attn.dims();
    let l = t - 1;
    let cls = attn.narrow(2, 0, 1).narrow(3, 1, l).reshape([b, h, l]); // attn[:, :, 0, 1:]
    let min = cls.clone().min_dim(2);
    let max = cls.clone().max_dim(2);
    // A head with a flat row carries no preference: it contributes zeros, not NaNs.
    let norm = (cls - min.clone()) / (max - min).clamp_min(1e-12);
    norm.mean_dim(1).reshape([b, l])
}
