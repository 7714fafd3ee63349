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
    /// A stage's own error, kept whole (its causes ride on `source`).
    #[error("stage `{stage}` failed")]
    Stage {
        stage: String,
        #[source]
        source: msmae_core::StageError,
    },
    #[error("panicked: {message}")]
    Panicked { message: String },
    #[error(
        "its key here is {key}, not {submitted} as submitted (computing on {env}): the code, config, inputs or environment changed since; re-run the driver"
    )]
    KeyMismatch { key: String, submitted: String, env: String },
    #[error("input `{upstream}` (artifact {artifact}) is damaged: {problems}; re-run it with `--stage {upstream}`")]
    DamagedInput { upstream: String, artifact: String, problems: String },
    /// A failure another process reported (a Slurm job, rank 0 of a multi-process run), as
    /// it rendered it.
    #[error("{0}")]
    Reported(String),
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
        "the artifact store {store} is full: stage `{stage}` wrote {written} before the filesystem ran out, so it needs more than the {available} available there; nothing was committed (its staging is removed): free space or move the store (--store), then re-run"
    )]
    OutOfSpace {
        stage: String,
        store: PathBuf,
        written: String,
        available: String,
        #[source]
        source: Box<Error>,
    },
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

    /// Whether the filesystem ran out of space somewhere down this error's causes: an I/O
    /// error of that kind, or a cause that a library turned into text.
    pub fn is_out_of_space(&self) -> bool {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = cause {
            if let Some(io) = e.downcast_ref::<std::io::Error>()
                && (io.kind() == std::io::ErrorKind::StorageFull || io.raw_os_error() == Some(28))
            {
                return true;
            }
            let text = e.to_string();
            if ["No space left on device", "os error 28", "StorageFull", "storage full", "no storage space"]
                .iter()
                .any(|t| text.contains(t))
            {
                return true;
            }
            cause = e.source();
        }
        false
    }
}

/// Why a stage failed: the error itself when it failed in this process (so a caller can
/// look at its variant and causes), the rendered chain when another process reported it.
/// Displays as the whole chain; serialises as that text.
#[derive(Debug, Clone)]
pub struct Failure(std::sync::Arc<Error>);

impl Failure {
    pub fn error(&self) -> &Error {
        &self.0
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure(std::sync::Arc::new(e))
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&msmae_core::error::chain(&*self.0))
    }
}

impl PartialEq for Failure {
    fn eq(&self, other: &Self) -> bool {
        self.to_string() == other.to_string()
    }
}

impl serde::Serialize for Failure {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> serde::Deserialize<'de> for Failure {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        String::deserialize(d).map(|s| Error::Reported(s).into())
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
                source: Box::new(Error::store(
                    "write",
                    "/s/tmp/x",
                    std::io::Error::new(std::io::ErrorKind::StorageFull, "no space"),
                )),
            },
            Error::Stage {
                stage: "a".into(),
                source: msmae_core::StageError::io("/d/x.png", std::io::Error::other("disk on fire")),
            },
            Error::Panicked { message: "index out of bounds".into() },
            Error::KeyMismatch { key: "k1".into(), submitted: "k2".into(), env: "cpu".into() },
            Error::DamagedInput { upstream: "b".into(), artifact: "abc".into(), problems: "x.bin: size".into() },
            Error::Reported("stage `a` failed: read /x: gone".into()),
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

    /// A failure keeps the error value in this process and crosses processes as its text.
    #[test]
    fn a_failure_keeps_its_error_and_travels_as_its_chain() {
        let f: Failure = Error::Stage {
            stage: "data".into(),
            source: msmae_core::StageError::io("/d/x.png", std::io::Error::other("gone")),
        }
        .into();
        assert!(matches!(f.error(), Error::Stage { stage, .. } if stage == "data"));
        assert_eq!(f.to_string(), "stage `data` failed: /d/x.png: gone");
        let json = serde_json::to_string(&f).expect("ser");
        let back: Failure = serde_json::from_str(&json).expect("de");
        assert!(matches!(back.error(), Error::Reported(_)));
        assert_eq!(back, f, "the same text");
        assert_eq!(back.to_string(), f.to_string());
    }

    #[test]
    fn running_out_of_space_is_found_down_the_causes() {
        let full = std::io::Error::new(std::io::ErrorKind::StorageFull, "full");
        assert!(Error::store("write", "/s/x", full).is_out_of_space());
        let as_text = msmae_core::StageError::other("writing images.parquet: No space left on device (os error 28)");
        assert!(Error::Stage { stage: "a".into(), source: as_text }.is_out_of_space());
        let other = msmae_core::StageError::io("/d/x.png", std::io::Error::other("gone"));
        assert!(!Error::Stage { stage: "a".into(), source: other }.is_out_of_space());
    }
}
