//! Property-based fuzzing on stable Rust (proptest, fixed case budgets, run by `cargo xtask
//! test`): the pipeline parser and the lock-file reader are fed mutations of real files
//! (characters deleted, inserted, replaced; lines duplicated or dropped) and arbitrary
//! text. They must never panic; every pipeline error names the file. Case counts are
//! printed with `--nocapture`.

use std::path::Path;

use msmae_pipeline::LockFile;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

const PIPELINE: &str = include_str!("../../../pipelines/quickstart.yaml");

/// One edit of a text at a position (a fraction of its length).
#[derive(Debug, Clone)]
enum Edit {
    Delete(f64, usize),
    Insert(f64, String),
    Replace(f64, String),
    DupLine(f64),
    DropLine(f64),
}

fn edit() -> impl Strategy<Value = Edit> {
    let junk = prop_oneof![
        "[ -~]{1,6}",
        Just(":".to_string()),
        Just("\n  ".to_string()),
        Just("${".to_string()),
        Just("{ [".to_string()),
        Just("- ".to_string()),
        Just("\u{feff}".to_string()),
        Just("é\u{0}".to_string()),
        Just("<<<<<<< HEAD\n".to_string()),
    ];
    prop_oneof![
        (0.0..1.0f64, 1..8usize).prop_map(|(p, n)| Edit::Delete(p, n)),
        (0.0..1.0f64, junk.clone()).prop_map(|(p, s)| Edit::Insert(p, s)),
        (0.0..1.0f64, junk).prop_map(|(p, s)| Edit::Replace(p, s)),
        (0.0..1.0f64).prop_map(Edit::DupLine),
        (0.0..1.0f64).prop_map(Edit::DropLine),
    ]
}

fn apply(text: &str, edits: &[Edit]) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    for e in edits {
        let at = |p: f64, len: usize| ((p * len as f64) as usize).min(len);
        match e {
            Edit::Delete(p, n) => {
                let i = at(*p, chars.len());
                let j = (i + n).min(chars.len());
                chars.drain(i..j);
            }
            Edit::Insert(p, s) => {
                let i = at(*p, chars.len());
                chars.splice(i..i, s.chars());
            }
            Edit::Replace(p, s) => {
                let i = at(*p, chars.len());
                let j = (i + s.chars().count()).min(chars.len());
                chars.splice(i..j, s.chars());
            }
            Edit::DupLine(p) | Edit::DropLine(p) => {
                let s: String = chars.iter().collect();
                let mut lines: Vec<&str> = s.split('\n').collect();
                let i = at(*p, lines.len().saturating_sub(1));
                if matches!(e, Edit::DupLine(_)) {
                    lines.insert(i, lines[i]);
                } else if lines.len() > 1 {
                    lines.remove(i);
                }
                chars = lines.join("\n").chars().collect();
            }
        }
    }
    chars.into_iter().collect()
}

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() })
}

/// The parser on a text: `Ok`, or errors that each name the file and say something.
fn check_pipeline(src: &str) -> Result<(), TestCaseError> {
    let file = Path::new("fuzz.yaml");
    if let Err(errs) = msmae_pipeline::parse(file, src, &[]) {
        prop_assert!(!errs.0.is_empty());
        for e in &errs.0 {
            prop_assert_eq!(&e.file, file);
            prop_assert!(!e.message.is_empty());
            prop_assert!(e.to_string().starts_with("fuzz.yaml"));
        }
    }
    Ok(())
}

#[test]
fn the_pipeline_parser_never_panics_on_mutated_pipelines() {
    msmae_pipeline::parse(Path::new("q.yaml"), PIPELINE, &[]).expect("the unmutated pipeline parses");
    let cases = 3000;
    runner(cases)
        .run(&prop::collection::vec(edit(), 1..6), |edits| check_pipeline(&apply(PIPELINE, &edits)))
        .expect("the parser held");
    eprintln!("fuzz: pipeline parser, {cases} mutated pipelines");
}

#[test]
fn the_pipeline_parser_never_panics_on_arbitrary_text() {
    let cases = 2000;
    runner(cases).run(&"(?s).{0,300}", |src| check_pipeline(&src)).expect("the parser held");
    eprintln!("fuzz: pipeline parser, {cases} arbitrary texts");
}

/// The head of a real lock file (the quickstart's first two stages).
const LOCK: &str = "# msmae lock file: written by `msmae run`, do not edit. `msmae verify` checks it.
msmae_lock: 1
pipeline: quickstart
stages:
- name: data
  key: 9267c90cab25ead2379ece9e769b37977284b58900bb82079f47a7f0ece89460
  kind: ingest/synthetic
  version: 1
  code: 640174d8fd1d6bfd92ff62874169ebac
  seed: 17
  config:
    images: 2000
    size: 64
    modality: xray
    images_per_patient: 2
    split:
      train: 0.7
      val: 0.1
      test: 0.2
    contrast: 0.6
    noise: 0.04
    lesion_radius:
    - 0.08
    - 0.12
    normal_fraction: 0.25
    previews: 16
    row_group: 256
  inputs: {}
  output:
    kind: image-table
    digest: f182fc1966752604c6188ebf269add644ca33f07a48d5e638f9efad2cd35cd03
    files: 3
    bytes: 7804210
  run:
    started: 2026-12-06T04:35:46Z
    seconds: 0.299
    host:
      os: linux
      arch: x86_64
      cpus: 2
      hostname: vm
    tools:
      burn: 0.22.1
      libtorch: 2.9.0
      msmae: 0.1.0
- name: supervised
  key: 93cbbb6de4c783eba0724e0a6be58f321886afaa451263b0bc30419a77d0a5c9
  kind: attention/train-supervised
  version: 1
  code: 565f0a0340488a3260a3b52dda72ae33
  seed: 17
  config:
    model:
      preset: tiny
      patch_size: null
      embed_dim: null
      depth: 2
      num_heads: null
      mlp_ratio: null
      decoder_dim: null
      decoder_depth: null
      decoder_heads: null
    epochs: 25
    batch_size: 64
    blr: 0.001
    min_lr: 1e-6
    warmup_epochs: 2.0
    weight_decay: 0.05
    layer_decay: null
    label_smoothing: 0.1
    drop_path: 0.1
    augment: true
    crop_scale:
    - 0.5
    - 1.0
    patience: null
    select_on: auto
    refresh_every: null
    mask_ratio: null
    throw_ratio: null
  inputs:
    data:
    - stage: data
      digest: f182fc1966752604c6188ebf269add644ca33f07a48d5e638f9efad2cd35cd03
  env:
    backend: tch
    device_kind: cpu
    precision: f32
  output:
    kind: vit-checkpoint
    digest: 215dcadcd5b9d2873d3763e371a819977232a2d487dd41823f9a950ec6165cfb
    files: 6
    bytes: 1821677
  run:
    started: 2026-12-06T04:35:46Z
    seconds: 63.342
    host:
      os: linux
      arch: x86_64
      cpus: 2
      hostname: vm
    tools:
      burn: 0.22.1
      libtorch: 2.9.0
      msmae: 0.1.0
";

#[test]
fn the_lock_file_reader_never_panics_on_mutated_lock_files() {
    let d = tempfile::tempdir().expect("tmp");
    let p = d.path().join("p.lock");
    std::fs::write(&p, LOCK).expect("write");
    LockFile::read(&p, "quickstart").expect("the unmutated lock file reads (the mutations start from a valid file)");
    let cases = 3000;
    runner(cases)
        .run(&prop::collection::vec(edit(), 1..6), |edits| {
            std::fs::write(&p, apply(LOCK, &edits)).expect("write");
            match LockFile::read(&p, "quickstart") {
                // whatever parses has only well-formed digests (they become paths)
                Ok(l) => {
                    for s in &l.stages {
                        prop_assert!(msmae_pipeline::store::check_digest(&s.output.digest).is_ok());
                    }
                }
                Err(e) => prop_assert!(e.to_string().contains("p.lock"), "{}", e),
            }
            Ok(())
        })
        .expect("the reader held");
    eprintln!("fuzz: lock-file reader, {cases} mutated lock files");
}
