//! `cargo xtask bench accum`: what gradient accumulation (`accum_steps`) buys. One training
//! epoch of a ViT-S/16 classifier (`attention/train-supervised`, preset `small`) and of a
//! ViT-S MAE (`mae/pretrain`) at 224 px, global batch 32, with the batch computed in 1, 2
//! and 4 micro-batches; every run its own `msmae` process, its peak resident memory sampled
//! from `/proc` and its wall time measured. The optimiser steps are the same in every
//! column (the data-parallel tests check the parameters agree to 1e-5).
//!
//! Flags: `--accum 1,2,4`, `--images N` (default 96: two optimiser steps of 32 after the
//! validation and test images are set aside), `--size S` (default 224), `--batch B`
//! (default 32).

#[path = "bench_common/mod.rs"]
mod common;

use std::process::Command;

use common::{msmae_exe, run_measured};

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned()).unwrap_or_else(|| default.to_string())
}

fn main() {
    let accums: Vec<usize> = arg("--accum", "1,2,4").split(',').filter_map(|s| s.trim().parse().ok()).collect();
    let (images, size, batch) = (arg("--images", "96"), arg("--size", "224"), arg("--batch", "32"));
    let work = tempfile::tempdir().expect("tmp");
    let store = work.path().join("store");
    let stages =
        [("supervised", "ViT-S/16 classifier (attention/train-supervised)"), ("mae", "ViT-S/16 MAE (mae/pretrain)")];
    // (stage, accum) → (seconds, MiB)
    let mut rows: Vec<Vec<(f64, f64)>> = vec![Vec::new(); stages.len()];
    for &accum in &accums {
        let yaml = work.path().join("accum.yaml");
        std::fs::write(
            &yaml,
            format!(
                "name: accum\nseed: 1\nstages:\n  data: {{ uses: ingest/synthetic, with: {{ images: {images}, size: {size}, previews: 0 }} }}\n  supervised: {{ uses: attention/train-supervised, needs: [data], with: {{ model: {{ preset: small }}, epochs: 1, batch_size: {batch}, warmup_epochs: 0, accum_steps: {accum} }} }}\n  mae: {{ uses: mae/pretrain, needs: [data], with: {{ model: {{ preset: small }}, epochs: 1, batch_size: {batch}, warmup_epochs: 0, figure_images: 1, accum_steps: {accum} }} }}\n"
            ),
        )
        .expect("pipeline");
        let mut data = Command::new(msmae_exe());
        data.arg("run").arg(&yaml).args(["--until", "data", "-q"]).arg("--store").arg(&store);
        assert!(run_measured(&mut data).0, "ingesting the images failed");
        for (k, (stage, _)) in stages.iter().enumerate() {
            let mut c = Command::new(msmae_exe());
            c.arg("run").arg(&yaml).args(["--stage", stage, "--force", "-q"]).arg("--store").arg(&store);
            let (ok, secs, mib) = run_measured(&mut c);
            if !ok {
                eprintln!("[bench accum] {stage} with accum_steps {accum} failed");
                std::process::exit(1);
            }
            eprintln!("[bench accum] {stage}, accum_steps {accum}: {secs:.1} s, peak RSS {mib:.0} MiB");
            rows[k].push((secs, mib));
        }
    }
    println!(
        "\ngradient accumulation: one epoch at {size} px, global batch {batch}, {images} images; one process per run, wall seconds and peak RSS (MiB)\n"
    );
    let head: Vec<String> = accums
        .iter()
        .map(|a| format!("accum {a} (micro-batch {}): s | MiB", batch.parse::<usize>().unwrap_or(32) / a))
        .collect();
    println!("| model | {} |", head.join(" | "));
    println!("|---|{}", "---|---|".repeat(accums.len()));
    for (k, (_, label)) in stages.iter().enumerate() {
        let cells: Vec<String> = rows[k].iter().map(|(s, m)| format!("{s:.1} | {m:.0}")).collect();
        println!("| {label} | {} |", cells.join(" | "));
    }
}
