//! Errors a stage reports to the runner.

use std::path::PathBuf;

/// A stage's `with:` block does not fit its typed config.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error("{path}: {message}")]
pub struct ConfigError {
    /// Dotted path inside `with` (`augment.scale`), empty for the block itself.
    pub path: String,
    pub message: String,
}

/// A stage failed while running.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("cancelled")]
    Cancelled,
    #[error("missing input slot `{slot}`")]
    MissingInput { slot: String },
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
                cause: std::io::Error,
    },
    /// Bad user data: names the file (and row/field where known).
    #[error("{path}{}: {message}", location.as_ref().map(|l| format!(" ({l})")).unwrap_or_default())]
    Data { path: PathBuf, location: Option<String>, message: String },
    #[error("{0}")]
    Other(String),
    #[error(transparent)]
    Boxed(#[from] Box<dyn std::error::Error + Send + Sync>),
}

impl StageError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), cause: source }
    }
    pub fn data(path: impl Into<PathBuf>, location: Option<String>, message: impl Into<String>) -> Self {
        Self::Data { path: path.into(), location, message: message.into() }
    }
    pub fn other(message: impl Into<String>) -> Self {
        Self::Other(message.into())
    }
}
