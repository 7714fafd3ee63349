//! `cargo xtask`: project automation. Thin on purpose (clap + std::process, no ML crates):
//! it sets libtorch up and shells out to cargo with ONE feature set and ONE profile for
//! every command, so the ML stack is compiled once and shared by run, test and bench.

mod gpu;
mod libtorch;
mod pyenv;
mod speak;
mod toolchain;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use toolchain::{Flavour, Toolchain};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "msmae project tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Build without libtorch (burn-flex only): no set-up, about half the training speed.
    #[arg(long, global = true)]
    no_tch: bool,
    /// Build and link the CUDA libtorch of `cargo xtask setup --cuda` (own target dir,
    /// `<target>-cuda`, so CPU builds are not disturbed).
    #[arg(long, global = true)]
    cuda: bool,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Install libtorch 2.9.0 for burn-tch (idempotent): the slim CPU build from PyPI wheels
    /// (~490 MB), or with --cuda the CUDA build (torch==2.9.0 and its nvidia wheels, in a
    /// venv, ~7 GB) that `cargo xtask run/test/bench --cuda` links.
    #[command(
        after_help = "Examples:\n  cargo xtask setup\n  cargo xtask setup --system   # as root: Open MPI, Slurm, Chromium for the whole test suite\n  cargo xtask setup --cuda\n  cargo xtask run --cuda pipelines/quickstart.yaml --device cuda"
    )]
    Setup {
        /// Also install the system packages the whole test suite needs (Debian/Ubuntu,
        /// apt-get, as root): Open MPI and libclang (multi-process tests), Slurm and munge
        /// (the Slurm executor's tests), Chromium (the report page in a browser). Without
        /// them those tests are skipped, each saying why.
        #[arg(long)]
        system: bool,
    },
    /// Build `msmae`, `bench_model` and `bench_loader` against the GPU machine's PyTorch
    /// (2.11.0+cu130, headers from PyPI), strip and pack them into gpu-bundle/ (< 40 MiB) for
    /// scripts/gpu-check.sh.
    #[command(
        name = "gpu-bundle",
        after_help = "Example:\n  cargo xtask gpu-bundle\n  # then, on the GPU machine, from the repository root:\n  bash scripts/gpu-check.sh"
    )]
    GpuBundle,
    /// Build the `msmae` binary (release) and run a pipeline with it.
    #[command(
        after_help = "Example:\n  cargo xtask run pipelines/quickstart.yaml\n  cargo xtask run pipelines/quickstart.yaml --stage data --force"
    )]
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
    #[command(
        after_help = "Examples:\n  cargo xtask test\n  cargo xtask test -- spec::   # only tests whose name contains `spec::`"
    )]
    Test {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Benchmarks that print a table: `runner` (no-op re-run, hashing throughput), `model`
    /// (train steps of ViT/MAE on every backend beside PyTorch eager), `study` (the quickstart
    /// study under several seeds: lesion coverage, accuracy of none/MAE/MSMAE, epoch times),
    /// `attention` (lesion coverage by supervised setting × map method), `ablation` (visible
    /// tokens and pre-training masks, focal vs diffuse evidence), `ingest` (images/s and peak RSS of ingestion against Pillow + pyarrow; memory at 10k/50k),
    /// `dp` (data-parallel images/s for 1 and N processes under mpirun, collective time per step),
    /// `scale` (each stage's time and peak RSS on generated ChestX-ray14 releases of 10k/50k/112k rows),
    /// `accum` (peak RSS and time of a ViT-S epoch at 1, 2 and 4 accumulated micro-batches).
    #[command(
        after_help = "Examples:\n  cargo xtask bench ingest -- --images 5000\n  cargo xtask bench runner\n  cargo xtask bench runner -- --files 100000 --big-mib 1024\n  cargo xtask bench model -- --quick\n  cargo xtask bench fused\n  cargo xtask bench study -- --seeds 1,2,3\n  cargo xtask bench attention\n  cargo xtask bench ablation -- --seeds 1,2,3\n  cargo xtask bench dp -- --processes 2\n  cargo xtask bench scale -- --rows 10000,50000,112120\n  cargo xtask bench accum"
    )]
    Bench {
        /// Which benchmark.
        which: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The hygiene gate: `cargo fmt --check`, clippy with `-D warnings` on the build's
    /// feature set, `cargo doc` with `-D warnings`, and a libtorch-free `cargo check`
    /// (burn-flex only) so that build keeps compiling.
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

fn status(mut c: Command) -> Result<ExitCode> {
    let s = c.status().with_context(|| format!("running {c:?}"))?;
    Ok(match s.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(n) => ExitCode::from(u8::try_from(n).unwrap_or(1)),
        None => ExitCode::FAILURE,
    })
}

/// Build everything (all targets: the same artifacts `cargo xtask test` uses, so a run after
/// a test, or a test after a run, compiles nothing new) and return the release dir.
fn build_all(tc: &Toolchain) -> Result<PathBuf> {
    // Quiet when there is nothing to build; otherwise a line on what follows, then cargo's
    // progress.
    let c = tc.cargo(&repo_root(), &["build", "--workspace", "--all-targets"]);
    let code = speak::build(c, &tc.release_dir().join("msmae"))?;
    if code != ExitCode::SUCCESS {
        bail!("the build failed");
    }
    Ok(tc.release_dir())
}

/// Run a built executable with libtorch on the library path.
fn exec(tc: &Toolchain, exe: &Path, args: &[String]) -> Result<ExitCode> {
    let mut c = Command::new(exe);
    c.args(args);
    for (k, v) in tc.run_env() {
        c.env(k, v);
    }
    status(c)
}

fn dispatch(cli: Cli) -> Result<ExitCode> {
    let flavour = Flavour::from_flags(cli.no_tch, cli.cuda)?;
    match cli.cmd {
        Cmd::Setup { system } => {
            if system {
                install_system_packages()?;
            }
            let tc = Toolchain::new(flavour, &target_dir())?;
            match flavour {
                Flavour::Flex => eprintln!("--no-tch builds need no set-up (burn-flex only)"),
                _ => eprintln!("libtorch ready for {flavour:?} builds (target dir {})", tc.target_dir.display()),
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::GpuBundle => {
            if cli.no_tch || cli.cuda {
                bail!("gpu-bundle builds its own flavour (PyTorch {}); drop --no-tch/--cuda", gpu::GPU_TORCH_VERSION);
            }
            let tc = Toolchain::new(Flavour::Bundle, &target_dir())?;
            gpu::bundle(&tc, &repo_root())?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Run { args } => {
            let tc = Toolchain::new(flavour, &target_dir())?;
            let bin = build_all(&tc)?;
            let mut full = vec!["run".to_string()];
            full.extend(args);
            exec(&tc, &bin.join("msmae"), &full)
        }
        Cmd::Msmae { args } => {
            let tc = Toolchain::new(flavour, &target_dir())?;
            let bin = build_all(&tc)?;
            exec(&tc, &bin.join("msmae"), &args)
        }
        Cmd::Test { args } => test(flavour, &args),
        Cmd::Lint => lint(flavour),
        Cmd::Ci => {
            let code = lint(flavour)?;
            if code != ExitCode::SUCCESS {
                return Ok(code);
            }
            test(flavour, &[])
        }
        Cmd::Bench { which, args } => {
            let exe = match which.as_str() {
                "runner" => "bench_runner",
                "model" => "bench_model",
                "study" => "bench_study",
                "attention" => "bench_attention",
                "ablation" => "bench_ablation",
                "ingest" => "bench_ingest",
                "fused" => "bench_fused",
                "loader" => "bench_loader",
                "dp" => "bench_dp",
                "scale" => "bench_scale",
                "accum" => "bench_accum",
                other => bail!(
                    "unknown benchmark `{other}`; available: runner, model, fused, study, attention, ablation, ingest, loader, dp, scale, accum"
                ),
            };
            let mut tc = Toolchain::new(flavour, &target_dir())?;
            let bin = build_all(&tc)?;
            let args: Vec<String> = args.into_iter().skip_while(|a| a == "--").collect();
            // The model and loader benchmarks run PyTorch beside burn on the same work.
            let python = pyenv::ensure().context("setting up the Python reference environment")?;
            tc.env.push(("MSMAE_PYTHON".into(), python.to_string_lossy().into_owned()));
            exec(&tc, &bin.join("examples").join(exe), &args)
        }
    }
}

/// The Debian packages the whole test suite needs: installed with their recommended
/// packages (Open MPI's launcher needs them), then without.
pub const SYSTEM_PACKAGES: [&[&str]; 2] = [
    &["openmpi-bin", "libopenmpi-dev", "libclang-dev"],
    &["slurmctld", "slurmd", "slurm-client", "munge", "chromium", "fonts-dejavu-core"],
];

/// `setup --system`: apt-get the [`SYSTEM_PACKAGES`] as root; otherwise say what to run.
fn install_system_packages() -> Result<()> {
    let all: Vec<&str> = SYSTEM_PACKAGES.iter().flat_map(|g| g.iter().copied()).collect();
    let root = Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !root || Command::new("apt-get").arg("--version").output().is_err() {
        bail!(
            "installing system packages needs root and apt-get (Debian/Ubuntu); as root run:\n  apt-get update && apt-get install -y {} && apt-get install -y --no-install-recommends {}\n(without them the tests that need them are skipped, each saying why)",
            SYSTEM_PACKAGES[0].join(" "),
            SYSTEM_PACKAGES[1].join(" ")
        );
    }
    eprintln!("xtask: apt-get update, then installing {}", all.join(" "));
    let ok = |mut c: Command| -> Result<()> {
        c.env("DEBIAN_FRONTEND", "noninteractive");
        let s = c.status().with_context(|| format!("running {c:?}"))?;
        if !s.success() {
            bail!("{c:?} failed ({s})");
        }
        Ok(())
    };
    let mut update = Command::new("apt-get");
    update.args(["update", "-qq"]);
    ok(update)?;
    for (i, group) in SYSTEM_PACKAGES.iter().enumerate() {
        let mut c = Command::new("apt-get");
        c.args(["install", "-y", "-qq"]);
        if i > 0 {
            c.arg("--no-install-recommends");
        }
        c.args(group.iter());
        ok(c)?;
    }
    Ok(())
}

fn test(flavour: Flavour, args: &[String]) -> Result<ExitCode> {
    let tc = Toolchain::new(flavour, &target_dir())?;
    let python = pyenv::ensure().context("setting up the Python reference environment for the tests")?;
    // Always the whole workspace with one feature set: selecting packages would change
    // feature unification and rebuild burn. Filter tests by name instead.
    // Every test binary runs even after one fails, so one run reports every failure.
    let mut c = tc.cargo(&repo_root(), &["test", "--workspace", "--no-fail-fast"]);
    c.env("MSMAE_PYTHON", &python);
    let filters: Vec<&String> = args.iter().skip_while(|a| *a == "--").collect();
    if !filters.is_empty() {
        c.arg("--").args(filters);
    }
    let missing: Vec<&str> = [(tc.mpi, "Open MPI"), (tc.slurm, "Slurm"), (tc.browser, "Chromium")]
        .iter()
        .filter(|(has, _)| !has)
        .map(|(_, n)| *n)
        .collect();
    let (code, totals) = speak::test_totals(c)?;
    let note = if totals.ignored > 0 && !missing.is_empty() {
        format!(
            " (not found here: {}; `cargo xtask setup --system` installs them as root, then the skipped tests run)",
            missing.join(", ")
        )
    } else {
        String::new()
    };
    println!("xtask: {} passed, {} failed, {} skipped{note}", totals.passed, totals.failed, totals.ignored);
    Ok(code)
}

/// fmt, clippy on the build's feature set (shares the build's target dir and profile, so no
/// second dependency build of the checked crates' build scripts), and a flex-only check.
fn lint(flavour: Flavour) -> Result<ExitCode> {
    let mut fmt = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    fmt.current_dir(repo_root()).args(["fmt", "--all", "--check"]);
    eprintln!("xtask: cargo fmt --all --check");
    let code = status(fmt)?;
    if code != ExitCode::SUCCESS {
        eprintln!("xtask: formatting differs: run `cargo fmt --all`");
        return Ok(code);
    }
    let tc = Toolchain::new(flavour, &target_dir())?;
    let mut clippy = tc.cargo(&repo_root(), &["clippy", "--workspace", "--all-targets"]);
    clippy.args(["--", "-D", "warnings"]);
    eprintln!("xtask: cargo clippy --workspace --all-targets -- -D warnings");
    let code = status(clippy)?;
    if code != ExitCode::SUCCESS {
        return Ok(code);
    }
    // The API docs build without a warning (broken intra-doc links included).
    let mut doc = tc.cargo(&repo_root(), &["doc", "--workspace", "--no-deps"]);
    doc.env("RUSTDOCFLAGS", "-D warnings");
    eprintln!("xtask: cargo doc --workspace --no-deps (RUSTDOCFLAGS=-D warnings)");
    let code = status(doc)?;
    if code != ExitCode::SUCCESS {
        return Ok(code);
    }
    if flavour == Flavour::Flex {
        return Ok(ExitCode::SUCCESS);
    }
    // The build without libtorch: a different feature set, so it is only checked.
    let flex = Toolchain::new(Flavour::Flex, &target_dir())?;
    eprintln!("xtask: cargo check --workspace --all-targets (without libtorch)");
    status(flex.cargo(&repo_root(), &["check", "--workspace", "--all-targets"]))
}
