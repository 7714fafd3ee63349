//! The stage plugin trait. A stage kind (`ingest/synthetic`, `mae/pretrain`, …) has a
//! version, a typed config deserialised from the pipeline's `with:` block (unknown fields
//! rejected), declared inputs and output, and a `run` that writes only into the output
//! directory it is given.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::artifact::{InputSlot, OutputDecl};
use crate::context::StageContext;
use crate::error::{ConfigError, StageError};

/// How much of the machine a stage occupies while it runs, in job slots of the runner's
/// `--jobs` budget. Training stages take every slot; light stages take one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resources {
    /// One slot.
    Light,
    /// `n` slots (capped at the budget).
    Slots(usize),
    /// The whole budget: nothing else runs beside it.
    Exclusive,
}

impl Resources {
    pub fn slots(self, budget: usize) -> usize {
        match self {
            Resources::Light => 1,
            Resources::Slots(n) => n.clamp(1, budget.max(1)),
            Resources::Exclusive => budget.max(1),
        }
    }
}

/// Files a stage reads that are named inside one of its external inputs rather than found
/// under one: a manifest's image and mask paths. The runner digests exactly these files
/// (size and content, in the listed order; a missing file as missing, since the stage
/// decides what a missing file means), so a changed image re-runs the stage wherever it
/// lives, and nothing else in its folder is hashed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedFiles {
    /// The file that names them (for people: `msmae status`, key diffs).
    pub list: PathBuf,
    /// Every listed file, resolved; duplicates allowed (the runner drops them).
    pub files: Vec<PathBuf>,
}

/// A stage kind, written against its typed config. Registered as a [`DynStage`] through
/// the blanket implementation.
pub trait Stage: Send + Sync + 'static {
    /// Typed `with:` block; use `#[serde(deny_unknown_fields)]` and defaults.
    type Config: Serialize + DeserializeOwned + Send + Sync + 'static;
    /// Kind name used in `uses:`.
    const KIND: &'static str;
    /// Bump when the stage's output format or semantics change.
    const VERSION: u32;
    /// One line for `msmae stages`.
    const SUMMARY: &'static str;
    /// Whether outputs depend on the numeric backend/device (training, inference): then the
    /// backend and device kind are part of the cache key.
    const USES_BACKEND: bool = false;
    /// Top-level `with:` fields that change how a run proceeds but not what it produces
    /// (how often a training stage checkpoints): left out of the cache key, so changing
    /// them re-uses the cached artifact.
    const RUN_ONLY: &'static [&'static str] = &[];
    /// Whether the stage trains data-parallel (through msmae-train's one loop): under a
    /// multi-process launch (`mpirun`, `srun`) every rank runs it on its share of each
    /// global batch and rank 0 commits the artifact; every other stage runs on rank 0 alone.
    /// Such a stage's `batch_size` field is the global batch: the runner refuses, before
    /// anything runs, one that does not split evenly over the devices of every process.
    const DATA_PARALLEL: bool = false;

    /// Digest of the code behind this stage: `msmae_core::code_fingerprint!()`.
    fn code_fingerprint(&self) -> &'static str;

    /// Check a config beyond what deserialisation checks (ranges, combinations).
    fn validate(&self, _config: &Self::Config) -> Result<(), ConfigError> {
        Ok(())
    }
    fn inputs(&self, config: &Self::Config) -> Vec<InputSlot>;
    fn output(&self, config: &Self::Config) -> OutputDecl;
    /// Files or directories outside the store whose content the output depends on (a
    /// dataset folder). Relative paths are relative to the pipeline file's directory.
    fn external_inputs(&self, _config: &Self::Config) -> Vec<PathBuf> {
        Vec::new()
    }
    /// Files named inside an external input ([`ListedFiles`]), read when the pipeline is
    /// planned, after every [`Stage::external_inputs`] path was found to exist. `base` is
    /// the pipeline file's folder, to resolve the stage's relative paths against. An error
    /// (the list cannot be read) stops the plan and names the file.
    fn listed_inputs(&self, _config: &Self::Config, _base: &Path) -> Result<Option<ListedFiles>, StageError> {
        Ok(None)
    }
    fn resources(&self, _config: &Self::Config) -> Resources {
        Resources::Light
    }
    fn run(&self, config: &Self::Config, ctx: &mut StageContext<'_>) -> Result<(), StageError>;
}

/// Type-erased stage kind, as the runner sees it.
pub trait DynStage: Send + Sync {
    fn kind(&self) -> &'static str;
    fn version(&self) -> u32;
    fn summary(&self) -> &'static str;
    fn uses_backend(&self) -> bool;
    fn data_parallel(&self) -> bool;
    fn code_fingerprint(&self) -> &'static str;
    /// Parse and validate a `with:` block (`null` for none).
    fn prepare(&self, with: &serde_json::Value) -> Result<Arc<dyn PreparedStage>, ConfigError>;
}

/// A stage kind bound to a valid config.
pub trait PreparedStage: Send + Sync {
    /// The full config, defaults filled in, as JSON.
    fn config_json(&self) -> serde_json::Value;
    /// The config as the cache key sees it (hashed canonically by the runner): the full
    /// config less the stage's [`Stage::RUN_ONLY`] fields.
    fn key_json(&self) -> serde_json::Value;
    fn inputs(&self) -> Vec<InputSlot>;
    fn output(&self) -> OutputDecl;
    fn external_inputs(&self, base: &Path) -> Vec<PathBuf>;
    fn listed_inputs(&self, base: &Path) -> Result<Option<ListedFiles>, StageError>;
    fn resources(&self) -> Resources;
    fn run(&self, ctx: &mut StageContext<'_>) -> Result<(), StageError>;
}

struct Prepared<S: Stage> {
    stage: Arc<S>,
    config: S::Config,
}

impl<S: Stage> PreparedStage for Prepared<S> {
    fn config_json(&self) -> serde_json::Value {
        // Serialising a plain serde struct to a JSON value cannot fail (no non-string map
        // keys in configs); fall back to null rather than panic.
        serde_json::to_value(&self.config).unwrap_or(serde_json::Value::Null)
    }
    fn key_json(&self) -> serde_json::Value {
        let mut v = self.config_json();
        if let serde_json::Value::Object(m) = &mut v {
            for f in S::RUN_ONLY {
                m.remove(*f);
            }
        }
        v
    }
    fn inputs(&self) -> Vec<InputSlot> {
        self.stage.inputs(&self.config)
    }
    fn output(&self) -> OutputDecl {
        self.stage.output(&self.config)
    }
    fn external_inputs(&self, base: &Path) -> Vec<PathBuf> {
        self.stage
            .external_inputs(&self.config)
            .into_iter()
            .map(|p| if p.is_absolute() { p } else { base.join(p) })
            .collect()
    }
    fn listed_inputs(&self, base: &Path) -> Result<Option<ListedFiles>, StageError> {
        self.stage.listed_inputs(&self.config, base)
    }
    fn resources(&self) -> Resources {
        self.stage.resources(&self.config)
    }
    fn run(&self, ctx: &mut StageContext<'_>) -> Result<(), StageError> {
        self.stage.run(&self.config, ctx)
    }
}

struct Erased<S: Stage>(Arc<S>);

impl<S: Stage> DynStage for Erased<S> {
    fn kind(&self) -> &'static str {
        S::KIND
    }
    fn version(&self) -> u32 {
        S::VERSION
    }
    fn summary(&self) -> &'static str {
        S::SUMMARY
    }
    fn uses_backend(&self) -> bool {
        S::USES_BACKEND
    }
    fn data_parallel(&self) -> bool {
        S::DATA_PARALLEL
    }
    fn code_fingerprint(&self) -> &'static str {
        self.0.code_fingerprint()
    }
    fn prepare(&self, with: &serde_json::Value) -> Result<Arc<dyn PreparedStage>, ConfigError> {
        let value = if with.is_null() { serde_json::Value::Object(Default::default()) } else { with.clone() };
        let config: S::Config = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            ConfigError { path: if path == "." { String::new() } else { path }, message: e.into_inner().to_string() }
        })?;
        self.0.validate(&config)?;
        Ok(Arc::new(Prepared { stage: self.0.clone(), config }))
    }
}

/// The stage kinds a binary knows, by kind name.
#[derive(Default, Clone)]
pub struct Registry {
    stages: BTreeMap<&'static str, Arc<dyn DynStage>>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.stages.keys()).finish()
    }
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Register a stage kind.
    ///
    /// # Panics
    /// When the kind is already registered: two plugins claiming one name is a programming
    /// error in the binary, caught by its first test.
    pub fn register<S: Stage>(&mut self, stage: S) -> &mut Self {
        let prev = self.stages.insert(S::KIND, Arc::new(Erased(Arc::new(stage))));
        assert!(prev.is_none(), "stage kind `{}` registered twice", S::KIND);
        self
    }

    pub fn get(&self, kind: &str) -> Option<&Arc<dyn DynStage>> {
        self.stages.get(kind)
    }

    pub fn kinds(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.stages.keys().copied()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn DynStage>> {
        self.stages.values()
    }

    /// Registered kinds closest to `kind` (for "did you mean" hints).
    pub fn suggest(&self, kind: &str) -> Vec<&'static str> {
        let mut scored: Vec<(usize, &'static str)> = self
            .stages
            .keys()
            .map(|k| (edit_distance(kind, k), *k))
            .filter(|(d, k)| *d <= 3.max(k.len() / 3))
            .collect();
        scored.sort();
        scored.into_iter().take(3).map(|(_, k)| k).collect()
    }
}

/// Levenshtein distance, for suggestions.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb)).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Cfg {
        #[serde(default = "two")]
        epochs: u32,
        lr: f64,
    }
    fn two() -> u32 {
        2
    }

    struct Demo;
    impl Stage for Demo {
        type Config = Cfg;
        const KIND: &'static str = "demo/train";
        const VERSION: u32 = 1;
        const SUMMARY: &'static str = "demo";
        fn code_fingerprint(&self) -> &'static str {
            crate::code_fingerprint!()
        }
        fn validate(&self, c: &Cfg) -> Result<(), ConfigError> {
            if c.lr <= 0.0 {
                return Err(ConfigError { path: "lr".into(), message: "must be > 0".into() });
            }
            Ok(())
        }
        fn inputs(&self, _: &Cfg) -> Vec<InputSlot> {
            vec![]
        }
        fn output(&self, _: &Cfg) -> OutputDecl {
            OutputDecl::new("x", &["x.bin"])
        }
        fn run(&self, _: &Cfg, _: &mut StageContext<'_>) -> Result<(), StageError> {
            Ok(())
        }
    }

    #[test]
    fn prepare_fills_defaults_and_reports_paths() {
        let mut r = Registry::new();
        r.register(Demo);
        let s = r.get("demo/train").expect("registered");
        let p = s.prepare(&serde_json::json!({"lr": 0.5})).expect("valid");
        assert_eq!(p.config_json(), serde_json::json!({"epochs": 2, "lr": 0.5}));
        let e = s.prepare(&serde_json::json!({"lr": "fast"})).err().expect("type error");
        assert_eq!(e.path, "lr");
        assert!(e.message.contains("invalid type"), "{}", e.message);
        let e = s.prepare(&serde_json::json!({"lr": 1.0, "epoch": 3})).err().expect("unknown field");
        assert!(e.message.contains("unknown field `epoch`"), "{}", e.message);
        let e = s.prepare(&serde_json::json!({"lr": -1.0})).err().expect("validate");
        assert_eq!(e.to_string(), "lr: must be > 0");
        let e = s.prepare(&serde_json::Value::Null).err().expect("missing lr");
        assert!(e.message.contains("missing field `lr`"), "{}", e.message);
    }

    #[test]
    fn suggestions_find_near_misses() {
        let mut r = Registry::new();
        r.register(Demo);
        assert_eq!(r.suggest("demo/trian"), ["demo/train"]);
        assert!(r.suggest("ingest/chestxray14").is_empty());
    }

    #[test]
    fn resources_are_capped_by_budget() {
        assert_eq!(Resources::Slots(8).slots(2), 2);
        assert_eq!(Resources::Exclusive.slots(3), 3);
        assert_eq!(Resources::Light.slots(4), 1);
    }
}
