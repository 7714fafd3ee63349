//! `msmae_eval::metrics` against scikit-learn (an independent implementation) on fixed
//! predictions: tied scores, a class absent from the truth, imbalanced classes, a binary
//! task and multi-label data with labels that have one class only. Every number must agree
//! within 1e-9 (absolute, in f64); counts and curves exactly (curves within 1e-12).

use std::path::PathBuf;
use std::process::Command;

use msmae_eval::metrics;
use serde_json::{Value, json};

const TOL: f64 = 1e-9;

/// The reference Python (`cargo xtask test` sets MSMAE_PYTHON to a venv with scikit-learn).
fn python() -> PathBuf {
    match std::env::var_os("MSMAE_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => panic!(
            "MSMAE_PYTHON is not set: run the suite with `cargo xtask test`, which creates the reference Python environment (scikit-learn)"
        ),
    }
}

/// A small deterministic generator (no dependency, same numbers everywhere).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Probability rows from small integer weights (many exact ties), leaning towards the true
/// class with probability `skill`/10.
fn probs_for(y: &[usize], n: usize, skill: u64, rng: &mut Lcg) -> Vec<Vec<f64>> {
    y.iter()
        .map(|&t| {
            let mut w: Vec<u64> = (0..n).map(|_| rng.below(4)).collect();
            if rng.below(10) < skill {
                w[t] += 3;
            }
            if w.iter().all(|&x| x == 0) {
                w[rng.below(n as u64) as usize] = 1;
            }
            let s: u64 = w.iter().sum();
            w.iter().map(|&x| x as f64 / s as f64).collect()
        })
        .collect()
}

/// (name, true classes, probability rows).
type SingleCase = (String, Vec<usize>, Vec<Vec<f64>>);

fn single_cases() -> Vec<SingleCase> {
    let mut rng = Lcg(7);
    let mut cases = Vec::new();
    // Balanced, 4 classes, quantised probabilities (ties within and across classes).
    let y: Vec<usize> = (0..80).map(|i| i % 4).collect();
    let p = probs_for(&y, 4, 6, &mut rng);
    cases.push(("balanced 4-class with ties".to_string(), y, p));
    // Imbalanced: 85 % class 0, a handful of 1 and 2.
    let y: Vec<usize> = (0..100)
        .map(|i| {
            if i % 20 == 3 {
                1
            } else if i % 20 == 11 || i == 50 {
                2
            } else {
                0
            }
        })
        .collect();
    let p = probs_for(&y, 3, 5, &mut rng);
    cases.push(("imbalanced 3-class".to_string(), y, p));
    // Class 2 of 4 never occurs in the truth (but is predicted sometimes).
    let y: Vec<usize> = (0..50).map(|i| [0, 1, 3][i % 3]).collect();
    let p = probs_for(&y, 4, 4, &mut rng);
    cases.push(("class absent from the truth".to_string(), y, p));
    // Binary.
    let y: Vec<usize> = (0..41).map(|i| usize::from(i % 3 == 0)).collect();
    let p = probs_for(&y, 2, 5, &mut rng);
    cases.push(("binary".to_string(), y, p));
    // Every score tied: AUC ½, argmax always class 0.
    let y: Vec<usize> = (0..9).map(|i| i % 3).collect();
    let p = vec![vec![1.0 / 3.0; 3]; 9];
    cases.push(("all scores tied".to_string(), y, p));
    cases
}

/// Multi-label: 5 labels, label 3 never positive, label 4 always positive, scores on a
/// 0.1 grid (ties, and exactly 0.5 at the threshold).
/// (name, multi-hot truth, scores).
type MultiCase = (String, Vec<Vec<u8>>, Vec<Vec<f64>>);

fn multi_cases() -> Vec<MultiCase> {
    let mut rng = Lcg(11);
    let mut cases = Vec::new();
    for (name, degenerate) in [("multi-label with one-class labels", true), ("multi-label, all labels defined", false)]
    {
        let mut ys = Vec::new();
        let mut ss = Vec::new();
        for i in 0..60u64 {
            let mut y: Vec<u8> = (0..5).map(|j| u8::from(rng.below(10) < 2 + j)).collect();
            if degenerate {
                y[3] = 0;
                y[4] = 1;
            } else if i < 2 {
                y[3] = i as u8;
                y[4] = 1 - i as u8;
            }
            let s: Vec<f64> = y.iter().map(|&t| (rng.below(8) + 2 * u64::from(t)).min(10) as f64 / 10.0).collect();
            ys.push(y);
            ss.push(s);
        }
        cases.push((name.to_string(), ys, ss));
    }
    cases
}

fn close(what: &str, ours: f64, theirs: &Value) {
    let t = theirs.as_f64().unwrap_or_else(|| panic!("{what}: scikit-learn gave {theirs}, we gave {ours}"));
    assert!((ours - t).abs() <= TOL, "{what}: ours {ours}, scikit-learn {t}");
}

fn close_opt(what: &str, ours: Option<f64>, theirs: &Value) {
    match ours {
        Some(v) => close(what, v, theirs),
        None => assert!(theirs.is_null(), "{what}: ours undefined, scikit-learn {theirs}"),
    }
}

#[test]
fn metrics_match_scikit_learn() {
    let single = single_cases();
    let multi = multi_cases();
    let mut cases: Vec<Value> = single.iter().map(|(_, y, p)| json!({"kind": "single", "y": y, "probs": p})).collect();
    cases.extend(multi.iter().map(|(_, y, s)| json!({"kind": "multi", "Y": y, "S": s, "threshold": 0.5})));
    let d = tempfile::tempdir().expect("tmp");
    let input = d.path().join("cases.json");
    std::fs::write(&input, serde_json::to_vec(&cases).expect("json")).expect("write cases");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/sklearn_metrics.py");
    let out = Command::new(python()).arg(script).arg(&input).output().expect("run python");
    assert!(out.status.success(), "scikit-learn script failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("json from python");
    let results = v["results"].as_array().expect("results");
    assert_eq!(results.len(), single.len() + multi.len());
    assert!(v["sklearn"].as_str().is_some_and(|s| s.starts_with("1.")), "scikit-learn version {}", v["sklearn"]);

    for ((name, y, p), r) in single.iter().zip(results) {
        let n = p[0].len();
        let pred: Vec<usize> = p.iter().map(|row| metrics::argmax(row)).collect();
        close(&format!("{name}: accuracy"), metrics::accuracy(y, &pred), &r["accuracy"]);
        close(&format!("{name}: macro F1"), metrics::macro_f1(y, &pred, n), &r["macro_f1"]);
        let cm = metrics::confusion_matrix(y, &pred, n);
        assert_eq!(json!(cm), r["confusion"], "{name}: confusion matrix");
        for (k, s) in metrics::per_class(&cm).iter().enumerate() {
            close(&format!("{name}: precision[{k}]"), s.precision, &r["precision"][k]);
            close(&format!("{name}: recall[{k}]"), s.recall, &r["recall"][k]);
            close(&format!("{name}: f1[{k}]"), s.f1, &r["f1"][k]);
            assert_eq!(json!(s.support), r["support"][k], "{name}: support[{k}]");
        }
        let auc = metrics::ovr_auc(y, p, n);
        close_opt(&format!("{name}: macro AUC"), auc.macro_auc, &r["macro_auc"]);
        for k in 0..n {
            close_opt(&format!("{name}: AUC[{k}]"), auc.per_class[k], &r["per_class_auc"][k]);
            let t: Vec<bool> = y.iter().map(|&c| c == k).collect();
            let s: Vec<f64> = p.iter().map(|row| row[k]).collect();
            let ours = metrics::roc_curve(&t, &s);
            let theirs = r["roc_curves"][k].as_array().expect("curve");
            assert_eq!(
                ours.len(),
                theirs.len(),
                "{name}: ROC curve of class {k} has {} points, scikit-learn {}",
                ours.len(),
                theirs.len()
            );
            for (i, ((fx, fy), t)) in ours.iter().zip(theirs).enumerate() {
                assert!(
                    (fx - t[0].as_f64().unwrap_or(f64::NAN)).abs() < 1e-12
                        && (fy - t[1].as_f64().unwrap_or(f64::NAN)).abs() < 1e-12,
                    "{name}: ROC point {i} of class {k}: ours ({fx}, {fy}), scikit-learn {t}"
                );
            }
        }
    }
    // The cases exercise what they claim to.
    assert_eq!(metrics::ovr_auc(&single[2].1, &single[2].2, 4).skipped, vec![2], "class 2 is absent");
    assert!(single[2].2.iter().any(|row| metrics::argmax(row) == 2), "class 2 is predicted at least once");
    assert_eq!(results[4]["macro_auc"], json!(0.5));

    for ((name, y, s), r) in multi.iter().zip(&results[single.len()..]) {
        let auc = metrics::multilabel_auc(y, s, 5);
        close_opt(&format!("{name}: mean AUC"), auc.mean_auc, &r["mean_auc"]);
        for j in 0..5 {
            close_opt(&format!("{name}: AUC[{j}]"), auc.per_label[j], &r["per_label_auc"][j]);
        }
        let prf = metrics::multilabel_prf(y, s, 5, 0.5);
        close(&format!("{name}: macro F1"), prf.macro_f1, &r["macro_f1"]);
        close(&format!("{name}: subset accuracy"), prf.subset_accuracy, &r["subset_accuracy"]);
        for (j, st) in prf.per_label.iter().enumerate() {
            close(&format!("{name}: precision[{j}]"), st.precision, &r["precision"][j]);
            close(&format!("{name}: recall[{j}]"), st.recall, &r["recall"][j]);
            close(&format!("{name}: f1[{j}]"), st.f1, &r["f1"][j]);
            assert_eq!(json!(st.support), r["support"][j], "{name}: support[{j}]");
        }
    }
    assert_eq!(metrics::multilabel_auc(&multi[0].1, &multi[0].2, 5).skipped, vec![3, 4]);
    assert!(metrics::multilabel_auc(&multi[1].1, &multi[1].2, 5).skipped.is_empty());
    assert!(multi[0].2.iter().flatten().any(|&v| v == 0.5), "some scores sit exactly on the threshold");
}

/// The predictions table reads as-is in pyarrow: column types, nullability, footer metadata.
#[test]
fn pyarrow_reads_the_predictions_table() {
    use msmae_data::predictions::{PREDICTIONS_SCHEMA_VERSION, PredictionMeta, PredictionRow, write_predictions};
    let d = tempfile::tempdir().expect("tmp");
    let p = d.path().join("predictions.parquet");
    let meta = PredictionMeta {
        schema_version: PREDICTIONS_SCHEMA_VERSION,
        label_names: vec!["a".into(), "b".into()],
        multi_label: true,
        provenance: json!({"k": 1}),
    };
    let rows: Vec<PredictionRow> = (0..3)
        .map(|i| PredictionRow {
            id: format!("r{i}"),
            split: msmae_data::table::Split::Test,
            label: None,
            labels: Some(vec![1, (i % 2) as u8]),
            scores: vec![0.25, 0.5 + i as f32 / 10.0],
        })
        .collect();
    write_predictions(&p, &meta, &rows).expect("write");
    let code = "import sys, json, pyarrow.parquet as pq\nt = pq.read_table(sys.argv[1])\nprint(json.dumps({'types': {f.name: str(f.type) for f in t.schema}, 'nullable': {f.name: f.nullable for f in t.schema}, 'meta': json.loads(t.schema.metadata[b'msmae.predictions']), 'rows': t.to_pylist()}))";
    let out = Command::new(python()).arg("-c").arg(code).arg(&p).output().expect("run python");
    assert!(out.status.success(), "pyarrow failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        v["types"],
        json!({"id": "string", "split": "string", "label": "int32", "labels": "list<item: uint8>", "scores": "list<item: float>"})
    );
    assert_eq!(v["nullable"]["label"], true);
    assert_eq!(v["nullable"]["scores"], false);
    assert_eq!(v["meta"]["label_names"], json!(["a", "b"]));
    assert_eq!(v["meta"]["schema_version"], PREDICTIONS_SCHEMA_VERSION);
    assert_eq!(
        v["rows"][1],
        json!({"id": "r1", "split": "test", "label": null, "labels": [1, 1], "scores": [0.25, 0.6000000238418579]})
    );
}
