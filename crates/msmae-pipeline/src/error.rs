//! Errors of the runner. Pipeline-file errors carry the file, line, column and the dotted
//! key they concern, and are collected so that one run reports all of them.

use std::fmt;
use std::path::PathBuf;

/// One problem in a pipeline file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    pub file: PathBuf,
    /// 1-based; 0 when unknown.
    pub line: usize,
    pub column: usize,
    /// Dotted key (`stages.pretrain.with.epochs`), empty for the whole file.
    pub key: String,
    pub message: String,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found in a pipeline file (at least one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecErrors(pub Vec<SpecError>);

impl fmt::Display for SpecErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SpecErrors {}

/// Errors of planning, running and inspecting a pipeline.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Spec(#[from] SpecErrors),
    #[error("read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{op} {path}")]
    Store {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("corrupt store entry {path}: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error("unknown stage `{name}`; stages: {known}")]
    UnknownStage { name: String, known: String },
    #[error(
        "stage `{stage}` needs `{upstream}`, which is not selected and has no cached output: run it first (e.g. `--until {upstream}`)"
    )]
    NotCached { stage: String, upstream: String },
    #[error("hash {path}")]
    Hash {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("stage `{stage}` output: {message}")]
    Output { stage: String, message: String },
    #[error("slurm: {0}")]
    Slurm(String),
    #[error("stage `{stage}` was cancelled")]
    Cancelled { stage: String },
    #[error("lock file {path}: {message}")]
    LockFile { path: PathBuf, message: String },
    #[error(
        "artifact store {path} is read-only and {what}: a fully cached run, status, why, dag and verify work on it; computing stages, updating its lock files and gc need it writable"
    )]
    ReadOnly { path: PathBuf, what: String },
    #[error(
        "the artifact store {store} is full: stage `{stage}` wrote {written} before the filesystem ran out, so it needs more than the {available} available there; nothing was committed (its staging is removed): free space or move the store (--store), then re-run ({cause})"
    )]
    OutOfSpace { stage: String, store: PathBuf, written: String, available: String, cause: String },
    #[error("artifact store {path} is held by {holder} (waiting is the default: drop --no-wait to wait for it)")]
    Busy { path: PathBuf, holder: String },
    #[error(
        "{path} is not an msmae artifact store: {found}. msmae makes a store only in a new or empty directory, so that nothing else is ever touched; choose one with --store (or MSMAE_STORE), e.g. --store {}",
        path.join(".msmae").display()
    )]
    NotAStore { path: PathBuf, found: String },
    #[error("audit: {0}")]
    Audit(String),
    #[error(
        "lock file {lock} belongs to pipeline {owner}, not {pipeline}: two pipelines sharing one lock file would overwrite each other's audit trail; give this one its own with --lock {}",
        suggested.display()
    )]
    LockOwner { lock: PathBuf, owner: String, pipeline: PathBuf, suggested: PathBuf },
}

impl Error {
    pub fn store(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Store { op, path: path.into(), source }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    /// Every variant of the runner's errors renders its cause once in `chain`.
    #[test]
    fn no_variant_repeats_its_cause() {
        let io = || std::io::Error::new(std::io::ErrorKind::PermissionDenied, "permission denied");
        let spec = SpecErrors(vec![SpecError {
            file: "p.yaml".into(),
            line: 3,
            column: 5,
            key: "stages.a.with".into(),
            message: "bad".into(),
        }]);
        let all = [
            Error::Spec(spec),
            Error::Read { path: "/p.yaml".into(), source: io() },
            Error::store("write", "/s/index/k", io()),
            Error::Corrupt { path: "/s/objects/ab".into(), message: "truncated manifest".into() },
            Error::UnknownStage { name: "x".into(), known: "a, b".into() },
            Error::NotCached { stage: "b".into(), upstream: "a".into() },
            Error::Hash { path: "/d/x.png".into(), source: io() },
            Error::Output { stage: "a".into(), message: "did not write model.safetensors".into() },
            Error::Slurm("sbatch: invalid partition".into()),
            Error::Cancelled { stage: "a".into() },
            Error::LockFile { path: "/p.lock".into(), message: "not YAML".into() },
            Error::ReadOnly { path: "/s".into(), what: "stage `a` must run".into() },
            Error::OutOfSpace {
                stage: "a".into(),
                store: "/s".into(),
                written: "1 GB".into(),
                available: "10 MB".into(),
                cause: "no space".into(),
            },
            Error::Busy { path: "/s".into(), holder: "pid 7".into() },
            Error::NotAStore { path: "/home".into(), found: "notes/".into() },
            Error::Audit("stage `a` differs".into()),
            Error::LockOwner {
                lock: "/a.lock".into(),
                owner: "a.yml".into(),
                pipeline: "a.yaml".into(),
                suggested: "a.yaml.lock".into(),
            },
        ];
        for e in &all {
            assert_eq!(msmae_core::error::repeated_cause(e), None, "{e:?}");
            let text = msmae_core::error::chain(e);
            assert!(text.matches("permission denied").count() <= 1, "{text}");
        }
        assert_eq!(msmae_core::error::chain(&all[1]), "read /p.yaml: permission denied");
        assert_eq!(msmae_core::error::chain(&all[2]), "write /s/index/k: permission denied");
    }
}
