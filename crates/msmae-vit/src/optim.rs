//! The optimisers of the training stages: AdamW for training, LARS for linear probing.

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

    fn step<const D: usize>(
        &self,
        lr: f64,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
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

/// LARS (You, Gitman & Ginsburg 2017) as the MAE reference's linear probe uses it: SGD with
/// momentum whose update of every matrix parameter is rescaled by the trust ratio
/// `trust_coefficient · ‖p‖ / ‖g + wd·p‖` (1 where either norm is 0); vectors (biases, norm
/// scales) get neither weight decay nor the ratio. Momentum without dampening, the first
/// step's velocity the update itself (PyTorch's `mu` from zeros).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Lars {
    pub momentum: f64,
    pub weight_decay: f64,
    pub trust_coefficient: f64,
}

impl burn::optim::Optimizer for Lars {
    type State<const D: usize> = burn::optim::SgdState<D>;

    fn step<const D: usize>(
        &self,
        lr: f64,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        let mut update = grad;
        if D > 1 {
            if self.weight_decay != 0.0 {
                update = update + tensor.clone() * self.weight_decay;
            }
            let norm = |t: Tensor<D>| f64::from(t.powi_scalar(2).sum().sqrt().into_scalar::<f32>());
            let (p, u) = (norm(tensor.clone()), norm(update.clone()));
            if p > 0.0 && u > 0.0 {
                update = update * (self.trust_coefficient * p / u);
            }
        }
        let momentum = burn::optim::momentum::Momentum::new(
            &burn::optim::momentum::MomentumConfig::new().with_momentum(self.momentum).with_dampening(0.0),
        );
        let (velocity, m) = momentum.transform(update, state.and_then(|s| s.momentum));
        (tensor - velocity * lr, Some(burn::optim::SgdState::new(Some(m))))
    }

    fn to_device<const D: usize>(mut state: Self::State<D>, device: &Device) -> Self::State<D> {
        state.momentum = state.momentum.map(|m| m.to_device(device));
        state
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::optim::{AdamWConfig, Optimizer};

    /// LARS against the reference's update written out by hand: three steps on a matrix
    /// (weight decay and trust ratio) and a vector (neither), momentum 0.9.
    #[test]
    fn lars_follows_the_reference_update() {
        let dev = Device::flex();
        let lars = Lars { momentum: 0.9, weight_decay: 0.05, trust_coefficient: 0.001 };
        let (lr, m) = (0.5, 0.9);
        let mut w = Tensor::<2>::from_floats([[0.5, -1.0], [2.0, 0.25]], &dev);
        let mut b = Tensor::<1>::from_floats([0.1, -0.2], &dev);
        let (mut sw, mut sb) = (None, None);
        // the reference, in f64
        let (mut rw, mut rb) = (vec![0.5, -1.0, 2.0, 0.25], vec![0.1, -0.2]);
        let (mut mw, mut mb) = (vec![0.0; 4], vec![0.0; 2]);
        let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
        for k in 0..3 {
            let gw = [0.3 - 0.1 * k as f64, 0.2, -0.4, 0.1 * k as f64];
            let gb = [0.05, -0.5 + 0.1 * k as f64];
            let dw: Vec<f64> = gw.iter().zip(&rw).map(|(g, p)| g + 0.05 * p).collect();
            let q = 0.001 * norm(&rw) / norm(&dw);
            for i in 0..4 {
                mw[i] = m * mw[i] + dw[i] * q;
                rw[i] -= lr * mw[i];
            }
            for i in 0..2 {
                mb[i] = m * mb[i] + gb[i];
                rb[i] -= lr * mb[i];
            }
            let gwt = Tensor::<1>::from_floats([gw[0] as f32, gw[1] as f32, gw[2] as f32, gw[3] as f32], &dev)
                .reshape([2, 2]);
            (w, sw) = lars.step(lr, w, gwt, sw);
            (b, sb) = lars.step(lr, b, Tensor::<1>::from_floats([gb[0] as f32, gb[1] as f32], &dev), sb);
        }
        let got_w = w.into_data().try_to_vec::<f32>().expect("w");
        let got_b = b.into_data().try_to_vec::<f32>().expect("b");
        for (g, r) in got_w.iter().zip(&rw).chain(got_b.iter().zip(&rb)) {
            assert!((f64::from(*g) - r).abs() < 1e-6, "{got_w:?} {got_b:?} vs {rw:?} {rb:?}");
        }
        // a zero parameter has no trust ratio: the plain momentum update
        let z = Tensor::<2>::zeros([2, 2], &dev);
        let (z, _) = lars.step(1.0, z, Tensor::<2>::ones([2, 2], &dev), None);
        assert_eq!(z.into_data().try_to_vec::<f32>().expect("z"), vec![-1.0; 4]);
    }

    /// Same trajectory as burn's AdamW (to float rounding) over several steps, with and
    /// without weight decay.
    #[test]
    fn lean_adamw_follows_burns_adamw() {
        let dev = Device::flex();
        for wd in [0.0, 0.05] {
            let lean = LeanAdamW { beta_1: 0.9, beta_2: 0.95, epsilon: 1e-8, weight_decay: wd };
            let burn_opt = AdamWConfig::new()
                .with_beta_1(0.9)
                .with_beta_2(0.95)
                .with_epsilon(1e-8)
                .with_weight_decay(wd as f32)
                .build();
            let p0 = Tensor::<1>::from_floats([0.5, -1.0, 2.0, 0.0], &dev);
            let (mut pa, mut pb) = (p0.clone(), p0);
            let (mut sa, mut sb) = (None, None);
            for k in 0..5 {
                let g = Tensor::<1>::from_floats([0.1 * k as f32, -0.3, 1.0, 0.02 * (k * k) as f32], &dev);
                (pa, sa) = lean.step(1e-2, pa, g.clone(), sa);
                (pb, sb) = burn_opt.step(1e-2, pb, g, sb);
            }
            let (a, b): (Vec<f32>, Vec<f32>) =
                (pa.into_data().try_to_vec::<f32>().expect("a"), pb.into_data().try_to_vec::<f32>().expect("b"));
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() < 1e-6, "wd {wd}: {a:?} vs {b:?}");
            }
            assert_eq!(sa.expect("state").momentum.time, 5);
        }
    }
}
