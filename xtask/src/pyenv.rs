//! The Python environment the tests use as an independent reference (pyarrow reading our
//! Parquet, later PyTorch/scikit-learn parity): a venv in the msmae cache, created from
//! `xtask/python-requirements.txt`, reinstalled when that file changes.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::libtorch::cache_root;

const REQUIREMENTS: &str = include_str!("../python-requirements.txt");

/// Create or update the venv; returns its python executable.
pub fn ensure() -> Result<PathBuf> {
    let dir = cache_root().join("pyenv");
    let python = dir.join("bin").join("python3");
    let stamp = dir.join("msmae-requirements.txt");
    if python.is_file() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(REQUIREMENTS) {
        return Ok(python);
    }
    let host = std::env::var("MSMAE_HOST_PYTHON").unwrap_or_else(|_| "python3".into());
    eprintln!("[pyenv] creating the test venv at {} (requirements changed or first run)", dir.display());
    run(Command::new(&host).args(["-m", "venv", "--clear"]).arg(&dir), "create the venv (is python3-venv installed?)")?;
    let req = dir.join("requirements.txt");
    std::fs::write(&req, REQUIREMENTS).with_context(|| format!("write {}", req.display()))?;
    run(
        Command::new(&python).args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--only-binary=:all:", "-r"]).arg(&req),
        "pip install the test requirements (is PyPI reachable?)",
    )?;
    std::fs::write(&stamp, REQUIREMENTS).with_context(|| format!("write {}", stamp.display()))?;
    Ok(python)
}

fn run(c: &mut Command, what: &str) -> Result<()> {
    let s = c.status().with_context(|| format!("{what}: could not start {c:?}"))?;
    if !s.success() {
        bail!("{what}: {c:?} exited with {s}");
    }
    Ok(())
}
