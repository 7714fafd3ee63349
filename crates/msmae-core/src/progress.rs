//! Progress reporting, implemented by the binary (progress bars on a terminal, quiet
//! otherwise) so that stage crates stay free of terminal concerns.

/// Creates progress bars for long loops (images, epochs, batches).
pub trait Progress: Send + Sync {
    /// A bar with `len` steps (`None`: unknown length) and a message.
    fn bar(&self, len: Option<u64>, message: &str) -> Box<dyn ProgressBar>;
}

/// One bar; dropping it finishes it.
pub trait ProgressBar: Send + Sync {
    fn inc(&self, n: u64);
    fn set_message(&self, message: &str);
}

/// Reports nothing (tests, non-interactive use).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

struct NoBar;

impl ProgressBar for NoBar {
    fn inc(&self, _: u64) {}
    fn set_message(&self, _: &str) {}
}

impl Progress for NoProgress {
    fn bar(&self, _: Option<u64>, _: &str) -> Box<dyn ProgressBar> {
        Box::new(NoBar)
    }
}
