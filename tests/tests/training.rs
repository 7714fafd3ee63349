//! The training stages end to end through the real binary, on a tiny generated study:
//! every stage kind of the MSMAE DAG runs, artifacts hold real numbers, two runs from
//! scratch give bit-identical artifacts, and a SIGKILLed pre-training resumes from its
//! checkpoint to exactly the artifact an uninterrupted run produces.

use std::fs;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use msmae_tests::{TINY_MODEL as MODEL, artifact_dir, lock_digests as digests, tiny_study as study};

fn msmae(dir: &Path, backend: &str, args: &[&str]) -> Output {
    Command::new(msmae_tests::msmae_bin())
        .current_dir(dir)
        .args(args)
        .env_remove("MSMAE_STORE")
        .env("MSMAE_BACKEND", backend)
        .output()
        .expect("run msmae")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).expect("json")
}

#[test]
fn the_msmae_study_runs_end_to_end_with_real_outputs_and_is_bit_identical() {
    let a = tempfile::tempdir().expect("tmp");
    let b = tempfile::tempdir().expect("tmp");
    for d in [&a, &b] {
        fs::write(d.path().join("tinystudy.yaml"), study()).expect("write");
    }
    let backend = "auto";
    let o = msmae(a.path(), backend, &["run", "tinystudy.yaml"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("tinystudy: 18 ran, 0 cached, 0 failed"), "{}", text(&o));
    let (store, lock) = (a.path().join(".msmae"), a.path().join("tinystudy.lock"));

    // attention maps: one per image, a lesion-coverage figure in [0, 1], overlays
    let attn = artifact_dir(&store, &lock, "attn");
    let s = json(&attn.join("summary.json"));
    assert_eq!(s["images"], 160);
    let cov = s["lesion_coverage"].as_f64().expect("coverage");
    assert!((0.0..=1.0).contains(&cov), "{s}");
    assert_eq!(fs::read_dir(attn.join("overlays")).expect("overlays").count(), 3);

    // pre-training: guided masking after one random epoch, maps refreshed, figure
    let pre = artifact_dir(&store, &lock, "pretrain");
    let h = json(&pre.join("history.json"));
    let epochs = h["epochs"].as_array().expect("epochs");
    assert_eq!(epochs.len(), 3);
    assert!(epochs[0]["masking"].as_str().unwrap_or("").starts_with("Random"), "{h}");
    assert!(epochs[1]["masking"].as_str().unwrap_or("").starts_with("Msmae"), "{h}");
    assert_eq!(epochs[2]["refreshed_maps"], true, "{h}");
    // 16 patches: 7 masked, 5 thrown, 4 visible (+ CLS) under 0.45 / 0.30
    assert_eq!(epochs[1]["tokens"], 5, "{h}");
    assert!(epochs.iter().all(|e| e.get("seconds").is_none()), "timing is not content");
    assert!(pre.join("reconstructions.png").is_file() && pre.join("attention.parquet").is_file());
    let img = image::open(pre.join("reconstructions.png")).expect("png");
    assert!(img.width() > 3 * 32 && img.height() >= 3 * 32);

    // fine-tuning: MSMAE keeps 5 tokens, full keeps 17; predictions feed eval
    let fm = json(&artifact_dir(&store, &lock, "ft-msmae").join("history.json"));
    assert!(fm["epochs"].as_array().expect("epochs").iter().all(|e| e["tokens"] == 5), "{fm}");
    let ff = json(&artifact_dir(&store, &lock, "ft-mae").join("history.json"));
    assert!(ff["epochs"].as_array().expect("epochs").iter().all(|e| e["tokens"] == 17), "{ff}");
    let m = json(&artifact_dir(&store, &lock, "eval-msmae").join("metrics.json"));
    let acc = m["accuracy"].as_f64().expect("accuracy");
    assert!((0.0..=1.0).contains(&acc) && m["n"].as_u64().unwrap_or(0) > 0, "{m}");
    let cmp = fs::read_to_string(artifact_dir(&store, &lock, "report").join("comparison.md")).expect("comparison");
    assert!(cmp.contains("eval-msmae") && cmp.contains("eval-mae"), "{cmp}");

    // segmentation transfer: Dice/IoU in [0, 1] over the test images with lesions
    let seg = json(&artifact_dir(&store, &lock, "seg").join("metrics.json"));
    let dice = seg["dice"].as_f64().expect("dice");
    assert!((0.0..=1.0).contains(&dice) && seg["images_with_lesion"].as_u64().unwrap_or(0) > 0, "{seg}");
    assert_eq!(
        seg["blocks"],
        serde_json::json!([1, 2]),
        "two evenly spread blocks of a 2-block encoder (deduplicated)"
    );

    // map refresh as DAG rounds: round 2 continues from round 1 under masks from its maps
    let r2 = json(&artifact_dir(&store, &lock, "rounds.2.pretrain").join("history.json"));
    assert!(r2["epochs"][0]["masking"].as_str().unwrap_or("").starts_with("Msmae"), "{r2}");
    let a2 = json(&artifact_dir(&store, &lock, "rounds.2.attn").join("summary.json"));
    assert_eq!(
        a2["model"].as_str(),
        digests(&lock).iter().find(|(s, _)| s == "rounds.1.pretrain").map(|(_, d)| d.as_str())
    );

    // the same pipeline from scratch elsewhere: every artifact bit-identical
    let o = msmae(b.path(), backend, &["run", "tinystudy.yaml"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(digests(&lock), digests(&b.path().join("tinystudy.lock")));
}

const LONG: &str = "name: resume\nseed: 9\nstages:\n  data: { uses: ingest/synthetic, with: { images: 256, size: 32, previews: 1 } }\n  pretrain: { uses: mae/pretrain, needs: [data], with: { model: { patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2, decoder_dim: 16, decoder_depth: 1, decoder_heads: 2 }, epochs: 80, batch_size: 16, warmup_epochs: 2, checkpoint_every: 1 } }\n";

const LONG_SEG: &str = "name: resume\nseed: 9\nstages:\n  data: { uses: ingest/synthetic, with: { images: 256, size: 32, previews: 1 } }\n  seg: { uses: segment/setr-pup, needs: [data], with: { model: { patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2 }, epochs: 60, batch_size: 16, head_channels: 8, figure_images: 1, checkpoint_every: 1 } }\n";

/// Run `yaml` (a pipeline `resume` whose last stage trains for `epochs` with a checkpoint
/// every epoch) once whole; then again, SIGKILLed once a few epochs are checkpointed, and
/// re-run: the resumed run must say so and commit exactly the uninterrupted run's artifacts.
fn killed_training_resumes_to_the_uninterrupted_result(yaml: &str, epochs: u64) {
    let backend = "flex";
    let whole = tempfile::tempdir().expect("tmp");
    fs::write(whole.path().join("resume.yaml"), yaml).expect("write");
    let o = msmae(whole.path(), backend, &["run", "resume.yaml"]);
    assert!(o.status.success(), "{}", text(&o));
    let want = digests(&whole.path().join("resume.lock"));

    let cut = tempfile::tempdir().expect("tmp");
    fs::write(cut.path().join("resume.yaml"), yaml).expect("write");
    let o = msmae(cut.path(), backend, &["run", "resume.yaml", "--until", "data"]);
    assert!(o.status.success(), "{}", text(&o));
    let mut child = Command::new(msmae_tests::msmae_bin())
        .current_dir(cut.path())
        .args(["run", "resume.yaml"])
        .env_remove("MSMAE_STORE")
        .env("MSMAE_BACKEND", backend)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    // Kill it (SIGKILL: no clean-up) once a checkpoint of a few epochs exists.
    let resume = cut.path().join(".msmae/resume");
    let t = Instant::now();
    let epochs_done = loop {
        let state = fs::read_dir(&resume)
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| e.ok())
            .map(|e| e.path().join("state.json"));
        if let Some(v) =
            state.and_then(|p| fs::read(p).ok()).and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        {
            let n = v["epochs_done"].as_u64().unwrap_or(0);
            if n >= 3 {
                child.kill().expect("kill");
                break n;
            }
        }
        assert!(
            child.try_wait().expect("wait").is_none(),
            "training finished before it could be killed; make it longer"
        );
        assert!(t.elapsed() < Duration::from_secs(300), "no checkpoint appeared");
        std::thread::sleep(Duration::from_millis(10));
    };
    let _ = child.wait();
    assert!(epochs_done < epochs);
    // gc keeps an interrupted run's checkpoints unless pruning
    let o = msmae(cut.path(), backend, &["gc", "resume.yaml", "--dry-run"]);
    assert!(text(&o).contains(", 0 checkpoint dirs"), "{}", text(&o));
    let o = msmae(cut.path(), backend, &["gc", "resume.yaml", "--prune", "--dry-run"]);
    assert!(text(&o).contains(", 1 checkpoint dirs"), "{}", text(&o));
    let o = msmae(cut.path(), backend, &["run", "resume.yaml"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("resuming after epoch"), "{}", text(&o));
    assert_eq!(digests(&cut.path().join("resume.lock")), want, "resumed run differs from the uninterrupted one");
    assert!(
        fs::read_dir(&resume).map(|d| d.count()).unwrap_or(0) == 0,
        "checkpoints are removed once the artifact is committed"
    );
}

#[test]
fn killed_pretraining_resumes_to_the_uninterrupted_result() {
    killed_training_resumes_to_the_uninterrupted_result(LONG, 80);
}

#[test]
fn killed_segmentation_training_resumes_to_the_uninterrupted_result() {
    killed_training_resumes_to_the_uninterrupted_result(LONG_SEG, 60);
}

#[test]
fn bad_training_configs_are_refused_before_anything_runs() {
    let d = tempfile::tempdir().expect("tmp");
    let bad = "name: bad\nstages:\n  data: { uses: ingest/synthetic, with: { images: 16, size: 32 } }\n  ft: { uses: finetune/full, needs: [data], with: { mask_ratio: 0.5 } }\n  pre: { uses: mae/pretrain, needs: [data], with: { blr: 1.0e-3, min_lr: 1.0, batch_size: 8 } }\n  seg: { uses: segment/setr-pup, needs: [data], with: { blocks: [0] } }\n";
    fs::write(d.path().join("bad.yaml"), bad).expect("write");
    let o = msmae(d.path(), "flex", &["run", "bad.yaml"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("bad.yaml:4:") && t.contains("stages.ft.with.mask_ratio") && t.contains("finetune/msmae"),
        "{t}"
    );
    assert!(t.contains("bad.yaml:5:") && t.contains("stages.pre.with.min_lr"), "{t}");
    assert!(t.contains("stages.seg.with.blocks"), "{t}");
    assert!(
        !d.path().join(".msmae/objects").exists()
            || fs::read_dir(d.path().join(".msmae/objects")).map(|r| r.count()).unwrap_or(0) == 0,
        "nothing ran"
    );
}

/// How often a training stage checkpoints is not part of what it produces: changing it
/// re-uses the cached artifact; changing the epochs does not.
#[test]
fn checkpoint_frequency_is_not_part_of_the_cache_key() {
    let d = tempfile::tempdir().expect("tmp");
    let yaml = |extra: &str| {
        format!(
            "name: ck\nseed: 4\nstages:\n  data: {{ uses: ingest/synthetic, with: {{ images: 64, size: 32, previews: 1 }} }}\n  ft: {{ uses: finetune/full, needs: [data], with: {{ model: {{ patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2 }}, batch_size: 16, warmup_epochs: 0{extra} }} }}\n  seg: {{ uses: segment/setr-pup, needs: [data], with: {{ model: {{ patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2 }}, batch_size: 16, head_channels: 8, figure_images: 1{extra} }} }}\n"
        )
    };
    let run = |y: String| {
        fs::write(d.path().join("ck.yaml"), y).expect("write");
        let o = msmae(d.path(), "flex", &["run", "ck.yaml"]);
        assert!(o.status.success(), "{}", text(&o));
        text(&o)
    };
    assert!(run(yaml(", epochs: 1")).contains("ck: 3 ran, 0 cached"));
    let again = run(yaml(", epochs: 1, checkpoint_every: 1"));
    assert!(again.contains("ck: 0 ran, 3 cached"), "a new checkpoint frequency re-ran a stage: {again}");
    let longer = run(yaml(", epochs: 2, checkpoint_every: 1"));
    assert!(longer.contains("ck: 2 ran, 1 cached"), "more epochs must re-run both training stages: {longer}");
}

/// A pre-trained MAE leaves through `export/pytorch` and comes back through
/// `import/pytorch` in another pipeline (as MAE's released weights would): the imported
/// checkpoint holds the very same weights, and fine-tuning starts from it.
#[test]
fn an_exported_mae_imports_into_another_pipeline_and_fine_tunes() {
    let d = tempfile::tempdir().expect("tmp");
    let data = "  data: { uses: ingest/synthetic, with: { images: 64, size: 32, previews: 1 } }\n";
    let first = format!(
        "name: first\nseed: 2\nstages:\n{data}  pre: {{ uses: mae/pretrain, needs: [data], with: {{ model: {MODEL}, epochs: 1, batch_size: 16, warmup_epochs: 0, figure_images: 1 }} }}\n  out: {{ uses: export/pytorch, needs: [pre] }}\n"
    );
    fs::write(d.path().join("first.yaml"), first).expect("write");
    let o = msmae(d.path(), "flex", &["run", "first.yaml"]);
    assert!(o.status.success(), "{}", text(&o));
    let (store, lock) = (d.path().join(".msmae"), d.path().join("first.lock"));
    let pre = artifact_dir(&store, &lock, "pre");
    let meta = json(&pre.join("model.json"));
    fs::create_dir_all(d.path().join("weights")).expect("mkdir");
    for f in ["model.safetensors", "config.json"] {
        fs::copy(artifact_dir(&store, &lock, "out").join(f), d.path().join("weights").join(f)).expect("copy");
    }
    // No mean/std given: the export's config.json beside the weights supplies them.
    let second = format!(
        "name: second\nseed: 2\nstages:\n{data}  mae: {{ uses: import/pytorch, with: {{ weights: weights/model.safetensors, checkpoint: mae, image_size: 32, channels: 1, model: {MODEL} }} }}\n  ft: {{ uses: finetune/full, needs: [mae, data], with: {{ epochs: 1, batch_size: 16, warmup_epochs: 0 }} }}\n"
    );
    fs::write(d.path().join("second.yaml"), second).expect("write");
    let o = msmae(d.path(), "flex", &["run", "second.yaml"]);
    assert!(o.status.success() && text(&o).contains("second: 2 ran, 1 cached"), "{}", text(&o));
    let lock2 = d.path().join("second.lock");
    assert_eq!(
        fs::read(artifact_dir(&store, &lock2, "mae").join("model.safetensors")).expect("imported"),
        fs::read(pre.join("model.safetensors")).expect("pre-trained"),
        "export → import is bit-exact"
    );
    assert_eq!(
        json(&artifact_dir(&store, &lock2, "mae").join("model.json"))["normalizer"],
        meta["normalizer"],
        "the export's normalisation came back"
    );
    let h = json(&artifact_dir(&store, &lock2, "ft").join("history.json"));
    assert_eq!(h["epochs"].as_array().map(Vec::len), Some(1), "{h}");
    // A mismatched architecture stops the import naming the file and the tensors.
    let wrong = fs::read_to_string(d.path().join("second.yaml"))
        .expect("read")
        .replace("depth: 2, num_heads: 2, decoder_dim", "depth: 3, num_heads: 2, decoder_dim");
    fs::write(d.path().join("second.yaml"), wrong).expect("write");
    let o = msmae(d.path(), "flex", &["run", "second.yaml"]);
    assert!(
        !o.status.success() && text(&o).contains("model.safetensors") && text(&o).contains("blocks.2."),
        "{}",
        text(&o)
    );
}

/// `finetune/linear` on a tiny pre-trained MAE: the probe trains (LARS, batch norm + head),
/// leaves an ordinary ViT classifier that `eval/classify` scores, and its encoder is the
/// MAE's, untouched (the CLS-attention maps of both are identical); CLS and mean pooling
/// give different probes.
#[test]
fn a_linear_probe_trains_a_head_on_a_frozen_encoder_and_is_evaluated() {
    let d = tempfile::tempdir().expect("tmp");
    let probe = "epochs: 3, batch_size: 16, warmup_epochs: 1, blr: 1.0";
    let yaml = format!(
        "name: probe\nseed: 3\nstages:\n  data: {{ uses: ingest/synthetic, with: {{ images: 96, size: 32, modality: xray, previews: 1 }} }}\n  pre: {{ uses: mae/pretrain, needs: [data], with: {{ model: {MODEL}, epochs: 1, batch_size: 16, warmup_epochs: 0, figure_images: 1 }} }}\n  lin: {{ uses: finetune/linear, needs: [pre, data], with: {{ {probe} }} }}\n  lin-mean: {{ uses: finetune/linear, needs: [pre, data], with: {{ {probe}, pool: mean }} }}\n  ev: {{ uses: eval/classify, needs: [lin] }}\n  attn-pre: {{ uses: attention/extract, needs: [pre, data], with: {{ overlays: 0 }} }}\n  attn-lin: {{ uses: attention/extract, needs: [lin, data], with: {{ overlays: 0 }} }}\n"
    );
    fs::write(d.path().join("probe.yaml"), yaml).expect("write");
    let o = msmae(d.path(), "auto", &["run", "probe.yaml"]);
    assert!(o.status.success(), "{}", text(&o));
    let (store, lock) = (d.path().join(".msmae"), d.path().join("probe.lock"));
    let h = json(&artifact_dir(&store, &lock, "lin").join("history.json"));
    let epochs = h["epochs"].as_array().expect("epochs");
    assert_eq!(epochs.len(), 3, "{h}");
    assert!(
        epochs
            .iter()
            .all(|e| e["train_loss"].as_f64().is_some_and(f64::is_finite) && e["val_accuracy"].as_f64().is_some()),
        "{h}"
    );
    assert_eq!(h["summary"]["pool"], "cls", "{h}");
    let meta = json(&artifact_dir(&store, &lock, "lin").join("model.json"));
    assert_eq!((meta["kind"].as_str(), meta["trained_by"].as_str()), (Some("vit"), Some("finetune/linear")), "{meta}");
    let m = json(&artifact_dir(&store, &lock, "ev").join("metrics.json"));
    let acc = m["accuracy"].as_f64().unwrap_or_else(|| panic!("accuracy: {m}"));
    assert!((0.0..=1.0).contains(&acc), "{m}");
    // the frozen encoder: the classifier's blocks read the same CLS attention as the MAE's
    let maps = |stage: &str| {
        let (_, rows) =
            msmae_data::attention::read_attention(&artifact_dir(&store, &lock, stage).join("attention.parquet"))
                .expect("maps");
        rows.into_iter().map(|r| r.weights).collect::<Vec<_>>()
    };
    assert_eq!(maps("attn-pre"), maps("attn-lin"), "the probe left the encoder as it was");
    let preds =
        |stage: &str| fs::read(artifact_dir(&store, &lock, stage).join("predictions.parquet")).expect("predictions");
    assert_ne!(preds("lin"), preds("lin-mean"), "CLS and mean pooling are different probes");
    // a bad config is refused naming the field
    fs::write(
        d.path().join("bad.yaml"),
        fs::read_to_string(d.path().join("probe.yaml"))
            .expect("read")
            .replace("name: probe", "name: bad")
            .replace("pool: mean", "pool: max"),
    )
    .expect("write");
    let o = msmae(d.path(), "auto", &["run", "bad.yaml"]);
    assert!(!o.status.success() && text(&o).contains("pool"), "{}", text(&o));
}

/// The map-method and visible-token switches end to end on tiny data: the diffuse benchmark condition, the three
/// ways `attention/extract` reads a map, fine-tuning's visible tokens from the lowest,
/// uniform or highest attention, a `repeat:` group of seeds and `eval/compare` summarising
/// it (mean ± sd per method, paired differences over the shared seeds).
#[test]
fn map_methods_visible_token_ablations_and_seed_groups_run_and_report() {
    let d = tempfile::tempdir().expect("tmp");
    let ft = "epochs: 2, batch_size: 16, warmup_epochs: 1";
    let yaml = format!(
        r#"name: switches
seed: 5
stages:
  data: {{ uses: ingest/synthetic, with: {{ images: 120, size: 32, modality: xray, previews: 1, evidence: diffuse, contrast: 0.3 }} }}
  supervised: {{ uses: attention/train-supervised, needs: [data], with: {{ model: {MODEL}, {ft} }} }}
  attn-cls: {{ uses: attention/extract, needs: [supervised, data], with: {{ overlays: 1 }} }}
  attn-rollout: {{ uses: attention/extract, needs: [supervised, data], with: {{ overlays: 1, method: rollout }} }}
  attn-gradient: {{ uses: attention/extract, needs: [supervised, data], with: {{ overlays: 1, method: gradient }} }}
  attn-smooth: {{ uses: attention/extract, needs: [supervised, data], with: {{ overlays: 1, method: rollout, smooth: {{ op: max, size: 3 }} }} }}
  masks: {{ uses: mask/msmae, needs: [attn-smooth] }}
  pretrain: {{ uses: mae/pretrain, needs: [data], with: {{ model: {MODEL}, {ft} }} }}
  pretrain-smooth: {{ uses: mae/pretrain, needs: [data, masks], with: {{ model: {MODEL}, {ft}, warmup_mask_epochs: 0, refresh_every: 1, map_method: rollout, map_smooth: {{ op: mean, size: 3 }} }} }}
  ft-smooth: {{ uses: finetune/msmae, needs: [pretrain, data], with: {{ {ft}, refresh_every: 1, map_method: gradient, map_smooth: {{ op: max, size: 3 }} }} }}
  seeds:
    repeat: 2
    stages:
      vis-highest: {{ uses: finetune/msmae, seed: "${{round}}", needs: [pretrain, data], with: {{ {ft}, visible: highest, refresh_every: 1 }} }}
      vis-uniform: {{ uses: finetune/msmae, seed: "${{round}}", needs: [pretrain, data], with: {{ {ft}, visible: uniform }} }}
      eval-highest: {{ uses: eval/classify, needs: [vis-highest] }}
      eval-uniform: {{ uses: eval/classify, needs: [vis-uniform] }}
  report: {{ uses: eval/compare, needs: [seeds.1.eval-highest, seeds.1.eval-uniform, seeds.2.eval-highest, seeds.2.eval-uniform] }}
"#
    );
    fs::write(d.path().join("switches.yaml"), yaml).expect("write");
    let o = msmae(d.path(), "auto", &["run", "switches.yaml"]);
    assert!(o.status.success(), "{}", text(&o));
    let (store, lock) = (d.path().join(".msmae"), d.path().join("switches.lock"));

    // diffuse data: large marked regions, the diffuse class names
    let report =
        fs::read_to_string(artifact_dir(&store, &lock, "data").join("split_report.json")).expect("split report");
    assert!(
        report.contains("lucency") && report.contains("reticular") && !report.contains("nodule"),
        "the diffuse class names: {report}"
    );

    // three map methods, each a map per image, each named in its summary, not all equal
    let maps: Vec<Vec<u8>> = ["cls", "rollout", "gradient"]
        .iter()
        .map(|m| {
            let dir = artifact_dir(&store, &lock, &format!("attn-{m}"));
            let s = json(&dir.join("summary.json"));
            assert_eq!(s["method"], *m, "{s}");
            assert_eq!(s["images"], 120, "{s}");
            let cov = s["lesion_coverage"].as_f64().expect("coverage: diffuse regions are marked");
            assert!((0.0..=1.0).contains(&cov), "{s}");
            fs::read(dir.join("attention.parquet")).expect("maps")
        })
        .collect();
    assert!(maps[0] != maps[1] && maps[0] != maps[2] && maps[1] != maps[2], "three methods, three sets of maps");

    // smoothing: the raw rollout maps kept beside the smoothed ones, which are what the
    // summary scores and the masks rank by; every smoothed map is the 3×3 max of its raw map
    let dir = artifact_dir(&store, &lock, "attn-smooth");
    let s = json(&dir.join("summary.json"));
    assert_eq!(
        (s["method"].as_str(), &s["smooth"]),
        (Some("rollout"), &serde_json::json!({ "op": "max", "size": 3 })),
        "{s}"
    );
    let read = |p: &Path| -> ([usize; 2], Vec<Vec<f32>>) {
        let (meta, rows) = msmae_data::attention::read_attention(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        ([meta.grid[0] as usize, meta.grid[1] as usize], rows.into_iter().map(|r| r.weights).collect())
    };
    let (grid, smoothed) = read(&dir.join("attention.parquet"));
    let (_, plain) = read(&dir.join("attention_raw.parquet"));
    let (_, rollout) = read(&artifact_dir(&store, &lock, "attn-rollout").join("attention.parquet"));
    assert_eq!(plain, rollout, "the raw maps are the plain rollout stage's");
    assert_eq!((grid, smoothed.len()), ([4, 4], 120));
    // the 3×3 max, cut at the border, computed here independently
    let max3 = |m: &[f32]| -> Vec<f32> {
        let at = |y: i64, x: i64| {
            if (0..4).contains(&y) && (0..4).contains(&x) { m[(y * 4 + x) as usize] } else { f32::NEG_INFINITY }
        };
        (0..16i64)
            .map(|i| {
                (-1..=1)
                    .flat_map(|dy| (-1..=1).map(move |dx| (dy, dx)))
                    .map(|(dy, dx)| at(i / 4 + dy, i % 4 + dx))
                    .fold(f32::NEG_INFINITY, f32::max)
            })
            .collect()
    };
    for (a, b) in smoothed.iter().zip(&plain) {
        assert_eq!(a, &max3(b), "a smoothed map is the 3×3 max of its raw map");
    }
    assert!(smoothed != plain, "smoothing changed the maps");
    // the training loops refresh with the configured reading
    let h = json(&artifact_dir(&store, &lock, "pretrain-smooth").join("history.json"));
    assert_eq!(h["epochs"][1]["refreshed_maps"], true, "{h}");
    let h = json(&artifact_dir(&store, &lock, "ft-smooth").join("history.json"));
    assert_eq!(h["epochs"][1]["refreshed_maps"], true, "{h}");

    // visible tokens: 16 patches at 32 px / 8 px → 4 visible (+ CLS) whatever their source
    for (stage, masking) in [("seeds.1.vis-highest", "Highest"), ("seeds.2.vis-uniform", "Random")] {
        let h = json(&artifact_dir(&store, &lock, stage).join("history.json"));
        let e = &h["epochs"][0];
        assert!(e["masking"].as_str().unwrap_or("").starts_with(masking), "{stage}: {h}");
        assert_eq!(e["tokens"], 5, "{stage}: {h}");
    }
    // the seed group: rounds are seeds, so the two rounds' models differ
    let dg = digests(&lock);
    let digest = |s: &str| dg.iter().find(|(n, _)| n == s).map(|(_, d)| d.clone()).unwrap_or_default();
    assert_ne!(digest("seeds.1.vis-highest"), digest("seeds.2.vis-highest"));

    // eval/compare over the seeds: a summary per method, one paired row
    let c = json(&artifact_dir(&store, &lock, "report").join("comparison.json"));
    let methods: Vec<&str> =
        c["methods"].as_array().expect("methods").iter().filter_map(|m| m["method"].as_str()).collect();
    assert_eq!(methods, ["seeds.*.eval-highest", "seeds.*.eval-uniform"], "{c}");
    assert_eq!(c["methods"][0]["rounds"], serde_json::json!([1, 2]), "{c}");
    assert_eq!(c["paired"].as_array().map(Vec::len), Some(1), "{c}");
    let md = fs::read_to_string(artifact_dir(&store, &lock, "report").join("comparison.md")).expect("md");
    assert!(md.contains("Over rounds (seeds)") && md.contains("seeds.*.eval-uniform − seeds.*.eval-highest"), "{md}");
    // and `msmae show` prints the summaries as mean ± sd
    let o = msmae(d.path(), "auto", &["show", "switches.yaml", "report"]);
    assert!(o.status.success() && text(&o).contains(" ± "), "{}", text(&o));

    // a smoothing of even size is refused naming the field
    let bad = fs::read_to_string(d.path().join("switches.yaml"))
        .expect("read")
        .replace("smooth: { op: max, size: 3 }", "smooth: { op: max, size: 2 }");
    fs::write(d.path().join("even.yaml"), bad.replace("name: switches", "name: even")).expect("write");
    let o = msmae(d.path(), "auto", &["run", "even.yaml"]);
    assert!(!o.status.success() && text(&o).contains("smooth") && text(&o).contains("odd"), "{}", text(&o));

    // gradient maps need a classifier: an MAE encoder without MSMAE's CE head (cls_weight
    // 0) is refused naming the field (one with the head has a predicted class: allowed)
    fs::write(
        d.path().join("bad.yaml"),
        format!("name: bad\nseed: 5\nstages:\n  data: {{ uses: ingest/synthetic, with: {{ images: 120, size: 32, modality: xray, previews: 1, evidence: diffuse, contrast: 0.3 }} }}\n  pretrain: {{ uses: mae/pretrain, needs: [data], with: {{ model: {MODEL}, {ft}, cls_weight: 0.0 }} }}\n  attn: {{ uses: attention/extract, needs: [pretrain, data], with: {{ method: gradient }} }}\n"),
    )
    .expect("write");
    let o = msmae(d.path(), "auto", &["run", "bad.yaml"]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("method") && text(&o).contains("classification head"), "{}", text(&o));
}
