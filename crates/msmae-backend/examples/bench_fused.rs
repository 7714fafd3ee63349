//! `cargo xtask bench fused`: each fused op (msmae_backend::fused) beside the same maths
//! in ordinary burn tensor ops, forward + backward at ViT-B/16 sizes, on every compiled
//! backend, in one process (ratios, not absolute times, are the result).
//!
//! Flags: `--reps N` (timed repetitions, default 7; the median is reported).

use std::time::Instant;

use burn::tensor::{Device, Distribution, Tensor, activation};
use msmae_backend::fused::{self, AdamWHyper};
use msmae_backend::{BackendKind, BackendRequest, DeviceRequest, compiled_backends, select};

fn median_ms(reps: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm-up
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn sync<const D: usize>(t: Tensor<D>) {
    let _: f32 = t.sum().into_scalar();
}

fn layer_norm(dev: &Device, reps: usize, fused_op: bool) -> f64 {
    let ad = dev.clone().autodiff();
    let x0 = Tensor::<3>::random([4, 197, 768], Distribution::Normal(0.0, 1.0), &ad).detach();
    let w = Tensor::<3>::random([4, 197, 768], Distribution::Normal(0.0, 1.0), &ad).detach();
    let (g0, b0) = (Tensor::<1>::ones([768], &ad), Tensor::<1>::zeros([768], &ad));
    median_ms(reps, || {
        let (x, g, b) = (x0.clone().require_grad(), g0.clone().require_grad(), b0.clone().require_grad());
        let out = if fused_op {
            fused::layer_norm(x.clone(), g.clone(), b.clone(), 1e-6)
        } else {
            let mean = x.clone().mean_dim(2);
            let c = x.clone() - mean;
            let var = c.clone().square().mean_dim(2);
            c / (var + 1e-6).sqrt() * g.clone().unsqueeze::<3>() + b.clone().unsqueeze::<3>()
        };
        let grads = (out * w.clone()).sum().backward();
        sync(x.grad(&grads).expect("dx"));
    })
}

fn attention(dev: &Device, reps: usize, fused_op: bool) -> f64 {
    let ad = dev.clone().autodiff();
    let shape = [4, 12, 197, 64];
    let qkv: Vec<Tensor<4>> =
        (0..3).map(|_| Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &ad).detach()).collect();
    let w = Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &ad).detach();
    median_ms(reps, || {
        let (q, k, v) = (qkv[0].clone().require_grad(), qkv[1].clone().require_grad(), qkv[2].clone().require_grad());
        let out = if fused_op {
            fused::attention(q.clone(), k.clone(), v.clone(), 0.125)
        } else {
            activation::softmax((q.clone() * 0.125).matmul(k.clone().swap_dims(2, 3)), 3).matmul(v.clone())
        };
        let grads = (out * w.clone()).sum().backward();
        sync(q.grad(&grads).expect("dq"));
    })
}

fn adamw(dev: &Device, reps: usize, fused_op: bool) -> f64 {
    // ViT-B/16 has 86 M parameters; a quarter of them keeps the memory modest.
    let n = 21_500_000;
    // Owned state moved into each update (as the optimiser does), so the fused op may
    // update it in place.
    let mut state = Some((
        Tensor::<1>::random([n], Distribution::Normal(0.0, 0.02), dev),
        Tensor::<1>::zeros([n], dev),
        Tensor::<1>::zeros([n], dev),
    ));
    let g = Tensor::<1>::random([n], Distribution::Normal(0.0, 0.01), dev);
    let h = AdamWHyper {
        lr: 1e-4,
        beta_1: 0.9,
        beta_2: 0.999,
        epsilon: 1e-8,
        weight_decay: 0.05,
        bias_correction_1: 0.1,
        bias_correction_2: 0.001,
    };
    median_ms(reps, || {
        let (p, m, v) = state.take().expect("state");
        let (p, m, v) = if fused_op {
            fused::adamw_update(p, g.clone(), m, v, h)
        } else {
            let m = m * h.beta_1 + g.clone() * (1.0 - h.beta_1);
            let v = v * h.beta_2 + g.clone().square() * (1.0 - h.beta_2);
            let update = (v.clone() / h.bias_correction_2).sqrt().add_scalar(h.epsilon).recip()
                * m.clone()
                * (h.lr / h.bias_correction_1);
            (p * (1.0 - h.lr * h.weight_decay) - update, m, v)
        };
        let _: f32 = p.clone().slice(0..1).into_scalar();
        state = Some((p, m, v));
    })
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let reps =
        args.iter().position(|a| a == "--reps").and_then(|i| args.get(i + 1)).and_then(|s| s.parse().ok()).unwrap_or(7);
    println!("| op (forward + backward) | backend | fused ms | composed ms | speed-up |");
    println!("|---|---|---|---|---|");
    for &kind in compiled_backends() {
        let req = if kind == BackendKind::Tch { BackendRequest::Tch } else { BackendRequest::Flex };
        let dev = select(req, DeviceRequest::Cpu).expect("compiled backend").device;
        type Bench = fn(&Device, usize, bool) -> f64;
        let ops: [(&str, Bench); 3] = [
            ("LayerNorm [4, 197, 768]", layer_norm),
            ("attention [4, 12, 197, 64]", attention),
            ("AdamW update, 21.5 M params (no backward)", adamw),
        ];
        for (name, f) in ops {
            let (a, b) = (f(&dev, reps, true), f(&dev, reps, false));
            println!("| {name} | {kind} | {a:.2} | {b:.2} | {:.2}× |", b / a);
        }
    }
    println!("threads: {} cpus", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
}
