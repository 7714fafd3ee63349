//! `ingest/messidor2` on a generated release in the published layout: exam pairs in one
//! split, ungradable images excluded, the `.jpg`/`.JPG` case mismatch of the released CSV,
//! and each bad input named.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use msmae_core::StageError;
use msmae_data::messidor2::Messidor2;
use msmae_data::table;

fn release(root: &Path) {
    msmae_data::fixtures::messidor2(root, 20);
}

fn run(root: &Path, out: &Path, extra: serde_json::Value) -> Result<(), StageError> {
    let base = serde_json::json!({ "root": root, "size": 16, "previews": 2 });
    common::ingest(&Messidor2, common::with(base, extra), 9, out)
}

#[test]
fn exams_stay_together_and_ungradable_images_are_excluded() {
    let d = tempfile::tempdir().expect("tmp");
    release(d.path());
    run(d.path(), &d.path().join("out"), serde_json::json!({})).expect("ingest");
    let rows = table::read_rows(&d.path().join("out/images.parquet")).expect("rows");
    assert_eq!(rows.len(), 39, "40 images, one ungradable");
    let meta = table::read_meta(&d.path().join("out/images.parquet")).expect("meta");
    assert_eq!(meta.label_names, ["none", "mild", "moderate", "severe", "proliferative"]);
    let mut exams: BTreeMap<&str, Vec<&table::ImageRow>> = BTreeMap::new();
    for r in &rows {
        exams.entry(&r.patient_id).or_default().push(r);
        assert_eq!(r.pixels.len(), 16 * 16 * 3);
        assert_eq!((r.width, r.height), (60, 40));
    }
    assert_eq!(exams.len(), 20);
    for (exam, imgs) in &exams {
        assert!(imgs.iter().all(|r| r.split == imgs[0].split), "{exam}: both eyes in one split");
    }
    assert_eq!(exams["exam-0004"].len(), 1, "exam 3's ungradable eye is out");
    let jpg = rows.iter().find(|r| r.id == "IM000001.jpg").expect("listed as .jpg, found as .JPG");
    assert_eq!((jpg.source_path.as_str(), jpg.label), ("IMAGES/IM000001.JPG", Some(1)));
    let rejects: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.path().join("out/rejects.json")).expect("rejects")).expect("json");
    assert_eq!(rejects[0]["path"], "IMAGES/2005_00007_PP.png");
    assert!(rejects[0]["reason"].as_str().expect("reason").contains("ungradable"));
}

fn failure(tweak: impl Fn(&Path)) -> String {
    let d = tempfile::tempdir().expect("tmp");
    release(d.path());
    tweak(d.path());
    run(d.path(), &d.path().join("out"), serde_json::json!({})).expect_err("must fail").to_string()
}

fn append(p: &Path, text: &str) {
    let mut s = std::fs::read_to_string(p).expect("read");
    s.push_str(text);
    std::fs::write(p, s).expect("write");
}

#[test]
fn every_bad_input_is_named() {
    let e = failure(|r| append(&r.join("messidor_data.csv"), "IM000000.jpg,1,0,1\n"));
    assert!(
        e.contains("messidor_data.csv (line 42, column `image_id`): `IM000000.jpg` is listed twice (first on line 2)"),
        "{e}"
    );
    let e = failure(|r| append(&r.join("messidor_data.csv"), "IM999999.jpg,1,0,1\n"));
    assert!(e.contains("line 42): image `IM999999.jpg` is listed but not in IMAGES/"), "{e}");
    let e = failure(|r| {
        let t = std::fs::read_to_string(r.join("messidor_data.csv")).expect("r").replacen(
            "IM000000.jpg,0,",
            "IM000000.jpg,7,",
            1,
        );
        std::fs::write(r.join("messidor_data.csv"), t).expect("w");
    });
    assert!(e.contains("line 2, column `adjudicated_dr_grade`): grade `7` is not 0–4"), "{e}");
    let e = failure(|r| std::fs::write(r.join("IMAGES/extra.png"), b"x").expect("w"));
    assert!(e.contains("IMAGES/extra.png") && e.contains("not listed in messidor_data.csv"), "{e}");
    let e = failure(|r| append(&r.join("messidor-2.csv"), "IM000000.JPG;IM000099.JPG\n"));
    assert!(e.contains("messidor-2.csv (line 22, column `left`): `IM000000.JPG` is also in exam-0001"), "{e}");
    let e = failure(|r| std::fs::remove_file(r.join("messidor-2.csv")).expect("rm"));
    assert!(e.contains("messidor-2.csv") && e.contains("set `pairs: null`"), "{e}");
    let e = failure(|r| std::fs::write(r.join("IMAGES/IM000004.JPG"), b"").expect("w"));
    assert!(e.contains("IM000004.JPG") && e.contains("empty file"), "{e}");
}
