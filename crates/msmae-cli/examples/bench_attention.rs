//! `cargo xtask bench attention`: why supervised attention misses the lesions. Runs `pipelines/attention.yaml` — the quickstart's supervised ViT under one
//! change at a time, each read by `attention/extract` with the paper's last-block CLS
//! attention, attention rollout and gradient-weighted attention, each raw and smoothed on the
//! patch grid (3×3 max, 3×3 mean) — and prints setting × smoothing × method → lesion
//! coverage of the top-25 % patches (uniform attention: 0.25), the hit rate, the supervised
//! model's best validation accuracy and the wall times.
//!
//! Flags as `bench study`: `--seeds a,b` (default 17), `--pipeline`, `--store`, `--set`.

#[path = "bench_common/mod.rs"]
mod common;

use std::collections::BTreeMap;

use common::{Args, json, mean_sd};

const METHODS: [&str; 3] = ["cls", "rollout", "gradient"];

/// The smoothings of `pipelines/attention.yaml` ("" = raw), as reading-label suffixes.
const SMOOTHINGS: [&str; 3] = ["", "+max3", "+mean3"];

/// `method` or `method+op size`, as `summary.json` describes the map it scored.
fn reading(summary: &serde_json::Value) -> String {
    let method = summary["method"].as_str().unwrap_or("cls");
    match (summary["smooth"]["op"].as_str(), summary["smooth"]["size"].as_u64()) {
        (Some(op), Some(size)) => format!("{method}+{op}{size}"),
        _ => method.to_string(),
    }
}

#[derive(Default)]
struct Setting {
    order: usize,
    description: String,
    val_accuracy: Vec<f64>,
    train_seconds: Vec<f64>,
    /// by reading (`rollout`, `rollout+max3`, …)
    by_method: BTreeMap<String, PerMethod>,
}

/// One map method's figures over the seeds.
#[derive(Default)]
struct PerMethod {
    coverage: Vec<f64>,
    hit: Vec<f64>,
    seconds: Vec<f64>,
    /// coverage on the images with a lesion the model classifies right / wrong
    right: Vec<f64>,
    wrong: Vec<f64>,
    /// (top fraction, coverage) per seed
    curves: Vec<Vec<(f64, f64)>>,
}

fn avg(v: &[f64]) -> f64 {
    msmae_eval::stats::mean_sd(v).0
}

fn main() {
    let args = Args::parse("attention", &[17], "pipelines/attention.yaml");
    let descriptions = descriptions(&args.pipeline);
    let mut settings: BTreeMap<String, Setting> = BTreeMap::new();
    for &seed in &args.seeds {
        let lock = args.run("attention", seed);
        for (k, extract) in lock.of_kind("attention/extract").iter().enumerate() {
            let model = lock.input(extract, "model");
            let summary = json(&lock.dir(extract).join("summary.json"));
            let f = |p: &str| summary.pointer(p).and_then(serde_json::Value::as_f64).unwrap_or(f64::NAN);
            let s = settings.entry(model.clone()).or_insert_with(|| Setting { order: k, ..Setting::default() });
            let e = s.by_method.entry(reading(&summary)).or_default();
            e.coverage.push(f("/lesion_coverage"));
            e.hit.push(f("/lesion_hit_rate"));
            e.seconds.push(lock.seconds(extract));
            e.right.push(f("/by_prediction/correct/lesion_coverage"));
            e.wrong.push(f("/by_prediction/wrong/lesion_coverage"));
            let curve = summary["coverage_curve"].as_array().cloned().unwrap_or_default();
            e.curves.push(
                curve
                    .iter()
                    .map(|x| {
                        (
                            x["top_fraction"].as_f64().unwrap_or(f64::NAN),
                            x["lesion_coverage"].as_f64().unwrap_or(f64::NAN),
                        )
                    })
                    .collect(),
            );
        }
        for (model, s) in settings.iter_mut() {
            let h = json(&lock.dir(model).join("history.json"));
            let best = h["summary"]["best_epoch"].as_u64();
            let epochs = h["epochs"].as_array().cloned().unwrap_or_default();
            let pick = best
                .and_then(|b| epochs.iter().find(|e| e["epoch"].as_u64() == Some(b)).cloned())
                .or_else(|| epochs.last().cloned());
            s.val_accuracy.push(pick.and_then(|e| e["val_accuracy"].as_f64()).unwrap_or(f64::NAN));
            s.train_seconds.push(lock.seconds(model));
            s.description = descriptions.get(model).cloned().unwrap_or_default();
        }
    }
    let mut rows: Vec<(&String, &Setting)> = settings.iter().collect();
    rows.sort_by_key(|(_, s)| s.order);
    println!(
        "\nlesion coverage: mean fraction of lesion pixels inside the top-25 % patches (uniform attention 0.250); {} seed(s): {:?}",
        args.seeds.len(),
        args.seeds
    );
    println!(
        "| setting (supervised stage) | smoothing | best val acc | train s | coverage cls | coverage rollout | coverage gradient | hit rate cls / rollout / gradient | extract s cls / rollout / gradient |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (name, s) in &rows {
        for smooth in SMOOTHINGS {
            if !METHODS.iter().any(|m| s.by_method.contains_key(&format!("{m}{smooth}"))) {
                continue;
            }
            let cell = |m: &str, f: &dyn Fn(&PerMethod) -> String| {
                s.by_method.get(&format!("{m}{smooth}")).map(f).unwrap_or_else(|| "—".into())
            };
            let hits: Vec<String> = METHODS.iter().map(|m| cell(m, &|e| format!("{:.2}", avg(&e.hit)))).collect();
            let secs: Vec<String> = METHODS.iter().map(|m| cell(m, &|e| format!("{:.1}", avg(&e.seconds)))).collect();
            let cov: Vec<String> = METHODS.iter().map(|m| cell(m, &|e| mean_sd(&e.coverage))).collect();
            println!(
                "| `{name}`: {} | {} | {} | {:.0} | {} | {} | {} |",
                s.description,
                if smooth.is_empty() { "none" } else { &smooth[1..] },
                mean_sd(&s.val_accuracy),
                avg(&s.train_seconds),
                cov.join(" | "),
                hits.join(" / "),
                secs.join(" / "),
            );
        }
    }
    print_detail(&rows);
}

/// The second table: coverage where the supervised model is right / wrong, and the
/// coverage curve over the top fraction (mean over seeds).
fn print_detail(rows: &[(&String, &Setting)]) {
    println!(
        "\ncoverage (top 25 %) on the images with a lesion that the supervised ViT classifies right | wrong, and the coverage curve over the top fraction"
    );
    let fractions: Vec<f64> = rows
        .iter()
        .find_map(|(_, s)| s.by_method.values().find_map(|p| p.curves.first()).map(|c| c.iter().map(|x| x.0).collect()))
        .unwrap_or_default();
    let head: Vec<String> = fractions.iter().map(|f| format!("top {:.0} %", f * 100.0)).collect();
    println!("| setting | map | right | wrong | {} |", head.join(" | "));
    println!("|---|---|---|---|{}", "---|".repeat(head.len()));
    for (name, s) in rows {
        for m in SMOOTHINGS.iter().flat_map(|smooth| METHODS.iter().map(move |m| format!("{m}{smooth}"))) {
            let Some(p) = s.by_method.get(&m) else { continue };
            let curve: Vec<String> = (0..fractions.len())
                .map(|k| {
                    format!("{:.3}", avg(&p.curves.iter().filter_map(|c| c.get(k).map(|x| x.1)).collect::<Vec<_>>()))
                })
                .collect();
            println!("| `{name}` | {m} | {} | {} | {} |", mean_sd(&p.right), mean_sd(&p.wrong), curve.join(" | "));
        }
    }
}

/// Stage descriptions from the pipeline file (the lock file does not keep them).
fn descriptions(pipeline: &std::path::Path) -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(pipeline).unwrap_or_default();
    let y: serde_yaml::Value = serde_yaml::from_str(&text).unwrap_or(serde_yaml::Value::Null);
    y.get("stages")
        .and_then(|s| s.as_mapping())
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| {
                    Some((
                        k.as_str()?.to_string(),
                        v.get("description").and_then(|d| d.as_str()).unwrap_or("").to_string(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default()
}
