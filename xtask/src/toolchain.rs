//! Which libtorch a build links, and everything that follows from it: the cargo features,
//! the environment torch-sys reads, extra link arguments, and the target dir.
//!
//! Each flavour has its own target dir, so switching between them never rebuilds another's
//! artifacts (a different `LIBTORCH` reruns torch-sys' build script, and with it every crate
//! above it: tch, burn, all of msmae).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Result, bail};

use crate::{gpu, libtorch};

/// How link flags reach cargo (unit-separator-delimited, so paths may hold spaces).
const ENCODED_RUSTFLAGS: &str = "CARGO_ENCODED_RUSTFLAGS";

/// Features every cargo invocation uses when libtorch is linked. Keep identical across
/// commands: a different feature set rebuilds burn.
pub const TCH_FEATURES: &str = "msmae-backend/tch,msmae-vit/tch";

/// Features of a build with MPI (multi-process data parallelism): the binary's collectives
/// and the tests that launch `mpirun`.
pub const MPI_FEATURES: &str = "msmae-cli/mpi,msmae-tests/mpi";

/// The Slurm tests start a one-node cluster from the system's Slurm and munge, as root.
pub const SLURM_FEATURES: &str = "msmae-tests/slurm";

/// The headless-browser test of the report page finds Debian's Chromium.
pub const BROWSER_FEATURES: &str = "msmae-tests/browser";

/// Whether a Chromium is on the PATH (`MSMAE_BROWSER_TESTS=0|1` decides instead).
pub fn browser_testable() -> bool {
    match std::env::var("MSMAE_BROWSER_TESTS").ok().as_deref() {
        Some("0") => return false,
        Some("1") => return true,
        _ => {}
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .any(|b| std::env::split_paths(&path).any(|d| d.join(b).is_file()))
}

/// Whether the Slurm tests can run here: root, and `slurmctld`, `slurmd`, `sbatch` and
/// `munged` installed (`MSMAE_SLURM_TESTS=0|1` decides instead).
pub fn slurm_testable() -> bool {
    match std::env::var("MSMAE_SLURM_TESTS").ok().as_deref() {
        Some("0") => return false,
        Some("1") => return true,
        _ => {}
    }
    let root = Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let found = |p: &str| {
        ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"].iter().any(|d| Path::new(d).join(p).is_file())
    };
    root && ["slurmctld", "slurmd", "sbatch", "munged"].iter().all(|p| found(p))
}

/// Whether this machine can build MPI in: `MSMAE_MPI=0|1` decides, else an `mpicc` on the
/// PATH and a libclang for rsmpi's bindings. The answer is the same for every command on a
/// machine, so every command uses one feature set.
pub fn mpi_available() -> bool {
    match std::env::var("MSMAE_MPI").ok().as_deref() {
        Some("0") => return false,
        Some("1") => return true,
        _ => {}
    }
    let mpicc = Command::new("mpicc").arg("--version").output().is_ok_and(|o| o.status.success());
    if !mpicc {
        return false;
    }
    let libclang = std::env::var_os("LIBCLANG_PATH").is_some()
        || ["/usr/lib", "/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64"]
            .iter()
            .any(|d| has_libclang(Path::new(d)))
        || std::fs::read_dir("/usr/lib").is_ok_and(|rd| {
            rd.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("llvm-") && has_libclang(&e.path().join("lib")))
        });
    if !libclang {
        eprintln!(
            "xtask: mpicc found but no libclang (rsmpi generates its bindings with it): building without MPI; `apt-get install libclang-dev` to add it"
        );
    }
    libclang
}

fn has_libclang(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|rd| rd.flatten().any(|e| e.file_name().to_string_lossy().starts_with("libclang")))
}

/// What a build links.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    /// burn-flex only (`--no-tch`).
    Flex,
    /// The slim CPU libtorch 2.9.0 (the default).
    Cpu,
    /// The CUDA libtorch 2.9.0 of `cargo xtask setup --cuda` (`--cuda`).
    Cuda,
    /// Headers and libraries of the GPU machine's PyTorch (`cargo xtask gpu-bundle`): the
    /// binaries load that machine's own `torch/lib` at run time.
    Bundle,
}

impl Flavour {
    /// From the global flags.
    pub fn from_flags(no_tch: bool, cuda: bool) -> Result<Self> {
        match (no_tch, cuda) {
            (true, true) => bail!("--no-tch and --cuda contradict each other: --cuda links the CUDA libtorch"),
            (true, false) => Ok(Flavour::Flex),
            (false, true) => Ok(Flavour::Cuda),
            (false, false) => Ok(Flavour::Cpu),
        }
    }

    /// The target dir of this flavour given the shared one: CPU and flex builds share it
    /// (cargo keeps both feature sets apart in one dir), CUDA and the bundle get siblings.
    pub fn target_dir(self, shared: &Path) -> PathBuf {
        let sibling = |suffix: &str| {
            let mut name = shared.file_name().map(|n| n.to_os_string()).unwrap_or_else(|| "target".into());
            name.push(suffix);
            shared.with_file_name(name)
        };
        match self {
            Flavour::Flex | Flavour::Cpu => shared.to_path_buf(),
            Flavour::Cuda => sibling("-cuda"),
            Flavour::Bundle => sibling("-gpu-bundle"),
        }
    }

    /// Link arguments (rustc flags) beyond what torch-sys emits, for the libtorch in
    /// `torch_lib`.
    ///
    /// - CUDA flavours: `-L torch_lib` and `--no-as-needed -ltorch_cuda`. Nothing in tch
    ///   references a symbol of `libtorch_cuda.so` (its kernels register themselves when it
    ///   is loaded), so with rustc's default `--as-needed` the linker drops it and libtorch
    ///   reports no GPU. The `-L` is for the link of every test and binary, also those that
    ///   do not depend on torch-sys (whose search path they do not get).
    /// - The bundle: also `--allow-shlib-undefined`, because the CUDA runtime libraries
    ///   that `libtorch_cuda.so` needs are on the GPU machine, not here.
    ///
    /// They go to cargo as `CARGO_ENCODED_RUSTFLAGS` (paths may hold spaces), and such
    /// builds pass `--target <host>`: without it cargo applies them to build scripts and
    /// proc macros too, which cannot link libtorch (and must not).
    pub fn link_args(self, torch_lib: &Path) -> Vec<String> {
        let keep_cuda = [
            "-C".to_string(),
            format!("link-arg=-L{}", torch_lib.display()),
            "-C".into(),
            "link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed".into(),
        ];
        match self {
            Flavour::Flex | Flavour::Cpu => vec![],
            Flavour::Cuda => keep_cuda.to_vec(),
            Flavour::Bundle => {
                keep_cuda.into_iter().chain(["-C".into(), "link-arg=-Wl,--allow-shlib-undefined".into()]).collect()
            }
        }
    }

    pub fn features(self) -> Option<&'static str> {
        (self != Flavour::Flex).then_some(TCH_FEATURES)
    }
}

/// A cargo command line for one flavour: target dir, features, libtorch environment.
pub struct Toolchain {
    pub flavour: Flavour,
    /// `--target` triple (the host's), for flavours with link flags.
    pub triple: Option<String>,
    /// Set for cargo and for the binaries it builds.
    pub env: Vec<(String, String)>,
    /// Removed from cargo's environment (they would make torch-sys look elsewhere).
    pub unset: Vec<&'static str>,
    pub target_dir: PathBuf,
    /// Build MPI in ([`MPI_FEATURES`]).
    pub mpi: bool,
    /// Run the Slurm tests ([`SLURM_FEATURES`]).
    pub slurm: bool,
    /// Run the headless-browser test ([`BROWSER_FEATURES`]).
    pub browser: bool,
}

impl Toolchain {
    /// Installs what the flavour needs (idempotent) and describes the build.
    pub fn new(flavour: Flavour, shared_target: &Path) -> Result<Self> {
        let mut unset: Vec<&'static str> = libtorch::CONFLICTING_ENV_VARS.to_vec();
        // The environment, and the libtorch libraries the CUDA flavours link explicitly.
        let (env, torch_lib) = match flavour {
            Flavour::Flex => (vec![], None),
            Flavour::Cpu => (libtorch::cargo_env(&libtorch::ensure_cpu()?), None),
            Flavour::Cuda => {
                unset.push("LIBTORCH");
                let (env, lib) = libtorch::ensure_cuda()?;
                (env, Some(lib))
            }
            Flavour::Bundle => {
                let dir = gpu::ensure_link_libtorch()?;
                (gpu::cargo_env(&dir), Some(dir.join("lib")))
            }
        };
        let link = torch_lib.map(|lib| flavour.link_args(&lib)).unwrap_or_default();
        let triple = if link.is_empty() { None } else { Some(host_triple()?) };
        let mut tc = Self::with_env(flavour, env, unset, shared_target, link, triple);
        // The GPU bundle stays self-contained: the GPU machine need not have an MPI.
        tc.mpi = flavour != Flavour::Bundle && mpi_available();
        tc.slurm = flavour != Flavour::Bundle && slurm_testable();
        tc.browser = flavour != Flavour::Bundle && browser_testable();
        Ok(tc)
    }

    /// The description without installing anything (tests, and callers that did).
    pub fn with_env(
        flavour: Flavour,
        mut env: Vec<(String, String)>,
        unset: Vec<&'static str>,
        shared_target: &Path,
        link: Vec<String>,
        triple: Option<String>,
    ) -> Self {
        let unset = unset.into_iter().filter(|u| !env.iter().any(|(k, _)| k == u)).collect();
        if !link.is_empty() {
            env.push((ENCODED_RUSTFLAGS.into(), link.join("\x1f")));
        }
        Toolchain {
            flavour,
            triple,
            env,
            unset,
            target_dir: flavour.target_dir(shared_target),
            mpi: false,
            slurm: false,
            browser: false,
        }
    }

    /// Where the release artifacts land (`<target dir>[/<triple>]/release`).
    pub fn release_dir(&self) -> PathBuf {
        match &self.triple {
            Some(t) => self.target_dir.join(t).join("release"),
            None => self.target_dir.join("release"),
        }
    }

    /// `cargo ARGS --release [--features …]` in the repository root.
    pub fn cargo(&self, root: &Path, args: &[&str]) -> Command {
        let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        c.current_dir(root);
        c.args(args);
        c.arg("--release");
        let features: Vec<&str> = self
            .flavour
            .features()
            .into_iter()
            .chain(self.mpi.then_some(MPI_FEATURES))
            .chain(self.slurm.then_some(SLURM_FEATURES))
            .chain(self.browser.then_some(BROWSER_FEATURES))
            .collect();
        if !features.is_empty() {
            c.args(["--features", &features.join(",")]);
        }
        if let Some(t) = &self.triple {
            c.args(["--target", t]);
        }
        c.env("CARGO_TARGET_DIR", &self.target_dir);
        for v in &self.unset {
            c.env_remove(v);
        }
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    /// The environment a built binary runs with (libtorch on the library path), without the
    /// build-only link flags.
    pub fn run_env(&self) -> impl Iterator<Item = &(String, String)> {
        self.env.iter().filter(|(k, _)| k != ENCODED_RUSTFLAGS)
    }
}

/// The host's target triple, from `rustc -vV`.
fn host_triple() -> Result<String> {
    let out = Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into())).arg("-vV").output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    match text.lines().find_map(|l| l.strip_prefix("host: ")) {
        Some(t) => Ok(t.trim().to_string()),
        None => bail!("`rustc -vV` names no host triple: {text}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(c: &Command) -> Vec<(String, Option<String>)> {
        c.get_envs()
            .map(|(k, v)| (k.to_string_lossy().into_owned(), v.map(|v| v.to_string_lossy().into_owned())))
            .collect()
    }

    #[test]
    fn flags_pick_one_flavour() {
        assert_eq!(Flavour::from_flags(false, false).ok(), Some(Flavour::Cpu));
        assert_eq!(Flavour::from_flags(true, false).ok(), Some(Flavour::Flex));
        assert_eq!(Flavour::from_flags(false, true).ok(), Some(Flavour::Cuda));
        let e = Flavour::from_flags(true, true).expect_err("contradictory flags").to_string();
        assert!(e.contains("--no-tch") && e.contains("--cuda"), "{e}");
    }

    #[test]
    fn cuda_and_bundle_builds_never_share_the_cpu_target_dir() {
        let shared = Path::new("/cache/msmae/target");
        assert_eq!(Flavour::Cpu.target_dir(shared), shared);
        assert_eq!(Flavour::Flex.target_dir(shared), shared);
        assert_eq!(Flavour::Cuda.target_dir(shared), Path::new("/cache/msmae/target-cuda"));
        assert_eq!(Flavour::Bundle.target_dir(shared), Path::new("/cache/msmae/target-gpu-bundle"));
        assert_eq!(Flavour::Cuda.target_dir(Path::new("build")), Path::new("build-cuda"));
    }

    #[test]
    fn cuda_links_keep_libtorch_cuda_and_only_the_bundle_allows_missing_cuda_libraries() {
        let lib = Path::new("/venv with space/torch/lib");
        assert!(Flavour::Cpu.link_args(lib).is_empty());
        for f in [Flavour::Cuda, Flavour::Bundle] {
            let args = f.link_args(lib);
            assert!(
                args.contains(&"link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed".to_string()),
                "{f:?}: {args:?}"
            );
            assert!(
                args.contains(&"link-arg=-L/venv with space/torch/lib".to_string()),
                "one argument, space and all: {args:?}"
            );
            assert!(args.chunks(2).all(|p| p[0] == "-C"), "{args:?}");
        }
        assert!(!Flavour::Cuda.link_args(lib).iter().any(|a| a.contains("allow-shlib-undefined")));
        assert!(Flavour::Bundle.link_args(lib).iter().any(|a| a.contains("--allow-shlib-undefined")));
        assert_eq!(Flavour::Flex.features(), None);
        assert_eq!(Flavour::Bundle.features(), Some(TCH_FEATURES));
    }

    #[test]
    fn cargo_commands_carry_the_flavours_environment() {
        let shared = Path::new("/t/target");
        // CUDA: torch-sys asks the venv's Python; LIBTORCH must not point it elsewhere.
        let cuda = Toolchain::with_env(
            Flavour::Cuda,
            vec![("LIBTORCH_USE_PYTORCH".into(), "1".into())],
            vec!["LIBTORCH", "LIBTORCH_USE_PYTORCH", "LIBTORCH_LIB"],
            shared,
            Flavour::Cuda.link_args(Path::new("/v/torch/lib")),
            Some("x86_64-unknown-linux-gnu".into()),
        );
        let c = cuda.cargo(Path::new("/repo"), &["build"]);
        let env = env_of(&c);
        assert!(env.contains(&("LIBTORCH_USE_PYTORCH".into(), Some("1".into()))), "{env:?}");
        assert!(env.contains(&("LIBTORCH".into(), None)), "LIBTORCH removed: {env:?}");
        assert!(env.contains(&("LIBTORCH_LIB".into(), None)), "{env:?}");
        assert!(env.contains(&("CARGO_TARGET_DIR".into(), Some("/t/target-cuda".into()))), "{env:?}");
        let flags = env.iter().find(|(k, _)| k == ENCODED_RUSTFLAGS).and_then(|(_, v)| v.clone()).unwrap_or_default();
        assert_eq!(
            flags.split('\x1f').collect::<Vec<_>>(),
            Flavour::Cuda.link_args(Path::new("/v/torch/lib")),
            "{env:?}"
        );
        let args: Vec<String> = c.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        // --target: the link flags must not reach build scripts and proc macros
        assert_eq!(args, ["build", "--release", "--features", TCH_FEATURES, "--target", "x86_64-unknown-linux-gnu"]);
        assert_eq!(cuda.release_dir(), Path::new("/t/target-cuda/x86_64-unknown-linux-gnu/release"));
        assert!(cuda.run_env().all(|(k, _)| k != ENCODED_RUSTFLAGS), "link flags are for the build only");
        // CPU: no link flags; the shared target dir.
        let cpu = Toolchain::with_env(
            Flavour::Cpu,
            vec![("LIBTORCH".into(), "/lt".into())],
            libtorch::CONFLICTING_ENV_VARS.to_vec(),
            shared,
            vec![],
            None,
        );
        assert_eq!(cpu.release_dir(), Path::new("/t/target/release"));
        let env = env_of(&cpu.cargo(Path::new("/repo"), &["test"]));
        assert!(env.contains(&("CARGO_TARGET_DIR".into(), Some("/t/target".into()))), "{env:?}");
        assert!(!env.iter().any(|(k, _)| k == ENCODED_RUSTFLAGS), "{env:?}");
    }
}
