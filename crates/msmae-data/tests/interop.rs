//! The image table reads back unchanged with our reader and with pyarrow (an independent
//! implementation), and a patient never crosses splits.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use msmae_data::synthetic::{SyntheticConfig, generate, patient_splits};
use msmae_data::table::{self, ImageRow, ImageTableWriter, TableMeta};

/// The reference Python (`cargo xtask test` sets MSMAE_PYTHON to a venv with pyarrow).
fn python() -> PathBuf {
    match std::env::var_os("MSMAE_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => panic!(
            "MSMAE_PYTHON is not set: run the suite with `cargo xtask test`, which creates the reference Python environment"
        ),
    }
}

fn write_table(dir: &std::path::Path, n: u32, row_group: usize) -> (PathBuf, Vec<ImageRow>, TableMeta) {
    let c = SyntheticConfig { images: n, size: 32, images_per_patient: 3, ..Default::default() };
    let meta = TableMeta {
        schema_version: table::SCHEMA_VERSION,
        label_names: c.modality.label_names(),
        multi_label: false,
        height: 32,
        width: 32,
        channels: 1,
        has_masks: true,
        bit_depth: 8,
        mask_classes: Vec::new(),
        provenance: serde_json::json!({"test": true}),
    };
    let splits = patient_splits(&c, 4);
    let path = dir.join("t.parquet");
    let mut w = ImageTableWriter::create(&path, meta.clone(), row_group).expect("create");
    let mut rows = Vec::new();
    for i in 0..n {
        let s = generate(&c, 4, i);
        let row = ImageRow {
            id: format!("img{i}"),
            patient_id: format!("p{}", i / 3),
            split: splits[(i / 3) as usize],
            label: Some(i32::from(s.label)),
            labels: None,
            width: 32,
            height: 32,
            channels: 1,
            source_sha256: "x".into(),
            source_path: format!("gen/{i}"),
            pixels: s.pixels,
            mask: if i % 5 == 0 { None } else { Some(s.mask) },
        };
        rows.push(row.clone());
        w.push(row).expect("push");
    }
    assert_eq!(w.finish().expect("finish"), u64::from(n));
    (path, rows, meta)
}

#[test]
fn rows_round_trip_through_our_reader_across_row_groups() {
    let d = tempfile::tempdir().expect("tmp");
    let (path, rows, meta) = write_table(d.path(), 23, 5);
    assert_eq!(table::read_meta(&path).expect("meta"), meta);
    assert_eq!(table::read_rows(&path).expect("rows"), rows);
}

#[test]
fn pyarrow_reads_the_table_unchanged() {
    let d = tempfile::tempdir().expect("tmp");
    let (path, rows, meta) = write_table(d.path(), 12, 4);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/read_table.py");
    let out = Command::new(python()).arg(script).arg(&path).output().expect("run python");
    assert!(out.status.success(), "pyarrow failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["num_rows"], 12);
    assert_eq!(
        v["columns"],
        serde_json::json!([
            "id",
            "patient_id",
            "split",
            "label",
            "width",
            "height",
            "channels",
            "pixels",
            "mask",
            "source_path",
            "source_sha256"
        ])
    );
    assert_eq!(v["types"]["pixels"], "binary");
    assert_eq!(v["types"]["label"], "int32");
    assert_eq!(v["nullable"]["label"], true);
    assert_eq!(v["nullable"]["pixels"], false);
    assert_eq!(v["label_names"], serde_json::json!(meta.label_names));
    assert_eq!(v["schema_version"], table::SCHEMA_VERSION);
    assert_eq!(v["ids"], serde_json::json!(rows.iter().map(|r| r.id.clone()).collect::<Vec<_>>()));
    assert_eq!(v["labels"], serde_json::json!(rows.iter().map(|r| r.label).collect::<Vec<_>>()));
    let sha = |b: &[u8]| {
        use sha2::Digest;
        sha2::Sha256::digest(b).iter().map(|x| format!("{x:02x}")).collect::<String>()
    };
    assert_eq!(v["pixel_sha256"], serde_json::json!(rows.iter().map(|r| sha(&r.pixels)).collect::<Vec<_>>()));
    assert_eq!(
        v["mask_sums"],
        serde_json::json!(
            rows.iter()
                .map(|r| r.mask.as_ref().map(|m| m.iter().map(|&x| u64::from(x)).sum::<u64>()))
                .collect::<Vec<_>>()
        )
    );
}

#[test]
fn no_patient_crosses_splits_in_a_generated_table() {
    let d = tempfile::tempdir().expect("tmp");
    let (path, _, _) = write_table(d.path(), 60, 16);
    let mut seen: BTreeMap<String, table::Split> = BTreeMap::new();
    for r in table::read_rows(&path).expect("rows") {
        let prev = seen.insert(r.patient_id.clone(), r.split);
        assert!(prev.is_none_or(|p| p == r.split), "patient {} in {:?} and {:?}", r.patient_id, prev, r.split);
    }
    assert!(seen.len() == 20);
}

#[test]
fn writer_rejects_rows_that_do_not_fit_the_table() {
    let d = tempfile::tempdir().expect("tmp");
    let meta = TableMeta {
        schema_version: 1,
        label_names: vec!["a".into()],
        multi_label: false,
        height: 2,
        width: 2,
        channels: 1,
        has_masks: false,
        bit_depth: 8,
        mask_classes: Vec::new(),
        provenance: serde_json::Value::Null,
    };
    let mut w = ImageTableWriter::create(&d.path().join("t.parquet"), meta, 4).expect("create");
    let row = ImageRow {
        id: "r1".into(),
        patient_id: "p".into(),
        split: table::Split::Train,
        label: Some(0),
        labels: None,
        width: 2,
        height: 2,
        channels: 1,
        pixels: vec![0; 3],
        mask: None,
        source_path: "s".into(),
        source_sha256: "h".into(),
    };
    let e = w.push(row.clone()).expect_err("short pixels");
    assert!(e.to_string().contains("row `r1`: pixels hold 3 bytes, expected 2×2×1"), "{e}");
    let e = w.push(ImageRow { pixels: vec![0; 4], label: Some(3), ..row }).expect_err("label");
    assert!(e.to_string().contains("label 3 is outside 0..1"), "{e}");
    assert!(table::read_meta(&d.path().join("missing.parquet")).is_err());
}

/// A multi-label table as ingested (ChestX-ray14 layout): pyarrow reads the `labels`
/// list<uint8> column and the footer unchanged.
#[test]
fn pyarrow_reads_a_multi_label_ingested_table() {
    use msmae_core::{ExecEnv, NoProgress, Stage, StageContext};
    use msmae_data::chestxray14::{ChestXray14, ChestXray14Config};
    let d = tempfile::tempdir().expect("tmp");
    msmae_data::fixtures::chestxray14(d.path(), false, false);
    let c: ChestXray14Config =
        serde_json::from_value(serde_json::json!({ "root": d.path(), "size": 8, "previews": 0 })).expect("config");
    let out = d.path().join("out");
    std::fs::create_dir_all(&out).expect("mkdir");
    let mut ctx = StageContext::new(
        "cxr".into(),
        1,
        ExecEnv::cpu_flex(),
        2,
        Default::default(),
        &NoProgress,
        out.clone(),
        out.clone(),
        ChestXray14.output(&c),
        BTreeMap::new(),
    );
    ChestXray14.run(&c, &mut ctx).expect("ingest");
    let path = out.join("images.parquet");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/read_table.py");
    let o = Command::new(python()).arg(script).arg(&path).output().expect("run python");
    assert!(o.status.success(), "pyarrow failed: {}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["types"]["labels"], "list<item: uint8>");
    assert_eq!(v["bit_depth"], 8);
    let rows = table::read_rows(&path).expect("rows");
    assert_eq!(v["multi_hot"], serde_json::json!(rows.iter().map(|r| r.labels.clone()).collect::<Vec<_>>()));
    assert_eq!(v["label_names"].as_array().map(Vec::len), Some(14));
}
