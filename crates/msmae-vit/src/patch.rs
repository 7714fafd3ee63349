//! MAE's `patchify` / `unpatchify` and index gathers over the token dimension.

use burn::prelude::*;

/// `[B, C, H, W]` → `[B, L, p·p·C]`, patches row-major, each patch `(p, p, C)` flattened
/// with the channel last (MAE: `einsum('nchpwq->nhwpqc')`).
///
/// # Shapes
/// - imgs: `[batch, channels, height, width]`, height and width divisible by `p`
pub fn patchify(imgs: Tensor<4>, p: usize) -> Tensor<3> {
    let [b, c, h, w] = imgs.dims();
    let (gh, gw) = (h / p, w / p);
    imgs.reshape([b, c, gh, p, gw, p]) // [b, c, gh, p, gw, q]
        .permute([0, 2, 4, 3, 5, 1]) // [b, gh, gw, p, q, c]
        .reshape([b, gh * gw, p * p * c])
}

/// Inverse of [`patchify`]: `[B, L, p·p·C]` → `[B, C, gh·p, gw·p]`.
pub fn unpatchify(x: Tensor<3>, p: usize, channels: usize, grid: [usize; 2]) -> Tensor<4> {
    let [b, l, _] = x.dims();
    let [gh, gw] = grid;
    assert_eq!(l, gh * gw, "{l} patches do not fill a {gh}×{gw} grid");
    x.reshape([b, gh, gw, p, p, channels]) // [b, gh, gw, p, q, c]
        .permute([0, 5, 1, 3, 2, 4]) // [b, c, gh, p, gw, q]
        .reshape([b, channels, gh * p, gw * p])
}

/// Per-sample gather along the token axis: `x[b, ids[b, j], :]`.
///
/// # Shapes
/// - x: `[batch, tokens, dim]`, ids: `[batch, n]` → `[batch, n, dim]`
pub fn gather_tokens(x: Tensor<3>, ids: Tensor<2, Int>) -> Tensor<3> {
    let [b, _, d] = x.dims();
    let [_, n] = ids.dims();
    let idx = ids.reshape([b, n, 1]).repeat_dim(2, d);
    x.gather(1, idx)
}

/// Index lists (one per sample, equal lengths) as an Int tensor `[batch, n]`.
pub fn index_tensor(rows: &[Vec<usize>], device: &Device) -> Tensor<2, Int> {
    let n = rows.first().map(Vec::len).unwrap_or(0);
    assert!(rows.iter().all(|r| r.len() == n), "every sample must keep the same number of tokens");
    let flat: Vec<i64> = rows.iter().flatten().map(|&i| i as i64).collect();
    Tensor::<2, Int>::from_data(TensorData::new(flat, [rows.len(), n]), device)
}
