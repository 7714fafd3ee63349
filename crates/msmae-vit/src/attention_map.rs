//! The supervised attention map (docs/method.md §2): the last block's softmaxed attention, CLS
//! row over the patches, min-max normalised per head, averaged over heads; and two
//! alternatives that read all blocks, attention rollout and gradient-weighted attention.

use burn::prelude::*;

use crate::VisionTransformer;

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

/// How a patch-weight map is read from a ViT (`attention/extract`'s `method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MapMethod {
    /// The paper's map (docs/method.md §2): the last block's CLS attention ([`cls_attention_map`]).
    #[default]
    Cls,
    /// Attention rollout across all blocks (Abnar & Zuidema 2020, [`rollout_map`]).
    Rollout,
    /// Gradient-weighted attention relevance to the predicted class across all blocks
    /// (Chefer, Gur & Wolf 2021, [`gradient_map`]); needs a classifier.
    Gradient,
}

impl MapMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            MapMethod::Cls => "cls",
            MapMethod::Rollout => "rollout",
            MapMethod::Gradient => "gradient",
        }
    }
}

/// Each row min-max normalised to [0, 1] (a flat row becomes zeros).
fn min_max(x: Tensor<2>) -> Tensor<2> {
    let min = x.clone().min_dim(1);
    let max = x.clone().max_dim(1);
    (x - min.clone()) / (max - min).clamp_min(1e-12)
}

/// The CLS row over the patches of `[batch, 1 + L, 1 + L]` relevance matrices, min-max
/// normalised per image.
fn cls_row(r: Tensor<3>) -> Tensor<2> {
    let [b, t, _] = r.dims();
    min_max(r.narrow(1, 0, 1).narrow(2, 1, t - 1).reshape([b, t - 1]))
}

/// Attention rollout (Abnar & Zuidema 2020): per block the head-averaged attention with
/// the residual added, `Â = (A + I) / 2` (rows still sum to 1), multiplied through the
/// blocks, `R = Â_n ⋯ Â_1`; the map is R's CLS row over the patches, min-max normalised.
/// With one block it orders the patches as the head-averaged CLS attention does.
///
/// # Shapes
/// - attns: one `[batch, heads, 1 + L, 1 + L]` per block, in block order → `[batch, L]`
///
/// # Panics
/// With no blocks.
pub fn rollout_map(attns: Vec<Tensor<4>>) -> Tensor<2> {
    let [b, _, t, _] =
        attns.first().map(Tensor::dims).unwrap_or_else(|| panic!("attention rollout needs at least one block"));
    let eye = Tensor::<2>::eye(t, &attns[0].device()).reshape([1, t, t]);
    let mut r: Option<Tensor<3>> = None;
    for a in attns {
        let a = (a.mean_dim(1).reshape([b, t, t]) + eye.clone()) * 0.5;
        r = Some(match r {
            None => a,
            Some(r) => a.matmul(r),
        });
    }
    cls_row(r.unwrap_or_else(|| unreachable!("at least one block")))
}

/// Gradient-weighted attention relevance (Chefer, Gur & Wolf 2021, "Generic
/// attention-model explainability"): per block `Ā = mean_heads (∇A ⊙ A)⁺`, the attention
/// weighted by the gradient of the predicted class's logit with respect to it, positive
/// part; relevance accumulated through the blocks as `R ← R + Ā·R` from `R = I`; the map is
/// R's CLS row over the patches, min-max normalised. Class-specific where plain attention
/// is not: patches the prediction depends on, not patches every image attends to.
///
/// `vit` and `imgs` must be on an autodiff device, and `vit` must have a classification
/// head; stochastic depth should be off (`drop_path = 0` in every block).
///
/// # Shapes
/// - imgs: `[batch, channels, height, width]` → `[batch, L]`
pub fn gradient_map(vit: &VisionTransformer, imgs: Tensor<4>) -> Result<Tensor<2>, String> {
    if vit.head.is_none() {
        return Err("gradient-weighted attention needs a classifier (a checkpoint with a head): the relevance is to the predicted class".into());
    }
    let device = imgs.device();
    if !device.is_autodiff() {
        return Err("gradient-weighted attention needs an autodiff device".into());
    }
    let [b, _, _, _] = imgs.dims();
    let t = vit.pos_embed.dims()[1];
    let heads = vit.blocks.first().map(|blk| blk.attn.num_heads).ok_or("a ViT without blocks has no attention")?;
    let probes: Vec<Tensor<4>> =
        vit.blocks.iter().map(|_| Tensor::<4>::zeros([b, heads, t, t], &device).require_grad()).collect();
    let (x, attns) = vit.forward_attentions(imgs, Some(probes.clone()));
    let logits = vit.head_forward(vit.pool(x));
    let [_, k] = logits.dims();
    let pred: Vec<i64> = logits
        .clone()
        .inner()
        .argmax(1)
        .try_into_vec_as::<i64>()
        .map_err(|e| format!("reading the predictions back: {e:?}"))?;
    let mut onehot = vec![0f32; b * k];
    for (i, p) in pred.iter().enumerate() {
        onehot[i * k + *p as usize] = 1.0;
    }
    let score = (logits * Tensor::<2>::from_data(TensorData::new(onehot, [b, k]), &device)).sum();
    let grads = score.backward();
    let inner = device.inner();
    let mut r = Tensor::<2>::eye(t, &inner).reshape([1, t, t]).expand([b, t, t]);
    for (a, p) in attns.into_iter().zip(&probes) {
        let g = p.grad(&grads).unwrap_or_else(|| Tensor::zeros([b, heads, t, t], &inner));
        let cam = (g * a.inner()).clamp_min(0.0).mean_dim(1).reshape([b, t, t]);
        r = r.clone() + cam.matmul(r);
    }
    Ok(cls_row(r))
}

/// The `[batch, L]` patch-weight maps of `imgs` by `method`. `Cls` and `Rollout` run on
/// any device; `Gradient` as [`gradient_map`] requires.
pub fn patch_maps(vit: &VisionTransformer, imgs: Tensor<4>, method: MapMethod) -> Result<Tensor<2>, String> {
    match method {
        MapMethod::Cls => Ok(cls_attention_map(vit.forward_with_attention(imgs).1)),
        MapMethod::Rollout => Ok(rollout_map(vit.forward_attentions(imgs, None).1)),
        MapMethod::Gradient => gradient_map(vit, imgs),
    }
}

/// The neighbourhood operation of a [`Smoothing`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmoothOp {
    /// The largest weight of the neighbourhood: a peak spreads to the patches around it.
    Max,
    /// The mean weight of the neighbourhood (the cells inside the grid).
    Mean,
}

impl SmoothOp {
    pub fn as_str(self) -> &'static str {
        match self {
            SmoothOp::Max => "max",
            SmoothOp::Mean => "mean",
        }
    }
}

/// Spatial smoothing of a patch-weight map on its patch grid, applied before the patches
/// are ranked (`smooth: { op: max, size: 3 }`): each patch takes the `op` of the
/// `size × size` patches centred on it, cut at the grid's border. A lesion that spans a
/// few patches then ranks as a block, its border patches with its core.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Smoothing {
    pub op: SmoothOp,
    /// Side of the neighbourhood in patches: odd, at least 1 (1 leaves the map as it is).
    pub size: usize,
}

impl Smoothing {
    /// Largest neighbourhood side accepted (a 63×63 neighbourhood is the whole grid of a
    /// 512 px image at 8 px patches already).
    pub const MAX_SIZE: usize = 63;

    /// Why this smoothing is not usable, if it is not.
    pub fn check(&self) -> Result<(), String> {
        if self.size == 0 || self.size.is_multiple_of(2) || self.size > Self::MAX_SIZE {
            return Err(format!(
                "size must be odd, from 1 to {} (patches on each side of the centre patch: (size - 1) / 2); got {}",
                Self::MAX_SIZE,
                self.size
            ));
        }
        Ok(())
    }

    /// A short label, e.g. `max3`.
    pub fn label(&self) -> String {
        format!("{}{}", self.op.as_str(), self.size)
    }

    /// The smoothed map of `map` (row-major on `grid`).
    ///
    /// # Panics
    /// If `map.len()` is not `grid[0] * grid[1]`.
    pub fn apply(&self, map: &[f32], grid: [usize; 2]) -> Vec<f32> {
        let [gh, gw] = grid;
        assert_eq!(map.len(), gh * gw, "a map of {} patches on a {gh}×{gw} grid", map.len());
        let r = self.size / 2;
        let mut out = Vec::with_capacity(map.len());
        for y in 0..gh {
            for x in 0..gw {
                let (ys, ye) = (y.saturating_sub(r), (y + r).min(gh - 1));
                let (xs, xe) = (x.saturating_sub(r), (x + r).min(gw - 1));
                let cells = (ys..=ye).flat_map(|yy| (xs..=xe).map(move |xx| map[yy * gw + xx]));
                out.push(match self.op {
                    SmoothOp::Max => cells.fold(f32::NEG_INFINITY, f32::max),
                    SmoothOp::Mean => {
                        let n = ((ye - ys + 1) * (xe - xs + 1)) as f32;
                        cells.sum::<f32>() / n
                    }
                });
            }
        }
        out
    }
}

/// How a map that ranks patches is read: the method, then the optional smoothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MapReading {
    pub method: MapMethod,
    pub smooth: Option<Smoothing>,
}

impl MapReading {
    /// `method`, or `method+op size` with smoothing (e.g. `rollout+max3`).
    pub fn label(&self) -> String {
        match self.smooth {
            Some(s) => format!("{}+{}", self.method.as_str(), s.label()),
            None => self.method.as_str().to_string(),
        }
    }

    /// The ranking map of a raw map read by `method`.
    pub fn finish(&self, raw: Vec<f32>, grid: [usize; 2]) -> Vec<f32> {
        match self.smooth {
            Some(s) => s.apply(&raw, grid),
            None => raw,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRID: [usize; 2] = [3, 4];
    // One peak at (1, 1); a second, lower one in the corner (2, 3).
    const MAP: [f32; 12] = [0.0, 0.1, 0.0, 0.0, 0.2, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5];

    #[test]
    fn max_smoothing_spreads_each_peak_over_its_neighbourhood_cut_at_the_border() {
        let s = Smoothing { op: SmoothOp::Max, size: 3 };
        let out = s.apply(&MAP, GRID);
        #[rustfmt::skip]
        let want = [
            1.0, 1.0, 1.0, 0.0,
            1.0, 1.0, 1.0, 0.5,
            1.0, 1.0, 1.0, 0.5,
        ];
        assert_eq!(out, want);
    }

    #[test]
    fn mean_smoothing_averages_the_cells_inside_the_grid() {
        let s = Smoothing { op: SmoothOp::Mean, size: 3 };
        let out = s.apply(&MAP, GRID);
        // corner (0, 0): cells (0,0) (0,1) (1,0) (1,1) → (0 + 0.1 + 0.2 + 1.0) / 4
        assert!((out[0] - 1.3 / 4.0).abs() < 1e-6, "{out:?}");
        // centre (1, 1): all nine cells of the top-left 3×3 → 1.3 / 9
        assert!((out[5] - 1.3 / 9.0).abs() < 1e-6, "{out:?}");
        // corner (2, 3): (1,2) (1,3) (2,2) (2,3) → 0.5 / 4
        assert!((out[11] - 0.125).abs() < 1e-6, "{out:?}");
        let lo = MAP.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = MAP.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        assert!(out.iter().all(|v| (lo..=hi).contains(v)), "a mean stays within the map's range");
    }

    #[test]
    fn size_one_is_the_identity_and_even_or_zero_sizes_are_refused() {
        for op in [SmoothOp::Max, SmoothOp::Mean] {
            assert_eq!(Smoothing { op, size: 1 }.apply(&MAP, GRID), MAP.to_vec());
        }
        for size in [0, 2, 4, Smoothing::MAX_SIZE + 2] {
            assert!(Smoothing { op: SmoothOp::Max, size }.check().is_err(), "size {size}");
        }
        assert!(Smoothing { op: SmoothOp::Mean, size: 5 }.check().is_ok());
    }

    #[test]
    fn a_reading_labels_itself_and_smooths_only_when_asked() {
        let plain = MapReading { method: MapMethod::Rollout, smooth: None };
        assert_eq!(plain.label(), "rollout");
        assert_eq!(plain.finish(MAP.to_vec(), GRID), MAP.to_vec());
        let smoothed =
            MapReading { method: MapMethod::Rollout, smooth: Some(Smoothing { op: SmoothOp::Max, size: 3 }) };
        assert_eq!(smoothed.label(), "rollout+max3");
        assert_eq!(smoothed.finish(MAP.to_vec(), GRID)[0], 1.0);
    }

    #[test]
    fn smoothing_reads_from_yaml_and_refuses_unknown_fields() {
        let s: Smoothing = serde_json::from_str(r#"{"op": "mean", "size": 5}"#).expect("a smoothing");
        assert_eq!(s, Smoothing { op: SmoothOp::Mean, size: 5 });
        assert!(serde_json::from_str::<Smoothing>(r#"{"op": "max", "size": 3, "sigma": 1}"#).is_err());
        assert!(serde_json::from_str::<Smoothing>(r#"{"op": "median", "size": 3}"#).is_err());
    }
}
