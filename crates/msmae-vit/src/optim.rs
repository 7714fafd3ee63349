//! The optimiser of the training stages.

use burn::prelude::*;

/// AdamW (decoupled weight decay, bias-corrected moments: the update of burn's `AdamW` and
/// PyTorch's) with burn's state type, so optimiser checkpoints are interchangeable, but
/// written so that each intermediate has one owner: libtorch then updates it in place,
/// and a step allocates two parameter-sized buffers instead of five.
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
        let (b1, b2) = (self.beta_1, self.beta_2);
        let (m, v, time) = match state {
            Some(s) => {
                let s = s.momentum;
                let m = s.moment_1.mul_scalar(b1).add(grad.clone().mul_scalar(1.0 - b1));
                let v = s.moment_2.mul_scalar(b2).add(grad.square().mul_scalar(1.0 - b2));
                (m, v, s.time + 1)
            }
            None => (grad.clone().mul_scalar(1.0 - b1), grad.square().mul_scalar(1.0 - b2), 1),
        };
        let t = time as i32;
        let (bc1, bc2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        // update = lr · (m / bc1) / (sqrt(v / bc2) + eps)
        let update = v.clone().div_scalar(bc2).sqrt().add_scalar(self.epsilon).recip().mul(m.clone()).mul_scalar(lr / bc1);
        let decayed = if self.weight_decay == 0.0 { tensor } else { tensor.mul_scalar(1.0 - lr * self.weight_decay) };
        let state = burn::optim::AdamWState::new(burn::optim::AdaptiveMomentumState::new(time, m, v));
        (decayed.sub(update), Some(state))
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
