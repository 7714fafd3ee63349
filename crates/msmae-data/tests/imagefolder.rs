//! `ingest/imagefolder` on generated folders: both layouts, splits by patient, channel and
//! size conversion, ignored non-images, and bad files (fail with the file's name, or skip
//! into rejects.json).

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use msmae_core::StageError;
use msmae_data::imagefolder::{ImageFolder, ImageFolderConfig};
use msmae_data::table::{self, Split};

fn write_png(p: &Path, w: u32, h: u32, v: u8, rgb: bool) {
    std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
    if rgb {
        image::RgbImage::from_pixel(w, h, image::Rgb([v, v / 2, 255 - v])).save(p).expect("png");
    } else {
        image::GrayImage::from_pixel(w, h, image::Luma([v])).save(p).expect("png");
    }
}

fn config(root: &Path, extra: serde_json::Value) -> ImageFolderConfig {
    let base = serde_json::json!({ "root": root, "size": 16, "channels": 1, "previews": 4 });
    serde_json::from_value(common::with(base, extra)).expect("config")
}

fn run(c: &ImageFolderConfig, out: &Path) -> Result<(), StageError> {
    common::run(&ImageFolder, c, 3, out)
}

#[test]
fn btmd_style_split_folders_with_val_carved_from_training() {
    let d = tempfile::tempdir().expect("tmp");
    let root = d.path().join("btmd");
    for (split, n) in [("Training", 20), ("Testing", 6)] {
        for class in ["glioma", "meningioma", "notumor", "pituitary"] {
            for i in 0..n {
                write_png(&root.join(format!("{split}/{class}/img{i}.jpg.png")), 40, 30, (i * 10) as u8, i % 2 == 0);
            }
        }
    }
    std::fs::write(root.join("Training/glioma/.DS_Store"), "x").expect("w");
    std::fs::write(root.join("Training/glioma/notes.txt"), "x").expect("w");
    let out = d.path().join("out");
    std::fs::create_dir_all(&out).expect("mkdir");
    let c = config(&root, serde_json::json!({ "val_fraction": 0.25 }));
    run(&c, &out).expect("ingest");
    let meta = table::read_meta(&out.join("images.parquet")).expect("meta");
    assert_eq!(meta.label_names, ["glioma", "meningioma", "notumor", "pituitary"]);
    let rows = table::read_rows(&out.join("images.parquet")).expect("rows");
    assert_eq!(rows.len(), 104);
    let count = |s: Split| rows.iter().filter(|r| r.split == s).count();
    assert_eq!((count(Split::Train), count(Split::Val), count(Split::Test)), (60, 20, 24));
    assert!(rows.iter().filter(|r| r.split == Split::Test).all(|r| r.id.starts_with("Testing/")));
    assert!(rows.iter().all(|r| r.pixels.len() == 16 * 16 && r.channels == 1 && (r.width, r.height) == (40, 30)));
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("split_report.json")).expect("report")).expect("json");
    assert_eq!(report["splits"]["test"]["classes"]["pituitary"], 6);
    assert!(out.join("previews/sheet.png").is_file());
    assert_eq!(std::fs::read_to_string(out.join("rejects.json")).expect("rejects").trim(), "[]");
}

#[test]
fn class_folders_split_by_patient_prefix() {
    let d = tempfile::tempdir().expect("tmp");
    let root = d.path().join("derm");
    for p in 0..30 {
        for eye in ["left", "right"] {
            write_png(
                &root.join(format!("{}/P{p:03}_{eye}.png", if p % 3 == 0 { "sick" } else { "well" })),
                20,
                20,
                p as u8,
                true,
            );
        }
    }
    let out = d.path().join("out");
    std::fs::create_dir_all(&out).expect("mkdir");
    let c = config(&root, serde_json::json!({ "patient_separator": "_", "channels": 3 }));
    run(&c, &out).expect("ingest");
    let rows = table::read_rows(&out.join("images.parquet")).expect("rows");
    assert_eq!(rows.len(), 60);
    let mut split_of: BTreeMap<String, Split> = BTreeMap::new();
    for r in &rows {
        assert_eq!(r.pixels.len(), 16 * 16 * 3);
        let prev = split_of.insert(r.patient_id.clone(), r.split);
        assert!(prev.is_none_or(|p| p == r.split), "patient {} crosses splits", r.patient_id);
    }
    assert_eq!(split_of.len(), 30, "left and right images share a patient");
    assert_eq!(split_of.values().filter(|s| **s == Split::Train).count(), 21);
}

#[test]
fn corrupt_and_empty_files_fail_by_name_or_are_rejected() {
    let d = tempfile::tempdir().expect("tmp");
    let root = d.path().join("ds");
    for i in 0..4 {
        write_png(&root.join(format!("a/{i}.png")), 8, 8, 9, false);
    }
    std::fs::write(root.join("a/empty.png"), b"").expect("w");
    std::fs::write(root.join("a/broken.jpg"), b"\xff\xd8\xff\xe0 not really a jpeg").expect("w");
    let out = d.path().join("out");
    std::fs::create_dir_all(&out).expect("mkdir");
    let e = run(&config(&root, serde_json::json!({})), &out).expect_err("fails");
    let msg = e.to_string();
    assert!(msg.contains("a/broken.jpg") || msg.contains("a/empty.png"), "{msg}");
    assert!(msg.contains("on_error: skip"), "{msg}");
    let out2 = d.path().join("out2");
    std::fs::create_dir_all(&out2).expect("mkdir");
    run(&config(&root, serde_json::json!({ "on_error": "skip" })), &out2).expect("skips");
    assert_eq!(table::read_rows(&out2.join("images.parquet")).expect("rows").len(), 4);
    let rejects: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out2.join("rejects.json")).expect("rejects")).expect("json");
    let list = rejects.as_array().expect("array");
    assert_eq!(list.len(), 2);
    assert!(list.iter().any(|r| r["path"] == "a/empty.png" && r["reason"] == "empty file (0 bytes)"), "{rejects}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out2.join("split_report.json")).expect("report")).expect("json");
    assert_eq!(report["rejected"], 2);
}

#[test]
fn an_empty_root_says_what_layout_it_expects() {
    let d = tempfile::tempdir().expect("tmp");
    std::fs::create_dir_all(d.path().join("ds")).expect("mkdir");
    let e = run(&config(&d.path().join("ds"), serde_json::json!({})), d.path()).expect_err("fails");
    assert!(
        e.to_string().contains("no class folders: expected ROOT/<class>/<image> or ROOT/<split>/<class>/<image>"),
        "{e}"
    );
}

fn busi(root: &Path) {
    msmae_data::fixtures::busi(root, [6, 4, 3]);
}

#[test]
fn segmentation_pairs_merge_masks_and_every_image_needs_one() {
    let d = tempfile::tempdir().expect("tmp");
    let root = d.path().join("Dataset_BUSI_with_GT");
    busi(&root);
    let out = d.path().join("out");
    std::fs::create_dir_all(&out).expect("mkdir");
    // crop 40×32 → central 32×32 (x 4..36), then 16×16: 2 source px per table px
    run(&config(&root, serde_json::json!({ "mask_suffix": "_mask", "channels": 3 })), &out).expect("ingest");
    let meta = table::read_meta(&out.join("images.parquet")).expect("meta");
    assert!(meta.has_masks);
    assert_eq!(meta.label_names, ["benign", "malignant", "normal"]);
    let rows = table::read_rows(&out.join("images.parquet")).expect("rows");
    assert_eq!(rows.len(), 13, "masks are not images");
    for r in &rows {
        let m = r.mask.as_ref().expect("every row has a mask");
        assert_eq!(m.len(), 256);
        assert!(m.iter().all(|&v| v <= 1));
        let fg: usize = m.iter().map(|&v| usize::from(v)).sum();
        if r.id.starts_with("normal/") {
            assert_eq!(fg, 0, "{}", r.id);
        } else if r.id.ends_with(" (1).png") {
            // first lesion x 4..20 → table x 0..8 (8 px × 12 rows) + second x 24..36 → 10..16 (6 × 4)
            assert_eq!(fg, 8 * 12 + 6 * 4, "{}: masks merged", r.id);
            assert_eq!(m[5 * 16 + 12], 1, "the second mask's lesion is in");
        } else {
            assert_eq!(fg, 8 * 12, "{}", r.id);
            assert_eq!((m[2 * 16], m[2 * 16 + 8]), (1, 0), "lesion on the left only");
        }
    }
    // an image without a mask, and a mask without an image: named, or rejected with skip
    std::fs::remove_file(root.join("benign/benign (2)_mask.png")).expect("rm");
    std::fs::copy(root.join("benign/benign (3)_mask.png"), root.join("malignant/malignant (9)_mask.png")).expect("cp");
    let e = run(&config(&root, serde_json::json!({ "mask_suffix": "_mask" })), &d.path().join("x"))
        .expect_err("fails")
        .to_string();
    assert!(
        e.contains("benign (2).png") && e.contains("image without a mask")
            || e.contains("malignant (9)_mask.png") && e.contains("mask without an image"),
        "{e}"
    );
    let out2 = d.path().join("out2");
    std::fs::create_dir_all(&out2).expect("mkdir");
    run(&config(&root, serde_json::json!({ "mask_suffix": "_mask", "on_error": "skip" })), &out2).expect("skips");
    assert_eq!(table::read_rows(&out2.join("images.parquet")).expect("rows").len(), 12);
    let rejects: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out2.join("rejects.json")).expect("rejects")).expect("json");
    let text = rejects.to_string();
    assert!(text.contains("benign/benign (2).png") && text.contains("malignant/malignant (9)_mask.png"), "{text}");
    // a mask of another size than its image is named
    image::GrayImage::new(10, 10).save(root.join("benign/benign (2)_mask.png")).expect("small mask");
    std::fs::remove_file(root.join("malignant/malignant (9)_mask.png")).expect("rm");
    let e = run(&config(&root, serde_json::json!({ "mask_suffix": "_mask" })), &d.path().join("y"))
        .expect_err("fails")
        .to_string();
    assert!(e.contains("benign (2)_mask.png") && e.contains("mask is 10×10 but its image is 40×32"), "{e}");
}
