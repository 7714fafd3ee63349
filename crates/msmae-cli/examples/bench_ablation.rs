//! `cargo xtask bench ablation`: the ablations of `pipelines/ablation.yaml` (issue 17,
//! item 3) under two benchmark conditions — `focal` (the class lives in a small lesion)
//! and `diffuse` (a change over a large part of one lung) — and several seeds: test
//! accuracy and macro AUC per condition × method (mean ± sd over seeds), and the paired
//! differences that answer the questions (seeds as pairs, 95 % Student-t intervals).
//!
//! Flags as `bench study` (`--seeds`, default 1,2,3; `--pipeline`; `--store`; `--set`),
//! and `--diffuse-contrast X` (default 0.15).

#[path = "bench_common/mod.rs"]
mod common;

use std::collections::BTreeMap;

use common::{Args, mean_sd};

/// (eval stage, what it is)
const METHODS: [(&str, &str); 7] = [
    ("eval-scratch", "no pre-training, full fine-tuning"),
    ("eval-pt-random", "random-mask pre-training (MAE + CE), full fine-tuning"),
    ("eval-pt-attmask", "AttMask pre-training, full fine-tuning"),
    ("eval-pt-msmae", "MSMAE pre-training, full fine-tuning"),
    ("eval-vis-lowest", "MSMAE pre-training, finetune/msmae visible from the lowest attention (the paper)"),
    ("eval-vis-uniform", "MSMAE pre-training, finetune/msmae visible uniformly at random"),
    ("eval-vis-highest", "MSMAE pre-training, finetune/msmae visible from the highest attention"),
];

/// The questions: (A, B) → A − B.
const PAIRS: [(&str, &str); 7] = [
    ("eval-vis-uniform", "eval-vis-lowest"),
    ("eval-vis-highest", "eval-vis-lowest"),
    ("eval-pt-msmae", "eval-vis-lowest"),
    ("eval-pt-msmae", "eval-pt-random"),
    ("eval-pt-attmask", "eval-pt-random"),
    ("eval-pt-msmae", "eval-pt-attmask"),
    ("eval-pt-random", "eval-scratch"),
];

#[derive(Default)]
struct Condition {
    coverage: Vec<f64>,
    supervised_val: Vec<f64>,
    /// eval stage → per seed [(acc, f1, auc) best-val, last-epoch]
    scores: BTreeMap<String, Vec<[(f64, f64, f64); 2]>>,
}

fn main() {
    let mut contrast = "0.15".to_string();
    let mut rest: Vec<String> = Vec::new();
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        if a == "--diffuse-contrast" {
            contrast = it.next().unwrap_or(contrast);
        } else {
            rest.push(a);
        }
    }
    let args = Args::parse_from("ablation", &[1, 2, 3], "pipelines/ablation.yaml", rest);
    let diffuse = ["params.evidence=diffuse".to_string(), format!("params.contrast={contrast}")];
    let conditions: [(&str, Vec<&str>); 2] = [("focal", vec![]), ("diffuse", diffuse.iter().map(String::as_str).collect())];
    let mut results: BTreeMap<&str, Condition> = BTreeMap::new();
    for &seed in &args.seeds {
        for (name, sets) in &conditions {
            let lock = args.run_with(&format!("ablation/{name}"), seed, sets);
            let c = results.entry(name).or_default();
            let attn = common::json(&lock.dir("attn").join("summary.json"));
            c.coverage.push(attn["lesion_coverage"].as_f64().unwrap_or(f64::NAN));
            let h = common::json(&lock.dir("supervised").join("history.json"));
            c.supervised_val.push(h["epochs"].as_array().and_then(|e| e.last()).and_then(|e| e["val_accuracy"].as_f64()).unwrap_or(f64::NAN));
            for (m, _) in METHODS {
                c.scores.entry(m.to_string()).or_default().push(lock.scores(m));
            }
            eprintln!("[bench ablation/{name}] seed {seed} done: {}", METHODS.iter().map(|(m, _)| format!("{m} {:.3}", lock.scores(m)[0].0)).collect::<Vec<_>>().join(", "));
        }
    }
    println!("\n{} seed(s): {:?}; diffuse contrast {contrast}", args.seeds.len(), args.seeds);
    for (name, _) in &conditions {
        let c = &results[name];
        println!(
            "\ncondition `{name}`: supervised ViT val accuracy (last epoch) {}, lesion coverage of its top-25 % `{}` map {}",
            mean_sd(&c.supervised_val),
            "params.map",
            mean_sd(&c.coverage)
        );
        println!("| method | accuracy | macro AUC | last-epoch accuracy | last-epoch AUC |");
        println!("|---|---|---|---|---|");
        for (m, label) in METHODS {
            let v = &c.scores[m];
            let col = |f: &dyn Fn(&[(f64, f64, f64); 2]) -> f64| mean_sd(&v.iter().map(f).collect::<Vec<_>>());
            println!("| {label} (`{m}`) | {} | {} | {} | {} |", col(&|s| s[0].0), col(&|s| s[0].2), col(&|s| s[1].0), col(&|s| s[1].2));
        }
        println!("\npaired differences, condition `{name}` (mean [95 % t interval]; * = excludes 0)");
        println!("| A − B | accuracy | macro AUC |");
        println!("|---|---|---|");
        for (a, b) in PAIRS {
            let cell = |f: &dyn Fn(&[(f64, f64, f64); 2]) -> f64| {
                let x: Vec<f64> = c.scores[a].iter().map(f).collect();
                let y: Vec<f64> = c.scores[b].iter().map(f).collect();
                let p = msmae_eval::stats::paired(&x, &y);
                format!("{:+.3} [{:+.3}, {:+.3}]{}", p.mean, p.lo, p.hi, if p.excludes_zero() { " *" } else { "" })
            };
            println!("| `{a}` − `{b}` | {} | {} |", cell(&|s| s[0].0), cell(&|s| s[0].2));
        }
    }
}
