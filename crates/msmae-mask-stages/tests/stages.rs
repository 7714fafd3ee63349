//! The `mask/*` stages through a real `StageContext` on small generated attention tables:
//! policy.json round-trips, weights are renormalised, exported plans match the §3.2
//! counts, are reproducible, and under `mask/msmae` land on the high-attention patches.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use msmae_core::{
    ArtifactKind, DynStage, ExecEnv, InputArtifact, NoProgress, Registry, Stage, StageContext, StageError,
};
use msmae_data::attention::{ATTENTION_SCHEMA_VERSION, AttentionMeta, AttentionRow, read_attention, write_attention};
use msmae_data::table::Split;
use msmae_mask::{MaskPolicy, counts};
use msmae_mask_stages::export::read_masks;
use msmae_mask_stages::stages::{AttmaskMaskConfig, MsmaeMaskConfig, RandomMaskConfig};
use msmae_mask_stages::{AttmaskMask, MsmaeMask, RandomMask};

const GRID: [u32; 2] = [6, 8];
const L: usize = 48;

/// A map peaked at a per-image centre: weight 1 + 20·exp(−d²/2) (contrast about 20:1).
fn peaked(i: usize) -> Vec<f32> {
    let (cy, cx) = ((i * 7) % GRID[0] as usize, (i * 3) % GRID[1] as usize);
    (0..L)
        .map(|p| {
            let (y, x) = ((p / GRID[1] as usize) as f32, (p % GRID[1] as usize) as f32);
            let d2 = (y - cy as f32).powi(2) + (x - cx as f32).powi(2);
            1.0 + 20.0 * (-d2 / 2.0).exp()
        })
        .collect()
}

/// 30 images, splits cycling train/val/test; image 5 (a test row) is all zero.
fn attention_dir(root: &Path) -> PathBuf {
    let dir = root.join("attn");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let rows: Vec<AttentionRow> = (0..30)
        .map(|i| AttentionRow {
            id: format!("img{i:03}"),
            split: Split::ALL[i % 3],
            weights: if i == 5 { vec![0.0; L] } else { peaked(i) },
        })
        .collect();
    let meta = AttentionMeta {
        schema_version: ATTENTION_SCHEMA_VERSION,
        grid: GRID,
        provenance: serde_json::json!({"model": "test"}),
    };
    write_attention(&dir.join("attention.parquet"), &meta, &rows).expect("write attention");
    dir
}

fn run_stage<S: Stage>(stage: &S, c: &S::Config, out: &Path, attn: Option<&Path>, seed: u64) -> Result<(), StageError> {
    stage.validate(c).map_err(|e| StageError::other(e.to_string()))?;
    std::fs::create_dir_all(out).expect("mkdir out");
    let mut inputs = BTreeMap::new();
    if let Some(a) = attn {
        inputs.insert(
            "attention".to_string(),
            vec![InputArtifact {
                stage: "attn".into(),
                kind: ArtifactKind::new("attention-maps"),
                dir: a.to_path_buf(),
                digest: "d1g35t".into(),
            }],
        );
    }
    let mut ctx = StageContext::new(
        "masks".into(),
        seed,
        ExecEnv::cpu_flex(),
        1,
        Default::default(),
        &NoProgress,
        out.to_path_buf(),
        out.to_path_buf(),
        stage.output(c),
        inputs,
    );
    stage.run(c, &mut ctx)?;
    // Every declared file without a wildcard exists, and nothing undeclared was written.
    for f in stage.output(c).required() {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    for e in std::fs::read_dir(out).expect("ls") {
        let name = e.expect("entry").file_name().to_string_lossy().to_string();
        assert!(stage.output(c).declares(&name), "undeclared output {name}");
    }
    Ok(())
}

fn policy(out: &Path) -> MaskPolicy {
    serde_json::from_slice(&std::fs::read(out.join("policy.json")).expect("policy.json")).expect("policy parses")
}

fn summary(out: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(out.join("summary.json")).expect("summary.json")).expect("json")
}

fn msmae_config(v: serde_json::Value) -> MsmaeMaskConfig {
    serde_json::from_value(v).expect("config")
}

#[test]
fn msmae_writes_policy_normalised_weights_and_exported_plans() {
    let d = tempfile::tempdir().expect("tmp");
    let attn = attention_dir(d.path());
    let c = msmae_config(serde_json::json!({ "export": { "images": 6, "epochs": [0, 3] } }));
    assert_eq!(c.mask_ratio, 0.45);
    assert_eq!(c.throw_ratio, 0.30);
    let out = d.path().join("out");
    run_stage(&MsmaeMask, &c, &out, Some(&attn), 7).expect("run");

    assert_eq!(policy(&out), MaskPolicy::Msmae { mask_ratio: 0.45, throw_ratio: 0.30 });

    // weights: same ids/splits/order as the input, each row sums to 1, shape preserved,
    // the all-zero map became uniform, provenance names the source digest.
    let (src_meta, src) = read_attention(&attn.join("attention.parquet")).expect("src");
    let (meta, rows) = read_attention(&out.join("weights.parquet")).expect("weights");
    assert_eq!(meta.grid, GRID);
    assert_eq!(meta.provenance["source"]["digest"], "d1g35t");
    assert_eq!(meta.provenance["source_provenance"], src_meta.provenance);
    assert_eq!(rows.len(), src.len());
    for (r, s) in rows.iter().zip(&src) {
        assert_eq!((&r.id, r.split), (&s.id, s.split));
        let sum: f64 = r.weights.iter().map(|&w| f64::from(w)).sum();
        assert!((sum - 1.0).abs() < 1e-5, "{}: sums to {sum}", r.id);
        let total: f32 = s.weights.iter().sum();
        if total > 0.0 {
            for (a, b) in r.weights.iter().zip(&s.weights) {
                assert!((a - b / total).abs() < 1e-6);
            }
        }
    }
    assert!(rows[5].weights.iter().all(|&w| (w - 1.0 / L as f32).abs() < 1e-7), "all-zero map → uniform");

    // exported plans: the first 6 test rows (rows 2, 5, 8, …), epochs 0 and 3, each with
    // the §3.2 counts.
    let (mm, recs) = read_masks(&out.join("masks.parquet")).expect("masks");
    assert_eq!((mm.grid, mm.seed), (GRID, 7));
    assert_eq!(recs.len(), 12);
    let (m, t) = counts(L, 0.45, 0.30);
    for (k, r) in recs.iter().enumerate() {
        let row = 2 + 3 * (k / 2);
        assert_eq!((r.id.as_str(), r.row_index, r.epoch), (format!("img{row:03}").as_str(), row as u64, [0, 3][k % 2]));
        let n = |s: u8| r.states.iter().filter(|&&x| x == s).count();
        assert_eq!((n(1), n(2), n(0)), (m, t, L - m - t), "{r:?}");
        // The documented RNG key reproduces the plan.
        let plan =
            mm.policy.select(Some(&rows[row].weights), L, &mut msmae_mask::sample_rng(7, "mask", r.epoch, r.row_index));
        assert_eq!(plan.states(), r.states);
    }
    // Different epochs give different plans for the same image.
    assert_ne!(recs[0].states, recs[1].states);

    let s = summary(&out);
    assert_eq!(s["per_plan"]["masked"], m);
    assert_eq!(s["per_plan"]["thrown"], t);
    assert_eq!(s["all_zero_maps"], 1);
    assert_eq!(s["export"]["plans"].as_array().expect("plans").len(), 12);
    assert!(
        s["export"]["plans"]
            .as_array()
            .expect("plans")
            .iter()
            .all(|p| p["masked"] == m && p["thrown"] == t && p["visible"] == L - m - t)
    );
    let mean = |k: &str| s["export"]["mean_weight"][k].as_f64().expect("mean");
    // Peaked maps (≈20:1): sampling without replacement puts the peaks first, so masked
    // patches carry clearly more weight than visible ones.
    assert!(mean("masked") > 1.5 * mean("visible"), "masked {} vs visible {}", mean("masked"), mean("visible"));
    assert!(mean("masked") > mean("thrown") && mean("thrown") > mean("visible"), "{}", s["export"]["mean_weight"]);

    let png = image::open(out.join("masks.png")).expect("png").to_rgb8();
    // 6 lines × (heat map + 2 epochs); 8-pixel patches make the 8-wide grid 64 pixels wide.
    assert_eq!(png.dimensions(), (4 + 3 * (8 * 8 + 4), 4 + 6 * (6 * 8 + 4)));
}

#[test]
fn reruns_are_byte_identical_and_seeds_matter() {
    let d = tempfile::tempdir().expect("tmp");
    let attn = attention_dir(d.path());
    let c = msmae_config(serde_json::json!({ "export": { "split": "train", "images": 5, "epochs": [1] } }));
    let (a, b, other) = (d.path().join("a"), d.path().join("b"), d.path().join("c"));
    run_stage(&MsmaeMask, &c, &a, Some(&attn), 11).expect("a");
    run_stage(&MsmaeMask, &c, &b, Some(&attn), 11).expect("b");
    run_stage(&MsmaeMask, &c, &other, Some(&attn), 12).expect("c");
    for f in ["policy.json", "weights.parquet", "summary.json", "masks.parquet", "masks.png"] {
        assert_eq!(
            std::fs::read(a.join(f)).expect("a"),
            std::fs::read(b.join(f)).expect("b"),
            "{f} differs between identical runs"
        );
    }
    let (ra, rc) =
        (read_masks(&a.join("masks.parquet")).expect("a").1, read_masks(&other.join("masks.parquet")).expect("c").1);
    assert_eq!(ra.iter().map(|r| &r.id).collect::<Vec<_>>(), rc.iter().map(|r| &r.id).collect::<Vec<_>>());
    assert_ne!(ra, rc, "another seed draws other plans");
}

#[test]
fn attmask_masks_the_top_weights() {
    let d = tempfile::tempdir().expect("tmp");
    let attn = attention_dir(d.path());
    let c: AttmaskMaskConfig = serde_json::from_value(serde_json::json!({ "export": {} })).expect("config");
    assert_eq!((c.mask_ratio, c.hints), (0.75, 0.0));
    let out = d.path().join("out");
    run_stage(&AttmaskMask, &c, &out, Some(&attn), 3).expect("run");
    assert_eq!(policy(&out), MaskPolicy::Attmask { mask_ratio: 0.75, hints: 0.0 });
    let (_, rows) = read_attention(&out.join("weights.parquet")).expect("weights");
    let (_, recs) = read_masks(&out.join("masks.parquet")).expect("masks");
    assert_eq!(recs.len(), 10, "default 16 images, but only 10 test rows");
    let (m, _) = counts(L, 0.75, 0.0);
    for r in &recs {
        let w = &rows[r.row_index as usize].weights;
        let masked_min = (0..L).filter(|&p| r.states[p] == 1).map(|p| w[p]).fold(f32::INFINITY, f32::min);
        let visible_max = (0..L).filter(|&p| r.states[p] == 0).map(|p| w[p]).fold(0.0, f32::max);
        assert_eq!(r.states.iter().filter(|&&s| s == 1).count(), m);
        assert!(r.states.iter().all(|&s| s != 2), "attmask throws nothing");
        assert!(masked_min >= visible_max, "{}: top-k violated", r.id);
    }
}

#[test]
fn random_writes_only_a_policy() {
    let d = tempfile::tempdir().expect("tmp");
    let c: RandomMaskConfig = serde_json::from_value(serde_json::json!({})).expect("config");
    let out = d.path().join("out");
    assert!(RandomMask.inputs(&c).is_empty());
    run_stage(&RandomMask, &c, &out, None, 1).expect("run");
    assert_eq!(policy(&out), MaskPolicy::Random { mask_ratio: 0.75 });
    assert_eq!(std::fs::read_dir(&out).expect("ls").count(), 1);
}

#[test]
fn configs_are_validated_naming_the_field() {
    let mut r = Registry::new();
    r.register(MsmaeMask).register(AttmaskMask).register(RandomMask);
    let err = |kind: &str, with: serde_json::Value| r.get(kind).expect(kind).prepare(&with).err().expect("invalid");
    let e = err("mask/msmae", serde_json::json!({ "mask_ratio": 1.5 }));
    assert_eq!(e.path, "mask_ratio", "{e}");
    let e = err("mask/msmae", serde_json::json!({ "mask_ratio": 0.6, "throw_ratio": 0.5 }));
    assert!(e.path == "mask_ratio" && e.message.contains("leave patches visible"), "{e}");
    let e = err("mask/msmae", serde_json::json!({ "throw_ratio": -0.1 }));
    assert_eq!(e.path, "throw_ratio", "{e}");
    let e = err("mask/attmask", serde_json::json!({ "hints": 2.0 }));
    assert_eq!(e.path, "hints", "{e}");
    let e = err("mask/random", serde_json::json!({ "mask_ratio": -1.0 }));
    assert_eq!(e.path, "mask_ratio", "{e}");
    let e = err("mask/msmae", serde_json::json!({ "export": { "images": 0 } }));
    assert_eq!(e.path, "export.images", "{e}");
    let e = err("mask/msmae", serde_json::json!({ "export": { "epochs": [] } }));
    assert_eq!(e.path, "export.epochs", "{e}");
    let e = err("mask/msmae", serde_json::json!({ "export": { "split": "holdout" } }));
    assert_eq!(e.path, "export.split", "{e}");
    let e = err("mask/random", serde_json::json!({ "throw_ratio": 0.1 }));
    assert!(e.message.contains("unknown field `throw_ratio`"), "{e}");
    // Defaults fill in; an absent export serialises as null.
    let p = r.get("mask/msmae").expect("kind").prepare(&serde_json::Value::Null).expect("defaults");
    assert_eq!(p.config_json(), serde_json::json!({ "mask_ratio": 0.45, "throw_ratio": 0.30, "export": null }));
    let p = r.get("mask/attmask").expect("kind").prepare(&serde_json::Value::Null).expect("defaults");
    assert_eq!(p.inputs().len(), 1);
    assert_eq!(p.output().kind.as_str(), "mask-weights");
    assert!(!p.output().declares("masks.png"), "no export files without export");
}

#[test]
fn bad_inputs_fail_naming_the_file() {
    let d = tempfile::tempdir().expect("tmp");
    let c = msmae_config(serde_json::json!({}));
    // no input bound
    let e = run_stage(&MsmaeMask, &c, &d.path().join("o1"), None, 1).expect_err("missing slot");
    assert!(matches!(e, StageError::MissingInput { ref slot } if slot == "attention"), "{e}");
    // a corrupt attention file
    let bad = d.path().join("bad");
    std::fs::create_dir_all(&bad).expect("mkdir");
    std::fs::write(bad.join("attention.parquet"), b"garbage").expect("w");
    let e = run_stage(&MsmaeMask, &c, &d.path().join("o2"), Some(&bad), 1).expect_err("corrupt").to_string();
    assert!(e.contains("bad/attention.parquet"), "{e}");
    // an empty table
    let empty = d.path().join("empty");
    std::fs::create_dir_all(&empty).expect("mkdir");
    let meta =
        AttentionMeta { schema_version: ATTENTION_SCHEMA_VERSION, grid: GRID, provenance: serde_json::json!({}) };
    write_attention(&empty.join("attention.parquet"), &meta, &[]).expect("write");
    let e = run_stage(&MsmaeMask, &c, &d.path().join("o3"), Some(&empty), 1).expect_err("empty").to_string();
    assert!(e.contains("no rows"), "{e}");
    // export of a split the table lacks
    let one = d.path().join("one");
    std::fs::create_dir_all(&one).expect("mkdir");
    write_attention(
        &one.join("attention.parquet"),
        &meta,
        &[AttentionRow { id: "a".into(), split: Split::Train, weights: peaked(0) }],
    )
    .expect("write");
    let c = msmae_config(serde_json::json!({ "export": {} }));
    let e = run_stage(&MsmaeMask, &c, &d.path().join("o4"), Some(&one), 1).expect_err("no test rows").to_string();
    assert!(e.contains("export.split") && e.contains("`test`"), "{e}");
}

#[test]
fn dyn_stage_metadata() {
    let mut r = Registry::new();
    r.register(MsmaeMask).register(AttmaskMask).register(RandomMask);
    assert_eq!(r.kinds().collect::<Vec<_>>(), ["mask/attmask", "mask/msmae", "mask/random"]);
    for s in r.iter() {
        assert!(!s.uses_backend());
        assert!(!s.code_fingerprint().is_empty());
    }
    let _: &dyn DynStage = r.get("mask/msmae").expect("kind").as_ref();
}
