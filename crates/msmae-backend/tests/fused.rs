//! The fused ops against the same maths written with ordinary burn tensor ops (whose
//! gradients burn's autodiff derives), on every compiled backend: values, gradients,
//! non-contiguous inputs, in-place safety and determinism.

use burn::tensor::{Device, Distribution, Tensor, activation};
use msmae_backend::fused::{self, AdamWHyper};
use msmae_backend::{BackendKind, BackendRequest, DeviceRequest, compiled_backends, select};

fn devices() -> Vec<(BackendKind, Device)> {
    compiled_backends()
        .iter()
        .map(|&k| {
            let req = match k {
                BackendKind::Flex => BackendRequest::Flex,
                BackendKind::Tch => BackendRequest::Tch,
            };
            (k, select(req, DeviceRequest::Cpu).expect("compiled backend").device)
        })
        .collect()
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_into_vec_as::<f32>().expect("f32 data")
}

fn assert_close<const D: usize>(what: &str, a: Tensor<D>, b: Tensor<D>, tol: f32) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes");
    let (a, b) = (values(a), values(b));
    let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(worst <= tol, "{what}: max |diff| {worst} > {tol}");
}

/// q, k, v `[b, h, n, hd]` as the model's explicit path makes them: views into one
/// permuted `[b, n, 3·h·hd]` qkv tensor.
fn split_qkv(qkv: Tensor<3>, h: usize) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
    let [b, n, d3] = qkv.dims();
    let hd = d3 / 3 / h;
    let p = qkv.reshape([b, n, 3, h, hd]).permute([2, 0, 3, 1, 4]);
    (
        p.clone().narrow(0, 0, 1).reshape([b, h, n, hd]),
        p.clone().narrow(0, 1, 1).reshape([b, h, n, hd]),
        p.narrow(0, 2, 1).reshape([b, h, n, hd]),
    )
}

fn softmax_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, scale: f64) -> Tensor<4> {
    activation::softmax((q * scale).matmul(k.swap_dims(2, 3)), 3).matmul(v)
}

fn ln_reference(x: Tensor<3>, gamma: Tensor<1>, beta: Tensor<1>, eps: f64) -> Tensor<3> {
    let mean = x.clone().mean_dim(2);
    let centered = x - mean;
    let var = centered.clone().square().mean_dim(2);
    centered / (var + eps).sqrt() * gamma.unsqueeze::<3>() + beta.unsqueeze::<3>()
}

#[test]
fn fused_layer_norm_matches_composed_ops_in_value_and_gradient() {
    for (kind, dev) in devices() {
        let ad = dev.clone().autodiff();
        // Non-contiguous input too: the model feeds views.
        for transposed in [false, true] {
            let base = Tensor::<3>::random([5, 3, 24], Distribution::Normal(0.5, 2.0), &ad);
            let x0 = if transposed { base.swap_dims(0, 1) } else { base.reshape([3, 5, 24]) };
            let x0 = x0.detach();
            let gamma0 = Tensor::<1>::random([24], Distribution::Normal(1.0, 0.3), &ad);
            let beta0 = Tensor::<1>::random([24], Distribution::Normal(0.0, 0.3), &ad);
            let w = Tensor::<3>::random([3, 5, 24], Distribution::Normal(0.0, 1.0), &ad).detach();

            let run = |fused_op: bool| {
                let (x, gamma, beta) =
                    (x0.clone().require_grad(), gamma0.clone().require_grad(), beta0.clone().require_grad());
                let out = if fused_op {
                    fused::layer_norm(x.clone(), gamma.clone(), beta.clone(), 1e-6)
                } else {
                    ln_reference(x.clone(), gamma.clone(), beta.clone(), 1e-6)
                };
                let grads = (out.clone() * w.clone()).sum().backward();
                (
                    out.inner(),
                    x.grad(&grads).expect("dx"),
                    gamma.grad(&grads).expect("dgamma"),
                    beta.grad(&grads).expect("dbeta"),
                )
            };
            let (o1, dx1, dg1, db1) = run(true);
            let (o2, dx2, dg2, db2) = run(false);
            let what = format!("{kind} transposed={transposed}");
            assert_close(&format!("{what} out"), o1, o2, 1e-5);
            assert_close(&format!("{what} dx"), dx1, dx2, 1e-4);
            assert_close(&format!("{what} dgamma"), dg1, dg2, 1e-4);
            assert_close(&format!("{what} dbeta"), db1, db2, 1e-4);
        }
        // Without autodiff (evaluation): the forward kernel alone.
        let x = Tensor::<3>::random([2, 4, 16], Distribution::Normal(0.0, 1.0), &dev);
        let (g, b) = (Tensor::<1>::ones([16], &dev), Tensor::<1>::zeros([16], &dev));
        assert_close(
            &format!("{kind} inference"),
            fused::layer_norm(x.clone(), g.clone(), b.clone(), 1e-6),
            ln_reference(x, g, b, 1e-6),
            1e-5,
        );
    }
}

#[test]
fn fused_attention_matches_softmax_attention_in_value_and_gradient() {
    for (kind, dev) in devices() {
        let ad = dev.clone().autodiff();
        let (b, h, n, hd) = (2, 3, 7, 8);
        // q, k, v as the model makes them: views into one permuted qkv tensor.
        let qkv0 = Tensor::<3>::random([b, n, 3 * h * hd], Distribution::Normal(0.0, 1.0), &ad).detach();
        let w = Tensor::<4>::random([b, h, n, hd], Distribution::Normal(0.0, 1.0), &ad).detach();
        let scale = 1.0 / (hd as f64).sqrt();
        let run = |fused_op: bool| {
            let qkv = qkv0.clone().require_grad();
            let (q, k, v) = split_qkv(qkv.clone(), h);
            let out = if fused_op { fused::attention(q, k, v, scale) } else { softmax_attention(q, k, v, scale) };
            let grads = (out.clone() * w.clone()).sum().backward();
            (out.inner(), qkv.grad(&grads).expect("dqkv"))
        };
        let (o1, d1) = run(true);
        let (o2, d2) = run(false);
        assert_close(&format!("{kind} attention out"), o1, o2, 1e-5);
        assert_close(&format!("{kind} attention dqkv"), d1, d2, 1e-4);
    }
}

fn hyper(t: i32, wd: f64) -> AdamWHyper {
    AdamWHyper {
        lr: 1e-2,
        beta_1: 0.9,
        beta_2: 0.95,
        epsilon: 1e-8,
        weight_decay: wd,
        bias_correction_1: 1.0 - 0.9f64.powi(t),
        bias_correction_2: 1.0 - 0.95f64.powi(t),
    }
}

#[test]
fn fused_adamw_follows_the_update_rule_and_leaves_shared_buffers_alone() {
    for (kind, dev) in devices() {
        for wd in [0.0, 0.05] {
            let n = 70_000; // more than one work item of the parallel kernel
            let p0: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
            let mut p = Tensor::<1>::from_floats(p0.as_slice(), &dev);
            let mut m = Tensor::<1>::zeros([n], &dev);
            let mut v = Tensor::<1>::zeros([n], &dev);
            let (mut pr, mut mr, mut vr) =
                (p0.iter().map(|&x| x as f64).collect::<Vec<_>>(), vec![0f64; n], vec![0f64; n]);
            let keep = p.clone(); // another owner of the first parameter buffer
            for t in 1..=4 {
                let g: Vec<f32> = (0..n).map(|i| (((i + 7 * t as usize) * 13 % 29) as f32 - 14.0) / 10.0).collect();
                let h = hyper(t, wd);
                (p, m, v) = fused::adamw_update(p, Tensor::<1>::from_floats(g.as_slice(), &dev), m, v, h);
                for i in 0..n {
                    let gi = g[i] as f64;
                    mr[i] = 0.9 * mr[i] + 0.1 * gi;
                    vr[i] = 0.95 * vr[i] + 0.05 * gi * gi;
                    pr[i] = pr[i] * (1.0 - h.lr * wd)
                        - h.lr / h.bias_correction_1 * mr[i] / ((vr[i] / h.bias_correction_2).sqrt() + 1e-8);
                }
            }
            let worst = values(p).iter().zip(&pr).map(|(a, b)| (*a as f64 - b).abs()).fold(0f64, f64::max);
            assert!(worst < 1e-5, "{kind} wd {wd}: max |param − f64 reference| {worst}");
            let worst_m = values(m).iter().zip(&mr).map(|(a, b)| (*a as f64 - b).abs()).fold(0f64, f64::max);
            assert!(worst_m < 1e-6, "{kind} wd {wd}: moment 1 off by {worst_m}");
            assert_eq!(values(keep), p0, "{kind}: a buffer shared with another tensor was updated in place");
        }
    }
}

#[test]
fn fused_backward_kernels_are_deterministic() {
    for (kind, dev) in devices() {
        let ad = dev.clone().autodiff();
        let x0 = Tensor::<3>::random([8, 50, 64], Distribution::Normal(0.0, 1.0), &ad).detach();
        let gamma0 = Tensor::<1>::random([64], Distribution::Normal(1.0, 0.3), &ad).detach();
        let w = Tensor::<3>::random([8, 50, 64], Distribution::Normal(0.0, 1.0), &ad).detach();
        let run = || {
            let gamma = gamma0.clone().require_grad();
            let out = fused::layer_norm(x0.clone(), gamma.clone(), Tensor::zeros([64], &ad), 1e-6);
            values(gamma.grad(&(out * w.clone()).sum().backward()).expect("dgamma"))
        };
        assert_eq!(run(), run(), "{kind}: LayerNorm dgamma differs between two identical runs");
    }
}

#[test]
fn fused_self_attention_matches_split_attend_merge_in_value_and_gradient() {
    for (kind, dev) in devices() {
        let ad = dev.clone().autodiff();
        let (b, h, n, hd) = (2, 3, 7, 8);
        let d = h * hd;
        let qkv0 = Tensor::<3>::random([b, n, 3 * d], Distribution::Normal(0.0, 1.0), &ad).detach();
        let w = Tensor::<3>::random([b, n, d], Distribution::Normal(0.0, 1.0), &ad).detach();
        let scale = 1.0 / (hd as f64).sqrt();
        let run = |fused_op: bool| {
            let qkv = qkv0.clone().require_grad();
            let out = if fused_op {
                fused::self_attention(qkv.clone(), h, scale)
            } else {
                let (q, k, v) = split_qkv(qkv.clone(), h);
                softmax_attention(q, k, v, scale).swap_dims(1, 2).reshape([b, n, d])
            };
            let grads = (out.clone() * w.clone()).sum().backward();
            (out.inner(), qkv.grad(&grads).expect("dqkv"))
        };
        let (o1, d1) = run(true);
        let (o2, d2) = run(false);
        assert_close(&format!("{kind} self-attention out"), o1, o2, 1e-5);
        assert_close(&format!("{kind} self-attention dqkv"), d1, d2, 1e-4);
        // evaluation (no autodiff)
        let x = Tensor::<3>::random([b, n, 3 * d], Distribution::Normal(0.0, 1.0), &dev);
        let o1 = fused::self_attention(x.clone(), h, scale);
        let (q, k, v) = split_qkv(x, h);
        let o2 = softmax_attention(q, k, v, scale).swap_dims(1, 2).reshape([b, n, d]);
        assert_close(&format!("{kind} self-attention inference"), o1, o2, 1e-5);
    }
}

#[test]
fn fused_linear_matches_matmul_plus_bias_in_value_and_gradient() {
    for (kind, dev) in devices() {
        let ad = dev.clone().autodiff();
        let x0 = Tensor::<2>::random([37, 24], Distribution::Normal(0.0, 1.0), &ad).detach();
        let w0 = Tensor::<2>::random([24, 40], Distribution::Normal(0.0, 0.2), &ad).detach();
        let b0 = Tensor::<1>::random([40], Distribution::Normal(0.0, 0.2), &ad).detach();
        let g = Tensor::<2>::random([37, 40], Distribution::Normal(0.0, 1.0), &ad).detach();
        let run = |fused_op: bool| {
            let (x, w, b) = (x0.clone().require_grad(), w0.clone().require_grad(), b0.clone().require_grad());
            let out = if fused_op {
                fused::linear(x.clone(), w.clone(), b.clone())
            } else {
                x.clone().matmul(w.clone()) + b.clone().unsqueeze::<2>()
            };
            let grads = (out.clone() * g.clone()).sum().backward();
            (out.inner(), x.grad(&grads).expect("dx"), w.grad(&grads).expect("dw"), b.grad(&grads).expect("db"))
        };
        let (o1, dx1, dw1, db1) = run(true);
        let (o2, dx2, dw2, db2) = run(false);
        assert_close(&format!("{kind} linear out"), o1, o2, 1e-5);
        assert_close(&format!("{kind} linear dx"), dx1, dx2, 1e-4);
        assert_close(&format!("{kind} linear dw"), dw1, dw2, 1e-4);
        assert_close(&format!("{kind} linear db"), db1, db2, 1e-4);
        // a transposed (non-contiguous) input, as the model's views can be
        let xt = Tensor::<2>::random([24, 37], Distribution::Normal(0.0, 1.0), &dev).transpose();
        let (w, b) = (w0.clone().inner(), b0.clone().inner());
        assert_close(
            &format!("{kind} linear transposed input"),
            fused::linear(xt.clone(), w.clone(), b.clone()),
            xt.matmul(w) + b.unsqueeze::<2>(),
            1e-5,
        );
    }
}

/// `--precision bf16`: the matmul ops compute in bfloat16 and hand back float32, values
/// within bfloat16 rounding of float32 (but not equal to them), gradients float32.
#[test]
fn bf16_precision_rounds_matmuls_and_attention_and_keeps_float32_around_them() {
    use burn::tensor::DType;
    use msmae_backend::precision::{self, Precision};
    for (kind, dev) in devices() {
        let ad = dev.clone().autodiff();
        // Seeded: the rounding error depends on the draw, and a test that passes on most draws
        // is a flaky test.
        let (x0, w0, b0) = msmae_backend::seeded(&ad, 7, || {
            (
                Tensor::<2>::random([37, 64], Distribution::Normal(0.0, 1.0), &ad).detach(),
                Tensor::<2>::random([64, 48], Distribution::Normal(0.0, 0.2), &ad).detach(),
                Tensor::<1>::random([48], Distribution::Normal(0.0, 0.2), &ad).detach(),
            )
        });
        let run = |p: Precision| {
            precision::with(p, || {
                let (x, w, b) = (x0.clone().require_grad(), w0.clone().require_grad(), b0.clone().require_grad());
                let y = fused::linear(x.clone(), w.clone(), b.clone()); // [37, 48] = 2 × 3 heads × 8
                let attn = fused::self_attention(y.clone().reshape([1, 37, 48]), 2, 0.35);
                let out = fused::matmul(attn.reshape([37, 16]), w.clone().narrow(0, 0, 16));
                let grads = (out.clone() * out.clone()).mean().backward();
                (y.inner(), out.inner(), w.grad(&grads).expect("dw"), x.grad(&grads).expect("dx"))
            })
        };
        let (y32, o32, dw32, dx32) = run(Precision::F32);
        let (y16, o16, dw16, dx16) = run(Precision::Bf16);
        assert_eq!(precision::current(), Precision::F32, "with() restores the thread's precision");
        for (what, t) in [("linear", &y16), ("output", &o16), ("dw", &dw16), ("dx", &dx16)] {
            assert_eq!(t.dtype(), DType::F32, "{kind} {what}: float32 outside the matmuls");
        }
        // ‖bf16 − f32‖ / ‖f32‖: bfloat16 keeps 8 significant bits (relative rounding 2⁻⁹ ≈ 0.002
        // per value); a chain of a few matmuls, a softmax and their backward stays within a
        // few percent. (The largest single difference over the largest value, tested here
        // before, is dominated by cancellation in dx and failed on one draw in CI at 0.052.)
        let rel = |a: &Tensor<2>, b: &Tensor<2>| {
            let (a, b) = (values(a.clone()), values(b.clone()));
            let diff: f64 = a.iter().zip(&b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
            let norm: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
            (diff / norm).sqrt()
        };
        for (what, lo, hi, tol) in [
            ("linear", &y16, &y32, 0.01),
            ("output", &o16, &o32, 0.02),
            ("dw", &dw16, &dw32, 0.03),
            ("dx", &dx16, &dx32, 0.03),
        ] {
            let r = rel(lo, hi);
            eprintln!("{kind} {what}: relative error {r:.5}");
            assert!(r > 0.0, "{kind} {what}: bf16 gave exactly the float32 numbers; nothing was rounded");
            assert!(r < tol, "{kind} {what}: bf16 off float32 by {r} in relative norm (> {tol})");
        }
    }
}

#[test]
fn precision_names_parse_and_nonsense_is_refused() {
    use msmae_backend::Precision;
    assert_eq!("bf16".parse(), Ok(Precision::Bf16));
    assert_eq!("F32".parse(), Ok(Precision::F32));
    assert_eq!(Precision::Bf16.to_string(), "bf16");
    let e = "fp8".parse::<Precision>().expect_err("fp8");
    assert!(e.to_string().contains("use f32 or bf16"), "{e}");
    let c = select(BackendRequest::Flex, DeviceRequest::Cpu).expect("flex").with_precision(Precision::Bf16);
    assert_eq!(c.env.precision, "bf16");
}
