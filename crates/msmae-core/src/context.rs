//! The context a stage runs in: where to write, what it may read, its seed, and how to
//! report progress and notice cancellation.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::artifact::{InputArtifact, OutputDecl};
use crate::error::StageError;
use crate::progress::Progress;

/// Set when the user interrupts a run; long loops check it between steps.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
    /// `Err(Cancelled)` once cancelled: `ctx.cancel.check()?` in loops.
    pub fn check(&self) -> Result<(), StageError> {
        if self.is_cancelled() { Err(StageError::Cancelled) } else { Ok(()) }
    }
}

/// What the numbers may depend on: part of the cache key of stages that use the backend.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExecEnv {
    /// `flex` (pure Rust) or `tch` (libtorch).
    pub backend: String,
    /// The device as the user asked for it, resolved: `cpu`, `cuda:0`.
    pub device: String,
    /// `cpu` or `cuda`: the part of the device that changes numbers.
    pub device_kind: String,
    pub precision: String,
    /// The numeric library behind the backend and its version (`libtorch 2.9.0`), part of
    /// the cache key of stages that compute with it; empty for the pure-Rust backend (whose
    /// version is one of the stage's dependencies).
    #[serde(default)]
    pub library: String,
}

impl ExecEnv {
    pub fn cpu_flex() -> Self {
        Self {
            backend: "flex".into(),
            device: "cpu".into(),
            device_kind: "cpu".into(),
            precision: "f32".into(),
            library: String::new(),
        }
    }
}

/// Handed to [`crate::Stage::run`].
pub struct StageContext<'a> {
    /// The stage's name in the pipeline (`pretrain`, `refresh.2.masks`).
    pub name: String,
    pub seed: u64,
    pub env: ExecEnv,
    /// Worker threads this stage may use (its share of the runner's budget).
    pub threads: usize,
    pub cancel: CancelToken,
    pub progress: &'a dyn Progress,
    out_dir: PathBuf,
    base_dir: PathBuf,
    output: OutputDecl,
    inputs: BTreeMap<String, Vec<InputArtifact>>,
    resume_dir: Option<PathBuf>,
    run_log: Option<PathBuf>,
    group: std::sync::Arc<dyn crate::Collective>,
}

impl std::fmt::Debug for StageContext<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StageContext")
            .field("name", &self.name)
            .field("seed", &self.seed)
            .field("out_dir", &self.out_dir)
            .field("inputs", &self.inputs)
            .finish_non_exhaustive()
    }
}

impl<'a> StageContext<'a> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: String,
        seed: u64,
        env: ExecEnv,
        threads: usize,
        cancel: CancelToken,
        progress: &'a dyn Progress,
        out_dir: PathBuf,
        base_dir: PathBuf,
        output: OutputDecl,
        inputs: BTreeMap<String, Vec<InputArtifact>>,
    ) -> Self {
        Self {
            name,
            seed,
            env,
            threads,
            cancel,
            progress,
            out_dir,
            base_dir,
            output,
            inputs,
            resume_dir: None,
            run_log: None,
            group: std::sync::Arc::new(crate::Solo),
        }
    }

    /// The processes this stage runs on together: the runner sets the launch's group for a
    /// data-parallel stage of a multi-process run; every other stage runs alone (Solo), so
    /// it can never wait in a collective the other ranks do not enter.
    pub fn with_group(mut self, group: std::sync::Arc<dyn crate::Collective>) -> Self {
        self.group = group;
        self
    }

    /// See [`Self::with_group`].
    pub fn group(&self) -> &dyn crate::Collective {
        &*self.group
    }

    /// Give the stage a directory that survives a killed run (the runner keys it by the
    /// stage's cache key and removes it once the output is committed).
    pub fn with_resume_dir(mut self, dir: PathBuf) -> Self {
        self.resume_dir = Some(dir);
        self
    }

    /// Where a long stage keeps checkpoints to resume from after a crash or kill. Anything
    /// here belongs to this exact cache key (same code, config, inputs, seed and backend),
    /// so a stage may resume from it without further checks beyond its own integrity
    /// checks. `None` when the caller provides no such directory (then: no resume).
    pub fn resume_dir(&self) -> Option<&Path> {
        self.resume_dir.as_deref()
    }

    /// Give the stage a run-log directory (TensorBoard event files): outside the artifact,
    /// so what is written there never changes a cache digest.
    pub fn with_run_log(mut self, dir: PathBuf) -> Self {
        self.run_log = Some(dir);
        self
    }

    /// See [`Self::with_run_log`]; `None` when the run keeps no such logs.
    pub fn run_log(&self) -> Option<&Path> {
        self.run_log.as_deref()
    }

    /// The (temporary) output directory; the runner commits it only if `run` succeeds.
    pub fn out_dir(&self) -> &Path {
        &self.out_dir
    }

    /// Path for a declared output file; creates its parent directory.
    pub fn output_path(&self, rel: &str) -> Result<PathBuf, StageError> {
        if !self.output.declares(rel) {
            return Err(StageError::Undeclared {
                stage: self.name.clone(),
                file: rel.to_string(),
                declared: format!("{:?}", self.output.files),
            });
        }
        let p = self.out_dir.join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).map_err(|e| StageError::io(parent, e))?;
        }
        Ok(p)
    }

    /// The single artifact bound to slot `name`.
    pub fn input(&self, slot: &str) -> Result<&InputArtifact, StageError> {
        self.inputs.get(slot).and_then(|v| v.first()).ok_or_else(|| StageError::MissingInput { slot: slot.to_string() })
    }

    /// All artifacts bound to slot `name` (empty for an unbound optional slot).
    pub fn inputs(&self, slot: &str) -> &[InputArtifact] {
        self.inputs.get(slot).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Resolve a path from the config against the pipeline file's directory.
    pub fn resolve(&self, p: impl AsRef<Path>) -> PathBuf {
        let p = p.as_ref();
        if p.is_absolute() { p.to_path_buf() } else { self.base_dir.join(p) }
    }
}
