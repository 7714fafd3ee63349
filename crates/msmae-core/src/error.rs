//! Errors a stage reports to the runner.
//!
//! Variants name the operation that failed and carry what a user needs to act (the file,
//! row, field, epoch); underlying errors are chained through `source()` (`#[source]`), and
//! [`chain`] renders the whole chain on one line for logs and the lock file.

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
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Bad user data: names the file (and row/field where known).
    #[error("{path}{}: {message}", location.as_ref().map(|l| format!(" ({l})")).unwrap_or_default())]
    Data { path: PathBuf, location: Option<String>, message: String },
    /// A `with:` field is invalid for the data the stage was given (found only at run time,
    /// e.g. a model that does not divide the images).
    #[error("with: {0}")]
    Config(ConfigError),
    /// The requested backend or device cannot be used.
    #[error("backend `{backend}`, device `{device}`")]
    Device {
        backend: String,
        device: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The training loss became NaN or infinite: nothing is committed, the last checkpoint
    /// is kept.
    #[error("training diverged at epoch {epoch}, step {step}: loss {loss} (lower the learning rate)")]
    Diverged { epoch: usize, step: usize, loss: f64 },
    /// A checkpoint to resume from exists but cannot be read.
    #[error("cannot resume from the checkpoint after epoch {epoch}, {path} ({message}); `--force` starts over")]
    Resume { path: PathBuf, epoch: usize, message: String },
    /// A checkpoint could not be written.
    #[error("writing checkpoint {path}: {message}")]
    WriteCheckpoint { path: PathBuf, message: String },
    /// An output file could not be encoded or written (a JSON summary, a figure, weights).
    #[error("writing {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The stage wrote a file its output declaration does not list (a bug of the stage).
    #[error("stage `{stage}` writes `{file}`, which its output declaration ({declared}) does not list")]
    Undeclared { stage: String, file: String, declared: String },
    /// A collective operation across the ranks of a multi-process run failed.
    #[error("{operation}: {message}")]
    Collective { operation: &'static str, message: String },
    #[error("{0}")]
    Other(String),
    #[error(transparent)]
    Boxed(#[from] Box<dyn std::error::Error + Send + Sync>),
}

impl StageError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }
    pub fn data(path: impl Into<PathBuf>, location: Option<String>, message: impl Into<String>) -> Self {
        Self::Data { path: path.into(), location, message: message.into() }
    }
    /// A `with:` field found invalid at run time.
    pub fn config(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Config(ConfigError { path: path.into(), message: message.into() })
    }
    pub fn other(message: impl Into<String>) -> Self {
        Self::Other(message.into())
    }
    /// Writing `path` failed because of `source` (an encoder's or a file's error).
    pub fn write(path: impl Into<PathBuf>, source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Write { path: path.into(), source: source.into() }
    }
}

/// An error and its causes on one line: `outer: inner: innermost`. Each error's message
/// names its own operation and leaves its cause to `source()`, so every cause appears once.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The first error of `e`'s chain whose message already contains its cause's message (the
/// cause would then print twice in [`chain`]): `(message, cause)`. For tests of error types.
pub fn repeated_cause(e: &(dyn std::error::Error + 'static)) -> Option<(String, String)> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        if let Some(src) = c.source() {
            let (m, s) = (c.to_string(), src.to_string());
            if !s.is_empty() && m.contains(&s) {
                return Some((m, s));
            }
        }
        cur = c.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every variant renders its cause once.
    #[test]
    fn no_variant_repeats_its_cause() {
        let io = || std::io::Error::new(std::io::ErrorKind::PermissionDenied, "permission denied");
        let all = [
            StageError::Cancelled,
            StageError::MissingInput { slot: "data".into() },
            StageError::io("/x", io()),
            StageError::data("/x.csv", Some("row 3, column `label`".into()), "not a number"),
            StageError::config("epochs", "must be at least 1"),
            StageError::Device { backend: "tch".into(), device: "cuda:3".into(), source: Box::new(io()) },
            StageError::Diverged { epoch: 1, step: 2, loss: f64::INFINITY },
            StageError::Resume { path: "/r".into(), epoch: 4, message: "truncated".into() },
            StageError::WriteCheckpoint { path: "/c".into(), message: "disk full".into() },
            StageError::write("/out/summary.json", io()),
            StageError::Undeclared { stage: "a".into(), file: "x.png".into(), declared: "[\"*.json\"]".into() },
            StageError::Collective { operation: "summing gradients over the ranks", message: "rank 1 left".into() },
            StageError::other("something"),
            StageError::Boxed(Box::new(StageError::io("/inner", io()))),
        ];
        for e in &all {
            assert_eq!(repeated_cause(e), None, "{e:?}");
            let text = chain(e);
            assert_eq!(
                text.matches("permission denied").count(),
                usize::from(text.contains("permission denied")),
                "{text}"
            );
        }
        assert_eq!(chain(&all[13]), "/inner: permission denied", "a transparent wrapper adds nothing");
        assert_eq!(chain(&all[9]), "writing /out/summary.json: permission denied");
        assert_eq!(chain(&all[5]), "backend `tch`, device `cuda:3`: permission denied");
    }

    #[test]
    fn a_message_that_repeats_its_cause_is_found() {
        #[derive(Debug, thiserror::Error)]
        #[error("reading /x: {source}")]
        struct Twice {
            #[source]
            source: std::io::Error,
        }
        let e = Twice { source: std::io::Error::other("gone") };
        assert_eq!(repeated_cause(&e), Some(("reading /x: gone".into(), "gone".into())));
    }

    #[test]
    fn causes_chain_through_source() {
        let e = StageError::io("/data/x.png", std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"));
        assert!(std::error::Error::source(&e).is_some(), "io errors must chain their cause");
        assert_eq!(chain(&e), "/data/x.png: no such file");
        let c = StageError::config("model.patch_size", "7 does not divide 64");
        assert_eq!(chain(&c), "with: model.patch_size: 7 does not divide 64");
        let d = StageError::Diverged { epoch: 3, step: 7, loss: f64::NAN };
        assert_eq!(chain(&d), "training diverged at epoch 3, step 7: loss NaN (lower the learning rate)");
    }
}
