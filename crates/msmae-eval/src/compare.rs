//! `eval/compare`: one table of the headline numbers of several `eval/classify` results —
//! one row per input, named by the upstream stage — as Markdown and JSON, also logged at the
//! end of a run.

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
    Comparison { rows, warnings }
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
        let _ = writeln!(s, "| {} | {:.4} | {:.4} | {} | {} | {} |", r.stage, r.accuracy, r.macro_f1, fmt_opt(r.auc), r.n, r.split);
    }
    for w in &c.warnings {
        let _ = writeln!(s, "\nNote: {w}.");
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
        OutputDecl::new("report", &["comparison.md", "comparison.json"]).table("comparison", "comparison.json", "/rows")
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
            let m: Metrics =
                serde_json::from_slice(&text).map_err(|e| StageError::data(&p, Some(format!("line {}, column {}", e.line(), e.column())), e.to_string()))?;
            loaded.push((a.stage.clone(), m));
        }
        let c = compare(&loaded);
        let table = table_markdown(&c);
        let mp = ctx.output_path("comparison.md")?;
        std::fs::write(&mp, format!("# Comparison\n\n{table}")).map_err(|e| StageError::io(&mp, e))?;
        let jp = ctx.output_path("comparison.json")?;
        let json = serde_json::to_vec_pretty(&c).map_err(|e| StageError::other(format!("{}: {e}", jp.display())))?;
        std::fs::write(&jp, json).map_err(|e| StageError::io(&jp, e))?;
        tracing::info!("{}: comparison\n{table}", ctx.name);
        Ok(())
    }
}
