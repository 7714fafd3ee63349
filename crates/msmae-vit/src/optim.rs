//! The optimiser of the training stages.

use burn::prelude::*;
use msmae_backend::fused::{self, AdamWHyper};

/// AdamW (decoupled weight decay, bias-corrected moments: the update of burn's `AdamW` and
/// PyTorch's) with burn's state type, so optimiser checkpoints are interchangeable, run as
/// one fused backend op per parameter: on libtorch/CPU one pass that reads parameter,
/// gradient and both moments once and updates them in place (burn's AdamW makes about ten
/// passes and five parameter-sized temporaries).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LeanAdamW {
    pub beta_1: f64,
    pub beta_2: f64,
    pub epsilon: f64,
    pub weight_decay: f64,
}

impl burn::optim::Optimizer for LeanAdamW {
    type State<const D: usize> = burn::optim::AdamWState<D>;

    fn step<const D: usize>(&self, lr: f64, tensor: Tensor<D>, grad: Tensor<D>, state: Option<Self::State<D>>) -> (Tensor<D>, Option<Self::State<D>>) {
        let (m, v, time) = match state {
            Some(s) => (s.momentum.moment_1, s.momentum.moment_2, s.momentum.time + 1),
            None => (grad.zeros_like(), grad.zeros_like(), 1),
        };
        let t = time as i32;
        let h = AdamWHyper {
            lr,
            beta_1: self.beta_1,
            beta_2: self.beta_2,
            epsilon: self.epsilon,
            weight_decay: self.weight_decay,
            bias_correction_1: 1.0 - self.beta_1.powi(t),
            bias_correction_2: 1.0 - self.beta_2.powi(t),
        };
        let (param, m, v) = fused::adamw_update(tensor, grad, m, v, h);
        (param, Some(burn::optim::AdamWState::new(burn::optim::AdaptiveMomentumState::new(time, m, v))))
    }

    fn to_device<const D: usize>(mut state: Self::State<D>, device: &Device) -> Self::State<D> {
        state.momentum = state.momentum.to_device(device);
        state
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::optim::{AdamWConfig, Optimizer};

    /// Same trajectory as burn's AdamW (to float rounding) over several steps, with and
    /// without weight decay.
    #[test]
    fn lean_adamw_follows_burns_adamw() {
        let dev = Device::flex();
        for wd in [0.0, 0.05] {
            let lean = LeanAdamW { beta_1: 0.9, beta_2: 0.95, epsilon: 1e-8, weight_decay: wd };
            let burn_opt = AdamWConfig::new().with_beta_1(0.9).with_beta_2(0.95).with_epsilon(1e-8).with_weight_decay(wd as f32).build();
            let p0 = Tensor::<1>::from_floats([0.5, -1.0, 2.0, 0.0], &dev);
            let (mut pa, mut pb) = (p0.clone(), p0);
            let (mut sa, mut sb) = (None, None);
            for k in 0..5 {
                let g = Tensor::<1>::from_floats([0.1 * k as f32, -0.3, 1.0, 0.02 * (k * k) as f32], &dev);
                (pa, sa) = lean.step(1e-2, pa, g.clone(), sa);
                (pb, sb) = burn_opt.step(1e-2, pb, g, sb);
            }
            let (a, b): (Vec<f32>, Vec<f32>) = (pa.into_data().try_to_vec::<f32>().expect("a"), pb.into_data().try_to_vec::<f32>().expect("b"));
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() < 1e-6, "wd {wd}: {a:?} vs {b:?}");
            }
            assert_eq!(sa.expect("state").momentum.time, 5);
        }
    }
}
