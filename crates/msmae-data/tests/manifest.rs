//! `ingest/manifest`: CSV and Parquet manifests, the three label forms, patient and split
//! columns, masks, and each bad row named by line and column.

mod common;

use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use msmae_core::{Stage, StageError};
use msmae_data::manifest::{Manifest, ManifestConfig};
use msmae_data::table::{self, Split};

fn png(p: &Path, v: u8) {
    std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
    image::GrayImage::from_fn(20, 20, |x, _| image::Luma([if x < 10 { v } else { 255 - v }])).save(p).expect("png");
}

fn run(extra: serde_json::Value, out: &Path) -> Result<(), StageError> {
    common::ingest(&Manifest, extra, 4, out)
}

/// 12 images of 6 patients; CSV with path, diagnosis, patient, split, mask.
fn csv_dataset(root: &Path, extra_rows: &str) -> std::path::PathBuf {
    let mut csv = String::from("path,diagnosis,patient,split,mask\n");
    for i in 0..12u32 {
        png(&root.join(format!("img/{i}.png")), (i * 20) as u8);
        image::GrayImage::from_fn(20, 20, |x, y| image::Luma([if x < 10 && y < 10 { 255 } else { 0 }]))
            .save(root.join(format!("img/{i}_m.png")))
            .expect("mask");
        let split = ["train", "train", "validation", "test", "train", "Testing"][(i / 2) as usize];
        csv.push_str(&format!(
            "img/{i}.png,{},P{},{split},img/{i}_m.png\n",
            ["benign", "malignant", "normal"][(i % 3) as usize],
            i / 2
        ));
    }
    csv.push_str(extra_rows);
    let p = root.join("manifest.csv");
    std::fs::write(&p, csv).expect("csv");
    p
}

#[test]
fn csv_manifest_with_patients_splits_and_masks() {
    let d = tempfile::tempdir().expect("tmp");
    let m = csv_dataset(d.path(), "");
    let out = d.path().join("out");
    let cfg = serde_json::json!({ "manifest": m, "label_column": "diagnosis", "patient_column": "patient", "split_column": "split", "mask_column": "mask", "size": 10, "channels": 1 });
    run(cfg, &out).expect("ingest");
    let meta = table::read_meta(&out.join("images.parquet")).expect("meta");
    assert_eq!(meta.label_names, ["benign", "malignant", "normal"], "sorted distinct values");
    assert!(meta.has_masks && !meta.multi_label);
    let rows = table::read_rows(&out.join("images.parquet")).expect("rows");
    assert_eq!(rows.len(), 12);
    let r5 = rows.iter().find(|r| r.id == "img/5.png").expect("row");
    assert_eq!((r5.label, r5.patient_id.as_str(), r5.split), (Some(2), "P2", Split::Val));
    assert_eq!(rows.iter().find(|r| r.id == "img/11.png").expect("row").split, Split::Test, "`Testing` is test");
    let mask = r5.mask.as_ref().expect("mask");
    assert_eq!(mask.iter().map(|&v| u32::from(v)).sum::<u32>(), 25, "the top-left quarter");
    // classes given: their order is the label order
    let out2 = d.path().join("out2");
    run(serde_json::json!({ "manifest": m, "label_column": "diagnosis", "classes": ["normal", "benign", "malignant"], "size": 10 }), &out2).expect("ingest");
    let rows = table::read_rows(&out2.join("images.parquet")).expect("rows");
    assert_eq!(rows.iter().find(|r| r.id == "img/5.png").expect("row").label, Some(0));
}

#[test]
fn parquet_manifest_with_multi_hot_columns_or_joined_names() {
    let d = tempfile::tempdir().expect("tmp");
    let paths: Vec<String> = (0..8).map(|i| format!("{}/x{i}.png", d.path().display())).collect();
    for (i, p) in paths.iter().enumerate() {
        png(Path::new(p), (i * 30) as u8);
    }
    let col = |v: Vec<i64>| Arc::new(Int64Array::from(v)) as ArrayRef;
    let joined: Vec<&str> = vec!["effusion", "", "mass|effusion", "mass", "", "effusion", "mass", "mass|effusion"];
    let batch = RecordBatch::try_from_iter([
        ("file", Arc::new(StringArray::from(paths.clone())) as ArrayRef),
        ("effusion", col(vec![1, 0, 1, 0, 0, 1, 0, 1])),
        ("mass", col(vec![0, 0, 1, 1, 0, 0, 1, 1])),
        ("findings", Arc::new(StringArray::from(joined)) as ArrayRef),
    ])
    .expect("batch");
    let m = d.path().join("m.parquet");
    let mut w = parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&m).expect("create"), batch.schema(), None)
        .expect("writer");
    w.write(&batch).expect("write");
    w.close().expect("close");
    let mut hots = Vec::new();
    for (k, form) in [
        ("hot", serde_json::json!({ "label_columns": ["effusion", "mass"] })),
        ("joined", serde_json::json!({ "labels_column": "findings" })),
    ] {
        let mut cfg = serde_json::json!({ "manifest": m, "path_column": "file", "size": 8, "split": { "train": 0.5, "val": 0.25, "test": 0.25 } });
        cfg.as_object_mut().expect("obj").extend(form.as_object().expect("obj").clone());
        let out = d.path().join(k);
        run(cfg, &out).expect("ingest");
        let meta = table::read_meta(&out.join("images.parquet")).expect("meta");
        assert!(meta.multi_label);
        assert_eq!(meta.label_names, ["effusion", "mass"]);
        let rows = table::read_rows(&out.join("images.parquet")).expect("rows");
        assert_eq!(rows.len(), 8);
        hots.push(rows.iter().map(|r| (r.id.clone(), r.split, r.labels.clone().expect("labels"))).collect::<Vec<_>>());
    }
    assert_eq!(hots[0], hots[1], "both forms give the same table");
    assert_eq!(hots[0][2].2, vec![1, 1]);
    assert_eq!(
        hots[0].iter().filter(|r| r.1 == Split::Train).count(),
        4,
        "seeded split by image when no patient column"
    );
}

#[test]
fn bad_rows_are_named_or_rejected() {
    let fail = |extra: &str, cfg: serde_json::Value| -> String {
        let d = tempfile::tempdir().expect("tmp");
        let m = csv_dataset(d.path(), extra);
        let mut c = serde_json::json!({ "manifest": m, "label_column": "diagnosis", "patient_column": "patient", "split_column": "split", "size": 10 });
        c.as_object_mut().expect("obj").extend(cfg.as_object().expect("obj").clone());
        run(c, &d.path().join("out")).expect_err("must fail").to_string()
    };
    let e = fail("img/0.png,benign,P9,train,\n", serde_json::json!({}));
    assert!(
        e.contains("manifest.csv (line 14, column `path`): id `img/0.png` is listed twice (first on line 2)"),
        "{e}"
    );
    let e = fail("img/99.png,benign,P9,train,\n", serde_json::json!({}));
    assert!(
        e.contains("line 14, column `path`): image") && e.contains("img/99.png` is listed but does not exist"),
        "{e}"
    );
    let e = fail("", serde_json::json!({ "classes": ["benign", "malignant"] }));
    assert!(
        e.contains(
            "line 4, column `diagnosis`): unknown label `normal` in column `diagnosis` (classes: benign, malignant)"
        ),
        "{e}"
    );
    let e = fail("", serde_json::json!({ "patient_column": "subject" }));
    assert!(
        e.contains("(header, column `subject`): missing column `subject`; the file has columns [\"path\", \"diagnosis\", \"patient\", \"split\", \"mask\"]"),
        "{e}"
    );
    let e = fail("img/0_m.png,benign,P0,test,\n", serde_json::json!({}));
    assert!(e.contains("patient `P0` is in both train and test"), "{e}");
    let e = fail("img/0_m.png,benign,P7,holdout,\n", serde_json::json!({}));
    assert!(e.contains("line 14, column `split`): unknown split `holdout`"), "{e}");
    let e = fail("img/0_m.png,benign,P7,train,\n", serde_json::json!({ "mask_column": "mask" }));
    assert!(e.contains("line 14, column `mask`): no mask path"), "{e}");
    // skip: the bad rows are rejects, the rest is ingested
    let d = tempfile::tempdir().expect("tmp");
    let m = csv_dataset(d.path(), "img/99.png,benign,P9,train,\nimg/0_m.png,tumour,P8,train,\n");
    let out = d.path().join("out");
    run(serde_json::json!({ "manifest": m, "label_column": "diagnosis", "classes": ["benign", "malignant", "normal"], "size": 10, "on_error": "skip" }), &out)
        .expect("skips");
    assert_eq!(table::read_rows(&out.join("images.parquet")).expect("rows").len(), 12);
    let rejects: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("rejects.json")).expect("rejects")).expect("json");
    assert_eq!(rejects.as_array().map(Vec::len), Some(2), "{rejects}");
    assert!(rejects.to_string().contains("manifest.csv:line 15"), "{rejects}");
}

/// A manifest may not make the stage read files anywhere: absolute paths and `..` out of
/// the root are refused by row and column unless `allow_outside_root: true`.
#[test]
fn paths_outside_the_root_are_refused_unless_allowed() {
    use msmae_data::manifest::leaves_root;
    let r = Path::new("/data/study");
    for (p, out) in [
        ("img/1.png", false),
        ("a/../img/1.png", false),
        ("./x.png", false),
        ("/data/study/img/1.png", false),
        ("../x.png", true),
        ("img/../../x.png", true),
        ("/etc/passwd", true),
        ("/data/study/../other/x.png", true),
        ("/data/studyx/1.png", true),
    ] {
        assert_eq!(leaves_root(p, r), out, "{p}");
    }
    let d = tempfile::tempdir().expect("tmp");
    let far = tempfile::tempdir().expect("tmp");
    let x = far.path().join("x.png");
    png(&x, 7);
    for (row, col) in [
        (format!("{},benign,P9,train,img/0_m.png\n", x.display()), "path"),
        ("img/1_m.png,benign,P9,train,../../etc/m.png\n".to_string(), "mask"),
    ] {
        let m = csv_dataset(d.path(), &row);
        let cfg = serde_json::json!({ "manifest": m, "label_column": "diagnosis", "id_column": null, "mask_column": "mask", "size": 10, "on_error": "skip" });
        let e = run(cfg, &d.path().join("out")).expect_err("refused").to_string();
        assert!(
            e.contains(&format!("line 14, column `{col}`"))
                && e.contains("leads outside the root")
                && e.contains("allow_outside_root"),
            "{e}"
        );
    }
    let m = csv_dataset(d.path(), &format!("{},benign,P9,train,img/0_m.png\n", x.display()));
    let out = d.path().join("allowed");
    run(serde_json::json!({ "manifest": m, "label_column": "diagnosis", "mask_column": "mask", "size": 10, "allow_outside_root": true }), &out)
        .expect("allowed");
    assert_eq!(table::read_rows(&out.join("images.parquet")).expect("rows").len(), 13);
}

/// The cache tracks the manifest and exactly the files it lists: relative to the root or
/// absolute elsewhere, images and masks; nothing else in their folders.
#[test]
fn the_cache_tracks_exactly_the_listed_images_and_masks() {
    let d = tempfile::tempdir().expect("tmp");
    let far = tempfile::tempdir().expect("tmp");
    let x = far.path().join("x.png");
    png(&x, 7);
    let m = csv_dataset(d.path(), &format!("{},benign,P9,train,img/0_m.png|img/1_m.png\n", x.display()));
    let cfg = |extra: serde_json::Value| -> ManifestConfig {
        let mut c = serde_json::json!({ "manifest": "manifest.csv", "label_column": "diagnosis", "mask_column": "mask", "size": 10 });
        c.as_object_mut().expect("obj").extend(extra.as_object().expect("obj").clone());
        serde_json::from_value(c).expect("config")
    };
    assert_eq!(
        Manifest.external_inputs(&cfg(serde_json::json!({}))),
        [Path::new("manifest.csv")],
        "the manifest, not its folder"
    );
    let l = Manifest.listed_inputs(&cfg(serde_json::json!({})), d.path()).expect("reads").expect("lists");
    assert_eq!(l.list, m, "the manifest is resolved against the pipeline's folder");
    assert_eq!(l.files.len(), 12 * 2 + 3, "12 images and masks, then one image with two masks");
    assert_eq!(&l.files[..2], [d.path().join("img/0.png"), d.path().join("img/0_m.png")]);
    assert_eq!(
        &l.files[24..],
        [x.clone(), d.path().join("img/0_m.png"), d.path().join("img/1_m.png")],
        "absolute paths stay as written"
    );
    // `root` moves the base of relative paths; without a mask column masks are not read.
    let l = Manifest
        .listed_inputs(&cfg(serde_json::json!({ "root": "elsewhere", "mask_column": null })), d.path())
        .expect("reads")
        .expect("lists");
    assert_eq!((l.files.len(), &l.files[0], &l.files[12]), (13, &d.path().join("elsewhere/img/0.png"), &x));
    // A column the config names but the manifest lacks stops the plan with the header named.
    let e = Manifest
        .listed_inputs(&cfg(serde_json::json!({ "path_column": "file" })), d.path())
        .expect_err("fails")
        .to_string();
    assert!(e.contains("manifest.csv (header, column `file`): missing column `file`"), "{e}");
}

#[test]
fn a_crafted_huge_image_is_one_reject_under_on_error_skip() {
    let d = tempfile::tempdir().expect("tmp");
    // 100 000 × 100 000 RGB declared in a 70-byte file, among 12 ordinary images.
    let m = csv_dataset(d.path(), "img/bomb.png,benign,P9,train,\n");
    std::fs::write(d.path().join("img/bomb.png"), msmae_data::fixtures::png_declaring(100_000, 100_000))
        .expect("write");
    let cfg = |on_error: &str| serde_json::json!({ "manifest": m, "label_column": "diagnosis", "size": 10, "on_error": on_error });
    let e = run(cfg("fail"), &d.path().join("fail")).expect_err("refused");
    assert!(e.to_string().contains("bomb.png") && e.to_string().contains("over the limit"), "{e}");
    let out = d.path().join("skip");
    run(cfg("skip"), &out).expect("the other images are ingested");
    assert_eq!(table::read_rows(&out.join("images.parquet")).expect("rows").len(), 12);
    let rejects = std::fs::read_to_string(out.join("rejects.json")).expect("rejects");
    assert!(rejects.contains("bomb.png") && rejects.contains("over the limit"), "{rejects}");
}
