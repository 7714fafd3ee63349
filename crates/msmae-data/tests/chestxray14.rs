//! `ingest/chestxray14` on generated releases in the published layouts: both CSV variants
//! (trailing comma, `Patient Sex`), both folder layouts, the official split with
//! validation carved by patient, multi-hot labels, and each bad-input case named.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use msmae_core::StageError;
use msmae_data::chestxray14::ChestXray14;
use msmae_data::table::{self, Split};

fn release(root: &Path, v2020: bool, flat: bool) -> Vec<String> {
    msmae_data::fixtures::chestxray14(root, v2020, flat)
}

fn run(root: &Path, out: &Path, extra: serde_json::Value) -> Result<(), StageError> {
    let base = serde_json::json!({ "root": root, "size": 16, "previews": 2, "val_fraction": 0.2 });
    common::ingest(&ChestXray14, common::with(base, extra), 5, out)
}

#[test]
fn both_csv_variants_and_layouts_give_the_same_table() {
    let mut tables = Vec::new();
    for (v2020, flat) in [(false, false), (true, true)] {
        let d = tempfile::tempdir().expect("tmp");
        let names = release(d.path(), v2020, flat);
        run(d.path(), &d.path().join("out"), serde_json::json!({})).expect("ingest");
        let meta = table::read_meta(&d.path().join("out/images.parquet")).expect("meta");
        assert!(meta.multi_label);
        assert_eq!(meta.label_names.len(), 14);
        assert_eq!((meta.label_names[0].as_str(), meta.label_names[13].as_str()), ("Atelectasis", "Hernia"));
        let rows = table::read_rows(&d.path().join("out/images.parquet")).expect("rows");
        assert_eq!(rows.len(), names.len());
        let mut patient_split = BTreeMap::new();
        for r in &rows {
            assert_eq!(r.pixels.len(), 16 * 16, "grey by default, RGBA converted");
            assert_eq!(r.label, None);
            let prev = patient_split.insert(r.patient_id.clone(), r.split);
            assert!(prev.is_none_or(|s| s == r.split), "patient {} in two splits", r.patient_id);
            let p: u32 = r.patient_id.parse().expect("numeric patient");
            assert_eq!(r.split == Split::Test, p <= 8, "official test list is kept: {}", r.id);
        }
        let n_val = patient_split.values().filter(|s| **s == Split::Val).count();
        assert_eq!(n_val, 4, "20 % of the 22 train_val patients, rounded");
        let by_id: BTreeMap<&str, &table::ImageRow> = rows.iter().map(|r| (r.id.as_str(), r)).collect();
        let hot = |id: &str| by_id[id].labels.clone().expect("labels");
        assert_eq!(hot("00000001_000.png"), vec![0; 14], "No Finding");
        let two = hot("00000002_000.png"); // Cardiomegaly
        assert_eq!((two[1], two.iter().map(|&x| u32::from(x)).sum::<u32>()), (1, 1));
        let three = hot("00000003_000.png"); // Effusion|Mass
        assert_eq!((three[2], three[4], three.iter().map(|&x| u32::from(x)).sum::<u32>()), (1, 1, 2));
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(d.path().join("out/split_report.json")).expect("report"))
                .expect("json");
        assert_eq!(report["total_patients"], 30);
        tables.push(rows.into_iter().map(|r| (r.id, r.split, r.labels, r.pixels)).collect::<Vec<_>>());
    }
    assert_eq!(tables[0], tables[1], "the variants are the same dataset");
}

fn failure(tweak: impl Fn(&Path)) -> String {
    let d = tempfile::tempdir().expect("tmp");
    release(d.path(), false, false);
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
    let e = failure(|r| append(&r.join("Data_Entry_2017.csv"), "00000009_000.png,Mass,0,9,40,M,PA,1,1,1,1\n"));
    assert!(
        e.contains(
            "Data_Entry_2017.csv (line 62, column `Image Index`): `00000009_000.png` is listed twice (first on line"
        ),
        "{e}"
    );
    let e = failure(|r| append(&r.join("Data_Entry_2017.csv"), "00000099_000.png,Pneumonitis,0,99,40,M,PA,1,1,1,1\n"));
    assert!(e.contains("line 62, column `Finding Labels`): unknown finding `Pneumonitis`"), "{e}");
    let e = failure(|r| append(&r.join("Data_Entry_2017.csv"), "00000099_000.png,Mass,0,99,40,M,PA,1,1,1,1\n"));
    assert!(e.contains("line 62): image `00000099_000.png` is listed but no such file"), "{e}");
    let e = failure(|r| std::fs::write(r.join("images_001/images/00000077_000.png"), b"x").expect("w"));
    assert!(e.contains("00000077_000.png") && e.contains("is not listed in Data_Entry_2017.csv"), "{e}");
    let e = failure(|r| std::fs::write(r.join("images_002/images/00000002_000.png"), b"").expect("w"));
    assert!(e.contains("images_002/images/00000002_000.png") && e.contains("empty file"), "{e}");
    let e = failure(|r| {
        let p = r.join("images_001/images/00000001_000.png");
        let bytes = std::fs::read(&p).expect("r");
        std::fs::write(&p, &bytes[..bytes.len() / 2]).expect("truncate");
    });
    assert!(e.contains("00000001_000.png") && e.contains("cannot decode"), "{e}");
    let e = failure(|r| {
        let text =
            std::fs::read_to_string(r.join("Data_Entry_2017.csv")).expect("r").replacen("Patient ID", "PatientID", 1);
        std::fs::write(r.join("Data_Entry_2017.csv"), text).expect("w");
    });
    assert!(e.contains("(header, column `Patient ID`): missing column `Patient ID`"), "{e}");
    let e = failure(|r| append(&r.join("test_list.txt"), "00000020_000.png\n"));
    assert!(e.contains("test_list.txt (line 16): `00000020_000.png` is also in train_val_list.txt"), "{e}");
    // patient 9's second image moved to the test list: the patient crosses the split
    let e = failure(|r| {
        let tv = std::fs::read_to_string(r.join("train_val_list.txt")).expect("r").replace("00000009_001.png\n", "");
        std::fs::write(r.join("train_val_list.txt"), tv).expect("w");
        append(&r.join("test_list.txt"), "00000009_001.png\n");
    });
    assert!(
        e.contains(
            "patient `9` has images in both train_val_list.txt and test_list.txt (00000009_000.png, 00000009_001.png"
        ),
        "{e}"
    );
    let e = failure(|r| {
        let tv = std::fs::read_to_string(r.join("train_val_list.txt")).expect("r").replace("00000030_000.png\n", "");
        std::fs::write(r.join("train_val_list.txt"), tv).expect("w");
    });
    assert!(e.contains("image `00000030_000.png` is in neither train_val_list.txt nor test_list.txt"), "{e}");
}

#[test]
fn skip_policy_rejects_and_records() {
    let d = tempfile::tempdir().expect("tmp");
    let names = release(d.path(), true, false);
    append(&d.path().join("Data_Entry_2017_v2020.csv"), "00000099_000.png,Mass,0,99,40,M,PA,1,1,1,1,\n");
    std::fs::write(d.path().join("images_001/images/00000001_000.png"), b"").expect("w");
    let tv = std::fs::read_to_string(d.path().join("train_val_list.txt")).expect("r").replace("00000009_001.png\n", "");
    std::fs::write(d.path().join("train_val_list.txt"), tv).expect("w");
    append(&d.path().join("test_list.txt"), "00000009_001.png\n");
    run(d.path(), &d.path().join("out"), serde_json::json!({ "on_error": "skip" })).expect("skips");
    let rows = table::read_rows(&d.path().join("out/images.parquet")).expect("rows");
    // rejected: the row without a file, the empty file, and patient 9 (three images)
    let p9 = names.iter().filter(|n| n.starts_with("00000009_")).count();
    assert_eq!(rows.len(), names.len() - 1 - p9);
    assert!(rows.iter().all(|r| r.patient_id != "9" && r.id != "00000001_000.png"));
    let rejects: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.path().join("out/rejects.json")).expect("rejects")).expect("json");
    let text = rejects.to_string();
    assert!(
        text.contains("Data_Entry_2017_v2020.csv:62") && text.contains("patient 9") && text.contains("empty file"),
        "{text}"
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.path().join("out/split_report.json")).expect("report")).expect("json");
    assert_eq!(report["rejected"], 3);
}
