//! `cargo xtask bench ablation`: the ablations of `pipelines/ablation.yaml` under two
//! benchmark conditions — `focal` (the class lives in a small lesion)
//! and `diffuse` (a change over a large part of one lung). The pipeline runs its seeds
//! itself (a `repeat:` group) and its `eval/compare` stage computes, per method, mean ±
//! sd over the seeds and the paired differences with 95 % Student-t intervals; this
//! prints those per condition × method, and the pairs that answer the questions.
//!
//! Flags: `--pipeline`, `--store`, `--set` as `bench study`; `--diffuse-contrast X`
//! (default 0.08: the supervised ViT then classifies about as well as on the focal images);
//! `--conditions focal,diffuse` (default both) to run or print some of them.
//! Another pipeline of the same shape (a `seeds` group of `eval/classify` stages compared by
//! a top-level `report`, an `attn` stage per round), e.g. `pipelines/guided.yaml`: its
//! methods are its eval stages, labelled by their descriptions, and every pair of them is
//! printed, the later one minus the earlier.

#[path = "bench_common/mod.rs"]
mod common;

use std::fmt::Write as _;

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

fn main() {
    let mut contrast = "0.08".to_string();
    let mut only: Option<String> = None;
    let mut rest: Vec<String> = Vec::new();
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--diffuse-contrast" => contrast = it.next().unwrap_or(contrast),
            "--conditions" => only = it.next(),
            _ => rest.push(a),
        }
    }
    // The seeds are the rounds of the pipeline's `seeds` group: the pipeline's own `seed`
    // plays no part, so one run per condition.
    let args = Args::parse_from("ablation", &[0], "pipelines/ablation.yaml", rest);
    let diffuse = ["params.evidence=diffuse".to_string(), format!("params.contrast={contrast}")];
    let conditions: Vec<(&str, Vec<&str>)> =
        [("focal", vec![]), ("diffuse", diffuse.iter().map(String::as_str).collect())]
            .into_iter()
            .filter(|(name, _)| only.as_deref().is_none_or(|o| o.split(',').any(|c| c == *name)))
            .collect();
    let (arms, pairs) = layout(&args.pipeline);
    let mut out = String::new();
    for (name, sets) in &conditions {
        let lock = args.run_with(&format!("ablation/{name}"), args.seeds[0], sets);
        let c = common::json(&lock.dir("report").join("comparison.json"));
        let rounds: Vec<String> = lock
            .stages
            .iter()
            .filter_map(|s| s.get("name").and_then(|n| n.as_str()))
            .filter(|n| n.ends_with(".attn"))
            .map(str::to_string)
            .collect();
        let coverage: Vec<f64> = rounds
            .iter()
            .map(|a| common::json(&lock.dir(a).join("summary.json"))["lesion_coverage"].as_f64().unwrap_or(f64::NAN))
            .collect();
        let sup_val: Vec<f64> = rounds
            .iter()
            .map(|a| {
                let h = common::json(&lock.dir(&a.replace(".attn", ".supervised")).join("history.json"));
                h["epochs"]
                    .as_array()
                    .and_then(|e| e.last())
                    .and_then(|e| e["val_accuracy"].as_f64())
                    .unwrap_or(f64::NAN)
            })
            .collect();
        let ms = |v: &serde_json::Value| match (v["mean"].as_f64(), v["sd"].as_f64()) {
            (Some(m), Some(sd)) => format!("{m:.3} ± {sd:.3}"),
            _ => "—".into(),
        };
        let iv = |v: &serde_json::Value| match (v["mean"].as_f64(), v["lo"].as_f64(), v["hi"].as_f64()) {
            (Some(m), Some(lo), Some(hi)) => {
                format!("{m:+.3} [{lo:+.3}, {hi:+.3}]{}", if lo > 0.0 || hi < 0.0 { " *" } else { "" })
            }
            _ => "—".into(),
        };
        let _ = writeln!(
            out,
            "\ncondition `{name}` ({} seeds): supervised ViT val accuracy (last epoch) {}, lesion coverage of the top-25 % patches of its map {}",
            rounds.len(),
            mean_sd(&sup_val),
            mean_sd(&coverage)
        );
        let _ = writeln!(out, "| method | accuracy | macro AUC | last-epoch accuracy | last-epoch AUC |");
        let _ = writeln!(out, "|---|---|---|---|---|");
        let methods = c["methods"].as_array().cloned().unwrap_or_default();
        for (stage, label) in &arms {
            let key = format!("seeds.*.{stage}");
            let Some(m) = methods.iter().find(|m| m["method"] == key.as_str()) else { continue };
            let _ = writeln!(
                out,
                "| {label} (`{stage}`) | {} | {} | {} | {} |",
                ms(&m["accuracy"]),
                ms(&m["auc"]),
                ms(&m["last_accuracy"]),
                ms(&m["last_auc"])
            );
        }
        let _ = writeln!(
            out,
            "\npaired differences, condition `{name}` (mean [95 % t interval] over the seeds; * = excludes 0)"
        );
        let _ = writeln!(out, "| A − B | accuracy | macro AUC | last-epoch accuracy |");
        let _ = writeln!(out, "|---|---|---|---|");
        let paired = c["paired"].as_array().cloned().unwrap_or_default();
        for (a, b) in &pairs {
            let (ka, kb) = (format!("seeds.*.{a}"), format!("seeds.*.{b}"));
            // eval/compare lists each pair once, later method first: flip where needed
            let (p, sign) = match paired.iter().find(|p| p["a"] == ka.as_str() && p["b"] == kb.as_str()) {
                Some(p) => (p.clone(), 1.0),
                None => match paired.iter().find(|p| p["a"] == kb.as_str() && p["b"] == ka.as_str()) {
                    Some(p) => (p.clone(), -1.0),
                    None => continue,
                },
            };
            let flip = |v: &serde_json::Value| -> serde_json::Value {
                if sign > 0.0 {
                    return v.clone();
                }
                let f = |k: &str| v[k].as_f64().map(|x| -x);
                serde_json::json!({ "mean": f("mean"), "lo": f("hi"), "hi": f("lo") })
            };
            let _ = writeln!(
                out,
                "| `{a}` − `{b}` | {} | {} | {} |",
                iv(&flip(&p["accuracy"])),
                iv(&flip(&p["auc"])),
                iv(&flip(&p["last_accuracy"]))
            );
        }
        eprintln!("[bench ablation/{name}] done");
    }
    println!("{out}");
}

/// Pairs of names: (eval stage, label) or (A, B).
type Named = Vec<(String, String)>;

/// The methods (eval stage, label) and the pairs (A, B → A − B) to print: the fixed ones of
/// `pipelines/ablation.yaml`, or for another pipeline its eval stages in file order and
/// every pair of them.
fn layout(pipeline: &std::path::Path) -> (Named, Named) {
    if pipeline.file_stem().is_some_and(|s| s == "ablation") {
        let m = METHODS.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        let p = PAIRS.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        return (m, p);
    }
    let text = std::fs::read_to_string(pipeline).unwrap_or_else(|e| panic!("{}: {e}", pipeline.display()));
    let y: serde_yaml::Value = serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", pipeline.display()));
    let round = y["stages"]["seeds"]["stages"].as_mapping().cloned().unwrap_or_default();
    let methods: Vec<(String, String)> = round
        .iter()
        .filter(|(_, v)| v["uses"].as_str() == Some("eval/classify"))
        .filter_map(|(k, v)| Some((k.as_str()?.to_string(), v["description"].as_str().unwrap_or("").to_string())))
        .collect();
    let mut pairs = Vec::new();
    for (j, (a, _)) in methods.iter().enumerate() {
        for (b, _) in &methods[..j] {
            pairs.push((a.clone(), b.clone()));
        }
    }
    (methods, pairs)
}
