//! `cargo xtask`: project automation. Thin on purpose (clap + std::process, no ML crates):
//! it sets libtorch up and shells out to cargo with ONE feature set and ONE profile for
//! every command, so the ML stack is compiled once and shared by run, test and bench.

mod libtorch;
mod pyenv;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

/// Features every cargo invocation uses when libtorch is available. Keep identical across
/// commands: a different feature set rebuilds burn.
const TCH_FEATURES: &str = "msmae-backend/tch";

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "msmae project tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Build without libtorch (burn-flex only): no set-up, about half the training speed.
    #[arg(long, global = true)]
    no_tch: bool,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Install libtorch 2.9.0 for burn-tch (idempotent; CPU from PyPI wheels, ~490 MB).
    #[command(after_help = "Examples:\n  cargo xtask setup\n  cargo xtask setup --cuda   # pip install torch==2.9.0 into a venv (~6.7 GB)")]
    Setup {
        #[arg(long)]
        cuda: bool,
    },
    /// Build the `msmae` binary (release) and run a pipeline with it.
    #[command(after_help = "Example:\n  cargo xtask run pipelines/quickstart.yaml\n  cargo xtask run pipelines/quickstart.yaml --stage data --force")]
    Run {
        /// Pipeline file, then any `msmae run` flags.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        args: Vec<String>,
    },
    /// Run `msmae` with any arguments (status, why, dag, verify, gc, stages…).
    #[command(after_help = "Example:\n  cargo xtask msmae status pipelines/quickstart.yaml")]
    Msmae {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The whole test suite, both backends built, parity tests included (README command).
    #[command(after_help = "Examples:\n  cargo xtask test\n  cargo xtask test -- spec::   # only tests whose name contains `spec::`")]
    Test {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Benchmarks that print a table: `runner` (no-op re-run, hashing throughput), `model`
    /// (train steps of ViT/MAE on every backend beside PyTorch eager), `study` (the quickstart
    /// study under several seeds: lesion coverage, accuracy of none/MAE/MSMAE, epoch times),
    /// `ingest` (images/s and peak RSS of ingestion against Pillow + pyarrow; memory at 10k/50k).
    #[command(
        after_help = "Examples:\n  cargo xtask bench ingest -- --images 5000\n  cargo xtask bench runner\n  cargo xtask bench runner -- --files 100000 --big-mib 1024\n  cargo xtask bench model -- --quick\n  cargo xtask bench fused\n  cargo xtask bench study -- --seeds 1,2,3"
    )]
    Bench {
        /// Which benchmark.
        which: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The hygiene gate: `cargo fmt --check`, clippy with `-D warnings` on the build's
    /// feature set, and a libtorch-free `cargo check` (burn-flex only) so that build keeps
    /// compiling.
    #[command(after_help = "Example:\n  cargo xtask lint")]
    Lint,
    /// What CI runs: the hygiene gate (`lint`), then the README test command.
    Ci,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn repo_root() -> PathBuf {
    // xtask/Cargo.toml sits one level below the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."))
}

/// The shared target dir: $CARGO_TARGET_DIR, else one outside the checkout that CI and
/// other clones reuse.
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => libtorch::cache_root().join("target"),
    }
}

/// A cargo command with the shared target dir, profile-independent env, and libtorch.
struct Toolchain {
    env: Vec<(String, String)>,
    features: Option<&'static str>,
}

impl Toolchain {
    fn new(no_tch: bool) -> Result<Self> {
        if no_tch {
            return Ok(Toolchain { env: vec![], features: None });
        }
        let dir = libtorch::ensure_cpu().context("setting up libtorch (or pass --no-tch to build with burn-flex only)")?;
        Ok(Toolchain { env: libtorch::cargo_env(&dir), features: Some(TCH_FEATURES) })
    }

    fn cargo(&self, args: &[&str]) -> Command {
        let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        c.current_dir(repo_root());
        c.args(args);
        c.arg("--release");
        if let Some(f) = self.features {
            c.args(["--features", f]);
        }
        c.env("CARGO_TARGET_DIR", target_dir());
        for v in libtorch::CONFLICTING_ENV_VARS {
            c.env_remove(v);
        }
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }
}

fn status(mut c: Command) -> Result<ExitCode> {
    let s = c.status().with_context(|| format!("running {c:?}"))?;
    Ok(match s.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(n) => ExitCode::from(u8::try_from(n).unwrap_or(1)),
        None => ExitCode::FAILURE,
    })
}

/// Build everything (all targets: the same artifacts `cargo xtask test` uses, so a run after
/// a test, or a test after a run, compiles nothing new) and return the target dir.
fn build_all(tc: &Toolchain) -> Result<PathBuf> {
    let mut c = tc.cargo(&["build", "--workspace", "--all-targets"]);
    c.arg("--quiet");
    let code = status(c)?;
    if code != ExitCode::SUCCESS {
        bail!("the build failed");
    }
    Ok(target_dir().join("release"))
}

/// Run a built executable with libtorch on the library path.
fn exec(tc: &Toolchain, exe: &Path, args: &[String]) -> Result<ExitCode> {
    let mut c = Command::new(exe);
    c.args(args);
    for (k, v) in &tc.env {
        c.env(k, v);
    }
    status(c)
}

fn dispatch(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Setup { cuda } => {
            if cuda {
                let env = libtorch::ensure_cuda()?;
                eprintln!("CUDA libtorch ready; build with:");
                for (k, v) in env {
                    eprintln!("  export {k}={v}");
                }
            } else {
                let dir = libtorch::ensure_cpu()?;
                eprintln!("libtorch {} ready at {}", libtorch::TORCH_VERSION, dir.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Run { args } => {
            let tc = Toolchain::new(cli.no_tch)?;
            let bin = build_all(&tc)?;
            let mut full = vec!["run".to_string()];
            full.extend(args);
            exec(&tc, &bin.join("msmae"), &full)
        }
        Cmd::Msmae { args } => {
            let tc = Toolchain::new(cli.no_tch)?;
            let bin = build_all(&tc)?;
            exec(&tc, &bin.join("msmae"), &args)
        }
        Cmd::Test { args } => test(cli.no_tch, &args),
        Cmd::Lint => lint(cli.no_tch),
        Cmd::Ci => {
            let code = lint(cli.no_tch)?;
            if code != ExitCode::SUCCESS {
                return Ok(code);
            }
            test(cli.no_tch, &[])
        }
        Cmd::Bench { which, args } => {
            let exe = match which.as_str() {
                "runner" => "bench_runner",
                "model" => "bench_model",
                "study" => "bench_study",
                "ingest" => "bench_ingest",
                "fused" => "bench_fused",
                other => bail!("unknown benchmark `{other}`; available: runner, model, fused, study, ingest"),
            };
            let tc = Toolchain::new(cli.no_tch)?;
            let bin = build_all(&tc)?;
            let args: Vec<String> = args.into_iter().skip_while(|a| a == "--").collect();
            // The model benchmark runs PyTorch eager beside burn on the same model.
            let python = pyenv::ensure().context("setting up the Python reference environment")?;
            let mut tc = tc;
            tc.env.push(("MSMAE_PYTHON".into(), python.to_string_lossy().into_owned()));
            exec(&tc, &bin.join("examples").join(exe), &args)
        }
    }
}

fn test(no_tch: bool, args: &[String]) -> Result<ExitCode> {
    let tc = Toolchain::new(no_tch)?;
    let python = pyenv::ensure().context("setting up the Python reference environment for the tests")?;
    // Always the whole workspace with one feature set: selecting packages would change
    // feature unification and rebuild burn. Filter tests by name instead.
    // Every test binary runs even after one fails, so one run reports every failure.
    let mut c = tc.cargo(&["test", "--workspace", "--no-fail-fast"]);
    c.env("MSMAE_PYTHON", &python);
    let filters: Vec<&String> = args.iter().skip_while(|a| *a == "--").collect();
    if !filters.is_empty() {
        c.arg("--").args(filters);
    }
    status(c)
}

/// fmt, clippy on the build's feature set (shares the build's target dir and profile, so no
/// second dependency build of the checked crates' build scripts), and a flex-only check.
fn lint(no_tch: bool) -> Result<ExitCode> {
    let mut fmt = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    fmt.current_dir(repo_root()).args(["fmt", "--all", "--check"]);
    eprintln!("xtask: cargo fmt --all --check");
    let code = status(fmt)?;
    if code != ExitCode::SUCCESS {
        eprintln!("xtask: formatting differs: run `cargo fmt --all`");
        return Ok(code);
    }
    let tc = Toolchain::new(no_tch)?;
    let mut clippy = tc.cargo(&["clippy", "--workspace", "--all-targets"]);
    clippy.args(["--", "-D", "warnings"]);
    eprintln!("xtask: cargo clippy --workspace --all-targets -- -D warnings");
    let code = status(clippy)?;
    if code != ExitCode::SUCCESS {
        return Ok(code);
    }
    if no_tch {
        return Ok(ExitCode::SUCCESS);
    }
    // The build without libtorch: a different feature set, so it is only checked.
    let flex = Toolchain::new(true)?;
    eprintln!("xtask: cargo check --workspace --all-targets (without libtorch)");
    status(flex.cargo(&["check", "--workspace", "--all-targets"]))
}
