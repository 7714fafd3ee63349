//! `eval/classify` and `eval/compare` run through a StageContext on small predictions whose
//! metrics are worked out by hand in the comments.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use msmae_core::{ArtifactKind, ExecEnv, InputArtifact, NoProgress, Stage, StageContext, StageError};
use msmae_data::predictions::{PREDICTIONS_SCHEMA_VERSION, PredictionMeta, PredictionRow, write_predictions};
use msmae_data::table::Split;
use msmae_eval::classify::{ClassifyConfig, EvalClassify, Metrics};
use msmae_eval::compare::{CompareConfig, Comparison, EvalCompare};

fn row(id: &str, split: Split, label: i32, scores: [f32; 3]) -> PredictionRow {
    PredictionRow { id: id.into(), split, label: Some(label), labels: None, scores: scores.to_vec() }
}

/// Test split: predictions 0,1 | 1,2 | 2,2 for truths 0,0 | 1,1 | 2,2; one training row that
/// would change every number if it were counted.
fn single_label_rows() -> Vec<PredictionRow> {
    vec![
        row("a", Split::Test, 0, [0.7, 0.2, 0.1]),
        row("b", Split::Test, 0, [0.4, 0.5, 0.1]),
        row("c", Split::Test, 1, [0.2, 0.6, 0.2]),
        row("d", Split::Test, 1, [0.1, 0.3, 0.6]),
        row("e", Split::Test, 2, [0.1, 0.1, 0.8]),
        row("f", Split::Test, 2, [0.3, 0.3, 0.4]),
        row("t", Split::Train, 0, [0.0, 0.0, 1.0]),
    ]
}

fn meta(names: &[&str], multi: bool) -> PredictionMeta {
    PredictionMeta {
        schema_version: PREDICTIONS_SCHEMA_VERSION,
        label_names: names.iter().map(|s| s.to_string()).collect(),
        multi_label: multi,
        provenance: serde_json::json!({"stage": "finetune/test"}),
    }
}

fn artifact(root: &Path, stage: &str, kind: &str) -> InputArtifact {
    let dir = root.join(format!("in-{stage}"));
    std::fs::create_dir_all(&dir).expect("mkdir");
    InputArtifact { stage: stage.into(), kind: ArtifactKind::new(kind), dir, digest: format!("digest-of-{stage}") }
}

fn run_classify(root: &Path, input: &InputArtifact, c: &ClassifyConfig, name: &str) -> Result<PathBuf, StageError> {
    let out = root.join(format!("out-{name}"));
    std::fs::create_dir_all(&out).expect("mkdir");
    let inputs = BTreeMap::from([("predictions".to_string(), vec![input.clone()])]);
    let mut ctx = StageContext::new(
        name.into(),
        1,
        ExecEnv::cpu_flex(),
        1,
        Default::default(),
        &NoProgress,
        out.clone(),
        root.to_path_buf(),
        EvalClassify.output(c),
        inputs,
    );
    EvalClassify.run(c, &mut ctx)?;
    Ok(out)
}

fn read_metrics(dir: &Path) -> (Metrics, serde_json::Value) {
    let bytes = std::fs::read(dir.join("metrics.json")).expect("metrics.json");
    (serde_json::from_slice(&bytes).expect("typed"), serde_json::from_slice(&bytes).expect("json"))
}

fn assert_png(p: &Path) {
    let img = image::open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).to_rgb8();
    assert_eq!(img.dimensions(), msmae_eval::plot::CHART_SIZE, "{}", p.display());
    let inked = img.pixels().filter(|px| px.0.iter().all(|&c| c < 128)).count();
    assert!(inked > 500, "{}: only {inked} dark pixels", p.display());
}

fn near(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

#[test]
fn classify_computes_single_label_metrics_on_the_chosen_split() {
    let d = tempfile::tempdir().expect("tmp");
    let input = artifact(d.path(), "ft-msmae", "predictions");
    write_predictions(
        &input.path("predictions.parquet"),
        &meta(&["normal", "nodule", "mass"], false),
        &single_label_rows(),
    )
    .expect("write");
    let out = run_classify(d.path(), &input, &ClassifyConfig::default(), "eval-msmae").expect("run");
    let (m, v) = read_metrics(&out);
    assert_eq!(m.n, 6);
    assert_eq!(v["split"], "test");
    assert_eq!(v["label_names"], serde_json::json!(["normal", "nodule", "mass"]));
    assert_eq!(m.source_stage, "ft-msmae");
    assert!(near(m.accuracy, 4.0 / 6.0), "{}", m.accuracy);
    assert_eq!(m.confusion_matrix, vec![vec![1, 1, 0], vec![0, 1, 1], vec![0, 0, 2]]);
    // F1: normal 2·1/(2+0+1), nodule 2·1/(2+1+1), mass 2·2/(4+1+0).
    assert!(near(m.macro_f1, (2.0 / 3.0 + 0.5 + 0.8) / 3.0), "{}", m.macro_f1);
    // AUC: normal 8/8; nodule (4 + 1 + 0 + 1 + ½)/8 (0.3 ties 0.3); mass (4 + 3)/8.
    let aucs: Vec<f64> = m.per_class.iter().map(|r| r.auc.expect("defined")).collect();
    assert!(near(aucs[0], 1.0) && near(aucs[1], 0.8125) && near(aucs[2], 0.875), "{aucs:?}");
    assert!(near(m.macro_auc.expect("macro"), (1.0 + 0.8125 + 0.875) / 3.0));
    assert!(m.auc_skipped.is_empty() && m.mean_auc.is_none());
    assert_eq!(m.per_class[2].stats.support, 2);
    assert!(near(m.per_class[2].stats.precision, 2.0 / 3.0));
    let report = std::fs::read_to_string(out.join("report.md")).expect("report");
    assert!(
        report.contains("| accuracy | 0.6667 |")
            && report.contains("| nodule | 0.5000 | 0.5000 | 0.5000 | 2 | 0.8125 |"),
        "{report}"
    );
    assert_png(&out.join("roc.png"));
    assert_png(&out.join("confusion.png"));

    // The training split instead: one row, one class → AUC undefined for every class.
    let out = run_classify(d.path(), &input, &ClassifyConfig { split: Split::Train }, "eval-train").expect("run train");
    let (m, _) = read_metrics(&out);
    assert_eq!((m.n, m.accuracy), (1, 0.0));
    assert_eq!(m.macro_auc, None);
    assert_eq!(m.auc_skipped, vec!["normal", "nodule", "mass"]);
}

#[test]
fn classify_names_the_file_and_split_when_the_split_is_empty() {
    let d = tempfile::tempdir().expect("tmp");
    let input = artifact(d.path(), "ft", "predictions");
    write_predictions(&input.path("predictions.parquet"), &meta(&["a", "b", "c"], false), &single_label_rows())
        .expect("write");
    let e = run_classify(d.path(), &input, &ClassifyConfig { split: Split::Val }, "eval")
        .expect_err("no val rows")
        .to_string();
    assert!(
        e.contains("predictions.parquet") && e.contains("(split `val`)") && e.contains("train (1), test (6)"),
        "{e}"
    );
    let cfg: Result<ClassifyConfig, _> = serde_json::from_value(serde_json::json!({"split": "test", "threshold": 0.3}));
    assert!(cfg.is_err_and(|e| e.to_string().contains("unknown field `threshold`")));
}

#[test]
fn classify_multi_label_reports_per_label_and_mean_auc() {
    let d = tempfile::tempdir().expect("tmp");
    let input = artifact(d.path(), "ft-cxr", "predictions");
    let r = |id: &str, labels: [u8; 3], scores: [f32; 3]| PredictionRow {
        id: id.into(),
        split: Split::Test,
        label: None,
        labels: Some(labels.to_vec()),
        scores: scores.to_vec(),
    };
    // Label `effusion` is never positive: no AUC, left out of the mean.
    let rows = vec![
        r("1", [1, 0, 0], [0.9, 0.2, 0.1]),
        r("2", [0, 1, 0], [0.3, 0.8, 0.2]),
        r("3", [1, 1, 0], [0.6, 0.4, 0.7]),
        r("4", [0, 0, 0], [0.5, 0.5, 0.3]),
    ];
    write_predictions(&input.path("predictions.parquet"), &meta(&["nodule", "mass", "effusion"], true), &rows)
        .expect("write");
    let out = run_classify(d.path(), &input, &ClassifyConfig::default(), "eval-cxr").expect("run");
    let (m, v) = read_metrics(&out);
    // nodule: pos {0.9, 0.6} vs neg {0.3, 0.5} → 1; mass: pos {0.8, 0.4} vs neg {0.2, 0.5} → 3/4.
    assert_eq!(m.per_class.iter().map(|c| c.auc).collect::<Vec<_>>(), vec![Some(1.0), Some(0.75), None]);
    assert!(near(m.mean_auc.expect("mean"), 0.875));
    assert_eq!(v["macro_auc"], serde_json::Value::Null);
    assert_eq!(m.auc_skipped, vec!["effusion"]);
    // At ≥ 0.5 — nodule: tp 2, fp 1 (row 4); mass: tp 1, fp 1 (row 4), fn 1 (row 3);
    // effusion: fp 1 (row 3). Rows 1 and 2 are right on every label.
    assert_eq!(m.confusion_matrix, vec![vec![1, 1, 0, 2], vec![1, 1, 1, 1], vec![3, 1, 0, 0]]);
    assert!(near(m.macro_f1, (0.8 + 0.5 + 0.0) / 3.0), "{}", m.macro_f1);
    assert!(near(m.accuracy, 0.5), "{}", m.accuracy);
    assert_png(&out.join("roc.png"));
    assert_png(&out.join("confusion.png"));
}

#[test]
fn compare_tables_every_input_by_stage_name() {
    let d = tempfile::tempdir().expect("tmp");
    let mut metrics = Vec::new();
    for (stage, flip) in [("ft-msmae", false), ("ft-mae", true)] {
        let input = artifact(d.path(), stage, "predictions");
        let mut rows = single_label_rows();
        if flip {
            // Row `b` right as well: accuracy 5/6.
            rows[1].scores = vec![0.6, 0.3, 0.1];
        }
        write_predictions(&input.path("predictions.parquet"), &meta(&["a", "b", "c"], false), &rows).expect("write");
        let name = format!("eval-{stage}");
        let out = run_classify(d.path(), &input, &ClassifyConfig::default(), &name).expect("classify");
        metrics.push(InputArtifact {
            stage: name,
            kind: ArtifactKind::new("metrics"),
            dir: out,
            digest: format!("m-{stage}"),
        });
    }
    let out = d.path().join("out-report");
    std::fs::create_dir_all(&out).expect("mkdir");
    let c = CompareConfig::default();
    let mut ctx = StageContext::new(
        "report".into(),
        1,
        ExecEnv::cpu_flex(),
        1,
        Default::default(),
        &NoProgress,
        out.clone(),
        d.path().into(),
        EvalCompare.output(&c),
        BTreeMap::from([("metrics".to_string(), metrics)]),
    );
    EvalCompare.run(&c, &mut ctx).expect("compare");
    let cmp: Comparison =
        serde_json::from_slice(&std::fs::read(out.join("comparison.json")).expect("json")).expect("parse");
    assert_eq!(cmp.rows.iter().map(|r| r.stage.as_str()).collect::<Vec<_>>(), ["eval-ft-msmae", "eval-ft-mae"]);
    assert_eq!(cmp.rows[1].source_stage, "ft-mae");
    assert!(near(cmp.rows[0].accuracy, 4.0 / 6.0) && near(cmp.rows[1].accuracy, 5.0 / 6.0));
    assert!(cmp.rows.iter().all(|r| r.n == 6 && r.auc.is_some()));
    assert!(cmp.warnings.is_empty(), "{:?}", cmp.warnings);
    let md = std::fs::read_to_string(out.join("comparison.md")).expect("md");
    assert!(md.contains("| model | accuracy | macro-F1 | macro AUC | n | split |"), "{md}");
    assert!(md.contains("| eval-ft-mae | 0.8333 |"), "{md}");

    // Missing metrics.json: the error names the file.
    let empty = d.path().join("in-empty");
    std::fs::create_dir_all(&empty).expect("mkdir");
    let bad =
        vec![InputArtifact { stage: "x".into(), kind: ArtifactKind::new("metrics"), dir: empty, digest: "d".into() }];
    let mut ctx = StageContext::new(
        "report".into(),
        1,
        ExecEnv::cpu_flex(),
        1,
        Default::default(),
        &NoProgress,
        out.clone(),
        d.path().into(),
        EvalCompare.output(&c),
        BTreeMap::from([("metrics".to_string(), bad)]),
    );
    let e = EvalCompare.run(&c, &mut ctx).expect_err("missing").to_string();
    assert!(e.contains("in-empty/metrics.json"), "{e}");
}
