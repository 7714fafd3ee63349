//! `ingest/ham10000` on a generated release in the published layout: lesion-level splits,
//! the optional `dataset` column, and every metadata/file mismatch named by row or file.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use msmae_core::StageError;
use msmae_data::ham10000::Ham10000;
use msmae_data::table;

fn jpg(p: &Path, v: u8) {
    std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
    image::RgbImage::from_pixel(60, 45, image::Rgb([v, 100, 200])).save(p).expect("jpg");
}

/// 24 lesions × 2 images, alternating folders; `extra` lines appended to the CSV.
fn release(root: &Path, with_dataset_column: bool, extra: &str) {
    let dx = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"];
    let mut csv = String::from(if with_dataset_column {
        "lesion_id,image_id,dx,dx_type,age,sex,localization,dataset\n"
    } else {
        "lesion_id,image_id,dx,dx_type,age,sex,localization\n"
    });
    for l in 0..24 {
        for k in 0..2 {
            let id = format!("ISIC_{:07}", l * 2 + k);
            jpg(&root.join(format!("HAM10000_images_part_{}/{id}.jpg", 1 + (l + k) % 2)), (l * 10) as u8);
            csv.push_str(&format!(
                "HAM_{l:07},{id},{},histo,50.0,male,back{}\n",
                dx[l % 7],
                if with_dataset_column { ",vidir_modern" } else { "" }
            ));
        }
    }
    csv.push_str(extra);
    std::fs::write(root.join("HAM10000_metadata.csv"), csv).expect("csv");
}

fn run(root: &Path, out: &Path, skip: bool) -> Result<(), StageError> {
    let with =
        serde_json::json!({ "root": root, "size": 16, "previews": 2, "on_error": if skip { "skip" } else { "fail" } });
    common::ingest(&Ham10000, with, 1, out)
}

#[test]
fn ingests_the_published_layout_with_lesion_level_splits() {
    for with_dataset in [false, true] {
        let d = tempfile::tempdir().expect("tmp");
        release(d.path(), with_dataset, "");
        run(d.path(), &d.path().join("out"), false).expect("ingest");
        let rows = table::read_rows(&d.path().join("out/images.parquet")).expect("rows");
        assert_eq!(rows.len(), 48);
        let meta = table::read_meta(&d.path().join("out/images.parquet")).expect("meta");
        assert_eq!(meta.label_names, ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]);
        let mut lesion_split = BTreeMap::new();
        for r in &rows {
            assert_eq!(r.pixels.len(), 16 * 16 * 3);
            assert_eq!((r.width, r.height), (60, 45));
            assert!(r.source_path.starts_with("HAM10000_images_part_"));
            let prev = lesion_split.insert(r.patient_id.clone(), r.split);
            assert!(prev.is_none_or(|p| p == r.split), "lesion {} in two splits", r.patient_id);
        }
        assert_eq!(lesion_split.len(), 24);
        let r0 = rows.iter().find(|r| r.id == "ISIC_0000002").expect("row");
        assert_eq!(r0.label, Some(1), "lesion 1 is bcc");
    }
}

fn failure(extra: &str, tweak: impl Fn(&Path)) -> String {
    let d = tempfile::tempdir().expect("tmp");
    release(d.path(), false, extra);
    tweak(d.path());
    run(d.path(), &d.path().join("out"), false).expect_err("must fail").to_string()
}

#[test]
fn every_mismatch_is_named() {
    let e = failure("HAM_0000099,ISIC_0000001,mel,histo,1,male,back\n", |_| {});
    assert!(e.contains("line 50, column `image_id`: `ISIC_0000001` is listed twice (first on line 3)"), "{e}");
    let e = failure("HAM_0000099,ISIC_0000100,melanoma,histo,1,male,back\n", |_| {});
    assert!(e.contains("line 50, column `dx`: unknown label `melanoma`"), "{e}");
    let e = failure("HAM_0000099,ISIC_0000100,mel,histo,1,male,back\n", |_| {});
    assert!(e.contains("line 50: image `ISIC_0000100` is listed but no ISIC_0000100.jpg exists"), "{e}");
    let e = failure("", |root| jpg(&root.join("HAM10000_images_part_2/ISIC_0009999.jpg"), 1));
    assert!(
        e.contains("ISIC_0009999.jpg") && e.contains("image `ISIC_0009999` is not listed in HAM10000_metadata.csv"),
        "{e}"
    );
    let e = failure("", |root| {
        let text =
            std::fs::read_to_string(root.join("HAM10000_metadata.csv")).expect("csv").replacen("dx,", "diagnosis,", 1);
        std::fs::write(root.join("HAM10000_metadata.csv"), text).expect("csv");
    });
    assert!(e.contains("HAM10000_metadata.csv (header, column `dx`): missing column `dx`"), "{e}");
    let e = failure("", |root| {
        std::fs::write(root.join("HAM10000_images_part_1/ISIC_0000000.jpg"), b"").expect("truncate")
    });
    assert!(e.contains("ISIC_0000000.jpg") && e.contains("empty file"), "{e}");
    let e = failure("", |root| {
        let p = root.join("HAM10000_images_part_1/ISIC_0000000.jpg");
        let bytes = std::fs::read(&p).expect("read");
        std::fs::write(&p, &bytes[..bytes.len() * 3 / 4]).expect("truncate");
    });
    assert!(e.contains("ISIC_0000000.jpg") && e.contains("truncated JPEG"), "{e}");
}

#[test]
fn skip_policy_records_rejects_and_keeps_the_rest() {
    let d = tempfile::tempdir().expect("tmp");
    release(
        d.path(),
        false,
        "HAM_0000099,ISIC_0000100,mel,histo,1,male,back\nHAM_0000098,ISIC_0000003,xx,histo,1,male,back\n",
    );
    jpg(&d.path().join("HAM10000_images_part_1/ISIC_0007777.jpg"), 3);
    run(d.path(), &d.path().join("out"), true).expect("skips");
    let rows = table::read_rows(&d.path().join("out/images.parquet")).expect("rows");
    assert_eq!(rows.len(), 48);
    let rejects: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.path().join("out/rejects.json")).expect("rejects")).expect("json");
    assert_eq!(rejects.as_array().map(Vec::len), Some(3), "{rejects}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.path().join("out/split_report.json")).expect("report")).expect("json");
    assert_eq!(report["rejected"], 3);
}
