//! `eval/classify`: metrics of one model's predictions on one split — accuracy, macro-F1,
//! macro one-vs-rest AUC, per-class precision/recall/F1/support/AUC and the confusion
//! matrix for single-label data; per-label AUC, their mean and thresholded F1 for
//! multi-label data — as `metrics.json`, a Markdown report, ROC curves and a confusion
//! chart. Metric definitions: [`crate::metrics`].

use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use msmae_core::{InputSlot, OutputDecl, Stage, StageContext, StageError};
use msmae_data::predictions::{PredictionMeta, PredictionRow, read_predictions};
use msmae_data::table::Split;

use crate::metrics::{self, ClassStats};
use crate::plot::{Series, heatmap_chart, line_chart};

/// Name of the predictions file inside a `predictions` artifact.
pub const PREDICTIONS_FILE: &str = "predictions.parquet";
/// The last epoch's predictions, beside those of the best-validation model, when a
/// training stage's validation picked an earlier epoch (absent: the two are one model).
pub const LAST_PREDICTIONS_FILE: &str = "predictions_last.parquet";
/// Name of the metrics file inside a `metrics` artifact.
pub const METRICS_FILE: &str = "metrics.json";
/// Threshold on per-label scores for multi-label precision/recall/F1 (positive: `>=`).
pub const MULTI_LABEL_THRESHOLD: f64 = 0.5;

fn d_split() -> Split {
    Split::Test
}

/// `with:` of `eval/classify`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifyConfig {
    /// Which split's rows to evaluate (`test`, `val` or `train`).
    #[serde(default = "d_split")]
    pub split: Split,
}

impl Default for ClassifyConfig {
    fn default() -> Self {
        Self { split: d_split() }
    }
}

/// One class's (or label's) row of the per-class table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassRow {
    /// Class (label) name.
    pub name: String,
    /// Precision, recall, F1 and support (for multi-label data: at the threshold; support
    /// counts the positives).
    #[serde(flatten)]
    pub stats: ClassStats,
    /// One-vs-rest (single-label) or per-label (multi-label) AUC; `null` where undefined.
    pub auc: Option<f64>,
}

/// The content of `metrics.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// The upstream stage whose predictions these are (its pipeline name).
    pub source_stage: String,
    /// The digest of the predictions artifact.
    pub source_digest: String,
    /// The split evaluated.
    pub split: Split,
    /// Rows evaluated.
    pub n: u64,
    /// Whether the predictions are multi-label.
    pub multi_label: bool,
    /// Class (label) names, in score order.
    pub label_names: Vec<String>,
    /// Single-label: top-1 accuracy. Multi-label: subset accuracy (every label right).
    pub accuracy: f64,
    /// Single-label: macro F1 over the classes present in truth or prediction
    /// (scikit-learn default). Multi-label: macro F1 over all labels at
    /// [`MULTI_LABEL_THRESHOLD`].
    pub macro_f1: f64,
    /// Single-label: macro one-vs-rest AUC over the classes present in the split.
    /// Multi-label: `null` (see `mean_auc`).
    pub macro_auc: Option<f64>,
    /// Multi-label: mean of the defined per-label AUCs. Single-label: `null`.
    pub mean_auc: Option<f64>,
    /// Classes (labels) left out of the AUC average: absent from the split (or, for
    /// multi-label data, present in every row).
    pub auc_skipped: Vec<String>,
    /// Multi-label only: the score threshold of the thresholded metrics.
    pub threshold: Option<f64>,
    /// One row per class (label), in `label_names` order.
    pub per_class: Vec<ClassRow>,
    /// Single-label: `confusion_matrix[true][predicted]`. Multi-label: per label
    /// `[tn, fp, fn, tp]`.
    pub confusion_matrix: Vec<Vec<u64>>,
    /// The headline figures of the last epoch's model, beside those above (the model
    /// validation picked): the selection rule matters where validation accuracy swings
    /// between epochs. Equal to the above (`same_model`) where validation picked the last
    /// epoch or nothing was selected; absent in files written before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_epoch: Option<Headline>,
}

/// Accuracy, macro-F1 and AUC of one model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Headline {
    pub accuracy: f64,
    pub macro_f1: f64,
    pub auc: Option<f64>,
    /// Whether it is the model of the headline figures.
    pub same_model: bool,
}

impl Metrics {
    /// The headline AUC: macro one-vs-rest (single-label) or mean per-label (multi-label).
    pub fn auc(&self) -> Option<f64> {
        if self.multi_label { self.mean_auc } else { self.macro_auc }
    }
}

/// Compute the metrics of `rows` (already restricted to one split).
pub fn compute(
    meta: &PredictionMeta,
    rows: &[&PredictionRow],
    split: Split,
    source_stage: &str,
    source_digest: &str,
) -> Metrics {
    let names = &meta.label_names;
    let n = names.len();
    let scores: Vec<Vec<f64>> = rows.iter().map(|r| r.scores.iter().map(|&s| f64::from(s)).collect()).collect();
    let base =
        |accuracy, macro_f1, macro_auc, mean_auc, auc_skipped: &[usize], per_class, confusion_matrix, threshold| {
            Metrics {
                source_stage: source_stage.into(),
                source_digest: source_digest.into(),
                split,
                n: rows.len() as u64,
                multi_label: meta.multi_label,
                label_names: names.clone(),
                accuracy,
                macro_f1,
                macro_auc,
                mean_auc,
                auc_skipped: auc_skipped.iter().map(|&k| names[k].clone()).collect(),
                threshold,
                per_class,
                confusion_matrix,
                last_epoch: None,
            }
        };
    if meta.multi_label {
        let y: Vec<Vec<u8>> = rows.iter().map(|r| r.labels.clone().unwrap_or_default()).collect();
        let auc = metrics::multilabel_auc(&y, &scores, n);
        let prf = metrics::multilabel_prf(&y, &scores, n, MULTI_LABEL_THRESHOLD);
        let per_class = (0..n)
            .map(|j| ClassRow { name: names[j].clone(), stats: prf.per_label[j], auc: auc.per_label[j] })
            .collect();
        let cm = prf.counts.iter().map(|c| c.to_vec()).collect();
        base(
            prf.subset_accuracy,
            prf.macro_f1,
            None,
            auc.mean_auc,
            &auc.skipped,
            per_class,
            cm,
            Some(MULTI_LABEL_THRESHOLD),
        )
    } else {
        // Labels were checked when the file was read: present and in range.
        let y: Vec<usize> = rows.iter().map(|r| r.label.unwrap_or(0).max(0) as usize).collect();
        let pred: Vec<usize> = scores.iter().map(|s| metrics::argmax(s)).collect();
        let cm = metrics::confusion_matrix(&y, &pred, n);
        let stats = metrics::per_class(&cm);
        let auc = metrics::ovr_auc(&y, &scores, n);
        let per_class =
            (0..n).map(|k| ClassRow { name: names[k].clone(), stats: stats[k], auc: auc.per_class[k] }).collect();
        base(
            metrics::accuracy(&y, &pred),
            metrics::macro_f1(&y, &pred, n),
            auc.macro_auc,
            None,
            &auc.skipped,
            per_class,
            cm,
            None,
        )
    }
}

/// A number for a Markdown table: 4 decimals, `–` for undefined.
pub fn fmt_opt(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.4}")).unwrap_or_else(|| "–".into())
}

/// The human-readable report of `m`.
pub fn report_markdown(m: &Metrics) -> String {
    let mut s = String::new();
    let kind = if m.multi_label { "multi-label" } else { "single-label" };
    let _ = writeln!(s, "# Evaluation of `{}` — split `{}`\n", m.source_stage, m.split.as_str());
    let _ = writeln!(
        s,
        "{} images, {kind}, {} {}.\n",
        m.n,
        m.label_names.len(),
        if m.multi_label { "labels" } else { "classes" }
    );
    let _ = writeln!(s, "| metric | value |\n|---|---|");
    if m.multi_label {
        let _ = writeln!(s, "| mean AUC | {} |", fmt_opt(m.mean_auc));
        let _ =
            writeln!(s, "| macro F1 (score ≥ {}) | {:.4} |", m.threshold.unwrap_or(MULTI_LABEL_THRESHOLD), m.macro_f1);
        let _ = writeln!(s, "| subset accuracy | {:.4} |", m.accuracy);
    } else {
        let _ = writeln!(s, "| accuracy | {:.4} |", m.accuracy);
        let _ = writeln!(s, "| macro F1 | {:.4} |", m.macro_f1);
        let _ = writeln!(s, "| macro AUC (one-vs-rest) | {} |", fmt_opt(m.macro_auc));
    }
    if !m.auc_skipped.is_empty() {
        let why = if m.multi_label { "one class only in this split" } else { "absent from this split" };
        let _ = writeln!(s, "\nLeft out of the AUC average ({why}): {}.", m.auc_skipped.join(", "));
    }
    let _ = writeln!(s, "\n## Per {}\n", if m.multi_label { "label" } else { "class" });
    let _ = writeln!(
        s,
        "| {} | precision | recall | F1 | support | AUC |\n|---|---|---|---|---|---|",
        if m.multi_label { "label" } else { "class" }
    );
    for r in &m.per_class {
        let _ = writeln!(
            s,
            "| {} | {:.4} | {:.4} | {:.4} | {} | {} |",
            r.name,
            r.stats.precision,
            r.stats.recall,
            r.stats.f1,
            r.stats.support,
            fmt_opt(r.auc)
        );
    }
    if m.multi_label {
        let _ = writeln!(s, "\n## Counts per label (score ≥ {})\n", m.threshold.unwrap_or(MULTI_LABEL_THRESHOLD));
        let _ = writeln!(s, "| label | TN | FP | FN | TP |\n|---|---|---|---|---|");
        for (name, c) in m.label_names.iter().zip(&m.confusion_matrix) {
            let _ = writeln!(s, "| {name} | {} |", c.iter().map(u64::to_string).collect::<Vec<_>>().join(" | "));
        }
    } else if m.label_names.len() > crate::plot::MAX_CHART_ITEMS {
        let _ = writeln!(
            s,
            "\n## Confusion matrix\n\n{} classes: too many for a table here; it is in `{METRICS_FILE}` (`confusion_matrix`).",
            m.label_names.len()
        );
    } else {
        let _ = writeln!(s, "\n## Confusion matrix (rows: true class, columns: predicted)\n");
        let _ = writeln!(s, "| true \\ predicted | {} |", m.label_names.join(" | "));
        let _ = writeln!(s, "|---|{}", "---|".repeat(m.label_names.len()));
        for (name, row) in m.label_names.iter().zip(&m.confusion_matrix) {
            let _ = writeln!(s, "| {name} | {} |", row.iter().map(u64::to_string).collect::<Vec<_>>().join(" | "));
        }
    }
    s
}

/// The `eval/classify` stage.
#[derive(Debug, Default, Clone, Copy)]
pub struct EvalClassify;

impl Stage for EvalClassify {
    type Config = ClassifyConfig;
    const KIND: &'static str = "eval/classify";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str =
        "predictions → accuracy, macro-F1, macro AUC (or per-label AUC), report, ROC and confusion charts";

    fn code_fingerprint(&self) -> &'static str {
        msmae_core::code_fingerprint!()
    }

    fn inputs(&self, _: &ClassifyConfig) -> Vec<InputSlot> {
        vec![
            InputSlot::one("predictions", "predictions", "a model's scores per image (predictions.parquet)")
                .or_kind("vit-checkpoint"),
        ]
    }

    fn output(&self, _: &ClassifyConfig) -> OutputDecl {
        OutputDecl::new("metrics", &[METRICS_FILE, "report.md", "roc.png", "confusion.png"])
            .metric("n", METRICS_FILE, "/n")
            .metric("accuracy", METRICS_FILE, "/accuracy")
            .metric("macro_f1", METRICS_FILE, "/macro_f1")
            .metric("macro_auc", METRICS_FILE, "/macro_auc")
            .metric("mean_auc", METRICS_FILE, "/mean_auc")
            .metric("last_epoch_accuracy", METRICS_FILE, "/last_epoch/accuracy")
            .metric("last_epoch_auc", METRICS_FILE, "/last_epoch/auc")
            .figure("ROC curves", "roc.png")
            .figure("confusion matrix", "confusion.png")
    }

    fn run(&self, c: &ClassifyConfig, ctx: &mut StageContext<'_>) -> Result<(), StageError> {
        let input = ctx.input("predictions")?.clone();
        let path = input.path(PREDICTIONS_FILE);
        let (meta, rows) = read_predictions(&path)?;
        let selected: Vec<&PredictionRow> = rows.iter().filter(|r| r.split == c.split).collect();
        if selected.is_empty() {
            let present: Vec<String> = Split::ALL
                .iter()
                .filter_map(|s| {
                    Some(rows.iter().filter(|r| r.split == *s).count())
                        .filter(|n| *n > 0)
                        .map(|n| format!("{} ({n})", s.as_str()))
                })
                .collect();
            return Err(StageError::data(
                &path,
                Some(format!("split `{}`", c.split.as_str())),
                format!(
                    "no predictions for split `{}`: the file has rows for {}; set `split:` in the stage's `with:` block",
                    c.split.as_str(),
                    if present.is_empty() { "no split at all".to_string() } else { present.join(", ") }
                ),
            ));
        }
        ctx.cancel.check()?;
        let mut m = compute(&meta, &selected, c.split, &input.stage, &input.digest);
        let last_path = input.path(LAST_PREDICTIONS_FILE);
        m.last_epoch = Some(if last_path.is_file() {
            let (lmeta, lrows) = read_predictions(&last_path)?;
            let lsel: Vec<&PredictionRow> = lrows.iter().filter(|r| r.split == c.split).collect();
            let l = compute(&lmeta, &lsel, c.split, &input.stage, &input.digest);
            Headline { accuracy: l.accuracy, macro_f1: l.macro_f1, auc: l.auc(), same_model: false }
        } else {
            Headline { accuracy: m.accuracy, macro_f1: m.macro_f1, auc: m.auc(), same_model: true }
        });
        let mp = ctx.output_path(METRICS_FILE)?;
        let json = serde_json::to_vec_pretty(&m).map_err(|e| StageError::write(&mp, e))?;
        std::fs::write(&mp, json).map_err(|e| StageError::io(&mp, e))?;
        let rp = ctx.output_path("report.md")?;
        std::fs::write(&rp, report_markdown(&m)).map_err(|e| StageError::io(&rp, e))?;
        write_roc(&ctx.output_path("roc.png")?, &meta, &selected, &m)?;
        write_confusion(&ctx.output_path("confusion.png")?, &m)?;
        tracing::info!(
            "{}: {} on {} `{}` images: accuracy {:.4}, macro-F1 {:.4}, {} {}",
            ctx.name,
            input.stage,
            m.n,
            m.split.as_str(),
            m.accuracy,
            m.macro_f1,
            if m.multi_label { "mean AUC" } else { "macro AUC" },
            fmt_opt(m.auc())
        );
        Ok(())
    }
}

/// One ROC curve per class (one-vs-rest) or label, AUC in the legend.
fn write_roc(path: &Path, meta: &PredictionMeta, rows: &[&PredictionRow], m: &Metrics) -> Result<(), StageError> {
    let mut series = Vec::new();
    for (k, name) in meta.label_names.iter().enumerate() {
        let truth: Vec<bool> = rows
            .iter()
            .map(|r| {
                if meta.multi_label {
                    r.labels.as_ref().and_then(|l| l.get(k)).is_some_and(|&v| v != 0)
                } else {
                    r.label == Some(k as i32)
                }
            })
            .collect();
        let scores: Vec<f64> = rows.iter().map(|r| r.scores.get(k).map_or(0.0, |&s| f64::from(s))).collect();
        let points = metrics::roc_curve(&truth, &scores);
        if !points.is_empty() {
            series.push(Series::new(format!("{name} (AUC {})", fmt_opt(m.per_class[k].auc)), points));
        }
    }
    series.push(Series::new("chance", vec![(0.0, 0.0), (1.0, 1.0)]));
    let what = if meta.multi_label { "per label" } else { "one-vs-rest" };
    let title = format!("ROC {what}: {} on {} (n = {})", m.source_stage, m.split.as_str(), m.n);
    line_chart(path, &title, "false positive rate", "true positive rate", &series)?;
    Ok(())
}

fn write_confusion(path: &Path, m: &Metrics) -> Result<(), StageError> {
    if m.multi_label {
        let cols: Vec<String> = ["TN", "FP", "FN", "TP"].iter().map(|s| s.to_string()).collect();
        let title = format!(
            "Counts per label at score ≥ {}: {} on {}",
            m.threshold.unwrap_or(MULTI_LABEL_THRESHOLD),
            m.source_stage,
            m.split.as_str()
        );
        heatmap_chart(path, &title, "outcome", "label", &m.label_names, &cols, &m.confusion_matrix)?;
    } else {
        let title = format!("Confusion matrix: {} on {} (n = {})", m.source_stage, m.split.as_str(), m.n);
        heatmap_chart(
            path,
            &title,
            "predicted class",
            "true class",
            &m.label_names,
            &m.label_names,
            &m.confusion_matrix,
        )?;
    }
    Ok(())
}
