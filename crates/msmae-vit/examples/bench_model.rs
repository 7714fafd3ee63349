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
//! the baseline is PyTorch with `scaled_dot_product_attention`, as timm runs a ViT),
//! `--device cpu|cuda|cuda:N` (default cpu; on CUDA the memory column is the GPU memory the
//! process holds, from nvidia-smi, for both sides, and burn-tch runs twice: composed
//! attention and libtorch's memory-efficient kernel), `--precision f32|bf16` (burn: see
//! msmae_backend::precision; PyTorch: `torch.autocast` to bfloat16), `--batch N` (override
//! every selected case's batch).
//!
//! `--parity [--device cuda] [--precision bf16]`: instead of timing, one model's forward,
//! attention map, losses and one step's gradients on the device against the same weights
//! and inputs on the CPU (libtorch CPU for a CUDA device, burn-flex for the CPU), one line
//! per figure with its tolerance; exits non-zero if one is off.

use std::process::Command;
use std::time::Instant;

use burn::optim::{AdamWConfig, GradientsParams};
use burn::prelude::*;
use burn::tensor::Distribution;
use msmae_backend::{BackendKind, BackendRequest, DeviceRequest, Precision, compiled_backends, precision, select};
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
    let tiny =
        MaeConfig::new(VitConfig::new([64, 64], 8, 3, 128, 4, 4).with_num_classes(4).with_global_pool(true), 64, 2, 4);
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
            Kind::Finetune(keep) => msmae_mask::msmae_select(
                &vec![1.0; l],
                0.45 * (1.0 - keep) / 0.75,
                0.30 * (1.0 - keep) / 0.75,
                &mut rng,
            ),
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
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// The training stages' AdamW ([`msmae_vit::optim::LeanAdamW`]); `MSMAE_BURN_ADAMW=1`
/// takes burn's own for comparison.
fn optimizer(beta_2: f64) -> burn::optim::ModuleOptimizer {
    if std::env::var_os("MSMAE_BURN_ADAMW").is_some() {
        AdamWConfig::new().with_beta_2(beta_2 as f32).with_weight_decay(0.05).with_epsilon(1e-8).init()
    } else {
        burn::optim::ModuleOptimizer::from(msmae_vit::optim::LeanAdamW {
            beta_1: 0.9,
            beta_2,
            epsilon: 1e-8,
            weight_decay: 0.05,
        })
    }
}

/// Where and how the burn side runs.
#[derive(Clone, Copy, Debug)]
struct Target {
    device: DeviceRequest,
    precision: Precision,
}

impl Target {
    fn cuda(&self) -> Option<usize> {
        match self.device {
            DeviceRequest::Cuda(n) => Some(n),
            _ => None,
        }
    }
    fn args(&self) -> [String; 4] {
        ["--device".into(), self.device.to_string(), "--precision".into(), self.precision.to_string()]
    }
}

/// GPU memory in use on device `n` (MiB), from nvidia-smi: the same reading for burn and
/// PyTorch (each caching allocator keeps what it took, so at the end of a run this is its
/// peak plus the CUDA context).
fn gpu_used_mib(n: usize) -> Option<f64> {
    let o = Command::new("nvidia-smi")
        .args(["--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", &n.to_string()])
        .output()
        .ok()?;
    String::from_utf8_lossy(&o.stdout).trim().parse().ok()
}

/// Run one case on one backend in this process; prints `RESULT ms_per_step peak_mib`.
fn run_one(case: &Case, backend: BackendRequest, steps: usize, target: Target) {
    let dev = match select(backend, target.device) {
        Ok(c) => c.device.autodiff(),
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    precision::set(target.precision);
    dev.seed(0);
    let c = &case.cfg;
    let [h, w] = c.encoder.image_size;
    let l = c.encoder.num_patches();
    let imgs = Tensor::<4>::random([case.batch, c.encoder.in_chans, h, w], Distribution::Normal(0.0, 1.0), &dev);
    let y = Tensor::<1, Int>::from_data(
        TensorData::new((0..case.batch as i64).map(|i| i % 4).collect::<Vec<_>>(), [case.batch]),
        &dev,
    );
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
                let logits =
                    if keep >= 1.0 { m.forward(imgs.clone()) } else { m.forward_visible(imgs.clone(), vis.clone()) };
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
                let out = m.forward(
                    imgs.clone(),
                    vis.clone(),
                    msk.clone(),
                    Some((msmae_vit::ClassTargets::Classes(y.clone()), 0.1)),
                );
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
    let mem = match target.cuda() {
        Some(n) => gpu_used_mib(n).unwrap_or(f64::NAN),
        None => peak_rss_mib(),
    };
    println!("RESULT {} {}", med(&|s| s.iter().sum()), mem);
    println!("SPLIT {:.1} {:.1} {:.1}", med(&|s| s[0]), med(&|s| s[1]), med(&|s| s[2]));
}

fn parse_result(out: &[u8]) -> Option<(f64, f64)> {
    let s = String::from_utf8_lossy(out);
    let line = s.lines().find(|l| l.starts_with("RESULT "))?;
    let mut it = line.split_whitespace().skip(1);
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// `--name VALUE`.
fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).map(String::as_str)
}

fn default_steps(idx: usize, case: &Case) -> usize {
    if idx < 3 {
        5
    } else if case.batch > 4 {
        2
    } else {
        3
    }
}

/// One implementation in the table: its label, and how to run it.
enum Impl {
    Torch(&'static str),
    /// A burn backend; `Some(v)` sets MSMAE_CUDA_ATTENTION=v in the child.
    Burn(BackendRequest, Option<&'static str>),
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let requested: DeviceRequest =
        flag(&args, "--device").map(|d| d.parse().unwrap_or_else(|e| panic!("{e}"))).unwrap_or(DeviceRequest::Cpu);
    // `auto` resolved once, here: children and the PyTorch side get `cpu` or `cuda:N`.
    let device = match select(BackendRequest::Auto, requested) {
        Ok(c) => c.env.device.parse().unwrap_or(DeviceRequest::Cpu),
        Err(e) => {
            eprintln!("bench_model: {e}");
            std::process::exit(2);
        }
    };
    let target = Target {
        device,
        precision: flag(&args, "--precision").map(|p| p.parse().unwrap_or_else(|e| panic!("{e}"))).unwrap_or_default(),
    };
    if args.iter().any(|a| a == "--parity") {
        std::process::exit(if parity(target) { 0 } else { 1 });
    }
    let mut all = cases();
    if let Some(b) = flag(&args, "--batch").and_then(|b| b.parse::<usize>().ok()) {
        all.iter_mut().for_each(|c| c.batch = b);
    }
    let steps_arg = flag(&args, "--steps").and_then(|s| s.parse::<usize>().ok());
    if let Some(i) = args.iter().position(|a| a == "--one") {
        let idx: usize = args[i + 1].parse().expect("case index");
        let backend: BackendRequest = args[i + 2].parse().expect("backend");
        run_one(&all[idx], backend, steps_arg.unwrap_or(default_steps(idx, &all[idx])), target);
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    let explicit = args.iter().any(|a| a == "--explicit");
    let flex_large = args.iter().any(|a| a == "--flex-large");
    let rounds = flag(&args, "--rounds").and_then(|s| s.parse::<usize>().ok()).unwrap_or(1).max(1);
    let only: Option<Vec<usize>> =
        flag(&args, "--only").map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect());
    let python = std::env::var_os("MSMAE_PYTHON");
    // The PyTorch side lives in the source tree: where it was built, or under $MSMAE_REPO
    // (the GPU machine gets the tree at another path).
    let script = match std::env::var_os("MSMAE_REPO") {
        Some(r) => std::path::Path::new(&r).join("crates/msmae-vit/tests/python/bench_model.py"),
        None => std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/bench_model.py")),
    };
    let exe = std::env::current_exe().expect("exe");
    let cuda = target.cuda();
    // On CUDA: GPU memory above what was in use before (other processes, none expected).
    let baseline = cuda.and_then(gpu_used_mib).unwrap_or(0.0);
    let mut burns: Vec<(String, BackendRequest, Option<&'static str>)> = Vec::new();
    if compiled_backends().contains(&BackendKind::Tch) {
        if cuda.is_some() {
            burns.push(("burn-tch (composed attention)".into(), BackendRequest::Tch, Some("composed")));
            burns.push(("burn-tch (efficient attention)".into(), BackendRequest::Tch, Some("efficient")));
        } else {
            burns.push(("burn-tch".into(), BackendRequest::Tch, None));
        }
    }
    if cuda.is_none() {
        burns.push(("burn-flex".into(), BackendRequest::Flex, None));
    }
    let mem_col = if cuda.is_some() { "GPU MiB" } else { "peak RSS MiB" };
    println!("device {:?}, precision {}", target.device, target.precision);
    println!("| case | batch | impl | ms/step | images/s | {mem_col} | vs PyTorch |");
    println!("|---|---|---|---|---|---|---|");
    let mut table: Vec<(usize, String, f64)> = Vec::new();
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
        let steps = steps_arg.unwrap_or(default_steps(idx, case)).to_string();
        let kind = match case.kind {
            Kind::Finetune(k) => format!("finetune:{k}"),
            Kind::Pretrain => "pretrain".into(),
        };
        let [_, dev_arg, _, prec_arg] = target.args();
        let run_torch = |attn: &str| {
            let py = python.as_ref()?;
            let cfg = serde_json::to_string(&case.cfg).ok()?;
            let o = Command::new(py)
                .arg(&script)
                .args([&cfg, &kind, &case.batch.to_string(), &steps, attn, &dev_arg, &prec_arg])
                .output()
                .ok()?;
            if !o.status.success() {
                eprintln!("PyTorch ({attn}) failed on {}: {}", case.name, String::from_utf8_lossy(&o.stderr));
            }
            parse_result(&o.stdout)
        };
        let run_burn = |label: &str, b: BackendRequest, attention: Option<&str>| {
            let mut c = Command::new(&exe);
            c.args([
                "--one",
                &idx.to_string(),
                &format!("{b:?}").to_lowercase(),
                "--steps",
                &steps,
                "--batch",
                &case.batch.to_string(),
            ])
            .args(target.args());
            if let Some(a) = attention {
                c.env("MSMAE_CUDA_ATTENTION", a);
            }
            let o = c.output().expect("child bench");
            let r = parse_result(&o.stdout);
            if r.is_none() {
                eprintln!("{label} failed on {}: {}", case.name, String::from_utf8_lossy(&o.stderr));
            }
            r
        };
        // impls in order: PyTorch SDPA (the baseline: SDPA attention, as timm runs a ViT
        // today), optionally PyTorch with explicit attention, then the burn backends.
        let mut impls: Vec<(String, Impl)> = vec![("PyTorch eager (SDPA)".into(), Impl::Torch("sdpa"))];
        if explicit {
            impls.push(("PyTorch eager (explicit softmax attention)".into(), Impl::Torch("explicit")));
        }
        for (label, b, attention) in &burns {
            if large && *b == BackendRequest::Flex && !flex_large {
                continue;
            }
            impls.push((label.clone(), Impl::Burn(*b, *attention)));
        }
        let mut runs: Vec<Vec<(f64, f64)>> = vec![Vec::new(); impls.len()];
        for _ in 0..rounds {
            for (i, (label, how)) in impls.iter().enumerate() {
                let r = match how {
                    Impl::Torch(attn) => run_torch(attn),
                    Impl::Burn(b, attention) => run_burn(label, *b, *attention),
                };
                runs[i].extend(r);
            }
        }
        // median time, largest memory
        let summary: Vec<Option<(f64, f64)>> = runs
            .into_iter()
            .map(|mut v| {
                if v.is_empty() {
                    return None;
                }
                v.sort_by(|a, b| a.0.total_cmp(&b.0));
                Some((v[v.len() / 2].0, v.iter().map(|x| x.1).fold(0.0, f64::max) - baseline))
            })
            .collect();
        let torch = summary[0].map(|x| x.0);
        for ((label, _), res) in impls.iter().zip(&summary) {
            if let Some((ms, mib)) = res {
                // speed relative to PyTorch (SDPA): > 1 means faster
                let ratio = torch.map(|t| format!("{:.2}×", t / ms)).unwrap_or_else(|| "-".into());
                println!(
                    "| {} | {} | {label} | {ms:.1} | {:.0} | {mib:.0} | {ratio} |",
                    case.name,
                    case.batch,
                    case.batch as f64 * 1e3 / ms
                );
                table.push((idx, label.clone(), *ms));
            }
        }
    }
    println!();
    println!("| speed-up of 25%-token over all-token fine-tuning | impl | ratio |");
    println!("|---|---|---|");
    let labels: Vec<String> =
        std::iter::once("PyTorch eager (SDPA)".to_string()).chain(burns.iter().map(|b| b.0.clone())).collect();
    for (full, part, name) in [(0usize, 1usize, "tiny"), (3, 4, "ViT-B/16"), (6, 7, "ViT-B/16")] {
        for label in &labels {
            let get = |i: usize| table.iter().find(|(j, l, _)| *j == i && l == label).map(|x| x.2);
            if let (Some(a), Some(b)) = (get(full), get(part)) {
                println!("| {name}, batch {} | {label} | {:.2}× |", all[full].batch, a / b);
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

/// The largest |a − b| and the largest |b|.
fn max_diff(a: &[f32], b: &[f32]) -> (f32, f32) {
    let d = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    (d, b.iter().fold(0f32, |m, v| m.max(v.abs())))
}

/// The `--parity` check; true when every figure is within tolerance.
fn parity(target: Target) -> bool {
    let cuda = target.cuda().is_some();
    let (tgt_backend, ref_backend) =
        if cuda { (BackendRequest::Tch, BackendRequest::Tch) } else { (BackendRequest::Auto, BackendRequest::Flex) };
    let tgt = match select(tgt_backend, target.device) {
        Ok(c) => c.device.autodiff(),
        Err(e) => {
            println!("parity: {e}");
            return false;
        }
    };
    let rf = select(ref_backend, DeviceRequest::Cpu).expect("CPU reference").device.autodiff();
    precision::set(target.precision);
    // bf16 rounds each matmul input to 8 significant bits; both sides round, in different
    // summation orders. float32 differs by summation order only (libtorch keeps TF32 off
    // for float32 matmuls unless asked).
    let tol = match target.precision {
        Precision::F32 => 1e-3,
        Precision::Bf16 => 5e-2,
    };
    let cfg = cases().remove(0).cfg; // the tiny MAE: 64×64, patch 8, dim 128, 4 heads
    let batch = 8;
    rf.seed(7);
    let m_ref = cfg.init(&rf);
    let m_tgt = cfg.init(&tgt).load_record(m_ref.clone().into_record());
    let [h, w] = cfg.encoder.image_size;
    let imgs = Tensor::<4>::random([batch, cfg.encoder.in_chans, h, w], Distribution::Normal(0.0, 1.0), &rf);
    let labels: Vec<i64> = (0..batch as i64).map(|i| i % 4).collect();
    let (vis, msk) = plans(cfg.encoder.num_patches(), batch, Kind::Pretrain);
    let run = |m: &msmae_vit::MaskedAutoencoder, dev: &Device| {
        let x = Tensor::<4>::from_data(imgs.to_data(), dev);
        let y = Tensor::<1, Int>::from_data(TensorData::new(labels.clone(), [batch]), dev);
        let logits = m.encoder.forward(x.clone());
        let (_, attn) = m.encoder.forward_with_attention(x.clone());
        let map = msmae_vit::attention_map::cls_attention_map(attn);
        let out = m.forward(
            x,
            index_tensor(&vis, dev),
            index_tensor(&msk, dev),
            Some((msmae_vit::ClassTargets::Classes(y), 0.1)),
        );
        let grads = out.loss.backward();
        let v = |t: Tensor<2>| t.inner().into_data().try_into_vec_as::<f32>().expect("f32");
        let g = |t: Tensor<2>| {
            t.grad(&grads).map(|g| g.into_data().try_into_vec_as::<f32>().expect("f32")).unwrap_or_default()
        };
        let qkv = m.encoder.blocks[0].attn.qkv.weight.val();
        let pred = m.decoder_pred.weight.val();
        vec![
            ("encoder logits", v(logits)),
            ("attention map", v(map)),
            ("MAE loss (reconstruction + 0.1 CE)", vec![out.loss.inner().into_scalar::<f32>()]),
            ("gradient of block 1 qkv weight", g(qkv)),
            ("gradient of decoder_pred weight", g(pred)),
        ]
    };
    let a = run(&m_tgt, &tgt);
    let b = run(&m_ref, &rf);
    let mut ok = true;
    for ((what, x), (_, y)) in a.iter().zip(&b) {
        let (d, scale) = max_diff(x, y);
        let rel = d / scale.max(1e-12);
        let pass = !x.is_empty() && x.len() == y.len() && rel <= tol;
        ok &= pass;
        println!(
            "parity {} {}: {what}: max|Δ| {d:.3e} = {rel:.2e} of max|ref| {scale:.3e} (tolerance {tol:.0e}): {}",
            target.precision,
            if cuda { "cuda vs libtorch CPU" } else { "cpu vs burn-flex" },
            if pass { "ok" } else { "FAIL" }
        );
    }
    ok
}
