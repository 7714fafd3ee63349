//! The harness every ingest test runs its stage through, as the runner would: the `with:`
//! block deserialised into the kind's config, validated, then run with two threads into
//! an output directory.
#![allow(dead_code)] // each test file uses part of it

use std::collections::BTreeMap;
use std::path::Path;

use msmae_core::{ExecEnv, NoProgress, Stage, StageContext, StageError};

/// `base` with the keys of `extra` set over it (both JSON objects).
pub fn with(base: serde_json::Value, extra: serde_json::Value) -> serde_json::Value {
    let mut v = base;
    if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    v
}

/// Run `stage` with the `with:` block `with` and seed `seed`, writing into `out` (created).
/// A config that does not deserialise panics (the tests write valid YAML shapes); one that
/// validation refuses is the returned error.
pub fn ingest<S: Stage>(stage: &S, with: serde_json::Value, seed: u64, out: &Path) -> Result<(), StageError> {
    let c: S::Config = serde_json::from_value(with).expect("config");
    run(stage, &c, seed, out)
}

/// Run `stage` with a typed config.
pub fn run<S: Stage>(stage: &S, c: &S::Config, seed: u64, out: &Path) -> Result<(), StageError> {
    stage.validate(c).map_err(|e| StageError::other(e.to_string()))?;
    std::fs::create_dir_all(out).expect("mkdir");
    let mut ctx = StageContext::new(
        S::KIND.into(),
        seed,
        ExecEnv::cpu_flex(),
        2,
        Default::default(),
        &NoProgress,
        out.to_path_buf(),
        out.to_path_buf(),
        stage.output(c),
        BTreeMap::new(),
    );
    stage.run(c, &mut ctx)
}
