//! The shipped dataset pipelines (`pipelines/chestxray.yaml`, `messidor2.yaml`,
//! `busi.yaml`), unchanged, on tiny releases generated in the publishers' layouts
//! (`msmae_data::fixtures`) and CPU-sized by `--set`: every stage runs, including
//! multi-label training and mean-AUC evaluation on ChestX-ray14 and segmentation transfer
//! on BUSI's merged masks.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn msmae(dir: &Path, args: &[&str]) -> Output {
    Command::new(msmae_tests::msmae_bin())
        .current_dir(dir)
        .args(args)
        .env_remove("MSMAE_STORE")
        .output()
        .expect("run msmae")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// A temp project: `pipelines/<name>.yaml` copied from the repository, `data/` beside it.
fn project(name: &str) -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().expect("tmp");
    fs::create_dir_all(d.path().join("pipelines")).expect("mkdir");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipelines").join(format!("{name}.yaml"));
    fs::copy(&src, d.path().join("pipelines").join(format!("{name}.yaml"))).expect("copy pipeline");
    let data = d.path().join("data");
    (d, data)
}

const TINY: &[&str] = &[
    "--set",
    "params.preset=tiny",
    "--set",
    "params.size=32",
    "--set",
    "params.batch=8",
    "--set",
    "params.pretrain_epochs=2",
    "--set",
    "params.pretrain_warmup=1",
    "--set",
    "params.finetune_epochs=2",
    "--set",
    "params.finetune_warmup=1",
];

/// `stage → committed artifact directory`, from the lock file.
fn artifact(dir: &Path, name: &str, stage: &str) -> PathBuf {
    let lock: serde_yaml::Value =
        serde_yaml::from_str(&fs::read_to_string(dir.join(format!("pipelines/{name}.lock"))).expect("lock"))
            .expect("yaml");
    let d = lock["stages"]
        .as_sequence()
        .expect("stages")
        .iter()
        .find(|s| s["name"].as_str() == Some(stage))
        .and_then(|s| s["output"]["digest"].as_str())
        .expect("stage in lock")
        .to_string();
    let store = [dir.join(".msmae"), dir.join("pipelines/.msmae")].into_iter().find(|p| p.is_dir()).expect("store");
    store.join("objects").join(&d[..2]).join(&d).join("data")
}

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).expect("json")
}

fn run(dir: &Path, name: &str, extra: &[&str]) {
    let mut args = vec!["run".to_string(), format!("pipelines/{name}.yaml")];
    args.extend(TINY.iter().chain(extra).map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = msmae(dir, &args);
    assert!(o.status.success(), "{name}: {}", text(&o));
    assert!(text(&o).contains("0 failed"), "{}", text(&o));
}

#[test]
fn chestxray_pipeline_trains_multi_label_and_reports_mean_auc() {
    let (d, data) = project("chestxray");
    msmae_data::fixtures::chestxray14(&data.join("chestxray14"), true, false);
    run(d.path(), "chestxray", &["--set", "params.probe_epochs=2"]);
    for stage in ["eval-msmae", "eval-mae", "eval-scratch", "eval-lin-msmae", "eval-lin-mae"] {
        let m = json(&artifact(d.path(), "chestxray", stage).join("metrics.json"));
        assert_eq!(m["multi_label"], true, "{stage}: {m}");
        assert_eq!(m["label_names"].as_array().map(Vec::len), Some(14), "{stage}");
        assert!(m["n"].as_u64().unwrap_or(0) > 0, "{stage}: {m}");
        let auc = m["mean_auc"].as_f64().unwrap_or_else(|| panic!("{stage}: no mean AUC: {m}"));
        assert!((0.0..=1.0).contains(&auc), "{stage}: {m}");
    }
    // multi-label: the best epoch is picked on the val mean AUC (select_on: auto)
    let h = json(&artifact(d.path(), "chestxray", "ft-scratch").join("history.json"));
    let epochs = h["epochs"].as_array().expect("epochs");
    assert!(epochs.iter().all(|e| e["val_auc"].as_f64().is_some_and(|a| (0.0..=1.0).contains(&a)) && e.get("val_accuracy").is_none()), "{h}");
    let report = json(&artifact(d.path(), "chestxray", "data").join("split_report.json"));
    assert!(report["splits"]["test"]["images"].as_u64().unwrap_or(0) > 0, "{report}");
    // A rehearsal on a sample of the patients: every split kept, whole patients, fewer rows.
    let o = msmae(
        d.path(),
        &[
            "run",
            "pipelines/chestxray.yaml",
            "--until",
            "data",
            "--set",
            "params.sample=0.3",
            "--set",
            "params.size=32",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let small = json(&artifact(d.path(), "chestxray", "data").join("split_report.json"));
    for split in ["train", "val", "test"] {
        let (all, some) = (
            report["splits"][split]["images"].as_u64().unwrap_or(0),
            small["splits"][split]["images"].as_u64().unwrap_or(0),
        );
        assert!(some > 0 && some < all, "{split}: {some} of {all} images in the sample: {small}");
    }
    // the PyTorch exports (their numbers are checked against timm in msmae-train's tests)
    let c = json(&artifact(d.path(), "chestxray", "export-classifier").join("config.json"));
    assert_eq!(
        (
            c["library"].as_str(),
            c["model_args"]["num_classes"].as_u64(),
            c["model_args"]["global_pool"].as_str(),
            c["multi_label"].as_bool()
        ),
        (Some("timm"), Some(14), Some("avg"), Some(true)),
        "{c}"
    );
    let c = json(&artifact(d.path(), "chestxray", "export-pretrain").join("config.json"));
    assert_eq!(c["library"], "mae", "{c}");
    assert!(artifact(d.path(), "chestxray", "export-pretrain").join("model.safetensors").is_file());
}

#[test]
fn messidor2_pipeline_runs_on_the_published_layout() {
    let (d, data) = project("messidor2");
    msmae_data::fixtures::messidor2(&data.join("messidor2"), 30);
    run(d.path(), "messidor2", &[]);
    let m = json(&artifact(d.path(), "messidor2", "eval").join("metrics.json"));
    assert_eq!(m["label_names"], serde_json::json!(["none", "mild", "moderate", "severe", "proliferative"]));
    assert!((0.0..=1.0).contains(&m["accuracy"].as_f64().expect("accuracy")), "{m}");
    let rejects = json(&artifact(d.path(), "messidor2", "data").join("rejects.json"));
    assert_eq!(rejects.as_array().map(Vec::len), Some(1), "the one ungradable image: {rejects}");
}

#[test]
fn busi_pipeline_segments_with_merged_masks() {
    let (d, data) = project("busi");
    msmae_data::fixtures::busi(&data.join("busi/Dataset_BUSI_with_GT"), [24, 16, 10]);
    run(d.path(), "busi", &["--set", "params.segment_epochs=2"]);
    for stage in ["seg-msmae", "seg-scratch"] {
        let m = json(&artifact(d.path(), "busi", stage).join("metrics.json"));
        let dice = m["dice"].as_f64().unwrap_or_else(|| panic!("{stage}: {m}"));
        assert!((0.0..=1.0).contains(&dice) && m["images_with_lesion"].as_u64().unwrap_or(0) > 0, "{stage}: {m}");
    }
    let seg = json(&artifact(d.path(), "busi", "seg-msmae").join("metrics.json"));
    let pc = &seg["per_class"];
    if let Some(normal) = pc.get("normal") {
        assert!(normal["images_with_lesion"] == 0 && normal["dice"].is_null(), "normal images have empty masks: {pc}");
    }
    assert!(pc["benign"]["dice"].as_f64().is_some() || pc["malignant"]["dice"].as_f64().is_some(), "{pc}");
    let m = json(&artifact(d.path(), "busi", "eval").join("metrics.json"));
    assert_eq!(m["label_names"], serde_json::json!(["benign", "malignant", "normal"]));
}

/// Multi-class segmentation from a manifest: class-index masks (0 background, 1 organ,
/// 2 lesion inside it) → `segment/setr-pup` with K-class heads, CE + Dice, Dice/IoU per
/// mask class.
#[test]
fn multi_class_masks_from_a_manifest_segment_per_class() {
    let d = tempfile::tempdir().expect("tmp");
    let data = d.path().join("data");
    fs::create_dir_all(&data).expect("mkdir");
    let mut csv = String::from("path,mask,patient\n");
    for i in 0..40u32 {
        let (cx, cy) = (8 + i % 12, 10 + (i * 7) % 10);
        let class = |x: u32, y: u32| {
            if x.abs_diff(cx) < 3 && y.abs_diff(cy) < 3 {
                2u8
            } else if x.abs_diff(cx) < 7 && y.abs_diff(cy) < 7 {
                1
            } else {
                0
            }
        };
        image::GrayImage::from_fn(32, 32, |x, y| {
            image::Luma([[30, 120, 230][usize::from(class(x, y))] + (i % 5) as u8])
        })
        .save(data.join(format!("img{i}.png")))
        .expect("image");
        image::GrayImage::from_fn(32, 32, |x, y| image::Luma([class(x, y)]))
            .save(data.join(format!("img{i}_m.png")))
            .expect("mask");
        csv.push_str(&format!("img{i}.png,img{i}_m.png,P{i}\n"));
    }
    fs::write(data.join("manifest.csv"), csv).expect("csv");
    let pipeline = r#"name: organs
seed: 5
stages:
  data: { uses: ingest/manifest, with: { manifest: data/manifest.csv, mask_column: mask, patient_column: patient, mask_classes: [background, organ, lesion], size: 32, channels: 1 } }
  seg: { uses: segment/setr-pup, needs: [data], with: { model: { preset: tiny }, epochs: 3, batch_size: 8, lr: 1.0e-3, head_channels: 8, figure_images: 2 } }
"#;
    fs::write(d.path().join("organs.yaml"), pipeline).expect("pipeline");
    let o = msmae(d.path(), &["run", "organs.yaml"]);
    assert!(o.status.success(), "{}", text(&o));
    let lock: serde_yaml::Value =
        serde_yaml::from_str(&fs::read_to_string(d.path().join("organs.lock")).expect("lock")).expect("yaml");
    let digest = lock["stages"]
        .as_sequence()
        .expect("stages")
        .iter()
        .find(|s| s["name"].as_str() == Some("seg"))
        .and_then(|s| s["output"]["digest"].as_str())
        .expect("seg")
        .to_string();
    let m = json(&d.path().join(".msmae/objects").join(&digest[..2]).join(&digest).join("data/metrics.json"));
    for class in ["organ", "lesion"] {
        let c = &m["per_mask_class"][class];
        assert!(
            c["dice"].as_f64().is_some_and(|v| (0.0..=1.0).contains(&v)) && c["images"].as_u64().unwrap_or(0) > 0,
            "{class}: {m}"
        );
    }
    assert!(m["per_mask_class"].get("background").is_none(), "background is not scored");
    // a mask value outside the named classes is named
    image::GrayImage::from_pixel(32, 32, image::Luma([7])).save(data.join("img3_m.png")).expect("bad mask");
    let o = msmae(d.path(), &["run", "organs.yaml"]);
    assert!(
        !o.status.success()
            && text(&o).contains("img3_m.png")
            && text(&o).contains("mask value 7 is not a class index"),
        "{}",
        text(&o)
    );
}

/// A manifest of absolute paths outside its folder: editing a listed image re-runs the
/// ingestion, files beside the manifest that it does not list do not.
#[test]
fn a_manifest_stage_re_runs_when_a_listed_image_elsewhere_changes() {
    let d = tempfile::tempdir().expect("tmp");
    let far = tempfile::tempdir().expect("tmp");
    let mut csv = String::from("path,label\n");
    for i in 0..6u32 {
        let p = far.path().join(format!("scan{i}.png"));
        image::GrayImage::from_fn(16, 16, |x, _| image::Luma([(x * 10 + i) as u8])).save(&p).expect("image");
        csv.push_str(&format!("{},{}\n", p.display(), ["a", "b"][(i % 2) as usize]));
    }
    fs::create_dir_all(d.path().join("data")).expect("mkdir");
    fs::write(d.path().join("data/manifest.csv"), csv).expect("csv");
    fs::write(
        d.path().join("p.yaml"),
        "name: p\nstages:\n  data: { uses: ingest/manifest, with: { manifest: data/manifest.csv, label_column: label, size: 16, channels: 1, allow_outside_root: true } }\n",
    )
    .expect("pipeline");
    let run = |want: &str| {
        let o = msmae(d.path(), &["run", "p.yaml"]);
        assert!(o.status.success() && text(&o).contains(want), "want `{want}`: {}", text(&o));
    };
    run("1 ran, 0 cached");
    run("0 ran, 1 cached");
    fs::write(d.path().join("data/notes.txt"), "not listed").expect("w");
    image::GrayImage::from_pixel(16, 16, image::Luma([1])).save(far.path().join("unlisted.png")).expect("image");
    run("0 ran, 1 cached");
    image::GrayImage::from_pixel(16, 16, image::Luma([200])).save(far.path().join("scan3.png")).expect("image");
    run("1 ran, 0 cached");
}

/// Without its dataset, every shipped dataset pipeline stops before running anything and
/// names the folder it expected.
#[test]
fn dataset_pipelines_refuse_to_start_without_their_data() {
    for (name, folder) in [
        ("chestxray", "data/chestxray14"),
        ("messidor2", "data/messidor2"),
        ("busi", "data/busi"),
        ("ham10000", "data/ham10000"),
        ("btmd", "data/btmd"),
    ] {
        let (d, _) = project(name);
        let o = msmae(d.path(), &["run", &format!("pipelines/{name}.yaml")]);
        let t = text(&o);
        assert!(!o.status.success() && t.contains(folder) && t.contains("data/README.md"), "{name}: {t}");
        assert!(
            !d.path().join(".msmae/objects").exists() && !d.path().join("pipelines/.msmae/objects").exists(),
            "{name}: nothing ran"
        );
    }
}
