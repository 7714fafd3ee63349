//! The `msmae` binary end to end on small generated data: run, cache, status, why, dag,
//! verify, gc, stages, exit codes and error messages.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const PIPELINE: &str = "name: tiny\nseed: 5\nparams: { n: 24 }\nstages:\n  xray: { uses: ingest/synthetic, with: { images: '${params.n}', size: 32, modality: xray, previews: 4 } }\n  fundus: { uses: ingest/synthetic, with: { images: 12, size: 32, modality: fundus } }\n";

fn msmae(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_msmae"))
        .current_dir(dir)
        .args(args)
        .env_remove("MSMAE_STORE")
        .env("MSMAE_BACKEND", "flex")
        .output()
        .expect("run msmae")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn setup() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().expect("tmp");
    let p = d.path().join("tiny.yaml");
    fs::write(&p, PIPELINE).expect("write");
    (d, p)
}

#[test]
fn run_then_rerun_is_cached_and_everything_checks_out() {
    let (d, _) = setup();
    let o = msmae(d.path(), &["run", "tiny.yaml"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("tiny: 2 ran, 0 cached, 0 failed"), "{}", text(&o));
    assert!(d.path().join(".msmae/objects").is_dir(), "default store beside the pipeline");
    let lock = fs::read_to_string(d.path().join("tiny.lock")).expect("lock file beside the pipeline");
    assert!(lock.starts_with("# msmae lock file"));
    let o = msmae(d.path(), &["run", "tiny.yaml"]);
    assert!(text(&o).contains("tiny: 0 ran, 2 cached"), "{}", text(&o));
    assert_eq!(fs::read_to_string(d.path().join("tiny.lock")).expect("lock"), lock);
    let o = msmae(d.path(), &["status", "tiny.yaml"]);
    assert!(o.status.success());
    assert_eq!(String::from_utf8_lossy(&o.stdout).matches("up to date").count(), 2, "{}", text(&o));
    let o = msmae(d.path(), &["verify", "tiny.yaml"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("verified 2 of 2 artifacts"), "{}", text(&o));
    let o = msmae(d.path(), &["dag", "tiny.yaml", "--format", "mermaid"]);
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("flowchart LR"), "{}", text(&o));
    let o = msmae(d.path(), &["dag", "tiny.yaml", "--format", "dot"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("digraph \"tiny\""), "{}", text(&o));
    // a changed parameter: dry run explains, then only that stage runs
    let o = msmae(d.path(), &["run", "tiny.yaml", "--set", "params.n=30", "--dry-run"]);
    assert!(text(&o).contains("config.images: 24 → 30"), "{}", text(&o));
    let o = msmae(d.path(), &["why", "tiny.yaml", "xray", "--set", "params.n=30"]);
    assert!(text(&o).contains("will run because") && text(&o).contains("config.images: 24 → 30"), "{}", text(&o));
    let o = msmae(d.path(), &["run", "tiny.yaml", "--set", "params.n=30"]);
    assert!(text(&o).contains("tiny: 1 ran, 1 cached"), "{}", text(&o));
    let o = msmae(d.path(), &["gc", "tiny.yaml", "--prune"]);
    assert!(text(&o).contains("removed 1 objects"), "{}", text(&o));
}

#[test]
fn artifacts_are_bit_identical_across_fresh_runs() {
    let (a, _) = setup();
    let (b, _) = setup();
    assert!(msmae(a.path(), &["run", "tiny.yaml"]).status.success());
    assert!(msmae(b.path(), &["run", "tiny.yaml", "--jobs", "1"]).status.success());
    let digests = |d: &Path| {
        let lock = fs::read_to_string(d.join("tiny.lock")).expect("lock");
        lock.lines().filter(|l| l.trim_start().starts_with("digest:")).map(str::to_string).collect::<Vec<_>>()
    };
    assert_eq!(digests(a.path()).len(), 2);
    assert_eq!(digests(a.path()), digests(b.path()));
}

#[test]
fn the_image_table_has_the_declared_files() {
    let (d, _) = setup();
    assert!(msmae(d.path(), &["run", "tiny.yaml"]).status.success());
    let objects = d.path().join(".msmae/objects");
    let mut found = Vec::new();
    for shard in fs::read_dir(&objects).expect("objects") {
        for o in fs::read_dir(shard.expect("shard").path()).expect("shard") {
            let data = o.expect("object").path().join("data");
            let report: serde_json::Value =
                serde_json::from_slice(&fs::read(data.join("split_report.json")).expect("report")).expect("json");
            found.push(report["total_images"].as_u64().expect("count"));
            assert!(data.join("images.parquet").is_file());
            assert!(data.join("previews/sheet.png").is_file());
        }
    }
    found.sort();
    assert_eq!(found, [12, 24]);
}

#[test]
fn bad_input_gets_clear_errors_and_exit_codes() {
    let (d, _) = setup();
    fs::write(d.path().join("bad.yaml"), "stages:\n  a:\n    uses: ingest/synthetik\n").expect("w");
    let o = msmae(d.path(), &["run", "bad.yaml"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o).contains(
            "bad.yaml:3:5: stages.a.uses: unknown stage kind `ingest/synthetik` (did you mean `ingest/synthetic`?)"
        ),
        "{}",
        text(&o)
    );
    fs::write(d.path().join("typed.yaml"), "stages:\n  a:\n    uses: ingest/synthetic\n    with: { size: big }\n")
        .expect("w");
    let o = msmae(d.path(), &["run", "typed.yaml"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o).contains("typed.yaml:4:13: stages.a.with.size: invalid type: string \"big\", expected u32"),
        "{}",
        text(&o)
    );
    let o = msmae(d.path(), &["run", "missing.yaml"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("read missing.yaml: No such file or directory"), "{}", text(&o));
    let o = msmae(d.path(), &["run", "tiny.yaml", "--device", "tpu"]);
    assert!(text(&o).contains("unknown device `tpu`: use cpu, cuda, cuda:N or auto"), "{}", text(&o));
    let o = msmae(d.path(), &["verify", "tiny.yaml"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("no lock file (run the pipeline first)"), "{}", text(&o));
    fs::write(d.path().join("range.yaml"), "stages:\n  a:\n    uses: ingest/synthetic\n    with: { size: 8 }\n")
        .expect("w");
    let o = msmae(d.path(), &["run", "range.yaml"]);
    assert!(text(&o).contains("stages.a.with.size: must be between 16 and 1024 pixels"), "{}", text(&o));
}

/// No GPU here (CI, this machine): asking for one is a one-line error before anything
/// runs, never a panic; `auto` falls back to the CPU; a bad precision is named.
#[test]
fn cuda_without_a_gpu_is_a_one_line_error_and_auto_falls_back_to_the_cpu() {
    let (d, _) = setup();
    let o = msmae(d.path(), &["run", "tiny.yaml", "--backend", "auto", "--device", "cuda"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("libtorch reports no CUDA device") || err.contains("built without libtorch"), "{err}");
    let objects = fs::read_dir(d.path().join(".msmae/objects")).map(|r| r.count()).unwrap_or(0);
    assert_eq!(objects, 0, "nothing ran");
    let o = msmae(d.path(), &["run", "tiny.yaml", "--precision", "fp8"]);
    assert!(text(&o).contains("unknown precision `fp8`: use f32 or bf16"), "{}", text(&o));
    let o = msmae(d.path(), &["run", "tiny.yaml", "--backend", "auto", "--device", "auto"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("on cpu (f32)"), "auto resolves to the CPU here: {}", text(&o));
}

#[test]
fn stages_and_help_list_kinds_and_examples() {
    let d = tempfile::tempdir().expect("tmp");
    let o = msmae(d.path(), &["stages"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("ingest/synthetic"), "{}", text(&o));
    for sub in ["run", "status", "why", "dag", "verify", "gc", "stages"] {
        let o = msmae(d.path(), &[sub, "--help"]);
        assert!(o.status.success());
        assert!(String::from_utf8_lossy(&o.stdout).contains("Example"), "`msmae {sub} --help` shows an example");
    }
}

#[test]
fn store_can_be_moved_by_flag() {
    let (d, _) = setup();
    let o = msmae(d.path(), &["run", "tiny.yaml", "--store", "elsewhere"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(d.path().join("elsewhere/objects").is_dir());
    assert!(!d.path().join(".msmae").exists());
}

/// Every stage kind this binary registers carries a real build-time fingerprint (a crate
/// without a build script would fall back to its name and version, and every edit of it
/// would go unnoticed by the cache), covering exactly the crates it computes with.
#[test]
fn every_registered_stage_kind_carries_a_build_time_fingerprint_of_its_computing_path() {
    let registry = msmae_cli::registry();
    let mut kinds = 0;
    for s in registry.iter() {
        let code = msmae_pipeline::key::Code::parse(s.code_fingerprint());
        assert!(
            code.is_built(),
            "`{}` has no build-time fingerprint (`{}`): its crate needs a build.rs calling msmae_fingerprint::emit()",
            s.kind(),
            s.code_fingerprint()
        );
        assert!(code.crates.contains_key("msmae-core"), "`{}`: {:?}", s.kind(), code.crates);
        for runner in ["msmae-pipeline", "msmae-cli", "msmae-fingerprint"] {
            assert!(
                !code.crates.contains_key(runner),
                "`{}` counts the runner crate {runner}: {:?}",
                s.kind(),
                code.crates
            );
        }
        for dep in code.deps.keys() {
            assert!(msmae_fingerprint::is_numeric(dep), "`{}` keys on {dep}, which is not a numeric crate", s.kind());
        }
        kinds += 1;
    }
    assert!(kinds >= 15, "{kinds} kinds");
    let code = |kind: &str| {
        msmae_pipeline::key::Code::parse(registry.iter().find(|s| s.kind() == kind).expect(kind).code_fingerprint())
    };
    // Ingestion computes with image codecs and Parquet, not with burn or the process group.
    let ingest = code("ingest/synthetic");
    assert!(
        !ingest.crates.contains_key("msmae-dist") && !ingest.crates.contains_key("msmae-backend"),
        "{:?}",
        ingest.crates
    );
    assert!(
        ingest.deps.contains_key("parquet") && ingest.deps.contains_key("image") && !ingest.deps.contains_key("burn"),
        "{:?}",
        ingest.deps
    );
    // Training computes with burn (and the mask library), not with the evaluation stages.
    let pretrain = code("mae/pretrain");
    assert!(pretrain.deps.contains_key("burn") && pretrain.crates.contains_key("msmae-mask"), "{:?}", pretrain);
    assert!(!pretrain.crates.contains_key("msmae-eval"), "{:?}", pretrain.crates);
    // The mask stages' own code keys the mask stages alone; the masking library keys both.
    assert!(
        !pretrain.crates.contains_key("msmae-mask-stages")
            && code("mask/msmae").crates.contains_key("msmae-mask-stages"),
        "{:?}",
        pretrain.crates
    );
    assert!(code("mask/msmae").crates.contains_key("msmae-mask"));
}

/// Every metric and table that a stage kind declares (the JSON pointers `msmae show`, the
/// report page and `msmae audit` read) resolves in a real artifact of that kind: a pointer
/// that drifted from what the stage writes would otherwise just leave a blank. A metric
/// may be null where it does not apply to the data (a multi-label AUC of single-label
/// data), never absent; the fine-tuning runs over two seeds so that the comparison's
/// over-seed tables exist.
#[test]
fn every_declared_metric_and_table_resolves_in_a_real_artifact() {
    const M: &str =
        "{ patch_size: 8, embed_dim: 16, depth: 1, num_heads: 2, decoder_dim: 16, decoder_depth: 1, decoder_heads: 2 }";
    let yaml = format!(
        "name: results\nseed: 3\nstages:
  data: {{ uses: ingest/synthetic, with: {{ images: 96, size: 32, modality: xray, previews: 2 }} }}
  supervised: {{ uses: attention/train-supervised, needs: [data], with: {{ model: {M}, epochs: 2, batch_size: 16, warmup_epochs: 1 }} }}
  attn: {{ uses: attention/extract, needs: [supervised, data], with: {{ overlays: 1 }} }}
  masks: {{ uses: mask/msmae, needs: [attn] }}
  random: {{ uses: mask/random }}
  attmask: {{ uses: mask/attmask, needs: [attn] }}
  pretrain: {{ uses: mae/pretrain, needs: [data, masks], with: {{ model: {M}, epochs: 2, batch_size: 16, warmup_epochs: 1, warmup_mask_epochs: 1, figure_images: 1 }} }}
  lin: {{ uses: finetune/linear, needs: [pretrain, data], with: {{ epochs: 2, batch_size: 16, warmup_epochs: 1 }} }}
  seg: {{ uses: segment/setr-pup, needs: [pretrain, data], with: {{ epochs: 1, batch_size: 16, head_channels: 8, figure_images: 1 }} }}
  export: {{ uses: export/pytorch, needs: [lin] }}
  seeds:
    repeat: 2
    seed: \"${{round}}\"
    stages:
      ft-msmae: {{ uses: finetune/msmae, needs: [pretrain, data], with: {{ epochs: 2, batch_size: 16, warmup_epochs: 1 }} }}
      ft-full: {{ uses: finetune/full, needs: [pretrain, data], with: {{ epochs: 2, batch_size: 16, warmup_epochs: 1 }} }}
      eval-msmae: {{ uses: eval/classify, needs: [ft-msmae] }}
      eval-full: {{ uses: eval/classify, needs: [ft-full] }}
  report: {{ uses: eval/compare, needs: [seeds.*.eval-msmae, seeds.*.eval-full] }}
"
    );
    let d = tempfile::tempdir().expect("tmp");
    fs::write(d.path().join("results.yaml"), &yaml).expect("write");
    let o = msmae(d.path(), &["run", "results.yaml"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = msmae(d.path(), &["show", "results.yaml", "--format", "json"]);
    assert!(o.status.success(), "{}", text(&o));
    let shown: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let stages = shown["stages"].as_array().expect("stages");
    let registry = msmae_cli::registry();
    let plan = msmae_pipeline::load_plan(&d.path().join("results.yaml"), &[], &registry).expect("plan");
    let mut declared = 0;
    for node in &plan.nodes {
        let stage = stages.iter().find(|s| s["name"] == node.name.as_str());
        let shown = |key: &str, name: &str| {
            stage
                .and_then(|s| s[key].as_array())
                .is_some_and(|a| a.iter().any(|m| m.get(0).and_then(|n| n.as_str()) == Some(name) || m["name"] == name))
        };
        let dir = stage.and_then(|s| s["path"].as_str()).map(PathBuf::from);
        let value = |file: &str, pointer: &str| {
            let dir = dir.as_ref().unwrap_or_else(|| panic!("`{}` has no artifact in {stage:?}", node.name));
            let v: serde_json::Value = serde_json::from_slice(&fs::read(dir.join(file)).expect("result file"))
                .unwrap_or_else(|e| panic!("{}/{file}: {e}", dir.display()));
            msmae_core::artifact::json_at(&v, pointer)
        };
        for m in &node.output.metrics {
            // A number, shown by `msmae show`; or null where the metric does not apply to
            // these data (a multi-label AUC of single-label data): never absent.
            match value(&m.file, &m.pointer) {
                Some(v) if v.is_number() => {
                    assert!(shown("metrics", &m.name), "`{}`: `{}` not shown", node.name, m.name)
                }
                Some(serde_json::Value::Null) => {}
                other => panic!(
                    "`{}` ({}): metric `{}` at {} {} resolves to {other:?}",
                    node.name,
                    node.kind.kind(),
                    m.name,
                    m.file,
                    m.pointer
                ),
            }
            declared += 1;
        }
        for t in &node.output.tables {
            let v = value(&t.file, &t.pointer);
            assert!(
                v.as_ref().is_some_and(serde_json::Value::is_array) && shown("tables", &t.name),
                "`{}` ({}): table `{}` at {} {} resolves to {v:?}",
                node.name,
                node.kind.kind(),
                t.name,
                t.file,
                t.pointer
            );
            declared += 1;
        }
    }
    assert!(declared >= 20, "{declared} declared results");
    // Every registered kind is in the pipeline but those that read data or weights from
    // outside the store (the ingest kinds other than the generator, the import); they
    // declare no results.
    let covered: std::collections::BTreeSet<&str> = plan.nodes.iter().map(|n| n.kind.kind()).collect();
    for s in registry.iter() {
        let outside =
            (s.kind().starts_with("ingest/") && s.kind() != "ingest/synthetic") || s.kind() == "import/pytorch";
        assert!(outside || covered.contains(s.kind()), "`{}` is not in this test's pipeline: add it", s.kind());
    }
}
