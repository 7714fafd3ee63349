//! A build that says what it does: cargo's output is held back until cargo starts
//! compiling something; then a line says what follows and cargo's progress (its bar on a
//! terminal, its `Compiling …` lines otherwise) streams through. A no-op build prints
//! nothing; a failed one prints everything cargo said.

use std::io::{IsTerminal, Read, Write};
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};

use anyhow::{Context, Result};

/// Words cargo prints only when it has work to do.
const WORK: [&str; 5] = ["Compiling", "Building", "Downloading", "Updating", "Blocking"];

/// The state of one build's stderr.
#[derive(Debug, Default)]
pub struct Gate {
    held: Vec<u8>,
    open: bool,
}

impl Gate {
    /// Feed a chunk of cargo's stderr; returns what to print now (with `banner` before it
    /// the first time work shows).
    pub fn feed(&mut self, chunk: &[u8], banner: &str) -> Vec<u8> {
        if self.open {
            return chunk.to_vec();
        }
        self.held.extend_from_slice(chunk);
        let text = String::from_utf8_lossy(&self.held);
        if !WORK.iter().any(|w| text.contains(w)) {
            return Vec::new();
        }
        self.open = true;
        let mut out = format!("{banner}\n").into_bytes();
        out.append(&mut self.held);
        out
    }

    /// At the end of the build: what is still held back, printed only if the build failed.
    pub fn finish(self, success: bool) -> Vec<u8> {
        if success || self.open { Vec::new() } else { self.held }
    }
}

/// The line printed when a build starts compiling.
pub fn banner(first: bool) -> String {
    if first {
        "xtask: first build of msmae (release, the ML stack included): about 20 minutes on 2 cores, once; later builds compile only what changed".into()
    } else {
        "xtask: building msmae (only what changed since the last build)".into()
    }
}

/// Run a cargo build command through a [`Gate`]. `binary` is what the build makes: when it
/// does not exist yet, the banner announces the long first build.
pub fn build(mut c: Command, binary: &Path) -> Result<ExitCode> {
    let tty = std::io::stderr().is_terminal();
    if tty {
        // cargo's own progress bar, although its stderr is a pipe (to us).
        let width = std::env::var("COLUMNS").ok().and_then(|w| w.parse::<u32>().ok()).unwrap_or(100);
        c.env("CARGO_TERM_PROGRESS_WHEN", "always").env("CARGO_TERM_PROGRESS_WIDTH", width.to_string());
        if std::env::var_os("CARGO_TERM_COLOR").is_none() {
            c.env("CARGO_TERM_COLOR", "always");
        }
    }
    c.stderr(Stdio::piped());
    let mut child = c.spawn().with_context(|| format!("running {c:?}"))?;
    let mut err = child.stderr.take().context("cargo's stderr")?;
    let banner = banner(!binary.exists());
    let mut gate = Gate::default();
    let mut buf = [0u8; 8192];
    let mut out = std::io::stderr();
    loop {
        let n = err.read(&mut buf).context("reading cargo's output")?;
        if n == 0 {
            break;
        }
        let now = gate.feed(&buf[..n], &banner);
        if !now.is_empty() {
            out.write_all(&now)?;
            out.flush()?;
        }
    }
    let status = child.wait().context("waiting for cargo")?;
    out.write_all(&gate.finish(status.success()))?;
    Ok(match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(n) => ExitCode::from(u8::try_from(n).unwrap_or(1)),
        None => ExitCode::FAILURE,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_no_op_build_prints_nothing() {
        let mut g = Gate::default();
        assert!(g.feed(b"    Finished `release` profile [optimized] target(s) in 0.41s\n", "B").is_empty());
        assert!(!g.open);
        assert!(g.finish(true).is_empty());
    }

    #[test]
    fn a_build_that_compiles_says_so_then_streams_everything() {
        let mut g = Gate::default();
        assert!(g.feed(b"   Compi", "B").is_empty(), "a word cut between chunks is held until complete");
        let first = g.feed(b"ling msmae-core v0.1.0\n", "B");
        assert_eq!(String::from_utf8_lossy(&first), "B\n   Compiling msmae-core v0.1.0\n");
        assert_eq!(g.feed(b"\r    Building [==> ] 3/500", "B"), b"\r    Building [==> ] 3/500".to_vec());
        assert!(g.finish(true).is_empty());
    }

    #[test]
    fn a_failure_before_any_compiling_shows_what_cargo_said() {
        let mut g = Gate::default();
        assert!(g.feed(b"error: failed to parse manifest at `/x/Cargo.toml`\n", "B").is_empty());
        assert_eq!(g.finish(false), b"error: failed to parse manifest at `/x/Cargo.toml`\n".to_vec());
    }

    #[test]
    fn the_banner_announces_the_long_first_build_only_once() {
        assert!(banner(true).contains("first build") && banner(true).contains("minutes"));
        assert!(!banner(false).contains("first build"));
    }
}

/// The counts of every `test result:` line of a `cargo test` run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TestTotals {
    pub passed: usize,
    pub failed: usize,
    pub ignored: usize,
}

impl TestTotals {
    /// Add one line of cargo test's output (`test result: ok. 3 passed; 0 failed; 1 ignored; …`).
    pub fn add_line(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else { return };
        for part in rest.split([';', '.']) {
            let mut w = part.split_whitespace();
            let (Some(n), Some(what)) = (w.next().and_then(|n| n.parse::<usize>().ok()), w.next()) else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }
}

/// Run `cargo test`, passing its output through as it comes, and total its result lines.
pub fn test_totals(mut c: Command) -> Result<(ExitCode, TestTotals)> {
    use std::io::BufRead;
    c.stdout(Stdio::piped());
    let mut child = c.spawn().with_context(|| format!("running {c:?}"))?;
    let mut totals = TestTotals::default();
    if let Some(out) = child.stdout.take() {
        let mut stdout = std::io::stdout();
        for line in std::io::BufReader::new(out).lines() {
            let line = line.context("reading cargo test's output")?;
            totals.add_line(&line);
            let _ = writeln!(stdout, "{line}");
        }
    }
    let s = child.wait().context("waiting for cargo test")?;
    let code = match s.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(n) => ExitCode::from(u8::try_from(n).unwrap_or(1)),
        None => ExitCode::FAILURE,
    };
    Ok((code, totals))
}

#[cfg(test)]
mod totals_tests {
    use super::TestTotals;

    #[test]
    fn totals_add_up_every_result_line() {
        let mut t = TestTotals::default();
        t.add_line("test result: ok. 12 passed; 0 failed; 2 ignored; 0 measured; 0 filtered out; finished in 1.02s");
        t.add_line("running 3 tests");
        t.add_line("test result: FAILED. 1 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.5s");
        assert_eq!(t, TestTotals { passed: 13, failed: 1, ignored: 2 });
    }
}
