//! Classification metrics as pure functions, with scikit-learn's semantics (checked against
//! scikit-learn 1.9 by `crates/msmae-eval/tests/sklearn.rs`):
//!
//! - [`accuracy`] — `accuracy_score`.
//! - [`confusion_matrix`] — `confusion_matrix(labels=range(n))` (rows: true class, columns:
//!   predicted class).
//! - [`per_class`] — `precision_recall_fscore_support(labels=range(n), zero_division=0)`.
//! - [`macro_f1`] — `f1_score(average='macro', zero_division=0)` without `labels`, i.e. the
//!   mean over the classes present in `y_true` or `y_pred` (a class neither true nor
//!   predicted anywhere is left out, as scikit-learn does).
//! - [`binary_auc`] — `roc_auc_score` for binary targets — the trapezoid under the ROC curve
//!   with one point per distinct score, so tied scores form one diagonal step (a tie between
//!   a positive and a negative counts ½). `None` when `y_true` holds one class only (where
//!   scikit-learn raises).
//! - [`ovr_auc`] — `roc_auc_score(multi_class='ovr', average='macro')`: the mean of the
//!   one-vs-rest binary AUCs of each class's probability column. Where scikit-learn raises
//!   because a class is absent from `y_true`, this skips that class (its AUC is `None`),
//!   averages the others and lists the skipped classes.
//! - [`multilabel_auc`] — per-label `roc_auc_score`; labels whose column holds one class only
//!   are `None`, excluded from the mean and listed.
//! - [`multilabel_prf`] — per-label precision/recall/F1 at a threshold, and their macro
//!   F1 (`f1_score(Y, S >= t, average='macro', zero_division=0)`, which for multi-label
//!   indicators averages over every label).
//!
//! Scores are `f64`; predicted classes are the first maximum of a row (as `numpy.argmax`).

use serde::{Deserialize, Serialize};

/// Index of the first maximum of `row` (as `numpy.argmax`); 0 for an empty row.
pub fn argmax(row: &[f64]) -> usize {
    let mut best = 0;
    for (k, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = k;
        }
    }
    best
}

/// Fraction of `y_pred` equal to `y_true` (0 for empty input).
pub fn accuracy(y_true: &[usize], y_pred: &[usize]) -> f64 {
    if y_true.is_empty() {
        return 0.0;
    }
    y_true.iter().zip(y_pred).filter(|(t, p)| t == p).count() as f64 / y_true.len() as f64
}

/// `n_classes`×`n_classes` counts: `m[true][predicted]`. Indices ≥ `n_classes` are ignored.
pub fn confusion_matrix(y_true: &[usize], y_pred: &[usize], n_classes: usize) -> Vec<Vec<u64>> {
    let mut m = vec![vec![0u64; n_classes]; n_classes];
    for (&t, &p) in y_true.iter().zip(y_pred) {
        if t < n_classes && p < n_classes {
            m[t][p] += 1;
        }
    }
    m
}

/// Precision, recall, F1 and support of one class.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ClassStats {
    /// tp / (tp + fp); 0 when the class is never predicted.
    pub precision: f64,
    /// tp / (tp + fn); 0 when the class never occurs.
    pub recall: f64,
    /// 2·tp / (2·tp + fp + fn); 0 when that denominator is 0.
    pub f1: f64,
    /// Number of true members (tp + fn).
    pub support: u64,
}

fn ratio(num: u64, den: u64) -> f64 {
    if den == 0 { 0.0 } else { num as f64 / den as f64 }
}

impl ClassStats {
    /// From true positives, false positives and false negatives (zero division → 0).
    pub fn from_counts(tp: u64, fp: u64, fn_: u64) -> Self {
        Self {
            precision: ratio(tp, tp + fp),
            recall: ratio(tp, tp + fn_),
            f1: ratio(2 * tp, 2 * tp + fp + fn_),
            support: tp + fn_,
        }
    }
}

/// Per-class statistics from a confusion matrix (`m[true][predicted]`).
pub fn per_class(confusion: &[Vec<u64>]) -> Vec<ClassStats> {
    let n = confusion.len();
    (0..n)
        .map(|k| {
            let tp = confusion[k][k];
            let predicted: u64 = confusion.iter().map(|row| row.get(k).copied().unwrap_or(0)).sum();
            let actual: u64 = confusion[k].iter().sum();
            ClassStats::from_counts(tp, predicted - tp, actual - tp)
        })
        .collect()
}

/// Macro F1 over the classes present in `y_true` or `y_pred` (scikit-learn's default
/// `labels`), with zero division → 0. 0 for empty input.
pub fn macro_f1(y_true: &[usize], y_pred: &[usize], n_classes: usize) -> f64 {
    let m = confusion_matrix(y_true, y_pred, n_classes);
    let stats = per_class(&m);
    let present: Vec<f64> = (0..n_classes)
        .filter(|&k| m[k].iter().sum::<u64>() > 0 || m.iter().any(|row| row[k] > 0))
        .map(|k| stats[k].f1)
        .collect();
    if present.is_empty() { 0.0 } else { present.iter().sum::<f64>() / present.len() as f64 }
}

/// Cumulative (false positives, true positives) at each distinct score, highest first,
/// starting from (0, 0).
fn roc_counts(y_true: &[bool], scores: &[f64]) -> Vec<(u64, u64)> {
    let mut order: Vec<usize> = (0..y_true.len().min(scores.len())).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let mut out = vec![(0u64, 0u64)];
    let (mut fp, mut tp) = (0u64, 0u64);
    for (i, &k) in order.iter().enumerate() {
        if y_true[k] {
            tp += 1;
        } else {
            fp += 1;
        }
        let last_of_tie = order.get(i + 1).is_none_or(|&next| scores[next] != scores[k]);
        if last_of_tie {
            out.push((fp, tp));
        }
    }
    out
}

/// Area under the ROC curve of binary targets (scikit-learn `roc_auc_score`); `None` when
/// `y_true` holds only positives or only negatives (or is empty).
pub fn binary_auc(y_true: &[bool], scores: &[f64]) -> Option<f64> {
    let counts = roc_counts(y_true, scores);
    let &(neg, pos) = counts.last()?;
    if neg == 0 || pos == 0 {
        return None;
    }
    // Twice the area in count units, exact in integers: Σ Δfp · (tp_i + tp_{i-1}).
    let twice: u128 = counts.windows(2).map(|w| u128::from(w[1].0 - w[0].0) * u128::from(w[1].1 + w[0].1)).sum();
    Some(twice as f64 / (2.0 * neg as f64 * pos as f64))
}

/// ROC curve points `(false positive rate, true positive rate)`, from (0, 0) to (1, 1), one
/// per distinct score; empty when `y_true` holds one class only.
pub fn roc_curve(y_true: &[bool], scores: &[f64]) -> Vec<(f64, f64)> {
    let counts = roc_counts(y_true, scores);
    let Some(&(neg, pos)) = counts.last() else { return Vec::new() };
    if neg == 0 || pos == 0 {
        return Vec::new();
    }
    counts.iter().map(|&(fp, tp)| (fp as f64 / neg as f64, tp as f64 / pos as f64)).collect()
}

/// One-vs-rest AUCs of single-label data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OvrAuc {
    /// Mean of the defined per-class AUCs; `None` when none is defined.
    pub macro_auc: Option<f64>,
    /// Per class: AUC of "this class" vs "the rest", using the class's probability column.
    pub per_class: Vec<Option<f64>>,
    /// Classes without an AUC: absent from `y_true` (or the only class present).
    pub skipped: Vec<usize>,
}

/// Macro one-vs-rest AUC; `probs` has one row of `n_classes` probabilities per sample.
pub fn ovr_auc(y_true: &[usize], probs: &[Vec<f64>], n_classes: usize) -> OvrAuc {
    let per_class: Vec<Option<f64>> = (0..n_classes)
        .map(|k| {
            let t: Vec<bool> = y_true.iter().map(|&y| y == k).collect();
            let s: Vec<f64> = probs.iter().map(|r| r.get(k).copied().unwrap_or(0.0)).collect();
            binary_auc(&t, &s)
        })
        .collect();
    let skipped = (0..n_classes).filter(|&k| per_class[k].is_none()).collect();
    OvrAuc { macro_auc: mean_defined(&per_class), per_class, skipped }
}

fn mean_defined(v: &[Option<f64>]) -> Option<f64> {
    let d: Vec<f64> = v.iter().flatten().copied().collect();
    (!d.is_empty()).then(|| d.iter().sum::<f64>() / d.len() as f64)
}

/// Per-label AUCs of multi-label data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MultiLabelAuc {
    /// Per label; `None` where the label's column holds one class only.
    pub per_label: Vec<Option<f64>>,
    /// Mean of the defined per-label AUCs; `None` when none is defined.
    pub mean_auc: Option<f64>,
    /// Labels without an AUC.
    pub skipped: Vec<usize>,
}

/// Per-label AUC and their mean; `y_true` rows are multi-hot, `scores` rows per-label scores.
pub fn multilabel_auc(y_true: &[Vec<u8>], scores: &[Vec<f64>], n_labels: usize) -> MultiLabelAuc {
    let per_label: Vec<Option<f64>> = (0..n_labels)
        .map(|j| {
            let t: Vec<bool> = y_true.iter().map(|r| r.get(j).is_some_and(|&v| v != 0)).collect();
            let s: Vec<f64> = scores.iter().map(|r| r.get(j).copied().unwrap_or(0.0)).collect();
            binary_auc(&t, &s)
        })
        .collect();
    let skipped = (0..n_labels).filter(|&j| per_label[j].is_none()).collect();
    MultiLabelAuc { mean_auc: mean_defined(&per_label), per_label, skipped }
}

/// Thresholded statistics of multi-label data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MultiLabelPrf {
    /// Per label, predicting positive where `score >= threshold`.
    pub per_label: Vec<ClassStats>,
    /// Mean F1 over every label (zero division → 0).
    pub macro_f1: f64,
    /// Fraction of samples whose whole predicted label set is right
    /// (scikit-learn `accuracy_score` on multi-label indicators).
    pub subset_accuracy: f64,
    /// Per label `[tn, fp, fn, tp]` counts.
    pub counts: Vec<[u64; 4]>,
}

/// Per-label precision/recall/F1 at `threshold` (positive where `score >= threshold`).
pub fn multilabel_prf(y_true: &[Vec<u8>], scores: &[Vec<f64>], n_labels: usize, threshold: f64) -> MultiLabelPrf {
    let mut counts = vec![[0u64; 4]; n_labels];
    let mut exact = 0usize;
    for (t, s) in y_true.iter().zip(scores) {
        let mut all = true;
        for (j, c) in counts.iter_mut().enumerate() {
            let truth = t.get(j).is_some_and(|&v| v != 0);
            let pred = s.get(j).is_some_and(|&v| v >= threshold);
            c[usize::from(truth) * 2 + usize::from(pred)] += 1;
            all &= truth == pred;
        }
        exact += usize::from(all);
    }
    let per_label: Vec<ClassStats> = counts.iter().map(|c| ClassStats::from_counts(c[3], c[1], c[2])).collect();
    let macro_f1 = if n_labels == 0 { 0.0 } else { per_label.iter().map(|s| s.f1).sum::<f64>() / n_labels as f64 };
    let subset_accuracy = if y_true.is_empty() { 0.0 } else { exact as f64 / y_true.len() as f64 };
    MultiLabelPrf { per_label, macro_f1, subset_accuracy, counts }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_counts_ties_as_half() {
        // One positive tied with one negative: AUC ½; a perfect ranking: 1; reversed: 0.
        assert_eq!(binary_auc(&[true, false], &[0.5, 0.5]), Some(0.5));
        assert_eq!(binary_auc(&[true, false, true], &[0.9, 0.1, 0.8]), Some(1.0));
        assert_eq!(binary_auc(&[true, false], &[0.1, 0.9]), Some(0.0));
        // pos {0.8, 0.4}, neg {0.4, 0.2}: pairs (0.8>0.4)=1, (0.8>0.2)=1, (0.4=0.4)=½, (0.4>0.2)=1 → 3.5/4.
        assert_eq!(binary_auc(&[true, true, false, false], &[0.8, 0.4, 0.4, 0.2]), Some(0.875));
        assert_eq!(binary_auc(&[true, true], &[0.8, 0.4]), None);
        assert_eq!(binary_auc(&[], &[]), None);
    }

    #[test]
    fn roc_curve_has_one_point_per_distinct_score() {
        let c = roc_curve(&[true, true, false, false], &[0.8, 0.4, 0.4, 0.2]);
        assert_eq!(c, vec![(0.0, 0.0), (0.0, 0.5), (0.5, 1.0), (1.0, 1.0)]);
    }

    #[test]
    fn macro_f1_leaves_out_classes_never_seen() {
        // Class 2 is neither true nor predicted: the mean is over classes 0 and 1 only.
        let (t, p) = ([0, 0, 1, 1], [0, 1, 1, 1]);
        let f0 = 2.0 / 3.0;
        let f1 = 0.8;
        assert!((macro_f1(&t, &p, 3) - (f0 + f1) / 2.0).abs() < 1e-12);
        // Class 2 predicted but never true: F1 0, included.
        assert!((macro_f1(&[0, 1], &[0, 2], 3) - (1.0 + 0.0 + 0.0) / 3.0).abs() < 1e-12);
        let s = per_class(&confusion_matrix(&t, &p, 3));
        assert_eq!(s[2], ClassStats { precision: 0.0, recall: 0.0, f1: 0.0, support: 0 });
        assert_eq!(s[1].precision, 2.0 / 3.0);
        assert_eq!(s[0].recall, 0.5);
    }

    #[test]
    fn ovr_skips_absent_classes() {
        let probs = vec![vec![0.7, 0.2, 0.1], vec![0.3, 0.6, 0.1], vec![0.5, 0.4, 0.1]];
        let r = ovr_auc(&[0, 1, 0], &probs, 3);
        assert_eq!(r.skipped, vec![2]);
        assert_eq!(r.per_class, vec![Some(1.0), Some(1.0), None]);
        assert_eq!(r.macro_auc, Some(1.0));
        assert_eq!(argmax(&[0.2, 0.4, 0.4]), 1);
    }

    #[test]
    fn multilabel_thresholds_at_or_above() {
        let y = vec![vec![1, 0], vec![0, 0], vec![1, 0]];
        let s = vec![vec![0.5, 0.1], vec![0.6, 0.2], vec![0.4, 0.3]];
        let r = multilabel_prf(&y, &s, 2, 0.5);
        assert_eq!(r.counts[0], [0, 1, 1, 1]);
        assert_eq!(r.per_label[0].f1, 0.5);
        assert_eq!(r.per_label[1].f1, 0.0);
        assert_eq!(r.macro_f1, 0.25);
        assert!((r.subset_accuracy - 1.0 / 3.0).abs() < 1e-12);
        let a = multilabel_auc(&y, &s, 2);
        assert_eq!(a.skipped, vec![1]);
        assert_eq!(a.mean_auc, a.per_label[0]);
    }
}
