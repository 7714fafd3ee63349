//! `cargo xtask bench model`: train-step time (forward + backward + AdamW) of the ViT and
//! MAE on every compiled backend beside PyTorch eager running the identical model
//! (tests/python/bench_model.py), plus peak memory and the FLOPs accounting.
//!
//! Each (case, implementation) runs in its own process so its peak RSS is its own.
//! Flags: `--quick` (tiny cases only), `--only 3,4` (these case numbers), `--steps N`
//! (timed steps, default 5 tiny / 3 ViT-B / 2 ViT-B batch 16), `--rounds N` (run every
//! (case, implementation) N times, alternating implementations, and report the median:
//! this machine's speed drifts by ±10 % over minutes), `--flex-large` (also flex on the
//! batch-16 cases),
//! `--explicit` (also PyTorch with the MAE reference code's explicit softmax attention;
//! the baseline is PyTorch with `scaled_dot_product_attention`, as timm runs a ViT).

use std::process::Command;
use std::time::Instant;

use burn::optim::{AdamWConfig, GradientsParams};
use burn::prelude::*;
use burn::tensor::Distribution;
use msmae_backend::{BackendKind, BackendRequest, DeviceRequest, compiled_backends, select};
use msmae_vit::patch::index_tensor;
use msmae_vit::{MaeConfig, VitConfig, flops};

#[derive(Clone, Copy, Debug)]
enum Kind {
    /// Classifier fine-tuning step with `keep` of the tokens (1.0 = all).
    Finetune(f64),
    /// MAE pre-training step: 25 % visible, 45 % masked, 30 % thrown.
    Pretrain,
}

struct Case {
    name: &'static str,
    cfg: MaeConfig,
    batch: usize,
    kind: Kind,
}

fn cases() -> Vec<Case> {
    let tiny = MaeConfig::new(VitConfig::new([64, 64], 8, 3, 128, 4, 4).with_num_classes(4).with_global_pool(true), 64, 2, 4);
    let mut base = MaeConfig::vit_base_patch16(3);
    base.encoder.num_classes = 4;
    base.encoder.global_pool = true;
    vec![
        Case { name: "tiny ViT fine-tune, all tokens", cfg: tiny.clone(), batch: 32, kind: Kind::Finetune(1.0) },
        Case { name: "tiny ViT fine-tune, 25% tokens", cfg: tiny.clone(), batch: 32, kind: Kind::Finetune(0.25) },
        Case { name: "tiny MAE pre-train (25% visible)", cfg: tiny, batch: 32, kind: Kind::Pretrain },
        Case { name: "ViT-B/16 fine-tune, all tokens", cfg: base.clone(), batch: 4, kind: Kind::Finetune(1.0) },
        Case { name: "ViT-B/16 fine-tune, 25% tokens", cfg: base.clone(), batch: 4, kind: Kind::Finetune(0.25) },
        Case { name: "ViT-B/16 MAE pre-train (25% visible)", cfg: base.clone(), batch: 4, kind: Kind::Pretrain },
        // A larger batch: the fixed per-step costs (optimiser, per-op overhead) weigh less,
        // so the 25 %-token speed-up approaches the FLOPs ratio. Not on flex by default.
        Case { name: "ViT-B/16 fine-tune, all tokens", cfg: base.clone(), batch: 16, kind: Kind::Finetune(1.0) },
        Case { name: "ViT-B/16 fine-tune, 25% tokens", cfg: base, batch: 16, kind: Kind::Finetune(0.25) },
    ]
}

fn plans(l: usize, batch: usize, kind: Kind) -> (Vec<Vec<usize>>, Vec<Vec<usize>>) {
    let mut vis = Vec::new();
    let mut msk = Vec::new();
    for i in 0..batch {
        let mut rng = msmae_mask::sample_rng(0, "bench", 0, i as u64);
        let p = match kind {
            Kind::Finetune(keep) => msmae_mask::msmae_select(&vec![1.0; l], 0.45 * (1.0 - keep) / 0.75, 0.30 * (1.0 - keep) / 0.75, &mut rng),
            Kind::Pretrain => msmae_mask::msmae_select(&vec![1.0; l], 0.45, 0.30, &mut rng),
        };
        vis.push(p.visible);
        msk.push(p.masked);
    }
    (vis, msk)
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok()))
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// The training stages' AdamW ([`msmae_vit::optim::LeanAdamW`]); `MSMAE_BURN_ADAMW=1`
/// takes burn's own for comparison.
fn optimizer(beta_2: f64) -> burn::optim::ModuleOptimizer {
    if std::env::var_os("MSMAE_BURN_ADAMW").is_some() {
        AdamWConfig::new().with_beta_2(beta_2 as f32).with_weight_decay(0.05).with_epsilon(1e-8).init()
    } else {
        burn::optim::ModuleOptimizer::from(msmae_vit::optim::LeanAdamW { beta_1: 0.9, beta_2, epsilon: 1e-8, weight_decay: 0.05 })
    }
}

/// Run one case on one backend in this process; prints `RESULT ms_per_step peak_mib`.
fn run_one(case: &Case, backend: BackendRequest, steps: usize) {
    let dev = select(backend, DeviceRequest::Cpu).expect("backend").device.autodiff();
    dev.seed(0);
    let c = &case.cfg;
    let [h, w] = c.encoder.image_size;
    let l = c.encoder.num_patches();
    let imgs = Tensor::<4>::random([case.batch, c.encoder.in_chans, h, w], Distribution::Normal(0.0, 1.0), &dev);
    let y = Tensor::<1, Int>::from_data(TensorData::new((0..case.batch as i64).map(|i| i % 4).collect::<Vec<_>>(), [case.batch]), &dev);
    let (vis, msk) = plans(l, case.batch, case.kind);
    let (vis, msk) = (index_tensor(&vis, &dev), index_tensor(&msk, &dev));
    // per timed step: forward, backward, optimiser seconds (libtorch runs eagerly and the
    // loss is read back at the end of the step, so the parts add up to the step)
    let mut split: Vec<[f64; 3]> = Vec::new();
    match case.kind {
        Kind::Finetune(keep) => {
            let mut m = c.encoder.init(&dev);
            let mut opt = optimizer(0.999);
            let ce = burn::nn::loss::CrossEntropyLossConfig::new().init(&dev);
            for s in 0..steps + 2 {
                let t = Instant::now();
                let logits = if keep >= 1.0 { m.forward(imgs.clone()) } else { m.forward_visible(imgs.clone(), vis.clone()) };
                let loss = ce.forward(logits, y.clone());
                let t_fwd = t.elapsed().as_secs_f64();
                let g = GradientsParams::from_grads(loss.backward(), &m);
                let t_bwd = t.elapsed().as_secs_f64();
                m = opt.step(1e-4, m, g);
                let _: f32 = loss.into_scalar(); // synchronise
                if s >= 2 {
                    split.push([t_fwd, t_bwd - t_fwd, t.elapsed().as_secs_f64() - t_bwd]);
                }
            }
        }
        Kind::Pretrain => {
            let mut m = c.init(&dev);
            let mut opt = optimizer(0.95);
            for s in 0..steps + 2 {
                let t = Instant::now();
                let out = m.forward(imgs.clone(), vis.clone(), msk.clone(), Some((msmae_vit::ClassTargets::Classes(y.clone()), 0.1)));
                let t_fwd = t.elapsed().as_secs_f64();
                let g = GradientsParams::from_grads(out.loss.backward(), &m);
                let t_bwd = t.elapsed().as_secs_f64();
                m = opt.step(1e-4, m, g);
                let _: f32 = out.loss.into_scalar();
                if s >= 2 {
                    split.push([t_fwd, t_bwd - t_fwd, t.elapsed().as_secs_f64() - t_bwd]);
                }
            }
        }
    }
    let med = |f: &dyn Fn(&[f64; 3]) -> f64| {
        let mut v: Vec<f64> = split.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2] * 1e3
    };
    println!("RESULT {} {}", med(&|s| s.iter().sum()), peak_rss_mib());
    println!("SPLIT {:.1} {:.1} {:.1}", med(&|s| s[0]), med(&|s| s[1]), med(&|s| s[2]));
}

fn parse_result(out: &[u8]) -> Option<(f64, f64)> {
    let s = String::from_utf8_lossy(out);
    let line = s.lines().find(|l| l.starts_with("RESULT "))?;
    let mut it = line.split_whitespace().skip(1);
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let all = cases();
    let steps_arg = args.iter().position(|a| a == "--steps").and_then(|i| args.get(i + 1)).and_then(|s| s.parse::<usize>().ok());
    if let Some(i) = args.iter().position(|a| a == "--one") {
        let idx: usize = args[i + 1].parse().expect("case index");
        let backend: BackendRequest = args[i + 2].parse().expect("backend");
        let steps = steps_arg.unwrap_or(if idx < 3 {
            5
        } else if all[idx].batch > 4 {
            2
        } else {
            3
        });
        run_one(&all[idx], backend, steps);
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    let explicit = args.iter().any(|a| a == "--explicit");
    let flex_large = args.iter().any(|a| a == "--flex-large");
    let rounds = args.iter().position(|a| a == "--rounds").and_then(|i| args.get(i + 1)).and_then(|s| s.parse::<usize>().ok()).unwrap_or(1).max(1);
    let only: Option<Vec<usize>> =
        args.iter().position(|a| a == "--only").and_then(|i| args.get(i + 1)).map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect());
    let python = std::env::var_os("MSMAE_PYTHON");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/bench_model.py");
    let exe = std::env::current_exe().expect("exe");
    let mut backends = vec![("burn-flex", BackendRequest::Flex)];
    if compiled_backends().contains(&BackendKind::Tch) {
        backends.insert(0, ("burn-tch", BackendRequest::Tch));
    }
    println!("| case | batch | impl | ms/step | peak RSS MiB | vs PyTorch |");
    println!("|---|---|---|---|---|---|");
    let mut table: Vec<(usize, &str, f64)> = Vec::new();
    for (idx, case) in all.iter().enumerate() {
        let selected = match &only {
            Some(list) => list.contains(&idx),
            None => !(quick && idx >= 3),
        };
        if !selected {
            continue;
        }
        // ViT-B at batch 16: flex only on request (minutes per step).
        let large = idx >= 3 && case.batch > 4;
        let steps = steps_arg
            .unwrap_or(if idx < 3 {
                5
            } else if large {
                2
            } else {
                3
            })
            .to_string();
        let kind = match case.kind {
            Kind::Finetune(k) => format!("finetune:{k}"),
            Kind::Pretrain => "pretrain".into(),
        };
        let run_torch = |attn: &str| {
            let py = python.as_ref()?;
            let cfg = serde_json::to_string(&case.cfg).ok()?;
            let o = Command::new(py).arg(script).args([&cfg, &kind, &case.batch.to_string(), &steps, attn]).output().ok()?;
            if !o.status.success() {
                eprintln!("PyTorch ({attn}) failed on {}: {}", case.name, String::from_utf8_lossy(&o.stderr));
            }
            parse_result(&o.stdout)
        };
        let run_burn = |label: &str, b: BackendRequest| {
            let o = Command::new(&exe).args(["--one", &idx.to_string(), &format!("{b:?}").to_lowercase(), "--steps", &steps]).output().expect("child bench");
            let r = parse_result(&o.stdout);
            if r.is_none() {
                eprintln!("{label} failed on {}: {}", case.name, String::from_utf8_lossy(&o.stderr));
            }
            r
        };
        // impls in order: PyTorch SDPA (the baseline: SDPA attention, as timm runs a ViT
        // today), optionally PyTorch with explicit attention, then the burn backends.
        let mut impls: Vec<(String, &str)> = vec![("PyTorch eager (SDPA)".into(), "torch")];
        if explicit {
            impls.push(("PyTorch eager (explicit softmax attention)".into(), "torch-explicit"));
        }
        for (label, b) in &backends {
            if large && *b == BackendRequest::Flex && !flex_large {
                continue;
            }
            impls.push((label.to_string(), label));
        }
        let mut runs: Vec<Vec<(f64, f64)>> = vec![Vec::new(); impls.len()];
        for _ in 0..rounds {
            for (i, (_, key)) in impls.iter().enumerate() {
                let r = match *key {
                    "torch" => run_torch("sdpa"),
                    "torch-explicit" => run_torch("explicit"),
                    label => backends.iter().find(|(l, _)| *l == label).and_then(|(l, b)| run_burn(l, *b)),
                };
                runs[i].extend(r);
            }
        }
        // median time, largest peak RSS
        let summary: Vec<Option<(f64, f64)>> = runs
            .into_iter()
            .map(|mut v| {
                if v.is_empty() {
                    return None;
                }
                v.sort_by(|a, b| a.0.total_cmp(&b.0));
                Some((v[v.len() / 2].0, v.iter().map(|x| x.1).fold(0.0, f64::max)))
            })
            .collect();
        let torch = summary[0].map(|x| x.0);
        for ((label, key), res) in impls.iter().zip(&summary) {
            if let Some((ms, mib)) = res {
                // speed relative to PyTorch (SDPA): > 1 means faster
                let ratio = torch.map(|t| format!("{:.2}×", t / ms)).unwrap_or_else(|| "-".into());
                println!("| {} | {} | {label} | {ms:.1} | {mib:.0} | {ratio} |", case.name, case.batch);
                table.push((idx, key, *ms));
            }
        }
    }
    println!();
    println!("| speed-up of 25%-token over all-token fine-tuning | impl | ratio |");
    println!("|---|---|---|");
    for (full, part, name) in [(0usize, 1usize, "tiny, batch 32"), (3, 4, "ViT-B/16, batch 4"), (6, 7, "ViT-B/16, batch 16")] {
        for label in ["torch", "burn-tch", "burn-flex"] {
            let get = |i: usize| table.iter().find(|(j, l, _)| *j == i && *l == label).map(|x| x.2);
            if let (Some(a), Some(b)) = (get(full), get(part)) {
                println!("| {name} | {label} | {:.2}× |", a / b);
            }
        }
    }
    let base = VitConfig::vit_base_patch16(3);
    let (f, k) = (flops::encoder(&base, 196), flops::encoder(&base, 49));
    println!();
    println!(
        "FLOPs (MACs, paper convention) ViT-B/16 forward: all tokens {:.2} G, 49 kept {:.2} G, reduction {:.2} % (paper 74.08 %); with attention products {:.2} %",
        f.linear() / 1e9,
        k.linear() / 1e9,
        100.0 * (1.0 - k.linear() / f.linear()),
        100.0 * (1.0 - k.total() / f.total())
    );
    println!(
        "threads: burn-flex uses rayon, libtorch and PyTorch OpenMP; machine has {} cpus",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
}
