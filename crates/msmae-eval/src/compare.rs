//! `eval/compare`: one table of the headline numbers of several `eval/classify` results —
//! one row per input, named by the upstream stage — as Markdown and JSON, also logged at the
//! end of a run. Given several seeds' evals (a `repeat:` group whose stages take
//! `seed: "${round}"`, named `GROUP.ROUND.STAGE`), it also summarises each method over the
//! rounds (mean ± sd of the best-validation and last-epoch figures) and every pair of
//! methods by the paired difference over the rounds they share, with its 95 % interval.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use msmae_core::{InputSlot, OutputDecl, Stage, StageContext, StageError};

use crate::classify::{METRICS_FILE, Metrics, fmt_opt};

/// `with:` of `eval/compare` (nothing to set yet).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompareConfig {}

/// One row of the comparison.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompareRow {
    /// The `eval/classify` stage's name in the pipeline.
    pub stage: String,
    /// The stage whose predictions it evaluated.
    pub source_stage: String,
    /// The split evaluated (`test`, `val`, `train`).
    pub split: String,
    /// Images evaluated.
    pub n: u64,
    /// Whether the predictions are multi-label.
    pub multi_label: bool,
    /// Top-1 accuracy (subset accuracy for multi-label data).
    pub accuracy: f64,
    /// Macro F1 (see [`crate::classify::Metrics::macro_f1`]).
    pub macro_f1: f64,
    /// Macro one-vs-rest AUC (single-label) or mean per-label AUC (multi-label).
    pub auc: Option<f64>,
}

/// The content of `comparison.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// One row per input, in the order the pipeline binds them.
    pub rows: Vec<CompareRow>,
    /// Things that make the rows hard to compare (different splits, label sets, sizes).
    pub warnings: Vec<String>,
    /// Each method over its rounds (only when some method has two or more).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<MethodSummary>,
    /// Every pair of methods over the rounds both have (two or more).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paired: Vec<PairedRow>,
}

/// Mean and standard deviation over rounds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MeanSd {
    pub mean: f64,
    pub sd: f64,
}

impl MeanSd {
    fn of(v: &[f64]) -> Option<MeanSd> {
        let v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
        (!v.is_empty()).then(|| {
            let (mean, sd) = crate::stats::mean_sd(&v);
            MeanSd { mean, sd }
        })
    }
}

/// One method (stage name with its round replaced by `*`) over its rounds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MethodSummary {
    pub method: String,
    /// The rounds (seeds) it has, in order.
    pub rounds: Vec<u64>,
    pub accuracy: Option<MeanSd>,
    pub macro_f1: Option<MeanSd>,
    pub auc: Option<MeanSd>,
    /// The last epoch's model (where the evals report it).
    pub last_accuracy: Option<MeanSd>,
    pub last_auc: Option<MeanSd>,
}

/// `a − b` over the rounds both methods have: mean and 95 % Student-t interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairedRow {
    pub a: String,
    pub b: String,
    pub rounds: usize,
    pub accuracy: Interval,
    pub auc: Option<Interval>,
    pub last_accuracy: Option<Interval>,
}

/// A mean difference and its 95 % interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    pub mean: f64,
    pub lo: f64,
    pub hi: f64,
}

/// `GROUP.ROUND.STAGE` → (`GROUP.*.STAGE`, ROUND); any other name is its own method.
pub fn method_of(stage: &str) -> (String, Option<u64>) {
    let parts: Vec<&str> = stage.split('.').collect();
    if parts.len() >= 3
        && let Some(i) =
            (1..parts.len() - 1).rev().find(|&i| !parts[i].is_empty() && parts[i].bytes().all(|b| b.is_ascii_digit()))
        && let Ok(round) = parts[i].parse()
    {
        let mut m = parts.clone();
        m[i] = "*";
        return (m.join("."), Some(round));
    }
    (stage.to_string(), None)
}

/// Per-method summaries and paired differences, when some method has two or more rounds.
fn over_rounds(inputs: &[(String, Metrics)]) -> (Vec<MethodSummary>, Vec<PairedRow>) {
    // method → round → metrics, methods in order of first appearance
    let mut order: Vec<String> = Vec::new();
    let mut by: std::collections::HashMap<String, std::collections::BTreeMap<u64, &Metrics>> = Default::default();
    for (stage, m) in inputs {
        let (method, round) = method_of(stage);
        let Some(round) = round else { continue };
        if !by.contains_key(&method) {
            order.push(method.clone());
        }
        by.entry(method).or_default().insert(round, m);
    }
    if by.values().all(|r| r.len() < 2) {
        return (Vec::new(), Vec::new());
    }
    let pick = |m: &Metrics, what: usize| -> f64 {
        match what {
            0 => m.accuracy,
            1 => m.macro_f1,
            2 => m.auc().unwrap_or(f64::NAN),
            3 => m.last_epoch.as_ref().map_or(f64::NAN, |h| h.accuracy),
            _ => m.last_epoch.as_ref().and_then(|h| h.auc).unwrap_or(f64::NAN),
        }
    };
    let methods = order
        .iter()
        .map(|name| {
            let r = &by[name];
            let col = |what: usize| MeanSd::of(&r.values().map(|m| pick(m, what)).collect::<Vec<_>>());
            MethodSummary {
                method: name.clone(),
                rounds: r.keys().copied().collect(),
                accuracy: col(0),
                macro_f1: col(1),
                auc: col(2),
                last_accuracy: col(3),
                last_auc: col(4),
            }
        })
        .collect();
    let mut paired = Vec::new();
    for (i, a) in order.iter().enumerate() {
        for b in &order[..i] {
            let common: Vec<u64> = by[a].keys().filter(|k| by[b].contains_key(k)).copied().collect();
            if common.len() < 2 {
                continue;
            }
            let diff = |what: usize| -> Option<Interval> {
                let x: Vec<f64> = common.iter().map(|k| pick(by[a][k], what)).collect();
                let y: Vec<f64> = common.iter().map(|k| pick(by[b][k], what)).collect();
                let p = crate::stats::paired(&x, &y);
                (p.n >= 2).then_some(Interval { mean: p.mean, lo: p.lo, hi: p.hi })
            };
            let Some(accuracy) = diff(0) else { continue };
            paired.push(PairedRow {
                a: a.clone(),
                b: b.clone(),
                rounds: common.len(),
                accuracy,
                auc: diff(2),
                last_accuracy: diff(3),
            });
        }
    }
    (methods, paired)
}

/// Build the comparison of `(stage name, metrics)` pairs, in the given order.
pub fn compare(inputs: &[(String, Metrics)]) -> Comparison {
    let rows: Vec<CompareRow> = inputs
        .iter()
        .map(|(stage, m)| CompareRow {
            stage: stage.clone(),
            source_stage: m.source_stage.clone(),
            split: m.split.as_str().into(),
            n: m.n,
            multi_label: m.multi_label,
            accuracy: m.accuracy,
            macro_f1: m.macro_f1,
            auc: m.auc(),
        })
        .collect();
    let mut warnings = Vec::new();
    if let Some((first_stage, first)) = inputs.first() {
        for (stage, m) in &inputs[1..] {
            if m.split != first.split || m.n != first.n {
                warnings.push(format!(
                    "`{stage}` evaluates {} `{}` images, `{first_stage}` {} `{}` images",
                    m.n,
                    m.split.as_str(),
                    first.n,
                    first.split.as_str()
                ));
            }
            if m.label_names != first.label_names || m.multi_label != first.multi_label {
                warnings.push(format!("`{stage}` and `{first_stage}` have different label sets"));
            }
        }
    }
    let (methods, paired) = over_rounds(inputs);
    Comparison { rows, warnings, methods, paired }
}

/// The comparison as a Markdown table (also what the run log shows).
pub fn table_markdown(c: &Comparison) -> String {
    let mut s = String::new();
    let multi = c.rows.iter().any(|r| r.multi_label);
    let single = c.rows.iter().any(|r| !r.multi_label);
    let auc = match (single, multi) {
        (true, true) => "AUC (macro OvR / mean per-label)",
        (false, true) => "mean AUC",
        _ => "macro AUC",
    };
    let acc = if multi && !single { "subset accuracy" } else { "accuracy" };
    let _ = writeln!(s, "| model | {acc} | macro-F1 | {auc} | n | split |");
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    for r in &c.rows {
        let _ = writeln!(
            s,
            "| {} | {:.4} | {:.4} | {} | {} | {} |",
            r.stage,
            r.accuracy,
            r.macro_f1,
            fmt_opt(r.auc),
            r.n,
            r.split
        );
    }
    for w in &c.warnings {
        let _ = writeln!(s, "\nNote: {w}.");
    }
    if !c.methods.is_empty() {
        let ms = |v: &Option<MeanSd>| v.map_or("—".to_string(), |m| format!("{:.4} ± {:.4}", m.mean, m.sd));
        let _ = writeln!(s, "\nOver rounds (seeds), mean ± sd:\n");
        let _ = writeln!(s, "| method | rounds | {acc} | macro-F1 | {auc} | last-epoch {acc} | last-epoch AUC |");
        let _ = writeln!(s, "|---|---|---|---|---|---|---|");
        for m in &c.methods {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} |",
                m.method,
                m.rounds.len(),
                ms(&m.accuracy),
                ms(&m.macro_f1),
                ms(&m.auc),
                ms(&m.last_accuracy),
                ms(&m.last_auc)
            );
        }
    }
    if !c.paired.is_empty() {
        let iv = |v: &Option<Interval>| {
            v.map_or("—".to_string(), |Interval { mean, lo, hi }| {
                format!("{mean:+.4} [{lo:+.4}, {hi:+.4}]{}", if lo > 0.0 || hi < 0.0 { " *" } else { "" })
            })
        };
        let _ = writeln!(s, "\nPaired differences over the shared rounds (mean [95 % t interval]; * = excludes 0):\n");
        let _ = writeln!(s, "| A − B | rounds | {acc} | {auc} | last-epoch {acc} |");
        let _ = writeln!(s, "|---|---|---|---|---|");
        for p in &c.paired {
            let _ = writeln!(
                s,
                "| {} − {} | {} | {} | {} | {} |",
                p.a,
                p.b,
                p.rounds,
                iv(&Some(p.accuracy)),
                iv(&p.auc),
                iv(&p.last_accuracy)
            );
        }
    }
    s
}

/// The `eval/compare` stage.
#[derive(Debug, Default, Clone, Copy)]
pub struct EvalCompare;

impl Stage for EvalCompare {
    type Config = CompareConfig;
    const KIND: &'static str = "eval/compare";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "several eval/classify results → one comparison table (accuracy, macro-F1, AUC, n)";

    fn code_fingerprint(&self) -> &'static str {
        msmae_core::code_fingerprint!()
    }

    fn inputs(&self, _: &CompareConfig) -> Vec<InputSlot> {
        vec![InputSlot::many("metrics", "metrics", "eval/classify results to compare (one row each)")]
    }

    fn output(&self, _: &CompareConfig) -> OutputDecl {
        OutputDecl::new("report", &["comparison.md", "comparison.json"])
            .table("comparison", "comparison.json", "/rows")
            .table("over seeds (mean ± sd)", "comparison.json", "/methods")
            .table("paired differences over seeds", "comparison.json", "/paired")
    }

    fn run(&self, _: &CompareConfig, ctx: &mut StageContext<'_>) -> Result<(), StageError> {
        let inputs = ctx.inputs("metrics");
        if inputs.is_empty() {
            return Err(StageError::MissingInput { slot: "metrics".into() });
        }
        let mut loaded = Vec::with_capacity(inputs.len());
        for a in inputs {
            let p = a.path(METRICS_FILE);
            let text = std::fs::read(&p).map_err(|e| StageError::io(&p, e))?;
            let m: Metrics = serde_json::from_slice(&text).map_err(|e| {
                StageError::data(&p, Some(format!("line {}, column {}", e.line(), e.column())), e.to_string())
            })?;
            loaded.push((a.stage.clone(), m));
        }
        let c = compare(&loaded);
        let table = table_markdown(&c);
        let mp = ctx.output_path("comparison.md")?;
        std::fs::write(&mp, format!("# Comparison\n\n{table}")).map_err(|e| StageError::io(&mp, e))?;
        let jp = ctx.output_path("comparison.json")?;
        let json = serde_json::to_vec_pretty(&c).map_err(|e| StageError::write(&jp, e))?;
        std::fs::write(&jp, json).map_err(|e| StageError::io(&jp, e))?;
        tracing::info!("{}: comparison\n{table}", ctx.name);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics(acc: f64, auc: f64, last: f64) -> Metrics {
        serde_json::from_value(serde_json::json!({
            "source_stage": "ft", "source_digest": "d", "split": "test", "n": 100, "multi_label": false,
            "label_names": ["a", "b"], "accuracy": acc, "macro_f1": acc - 0.1, "macro_auc": auc, "mean_auc": null,
            "auc_skipped": [], "threshold": null, "per_class": [], "confusion_matrix": [],
            "last_epoch": { "accuracy": last, "macro_f1": last - 0.1, "auc": auc, "same_model": false }
        }))
        .unwrap_or_else(|e| panic!("metrics fixture: {e}"))
    }

    #[test]
    fn round_names_map_to_one_method() {
        assert_eq!(method_of("seeds.3.eval-msmae"), ("seeds.*.eval-msmae".to_string(), Some(3)));
        assert_eq!(method_of("g.12.inner.eval"), ("g.12.inner.eval".replace(".12.", ".*."), Some(12)));
        assert_eq!(method_of("eval-msmae"), ("eval-msmae".to_string(), None));
        assert_eq!(method_of("a.b"), ("a.b".to_string(), None));
    }

    #[test]
    fn several_seeds_give_mean_sd_and_paired_intervals_over_shared_rounds() {
        // method B beats A by 0.05 in every round despite a large spread between rounds;
        // C has a single round and pairs with nothing.
        let inputs: Vec<(String, Metrics)> = vec![
            ("s.1.eval-a".into(), metrics(0.60, 0.80, 0.55)),
            ("s.1.eval-b".into(), metrics(0.65, 0.82, 0.60)),
            ("s.2.eval-a".into(), metrics(0.80, 0.90, 0.75)),
            ("s.2.eval-b".into(), metrics(0.85, 0.93, 0.70)),
            ("s.3.eval-a".into(), metrics(0.70, 0.85, 0.65)),
            ("s.3.eval-b".into(), metrics(0.75, 0.86, 0.70)),
            ("eval-c".into(), metrics(0.5, 0.5, 0.5)),
        ];
        let c = compare(&inputs);
        assert_eq!(c.rows.len(), 7);
        assert_eq!(c.methods.iter().map(|m| m.method.as_str()).collect::<Vec<_>>(), ["s.*.eval-a", "s.*.eval-b"]);
        let a = &c.methods[0];
        assert_eq!(a.rounds, [1, 2, 3]);
        let acc = a.accuracy.expect("accuracy");
        assert!((acc.mean - 0.70).abs() < 1e-12 && (acc.sd - 0.1).abs() < 1e-12, "{acc:?}");
        assert!((a.last_accuracy.expect("last").mean - 0.65).abs() < 1e-12);
        assert_eq!(c.paired.len(), 1);
        let p = &c.paired[0];
        assert_eq!((p.a.as_str(), p.b.as_str(), p.rounds), ("s.*.eval-b", "s.*.eval-a", 3));
        // a constant +0.05: zero-width interval, excludes 0
        assert!((p.accuracy.mean - 0.05).abs() < 1e-12 && (p.accuracy.hi - p.accuracy.lo).abs() < 1e-9, "{p:?}");
        let md = table_markdown(&c);
        assert!(md.contains("| s.*.eval-a | 3 | 0.7000 ± 0.1000 |"), "{md}");
        assert!(md.contains("| s.*.eval-b − s.*.eval-a | 3 | +0.0500 [+0.0500, +0.0500] * |"), "{md}");
        // one seed each: no summaries
        let one = compare(&inputs[..2]);
        assert!(one.methods.is_empty() && one.paired.is_empty());
        assert!(!serde_json::to_string(&one).unwrap_or_default().contains("methods"), "old readers see the old file");
    }
}
