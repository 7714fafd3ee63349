//! Progress as the reader sees it: bars (indicatif) on a terminal, printed through one
//! [`indicatif::MultiProgress`] with the log lines so they do not tear; without a terminal
//! (a Slurm job's log, CI, `nohup`), a log line per loop every `MSMAE_PROGRESS_STEPS` steps
//! (default 50) or `MSMAE_PROGRESS_SECONDS` seconds (default 30), whichever comes first,
//! but at most one every `MSMAE_PROGRESS_SECONDS / 6`: position, rate, the loop's message
//! (a training step's loss, learning rate and images/s) and the ETA.

use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use msmae_core::{Progress, ProgressBar as CoreBar};

static MULTI: OnceLock<MultiProgress> = OnceLock::new();

fn multi() -> &'static MultiProgress {
    MULTI.get_or_init(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()))
}

/// Bars for stage loops: on a terminal, or as log lines.
#[derive(Debug, Clone)]
pub enum Bars {
    Terminal,
    Log { steps: u64, every: Duration },
}

impl Default for Bars {
    fn default() -> Self {
        if std::io::stderr().is_terminal() { Bars::Terminal } else { Bars::log_from_env() }
    }
}

impl Bars {
    /// Log lines at the intervals the environment sets (see the module doc).
    pub fn log_from_env() -> Self {
        let num = |k: &str| {
            std::env::var(k).ok().and_then(|v| v.trim().parse::<f64>().ok()).filter(|v| v.is_finite() && *v > 0.0)
        };
        Bars::Log {
            steps: num("MSMAE_PROGRESS_STEPS").map_or(50, |v| v.ceil() as u64),
            every: Duration::from_secs_f64(num("MSMAE_PROGRESS_SECONDS").unwrap_or(30.0)),
        }
    }
}

/// A loop's progress as log lines.
struct LogBar {
    name: String,
    len: Option<u64>,
    steps: u64,
    every: Duration,
    started: Instant,
    state: Mutex<LogState>,
}

struct LogState {
    pos: u64,
    message: String,
    last_time: Instant,
    last_pos: u64,
}

impl LogBar {
    fn line(&self, s: &LogState) -> String {
        let secs = self.started.elapsed().as_secs_f64().max(1e-9);
        let rate = s.pos as f64 / secs;
        let mut line = match self.len {
            Some(n) if n > 0 => {
                format!("{}: {}/{n} ({:.0} %), {rate:.2}/s", self.name, s.pos, 100.0 * s.pos as f64 / n as f64)
            }
            _ => format!("{}: {}, {rate:.2}/s", self.name, s.pos),
        };
        if !s.message.is_empty() {
            line.push_str(&format!(", {}", s.message));
        }
        if let Some(n) = self.len.filter(|_| rate > 0.0) {
            let eta = n.saturating_sub(s.pos) as f64 / rate;
            line.push_str(&format!(", ETA {}", hms(eta)));
        }
        line
    }
}

/// `1:02:03`, `2:03` or `3 s`.
fn hms(seconds: f64) -> String {
    let s = seconds.round() as u64;
    match (s / 3600, (s / 60) % 60, s % 60) {
        (0, 0, sec) => format!("{sec} s"),
        (0, m, sec) => format!("{m}:{sec:02}"),
        (h, m, sec) => format!("{h}:{m:02}:{sec:02}"),
    }
}

impl CoreBar for LogBar {
    fn inc(&self, n: u64) {
        let Ok(mut s) = self.state.lock() else { return };
        s.pos += n;
        let since = s.last_time.elapsed();
        let by_steps = s.pos - s.last_pos >= self.steps && since >= self.every / 6;
        if (by_steps || since >= self.every) && self.len.is_none_or(|l| s.pos < l) {
            tracing::info!("{}", self.line(&s));
            s.last_time = Instant::now();
            s.last_pos = s.pos;
        }
    }
    fn set_message(&self, m: &str) {
        if let Ok(mut s) = self.state.lock() {
            s.message = m.to_string();
        }
    }
}

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
        if let Bars::Log { steps, every } = self {
            let now = Instant::now();
            return Box::new(LogBar {
                name: message.to_string(),
                len,
                steps: *steps,
                every: *every,
                started: now,
                state: Mutex::new(LogState { pos: 0, message: String::new(), last_time: now, last_pos: 0 }),
            });
        }
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
    Arc::new(Bars::default())
}
