//! Model core on small configs: shapes, patchify round trips, visible-token forwards,
//! attention maps, MAE loss and a few training steps, and flex-vs-libtorch agreement.

use burn::optim::{AdamWConfig, GradientsParams};
use burn::prelude::*;
use burn::tensor::{Distribution, Tolerance};
use msmae_backend::{BackendKind, BackendRequest, DeviceRequest, compiled_backends, seeded, select};
use msmae_vit::attention_map::cls_attention_map;
use msmae_vit::patch::{gather_tokens, index_tensor, patchify, unpatchify};
use msmae_vit::{MaeConfig, VitConfig};

fn flex() -> Device {
    select(BackendRequest::Flex, DeviceRequest::Cpu).expect("flex").device
}

fn vals(t: Tensor<2>) -> Vec<f32> {
    t.into_data().try_into_vec::<f32>().expect("f32")
}

#[test]
fn patchify_layout_and_round_trip() {
    let dev = flex();
    // [1, 2, 4, 6] with value = c*100 + y*10 + x; patch 2 → grid 2×3, patch_dim 8
    let data: Vec<f32> =
        (0..2).flat_map(|c| (0..4).flat_map(move |y| (0..6).map(move |x| (c * 100 + y * 10 + x) as f32))).collect();
    let imgs = Tensor::<4>::from_data(TensorData::new(data, [1, 2, 4, 6]), &dev);
    let p = patchify(imgs.clone(), 2);
    assert_eq!(p.dims(), [1, 6, 8]);
    // patch (row 1, col 2) = pixels y 2..4, x 4..6; inner order (y, x, c)
    let patch5: Vec<f32> = p.clone().narrow(1, 5, 1).reshape([1, 8]).into_data().try_into_vec::<f32>().expect("f32");
    assert_eq!(patch5, [24.0, 124.0, 25.0, 125.0, 34.0, 134.0, 35.0, 135.0]);
    let back = unpatchify(p, 2, 2, [2, 3]);
    back.into_data().assert_eq(&imgs.into_data(), true);
}

#[test]
fn gather_tokens_picks_per_sample_rows() {
    let dev = flex();
    let x = Tensor::<3>::from_data(TensorData::new((0..12).map(|v| v as f32).collect::<Vec<_>>(), [2, 3, 2]), &dev);
    let ids = index_tensor(&[vec![2, 0], vec![1, 1]], &dev);
    let g = gather_tokens(x, ids);
    assert_eq!(g.into_data().try_into_vec::<f32>().expect("f32"), [4.0, 5.0, 0.0, 1.0, 8.0, 9.0, 8.0, 9.0]);
}

fn small(classes: usize) -> VitConfig {
    VitConfig::new([16, 24], 4, 3, 32, 2, 4).with_num_classes(classes).with_global_pool(true)
}

#[test]
fn forward_shapes_and_visible_forward_with_every_patch_equals_the_full_forward() {
    let dev = flex();
    let c = small(5);
    assert_eq!(c.grid(), [4, 6]);
    let (m, imgs) =
        seeded(&dev, 1, || (c.init(&dev), Tensor::<4>::random([2, 3, 16, 24], Distribution::Normal(0.0, 1.0), &dev)));
    let full = m.forward(imgs.clone());
    assert_eq!(full.dims(), [2, 5]);
    let all: Vec<usize> = (0..24).collect();
    let vis = m.forward_visible(imgs.clone(), index_tensor(&[all.clone(), all], &dev));
    vis.into_data().assert_approx_eq::<f32>(&full.into_data(), Tolerance::absolute(1e-5));
    let few = m.forward_visible(imgs.clone(), index_tensor(&[vec![0, 5, 9, 20], vec![1, 2, 3, 4]], &dev));
    assert_eq!(few.dims(), [2, 5]);
    let inter = m.forward_intermediates(imgs, &[1, 2]);
    assert_eq!(inter.len(), 2);
    assert_eq!(inter[1].dims(), [2, 24, 32]);
}

#[test]
fn attention_rows_are_distributions_and_the_map_is_min_max_normalised() {
    let dev = flex();
    let (m, imgs) = seeded(&dev, 2, || {
        (small(0).init(&dev), Tensor::<4>::random([3, 3, 16, 24], Distribution::Normal(0.0, 1.0), &dev))
    });
    let (tokens, attn) = m.forward_with_attention(imgs);
    assert_eq!(tokens.dims(), [3, 25, 32]);
    assert_eq!(attn.dims(), [3, 4, 25, 25]);
    let sums = vals(attn.clone().sum_dim(3).reshape([3, 100]));
    assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5));
    let map = cls_attention_map(attn.clone());
    assert_eq!(map.dims(), [3, 24]);
    let v = vals(map);
    assert!(v.iter().all(|x| (0.0..=1.0).contains(x)));
    // by hand for sample 0: per head min-max of attn[0, h, 0, 1:], then the mean
    let a: Vec<f32> = attn.into_data().try_into_vec::<f32>().expect("f32");
    let mut want = [0f32; 24];
    for h in 0..4 {
        let row: Vec<f32> = (1..25).map(|j| a[(h * 25) * 25 + j]).collect();
        let (lo, hi) = row.iter().fold((f32::MAX, f32::MIN), |(l, u), &x| (l.min(x), u.max(x)));
        for (w, x) in want.iter_mut().zip(&row) {
            *w += (x - lo) / (hi - lo) / 4.0;
        }
    }
    for (g, w) in v[..24].iter().zip(want) {
        assert!((g - w).abs() < 1e-5, "{g} vs {w}");
    }
}

fn mae_batch(dev: &Device) -> (msmae_vit::MaskedAutoencoder, Tensor<4>, Tensor<2, Int>, Tensor<2, Int>) {
    let cfg = MaeConfig::new(VitConfig::new([16, 16], 4, 1, 32, 2, 4).with_num_classes(3), 16, 1, 2);
    let (m, imgs) =
        seeded(dev, 3, || (cfg.init(dev), Tensor::<4>::random([2, 1, 16, 16], Distribution::Normal(0.0, 1.0), dev)));
    let mut rng = msmae_mask::sample_rng(1, "mask", 0, 0);
    let plans: Vec<_> = (0..2).map(|_| msmae_mask::msmae_select(&[1.0; 16], 0.45, 0.30, &mut rng)).collect();
    let vis = index_tensor(&plans.iter().map(|p| p.visible.clone()).collect::<Vec<_>>(), dev);
    let msk = index_tensor(&plans.iter().map(|p| p.masked.clone()).collect::<Vec<_>>(), dev);
    (m, imgs, vis, msk)
}

#[test]
fn mae_forward_shapes_and_loss() {
    let dev = flex();
    let (m, imgs, vis, msk) = mae_batch(&dev);
    assert_eq!(vis.dims(), [2, 4]);
    assert_eq!(msk.dims(), [2, 7]);
    let latent = m.forward_encoder(imgs.clone(), vis.clone());
    assert_eq!(latent.dims(), [2, 5, 32]);
    let pred = m.forward_decoder(latent, vis.clone(), msk.clone());
    assert_eq!(pred.dims(), [2, 7, 16]);
    // the loss is the mean squared error on exactly the masked patches
    let loss: f32 = m.forward_loss(imgs.clone(), pred.clone(), msk.clone()).into_scalar();
    let target = gather_tokens(patchify(imgs.clone(), 4), msk.clone());
    let d = (pred - target).into_data().try_into_vec::<f32>().expect("f32");
    let want = d.iter().map(|x| x * x).sum::<f32>() / d.len() as f32;
    assert!((loss - want).abs() < 1e-5 * want.max(1.0), "{loss} vs {want}");
    let y = Tensor::<1, Int>::from_data(TensorData::new(vec![0i64, 2], [2]), &dev);
    let out = m.forward(imgs, vis, msk, Some((msmae_vit::ClassTargets::Classes(y), 0.1)));
    assert_eq!(out.logits.as_ref().map(|l| l.dims()), Some([2, 3]));
    let (total, rec): (f32, f32) = (out.loss.into_scalar(), out.reconstruction_loss.into_scalar());
    assert!(total > rec, "the CLS cross-entropy adds to the loss");
}

#[test]
fn a_few_adamw_steps_reduce_the_loss_on_one_batch() {
    let dev = flex().autodiff();
    let (mut m, imgs, vis, msk) = mae_batch(&dev);
    let mut opt = AdamWConfig::new().with_beta_2(0.95).with_weight_decay(0.05).with_epsilon(1e-8).init();
    let first: f32 = m.forward(imgs.clone(), vis.clone(), msk.clone(), None).loss.into_scalar();
    for _ in 0..30 {
        let out = m.forward(imgs.clone(), vis.clone(), msk.clone(), None);
        let grads = GradientsParams::from_grads(out.loss.backward(), &m);
        m = opt.step(1e-2, m, grads);
    }
    let last: f32 = m.forward(imgs, vis, msk, None).loss.into_scalar();
    assert!(last < 0.7 * first, "loss {first} → {last}");
}

/// The same weights and inputs give the same outputs on every compiled backend.
#[test]
fn backends_agree_on_vit_and_mae_forwards() {
    let f = flex();
    let (m, imgs, vis, msk) = mae_batch(&f);
    let reference = m.forward(imgs.clone(), vis.clone(), msk.clone(), None).pred.into_data();
    let mut others = vec![f.clone().autodiff()];
    if compiled_backends().contains(&BackendKind::Tch) {
        others.push(select(BackendRequest::Tch, DeviceRequest::Cpu).expect("tch").device);
    }
    for dev in others {
        let cfg = MaeConfig::new(VitConfig::new([16, 16], 4, 1, 32, 2, 4).with_num_classes(3), 16, 1, 2);
        let m2 = cfg.init(&dev).load_record(m.clone().into_record());
        let to = |t: Tensor<2, Int>| Tensor::<2, Int>::from_data(t.into_data(), &dev);
        let out = m2.forward(Tensor::<4>::from_data(imgs.to_data(), &dev), to(vis.clone()), to(msk.clone()), None);
        out.pred.into_data().assert_approx_eq::<f32>(&reference, Tolerance::absolute(1e-4));
    }
}

/// The training AdamW (LeanAdamW → the fused update) updates parameters and moments in
/// place on libtorch: after the first step (which allocates the moments) no buffer is
/// copied because something else still shares it. The loss also goes down.
#[test]
fn lean_adamw_updates_in_place_and_trains() {
    let mut devices = vec![flex().autodiff()];
    if compiled_backends().contains(&BackendKind::Tch) {
        devices.push(select(BackendRequest::Tch, DeviceRequest::Cpu).expect("tch").device.autodiff());
    }
    for dev in devices {
        let (mut m, imgs, vis, msk) = mae_batch(&dev);
        let mut opt = burn::optim::ModuleOptimizer::from(msmae_vit::optim::LeanAdamW {
            beta_1: 0.9,
            beta_2: 0.95,
            epsilon: 1e-8,
            weight_decay: 0.05,
        });
        let first: f32 = m.forward(imgs.clone(), vis.clone(), msk.clone(), None).loss.into_scalar();
        let mut copies_after_first = 0;
        for step in 0..30 {
            let out = m.forward(imgs.clone(), vis.clone(), msk.clone(), None);
            let grads = GradientsParams::from_grads(out.loss.backward(), &m);
            m = opt.step(1e-2, m, grads);
            if step == 0 {
                copies_after_first = msmae_backend::fused::adamw_buffer_copies();
            }
        }
        assert_eq!(
            msmae_backend::fused::adamw_buffer_copies(),
            copies_after_first,
            "{dev:?}: AdamW copied shared buffers after the first step"
        );
        let last: f32 = m.forward(imgs, vis, msk, None).loss.into_scalar();
        assert!(last < 0.7 * first, "{dev:?}: loss {first} → {last}");
    }
}

/// `[t, t]` row-major product `a · b`.
fn matmul_host(a: &[f32], b: &[f32], t: usize) -> Vec<f32> {
    let mut c = vec![0f32; t * t];
    for i in 0..t {
        for k in 0..t {
            let x = a[i * t + k];
            for j in 0..t {
                c[i * t + j] += x * b[k * t + j];
            }
        }
    }
    c
}

fn min_max_host(v: &[f32]) -> Vec<f32> {
    let (lo, hi) = v.iter().fold((f32::MAX, f32::MIN), |(l, u), &x| (l.min(x), u.max(x)));
    v.iter().map(|x| (x - lo) / (hi - lo)).collect()
}

#[test]
fn attention_rollout_multiplies_the_residual_averaged_attention_of_every_block() {
    let dev = flex();
    let (m, imgs) = seeded(&dev, 4, || {
        (small(0).init(&dev), Tensor::<4>::random([2, 3, 16, 24], Distribution::Normal(0.0, 1.0), &dev))
    });
    let (_, attns) = m.forward_attentions(imgs.clone(), None);
    assert_eq!(attns.len(), 2);
    // the last entry is the attention forward_with_attention reports
    let (_, last) = m.forward_with_attention(imgs);
    attns[1].clone().into_data().assert_approx_eq::<f32>(&last.into_data(), Tolerance::absolute(1e-6));
    let got = vals(msmae_vit::attention_map::rollout_map(attns.clone()));
    assert_eq!(got.len(), 2 * 24);
    let t = 25;
    let a: Vec<Vec<f32>> = attns.iter().map(|x| x.clone().into_data().try_into_vec::<f32>().expect("f32")).collect();
    for b in 0..2 {
        // Â = (mean_h A + I) / 2 per block, R = Â2 · Â1, map = min-max of R[0, 1:]
        let hat = |blk: usize| -> Vec<f32> {
            let mut m = vec![0f32; t * t];
            for h in 0..4 {
                for (k, v) in m.iter_mut().enumerate() {
                    *v += a[blk][((b * 4 + h) * t) * t + k] / 4.0;
                }
            }
            for i in 0..t {
                for j in 0..t {
                    m[i * t + j] = 0.5 * m[i * t + j] + if i == j { 0.5 } else { 0.0 };
                }
            }
            m
        };
        let r = matmul_host(&hat(1), &hat(0), t);
        let want = min_max_host(&r[1..t]);
        for (g, w) in got[b * 24..(b + 1) * 24].iter().zip(&want) {
            assert!((g - w).abs() < 1e-4, "sample {b}: {g} vs {w}");
        }
    }
}

/// Logit `class` of sample 0 with `probes` added to the blocks' attention.
fn probed_logit(m: &msmae_vit::VisionTransformer, imgs: Tensor<4>, probes: Vec<Tensor<4>>, class: usize) -> Tensor<1> {
    let (x, _) = m.forward_attentions(imgs, Some(probes));
    m.head_forward(m.pool(x)).narrow(0, 0, 1).narrow(1, class, 1).reshape([1])
}

#[test]
fn attention_probes_carry_the_gradient_of_the_output_with_respect_to_each_blocks_attention() {
    let dev = flex();
    let ad = dev.clone().autodiff();
    let (m, imgs) = seeded(&dev, 5, || {
        (small(3).init(&dev), Tensor::<4>::random([1, 3, 16, 24], Distribution::Normal(0.0, 1.0), &dev))
    });
    let shape = [1, 4, 25, 25];
    let m_ad = m.clone().fork(&ad);
    let probes: Vec<Tensor<4>> = (0..2).map(|_| Tensor::<4>::zeros(shape, &ad).require_grad()).collect();
    let y = probed_logit(&m_ad, Tensor::from_data(imgs.to_data(), &ad), probes.clone(), 1);
    let grads = y.sum().backward();
    // central differences at a few entries of each block's attention (head, row, column)
    for (blk, (h, i, j)) in [(0, (1, 0, 3)), (0, (3, 7, 0)), (1, (2, 0, 9)), (1, (0, 5, 5))] {
        let g = probes[blk]
            .grad(&grads)
            .expect("a gradient for every probe")
            .into_data()
            .try_into_vec::<f32>()
            .expect("f32");
        let analytic = g[((h * 25) + i) * 25 + j];
        let eps = 1e-2f32;
        let at = |s: f32| {
            let mut onehot = vec![0f32; 4 * 25 * 25];
            onehot[((h * 25) + i) * 25 + j] = s;
            let p: Vec<Tensor<4>> = (0..2)
                .map(|b| {
                    if b == blk {
                        Tensor::from_data(TensorData::new(onehot.clone(), shape), &dev)
                    } else {
                        Tensor::zeros(shape, &dev)
                    }
                })
                .collect();
            vals(probed_logit(&m, imgs.clone(), p, 1).reshape([1, 1]))[0]
        };
        let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
        assert!(
            (analytic - numeric).abs() <= 2e-3 + 2e-2 * numeric.abs(),
            "block {blk} ({h}, {i}, {j}): autodiff {analytic}, central difference {numeric}"
        );
    }
}

#[test]
fn gradient_maps_are_per_image_normalised_and_need_a_head_and_autodiff() {
    let dev = flex();
    let ad = dev.clone().autodiff();
    let (m, imgs) = seeded(&dev, 6, || {
        (small(3).init(&dev), Tensor::<4>::random([3, 3, 16, 24], Distribution::Normal(0.0, 1.0), &dev))
    });
    let m_ad = m.clone().fork(&ad);
    let batch =
        vals(msmae_vit::attention_map::gradient_map(&m_ad, Tensor::from_data(imgs.to_data(), &ad)).expect("map"));
    assert_eq!(batch.len(), 3 * 24);
    assert!(batch.iter().all(|x| (0.0..=1.0).contains(x)));
    // each image's map is its own (the class picked per image, no batch coupling)
    let alone = vals(
        msmae_vit::attention_map::gradient_map(&m_ad, Tensor::from_data(imgs.clone().narrow(0, 1, 1).to_data(), &ad))
            .expect("map"),
    );
    for (a, b) in alone.iter().zip(&batch[24..48]) {
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
    }
    assert!(msmae_vit::attention_map::gradient_map(&m, imgs.clone()).expect_err("plain device").contains("autodiff"));
    let headless = small(0).init(&ad);
    assert!(
        msmae_vit::attention_map::gradient_map(&headless, Tensor::from_data(imgs.to_data(), &ad))
            .expect_err("no head")
            .contains("needs a classifier")
    );
}
