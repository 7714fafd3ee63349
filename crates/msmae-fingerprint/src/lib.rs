//! Build-time code fingerprint: a stage crate's `build.rs` calls [`emit`], which hashes the
//! crate's own sources and those of every `msmae-*` crate it depends on (transitively) and
//! exports the digest as `MSMAE_CODE_FINGERPRINT`. The runner folds it into each stage's
//! cache key, so editing the code behind a stage re-runs that stage and nothing else.
//!
//! Why not the git tree hash: a build from a tarball or with uncommitted edits must still
//! produce honest keys, and a commit that touches only the runner must not invalidate
//! every trained model.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

/// Hash the calling crate (from `CARGO_MANIFEST_DIR`) and its `msmae-*` path dependencies,
/// print `cargo:rustc-env=MSMAE_CODE_FINGERPRINT=<hex>` and the `rerun-if-changed` lines.
///
/// # Panics
/// Build scripts report failure by panicking; this panics when the manifest dir is unset or
/// a source file cannot be read, with the path in the message.
pub fn emit() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| panic!("CARGO_MANIFEST_DIR is not set: call emit() from build.rs"));
    let (digest, files) = fingerprint(Path::new(&dir)).unwrap_or_else(|e| panic!("msmae-fingerprint: cannot hash sources under {dir}: {e}"));
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    println!("cargo:rustc-env=MSMAE_CODE_FINGERPRINT={digest}");
}

/// Digest of a crate directory and its `msmae-*` sibling dependencies, with the files read.
pub fn fingerprint(crate_dir: &Path) -> std::io::Result<(String, Vec<PathBuf>)> {
    let mut crates = BTreeSet::new();
    collect_crates(crate_dir, &mut crates)?;
    let mut hasher = blake3::Hasher::new();
    let mut files = Vec::new();
    for c in &crates {
        let name = c.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let mut crate_files = Vec::new();
        crate_files.push(c.join("Cargo.toml"));
        let src = c.join("src");
        if src.is_dir() {
            walk(&src, &mut crate_files)?;
        }
        crate_files.sort();
        for f in crate_files {
            let rel = f.strip_prefix(c).unwrap_or(&f).to_string_lossy().replace('\\', "/");
            let bytes = fs::read(&f)?;
            hasher.update(name.as_bytes());
            hasher.update(b"/");
            hasher.update(rel.as_bytes());
            hasher.update(&(bytes.len() as u64).to_le_bytes());
            hasher.update(&bytes);
            files.push(f);
        }
    }
    Ok((hasher.finalize().to_hex()[..32].to_string(), files))
}

/// The crate itself plus every dependency named `msmae-*` found as a sibling directory.
fn collect_crates(dir: &Path, seen: &mut BTreeSet<PathBuf>) -> std::io::Result<()> {
    let dir = dir.canonicalize()?;
    if !seen.insert(dir.clone()) {
        return Ok(());
    }
    let manifest = fs::read_to_string(dir.join("Cargo.toml"))?;
    let mut in_deps = false;
    for line in manifest.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            // Build- and dev-dependencies do not change what the stage computes.
            in_deps = t == "[dependencies]";
            continue;
        }
        if !in_deps {
            continue;
        }
        let name = t.split(['=', ' ', '.']).next().unwrap_or("");
        if name.starts_with("msmae-")
            && name != "msmae-fingerprint"
            && let Some(parent) = dir.parent()
        {
            let sib = parent.join(name);
            if sib.join("Cargo.toml").is_file() {
                collect_crates(&sib, seen)?;
            }
        }
    }
    Ok(())
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let p = entry?.path();
        if p.is_dir() {
            walk(&p, out)?;
        } else {
            out.push(p);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(p: &Path, s: &str) {
        fs::create_dir_all(p.parent().expect("test path has a parent")).expect("mkdir");
        fs::write(p, s).expect("write");
    }

    #[test]
    fn follows_msmae_dependencies_and_changes_with_their_sources() {
        let t = tempfile_dir();
        write(
            &t.join("msmae-a/Cargo.toml"),
            "[package]\nname='msmae-a'\n[dependencies]\nmsmae-b = { workspace = true }\nserde = '1'\n[dev-dependencies]\nmsmae-c.workspace = true\n",
        );
        write(&t.join("msmae-a/src/lib.rs"), "a");
        write(&t.join("msmae-b/Cargo.toml"), "[package]\nname='msmae-b'\n");
        write(&t.join("msmae-b/src/lib.rs"), "b");
        write(&t.join("msmae-c/Cargo.toml"), "[package]\nname='msmae-c'\n");
        write(&t.join("msmae-c/src/lib.rs"), "c");
        let (d1, files) = fingerprint(&t.join("msmae-a")).expect("hash");
        assert_eq!(files.len(), 4, "{files:?}");
        write(&t.join("msmae-c/src/lib.rs"), "c2");
        assert_eq!(fingerprint(&t.join("msmae-a")).expect("hash").0, d1, "dev-dep must not count");
        write(&t.join("msmae-b/src/lib.rs"), "b2");
        assert_ne!(fingerprint(&t.join("msmae-a")).expect("hash").0, d1, "dep change must count");
        fs::remove_dir_all(&t).ok();
    }

    fn tempfile_dir() -> PathBuf {
        let p = std::env::temp_dir().join(format!("msmae-fp-{}-{:?}", std::process::id(), std::thread::current().id()));
        let _ = fs::remove_dir_all(&p);
        p
    }
}
