//! Classification losses shared by every model that trains a CLS head: the classifier
//! stages (docs/method.md §5) and the `cls_weight` term of MSMAE pre-training (§4), so the loss
//! that trains is the one the PyTorch parity test checks.

use burn::nn::loss::CrossEntropyLossConfig;
use burn::prelude::*;

/// What a CLS head is trained against.
#[derive(Debug, Clone)]
pub enum ClassTargets {
    /// Single-label: class indices, `[batch]`.
    Classes(Tensor<1, Int>),
    /// Multi-label: 0/1 targets, `[batch, classes]`.
    MultiHot(Tensor<2>),
}

/// Cross-entropy on class indices (with label smoothing when `smoothing` > 0), or mean
/// binary cross-entropy on logits for multi-hot targets (smoothing does not apply).
///
/// # Shapes
/// - logits: `[batch, classes]` → `[1]`
pub fn classification_loss(logits: Tensor<2>, targets: ClassTargets, smoothing: f64) -> Tensor<1> {
    match targets {
        ClassTargets::MultiHot(t) => bce_with_logits(logits, t),
        ClassTargets::Classes(y) => {
            let mut cfg = CrossEntropyLossConfig::new();
            if smoothing > 0.0 {
                cfg = cfg.with_smoothing(Some(smoothing as f32));
            }
            cfg.init(&logits.device()).forward(logits, y)
        }
    }
}

/// Numerically stable mean binary cross-entropy on logits (multi-label).
///
/// # Shapes
/// - logits, targets: `[batch, classes]` → `[1]`
pub fn bce_with_logits(logits: Tensor<2>, targets: Tensor<2>) -> Tensor<1> {
    let relu = logits.clone().clamp_min(0.0);
    let softplus = (logits.clone().abs().neg().exp() + 1.0).log();
    (relu - logits * targets + softplus).mean()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bce_matches_the_formula_and_ce_prefers_the_true_class() {
        let dev = Device::flex();
        let logits = Tensor::<2>::from_data(TensorData::new(vec![2.0f32, -1.0, 0.5, 0.0], [2, 2]), &dev);
        let t = Tensor::<2>::from_data(TensorData::new(vec![1.0f32, 0.0, 0.0, 1.0], [2, 2]), &dev);
        let got = bce_with_logits(logits.clone(), t).into_scalar::<f32>();
        let sig = |x: f32| 1.0 / (1.0 + (-x).exp());
        let want = -((sig(2.0).ln() + (1.0 - sig(-1.0)).ln() + (1.0 - sig(0.5)).ln() + sig(0.0).ln()) / 4.0);
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        let y = |c: i64| ClassTargets::Classes(Tensor::<1, Int>::from_data(TensorData::new(vec![c, c], [2]), &dev));
        let right = classification_loss(logits.clone(), y(0), 0.0).into_scalar::<f32>();
        let wrong = classification_loss(logits.clone(), y(1), 0.0).into_scalar::<f32>();
        let smoothed = classification_loss(logits, y(0), 0.1).into_scalar::<f32>();
        assert!(right < wrong && smoothed > right, "{right} {wrong} {smoothed}");
    }
}
