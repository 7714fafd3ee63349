//! Progress bars (indicatif) on a terminal; nothing when stderr is not one. Log lines are
//! printed through the same [`indicatif::MultiProgress`] so they do not tear the bars.

use std::io::Write;
use std::sync::{Arc, OnceLock};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use msmae_core::{Progress, ProgressBar as CoreBar};

static MULTI: OnceLock<MultiProgress> = OnceLock::new();

fn multi() -> &'static MultiProgress {
    MULTI.get_or_init(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()))
}

/// Bars for stage loops.
#[derive(Debug, Clone, Default)]
pub struct Bars;

struct Bar(ProgressBar);

impl CoreBar for Bar {
    fn inc(&self, n: u64) {
        self.0.inc(n);
    }
    fn set_message(&self, m: &str) {
        self.0.set_message(m.to_string());
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

impl Progress for Bars {
    fn bar(&self, len: Option<u64>, message: &str) -> Box<dyn CoreBar> {
        let pb = match len {
            Some(n) => ProgressBar::new(n).with_style(
                ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} {per_sec} {msg} (ETA {eta})")
                    .map(|s| s.progress_chars("=> "))
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            ),
            None => ProgressBar::new_spinner(),
        };
        let pb = multi().add(pb.with_prefix(message.to_string()));
        Box::new(Bar(pb))
    }
}

/// A `tracing` writer that suspends the bars while a line is written.
#[derive(Debug, Clone, Default)]
pub struct LogWriter;

pub struct LineWriter(Vec<u8>);

impl Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        let bytes = std::mem::take(&mut self.0);
        multi().suspend(|| {
            let _ = std::io::stderr().write_all(&bytes);
        });
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LineWriter;
    fn make_writer(&'a self) -> Self::Writer {
        LineWriter(Vec::new())
    }
}

/// Shared handle for stages.
pub fn bars() -> Arc<Bars> {
    Arc::new(Bars)
}
