//! `cargo xtask gpu-bundle`: the binaries for the lent GPU machine, built here.
//!
//! That machine has no Rust and no package registry, but has PyTorch 2.11.0+cu130 under its
//! Python. So the bundle links against the headers and libraries of the same PyTorch,
//! taken from PyPI's `torch==2.11.0` wheel (the cu130 build; tch 0.22 compiles against it
//! with `LIBTORCH_BYPASS_VERSION_CHECK=1`), and at run time loads that machine's own
//! `torch/lib` (scripts/gpu-check.sh sets `LD_LIBRARY_PATH`). Only what the link needs is
//! unpacked: the headers and `libc10{,_cuda}.so`, `libtorch{,_cpu,_cuda}.so`, libgomp; the
//! CUDA runtime libraries those need are absent here, hence `--allow-shlib-undefined`.
//!
//! The bundle (`gpu-bundle/`, git-ignored, carried to the device with the tree): the
//! stripped `msmae`, `bench_model` and `bench_loader` in one `tar.xz` (xz's 64 MiB window
//! spans the three binaries, so their shared code is stored about once), checked to stay
//! under 40 MiB, and a MANIFEST.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

use crate::libtorch::{self, Stamp};
use crate::toolchain::Toolchain;

/// PyTorch of the GPU machine.
pub const GPU_TORCH_VERSION: &str = "2.11.0";
const LINK_RECIPE: &str = "pypi-torch-2.11.0-cu130-wheel-link-only-v1";
const LINK_DIR_NAME: &str = "libtorch-2.11.0-cu130-link";
const GPU_TORCH_WHEEL: (&str, &str, &str) = (
    "torch==2.11.0",
    "torch-2.11.0-cp311-cp311-manylinux_2_28_x86_64.whl",
    "7aa2f9bbc6d4595ba72138026b2074be1233186150e9292865e04b7a63b8c67a",
);
/// Libraries torch-sys links (plus libgomp, found by pattern).
const LINK_LIBS: &[&str] = &["libc10.so", "libc10_cuda.so", "libtorch.so", "libtorch_cpu.so", "libtorch_cuda.so"];
/// What goes into the bundle: (cargo target flag, name).
pub const BUNDLE_BINARIES: &[(&str, &str)] =
    &[("--bin", "msmae"), ("--example", "bench_model"), ("--example", "bench_loader")];
/// The device takes at most 64 MiB with the working tree; the bundle stays well under.
pub const BUNDLE_LIMIT_BYTES: u64 = 40 * 1024 * 1024;
pub const BUNDLE_DIR: &str = "gpu-bundle";
pub const BUNDLE_FILE: &str = "msmae-gpu.tar.xz";

const UNPACK_LINK_PY: &str = r##"
import os, shutil, sys, zipfile
stage, whl = sys.argv[1:3]
libs = sys.argv[3:]
def safe_rel(rel):
    parts = rel.split("/")
    if rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        sys.exit("refusing suspicious path in wheel: " + rel)
    return os.path.join(*parts)
def copy(z, info, dest, mode):
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with z.open(info) as src, open(dest, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    os.chmod(dest, mode)
with zipfile.ZipFile(whl) as z:
    infos = {i.filename: i for i in z.infolist() if not i.filename.endswith("/")}
    headers = [n for n in infos if n.startswith("torch/include/")]
    if not headers:
        sys.exit("no torch/include/ in " + whl)
    for n in headers:
        copy(z, infos[n], os.path.join(stage, "include", safe_rel(n[len("torch/include/"):])), 0o644)
    gomp = [n for n in infos if n.startswith("torch/lib/libgomp") and ".so" in n]
    for n in [("torch/lib/" + l) for l in libs] + gomp:
        if n not in infos:
            sys.exit("%s not in %s" % (n, whl))
        copy(z, infos[n], os.path.join(stage, "lib", os.path.basename(n)), 0o755)
    print("[gpu-bundle] unpacked %d headers and %d libraries" % (len(headers), len(libs) + len(gomp)), flush=True)
"##;

/// Environment for cargo: this libtorch, its version check bypassed (tch 0.22 asks for
/// 2.9.0; its C++ API use compiles unchanged against 2.11.0).
pub fn cargo_env(dir: &Path) -> Vec<(String, String)> {
    vec![("LIBTORCH".into(), dir.to_string_lossy().into_owned()), ("LIBTORCH_BYPASS_VERSION_CHECK".into(), "1".into())]
}

/// The link-only libtorch 2.11.0 (headers + the libraries torch-sys links), installed
/// under the msmae cache once.
pub fn ensure_link_libtorch() -> Result<PathBuf> {
    let dir = libtorch::cache_root().join(LINK_DIR_NAME);
    let want = Stamp { torch: GPU_TORCH_VERSION.into(), recipe: LINK_RECIPE.into() };
    let stamp_path = dir.join(libtorch::STAMP_FILE);
    let ready = fs::read_to_string(&stamp_path).ok().and_then(|t| Stamp::parse(&t)).is_some_and(|s| s == want)
        && LINK_LIBS.iter().all(|l| dir.join("lib").join(l).is_file());
    if ready {
        eprintln!("[gpu-bundle] libtorch {GPU_TORCH_VERSION} (link only) at {}", dir.display());
        return Ok(dir);
    }
    let parent = dir.parent().context("the cache dir has no parent")?;
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let downloads = parent.join(format!(".{LINK_DIR_NAME}.downloads"));
    fs::create_dir_all(&downloads).with_context(|| format!("creating {}", downloads.display()))?;
    let (req, file, sha) = GPU_TORCH_WHEEL;
    let requirements = downloads.join("requirements.txt");
    fs::write(&requirements, format!("{req} --hash=sha256:{sha}\n"))
        .with_context(|| format!("writing {}", requirements.display()))?;
    let python = std::env::var("MSMAE_PYTHON").unwrap_or_else(|_| "python3".into());
    eprintln!("[gpu-bundle] downloading {req} (~530 MB) from PyPI");
    let mut pip = Command::new(&python);
    pip.args([
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--progress-bar",
        "off",
        "--disable-pip-version-check",
        "--require-hashes",
    ])
    .args(libtorch::PIP_TARGET_ARGS)
    .arg("-r")
    .arg(&requirements)
    .arg("-d")
    .arg(&downloads);
    check(&mut pip, "pip download torch==2.11.0")?;
    let stage = parent.join(format!(".{LINK_DIR_NAME}.tmp-{}", std::process::id()));
    let _ = fs::remove_dir_all(&stage);
    let mut unpack = Command::new(&python);
    unpack.arg("-c").arg(UNPACK_LINK_PY).arg(&stage).arg(downloads.join(file)).args(LINK_LIBS);
    check(&mut unpack, "unpacking the torch 2.11.0 wheel")?;
    let lib = stage.join("lib");
    let gomp = fs::read_dir(&lib)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libgomp.so."));
    if let Some(g) = gomp {
        std::os::unix::fs::symlink(&g, lib.join("libgomp.so")).context("linking libgomp.so")?;
    }
    fs::write(stage.join("build-version"), format!("{GPU_TORCH_VERSION}\n"))?;
    fs::write(stage.join(libtorch::STAMP_FILE), want.render())?;
    let _ = fs::remove_dir_all(&dir);
    fs::rename(&stage, &dir).with_context(|| format!("renaming {} to {}", stage.display(), dir.display()))?;
    let _ = fs::remove_dir_all(&downloads);
    Ok(dir)
}

fn check(c: &mut Command, what: &str) -> Result<()> {
    let s = c.status().with_context(|| format!("{what}: could not start {:?}", c.get_program()))?;
    ensure!(s.success(), "{what} failed ({s})");
    Ok(())
}

fn output(c: &mut Command, what: &str) -> Result<String> {
    let o = c.output().with_context(|| format!("{what}: could not start {:?}", c.get_program()))?;
    ensure!(o.status.success(), "{what} failed: {}", String::from_utf8_lossy(&o.stderr).trim());
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// `DT_NEEDED` entries of an ELF file (readelf, from binutils).
fn needed(file: &Path) -> Result<Vec<String>> {
    let text = output(Command::new("readelf").arg("-d").arg(file), "readelf -d")?;
    Ok(text
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| Some(l.split('[').nth(1)?.trim_end_matches(']').to_string()))
        .collect())
}

/// Build, check, strip and pack the bundle into `ROOT/gpu-bundle/`; returns the archive.
pub fn bundle(tc: &Toolchain, root: &Path) -> Result<PathBuf> {
    let mut args: Vec<&str> = vec!["build", "--workspace"];
    for (flag, name) in BUNDLE_BINARIES {
        args.extend([*flag, *name]);
    }
    eprintln!(
        "[gpu-bundle] building {} against PyTorch {GPU_TORCH_VERSION} into {}",
        BUNDLE_BINARIES.len(),
        tc.target_dir.display()
    );
    check(&mut tc.cargo(root, &args), "the bundle build")?;
    let out = root.join(BUNDLE_DIR);
    let stage = out.join("stage");
    let _ = fs::remove_dir_all(&stage);
    fs::create_dir_all(stage.join("bin")).with_context(|| format!("creating {}", stage.display()))?;
    let release = tc.release_dir();
    for (flag, name) in BUNDLE_BINARIES {
        let built = if *flag == "--bin" { release.join(name) } else { release.join("examples").join(name) };
        let libs = needed(&built)?;
        // Without libtorch_cuda.so in DT_NEEDED the binary would load but see no GPU.
        ensure!(
            libs.iter().any(|l| l == "libtorch_cuda.so"),
            "{} does not link libtorch_cuda.so (needs: {})",
            built.display(),
            libs.join(", ")
        );
        let dest = stage.join("bin").join(name);
        check(Command::new("strip").arg("-o").arg(&dest).arg(&built), "strip")?;
    }
    let archive = out.join(BUNDLE_FILE);
    let partial = out.join(format!("{BUNDLE_FILE}.partial"));
    eprintln!("[gpu-bundle] compressing (xz -9e, one thread so the window spans all binaries; a few minutes)");
    let tar = format!("tar -C '{}' -cf - bin | xz -9e -T1 > '{}'", stage.display(), partial.display());
    check(Command::new("bash").args(["-o", "pipefail", "-c", &tar]), "tar | xz")?;
    let size = fs::metadata(&partial)?.len();
    if size > BUNDLE_LIMIT_BYTES {
        bail!("the bundle is {:.1} MiB, over the {} MiB limit", size as f64 / 1048576.0, BUNDLE_LIMIT_BYTES / 1048576);
    }
    fs::rename(&partial, &archive)?;
    let commit = output(Command::new("git").arg("-C").arg(root).args(["rev-parse", "HEAD"]), "git rev-parse")
        .unwrap_or_default();
    let dirty = output(
        Command::new("git").arg("-C").arg(root).args(["status", "--porcelain", "--untracked-files=no"]),
        "git status",
    )
    .unwrap_or_default();
    let manifest = format!(
        "torch={GPU_TORCH_VERSION}\ncommit={}{}\nbinaries={}\nbytes={size}\n",
        commit.trim(),
        if dirty.trim().is_empty() { "" } else { " (with uncommitted changes)" },
        BUNDLE_BINARIES.iter().map(|(_, n)| *n).collect::<Vec<_>>().join(",")
    );
    fs::write(out.join("MANIFEST"), manifest)?;
    let _ = fs::remove_dir_all(&stage);
    eprintln!(
        "[gpu-bundle] {} ({:.1} MiB); on the GPU machine run: bash scripts/gpu-check.sh",
        archive.display(),
        size as f64 / 1048576.0
    );
    Ok(archive)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_link_libtorch_is_the_gpu_machines_version_and_bypasses_tchs_check() {
        let env = cargo_env(Path::new("/c/libtorch-2.11.0-cu130-link"));
        assert!(env.contains(&("LIBTORCH_BYPASS_VERSION_CHECK".into(), "1".into())));
        assert!(env.contains(&("LIBTORCH".into(), "/c/libtorch-2.11.0-cu130-link".into())));
        assert!(GPU_TORCH_WHEEL.1.starts_with(&format!("torch-{GPU_TORCH_VERSION}-")));
        assert_eq!(GPU_TORCH_WHEEL.2.len(), 64, "sha256 pin");
        assert!(LINK_LIBS.contains(&"libtorch_cuda.so"), "the CUDA half is what the bundle is for");
    }

    #[test]
    fn the_bundle_carries_what_gpu_check_runs() {
        let script = include_str!("../../scripts/gpu-check.sh");
        for (_, name) in BUNDLE_BINARIES {
            assert!(script.contains(&format!("$BIN/{name}")), "gpu-check.sh never runs {name}");
        }
        assert!(script.contains(BUNDLE_FILE) && script.contains(BUNDLE_DIR));
    }
}
