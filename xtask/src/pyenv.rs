//! The Python environment the tests use as an independent reference (pyarrow reading our
//! Parquet, PyTorch/timm/scikit-learn parity): a venv in the msmae cache created from
//! `xtask/python-requirements.txt`.
//!
//! Each requirements text gets its own venv (`pyenv-<hash>`), created under an exclusive
//! lock: two jobs on one cache (CI runs of two branches) never rebuild a venv the other
//! is using, and two that need the same one create it once.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::libtorch::cache_root;

const REQUIREMENTS: &str = include_str!("../python-requirements.txt");

/// 64-bit FNV-1a: a stable name for a requirements text (not a security boundary).
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// The venv of the current requirements.
fn venv_dir() -> PathBuf {
    cache_root().join(format!("pyenv-{:016x}", fnv1a(REQUIREMENTS)))
}

/// Create the venv if needed; returns its python executable.
pub fn ensure() -> Result<PathBuf> {
    let dir = venv_dir();
    let python = dir.join("bin").join("python3");
    let stamp = dir.join("msmae-requirements.txt");
    let ready = || python.is_file() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(REQUIREMENTS);
    if ready() {
        return Ok(python);
    }
    std::fs::create_dir_all(cache_root()).with_context(|| format!("create {}", cache_root().display()))?;
    let lock_path = dir.with_extension("lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("open {}", lock_path.display()))?;
    lock.lock().with_context(|| format!("lock {}", lock_path.display()))?;
    // Someone else may have finished it while this job waited.
    if ready() {
        return Ok(python);
    }
    let host = std::env::var("MSMAE_HOST_PYTHON").unwrap_or_else(|_| "python3".into());
    eprintln!("[pyenv] creating the test venv at {} (first run with these requirements)", dir.display());
    run(Command::new(&host).args(["-m", "venv", "--clear"]).arg(&dir), "create the venv (is python3-venv installed?)")?;
    let req = dir.join("requirements.txt");
    std::fs::write(&req, REQUIREMENTS).with_context(|| format!("write {}", req.display()))?;
    run(
        Command::new(&python)
            .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--only-binary=:all:", "-r"])
            .arg(&req),
        "pip install the test requirements (is PyPI reachable?)",
    )?;
    // The stamp last: a venv without it is unfinished and is redone.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn venv_names_follow_the_requirements_text() {
        assert_eq!(fnv1a(""), 0xcbf2_9ce4_8422_2325, "FNV-1a's offset basis");
        assert_eq!(fnv1a("a"), 0xaf63_dc4c_8601_ec8c, "the published FNV-1a test vector");
        assert_ne!(fnv1a("torch==2.9.0\n"), fnv1a("torch==2.9.1\n"));
        let name = venv_dir().file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        assert!(name.starts_with("pyenv-") && name.len() == 6 + 16, "{name}");
    }
}
