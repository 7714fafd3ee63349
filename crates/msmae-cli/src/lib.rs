//! Command-line interface of msmae (the `msmae` binary and `cargo xtask run`).
//!
//! Exit codes: 0 success, 1 a stage failed or verification found mismatches, 2 the
//! pipeline file or the command line is invalid.

mod commands;
mod progress;
pub mod report;

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};

use msmae_backend::{BackendRequest, DeviceList, DeviceRequest, Precision};
use msmae_core::{CancelToken, ExecEnv, Registry};
use msmae_pipeline::inspect::{self, DagFormat};
use msmae_pipeline::{LockFile, Outcome, Override, RunOptions, Store, lockfile, results};

/// The stage kinds this binary ships: one `register` per stage crate.
pub fn registry() -> Registry {
    let mut r = Registry::new();
    msmae_data::register(&mut r);
    msmae_attention::register(&mut r);
    msmae_mask_stages::register(&mut r);
    msmae_pretrain::register(&mut r);
    msmae_finetune::register(&mut r);
    msmae_eval::register(&mut r);
    msmae_segment::register(&mut r);
    msmae_interop::register(&mut r);
    r
}

/// Medical Supervised Masked Autoencoder: cached pipelines of stages.
#[derive(Debug, Parser)]
#[command(name = "msmae", version, about, long_about = None, after_help = "Example:\n  msmae run pipelines/quickstart.yaml\n  msmae status pipelines/quickstart.yaml")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// More log output (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Only warnings and errors.
    #[arg(short, long, global = true)]
    pub quiet: bool,
}

#[derive(Debug, Args, Clone)]
pub struct Common {
    /// Pipeline file (YAML).
    pub pipeline: PathBuf,
    /// Artifact store; default `.msmae/` beside the pipeline file.
    #[arg(long, env = "MSMAE_STORE")]
    pub store: Option<PathBuf>,
    /// Lock file; default `NAME.lock` beside the pipeline file.
    #[arg(long)]
    pub lock: Option<PathBuf>,
    /// Override a parameter: `--set params.size=32` (repeatable; also `seed=N`).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<Override>,
    /// Compute device(s): auto (every CUDA device libtorch sees, else the CPU), cpu, cuda,
    /// cuda:N, or a comma-separated list (`cuda:0,cuda:1`) that training stages run
    /// data-parallel on: each device takes an equal share of every global batch.
    #[arg(long, visible_alias = "devices", env = "MSMAE_DEVICE", default_value = "auto")]
    pub device: String,
    /// Precision of matmuls and attention: f32, or bf16 (bfloat16 matmuls and attention;
    /// float32 weights, optimiser, normalisation, softmax, losses and reductions).
    #[arg(long, env = "MSMAE_PRECISION", default_value = "f32")]
    pub precision: String,
    /// Numeric backend: auto (libtorch when built in, else flex), flex or tch.
    #[arg(long, env = "MSMAE_BACKEND", default_value = "auto")]
    pub backend: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExecutorArg {
    Local,
    Slurm,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Format {
    Text,
    Dot,
    Mermaid,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ShowFormat {
    Text,
    Json,
    Csv,
    Md,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum AuditFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a pipeline: cached stages are served from the store, the rest execute.
    #[command(
        after_help = "Examples:\n  msmae run pipelines/quickstart.yaml\n  msmae run pipelines/quickstart.yaml --stage masks        # re-run one stage\n  msmae run pipelines/quickstart.yaml --set params.size=32 --dry-run"
    )]
    Run(RunArgs),
    /// What a Slurm job runs: one stage of a pipeline into the shared store (hidden).
    #[command(hide = true)]
    RunStage(RunStageArgs),
    /// Which stages are up to date, which would run and why.
    #[command(after_help = "Example:\n  msmae status pipelines/quickstart.yaml")]
    Status {
        #[command(flatten)]
        common: Common,
    },
    /// Explain one stage's state and list its cache-key components.
    #[command(after_help = "Example:\n  msmae why pipelines/quickstart.yaml pretrain")]
    Why {
        #[command(flatten)]
        common: Common,
        stage: String,
    },
    /// Print the stage graph.
    #[command(after_help = "Example:\n  msmae dag pipelines/quickstart.yaml --format mermaid")]
    Dag {
        #[command(flatten)]
        common: Common,
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
    },
    /// Re-hash every artifact recorded in the lock file; exit 1 on any mismatch.
    #[command(after_help = "Example:\n  msmae verify pipelines/quickstart.yaml")]
    Verify {
        #[command(flatten)]
        common: Common,
    },
    /// Remove interrupted runs' leftovers and unreferenced artifacts from the store.
    #[command(after_help = "Example:\n  msmae gc pipelines/quickstart.yaml --prune --dry-run")]
    Gc(GcArgs),
    /// Show the results the lock file records (metrics, the comparison table, Dice/IoU,
    /// lesion coverage) without running anything; stale or missing stages are marked.
    #[command(
        after_help = "Examples:\n  msmae show pipelines/quickstart.yaml\n  msmae show pipelines/quickstart.yaml report seg-msmae --format md\n  msmae show pipelines/quickstart.yaml --against HEAD~1          # the lock file as committed there\n  msmae show pipelines/quickstart.yaml --against old/quickstart.lock --format csv"
    )]
    Show(ShowArgs),
    /// Print the directory of a stage's recorded artifact (for scripts).
    #[command(after_help = "Example:\n  ls \"$(msmae path pipelines/quickstart.yaml attn)\"/overlays")]
    Path {
        #[command(flatten)]
        common: Common,
        stage: String,
    },
    /// Write one self-contained HTML page of the results (DAG, stages, comparison, figures,
    /// provenance): no network needed to view it.
    #[command(after_help = "Example:\n  msmae report pipelines/quickstart.yaml -o quickstart.html")]
    Report {
        #[command(flatten)]
        common: Common,
        /// Output file (default: NAME.report.html beside the pipeline file).
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Recompute stages from what the lock file records (config, seed, input artifacts) in
    /// a scratch store and report whether each reproduces: bit for bit, or by its metrics
    /// (recorded vs recomputed, with the delta), beside every difference of environment.
    /// Touches neither the lock file nor the store. Exit 0 when every stage is bit-identical
    /// or within tolerance, 1 otherwise.
    #[command(
        after_help = "Examples:\n  msmae audit pipelines/quickstart.yaml\n  msmae audit pipelines/quickstart.yaml ft-msmae --threads 1 --tolerance 0.01\n  msmae audit pipelines/quickstart.yaml data masks --format json"
    )]
    Audit(AuditArgs),
    /// What this machine and build offer for training: backends, CUDA devices, MPI, the
    /// process group, NCCL and the CUDA driver, and how gradients would be summed. For
    /// checking a node before a long job.
    #[command(
        after_help = "Examples:\n  msmae env\n  mpirun -np 2 msmae env\n  MSMAE_NCCL_LIBRARY=/opt/nccl/lib/libnccl.so.2 msmae env"
    )]
    Env,
    /// List the stage kinds this binary provides.
    #[command(after_help = "Example:\n  msmae stages")]
    Stages,
}

// `msmae run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub common: Common,
    /// Run only this stage (re-executed even if cached); its inputs must be cached.
    #[arg(long)]
    pub stage: Option<String>,
    /// Re-execute this stage, then whatever downstream its output changes.
    #[arg(long)]
    pub from: Option<String>,
    /// Stop after this stage (and what it needs).
    #[arg(long)]
    pub until: Option<String>,
    /// Re-execute every selected stage even if cached.
    #[arg(long)]
    pub force: bool,
    /// Show what would run and why; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Job slots (light stages take one, training stages all).
    #[arg(short, long)]
    pub jobs: Option<usize>,
    /// Fail instead of waiting when another runner is computing a stage.
    #[arg(long)]
    pub no_wait: bool,
    /// Where stages run: `local` (threads of this process) or `slurm` (one job per
    /// stage, this process driving from the login node; the store must be shared).
    #[arg(long, value_enum, default_value = "local")]
    pub executor: ExecutorArg,
    /// Slurm profile (YAML: partition, account, qos, gpu_flag, mpi, extra, light,
    /// training); none of it enters the cache key.
    #[arg(long, env = "MSMAE_SLURM_PROFILE")]
    pub profile: Option<PathBuf>,
    /// Re-hash the inputs of every stage that runs before running it (a cache hit checks
    /// files and sizes only).
    #[arg(long)]
    pub verify_inputs: bool,
    /// Resubmissions of a Slurm job ended by its time limit, a node failure or preemption
    /// (the stage resumes from its checkpoint).
    #[arg(long, default_value_t = 1)]
    pub retries: usize,
    /// Write TensorBoard scalars (loss, lr, validation metrics per epoch; per step too
    /// with MSMAE_TENSORBOARD_STEPS=1) of every training stage that runs into
    /// DIR/PIPELINE/STAGE/ (outside the store: never part of a cache key).
    #[arg(long, env = "MSMAE_TENSORBOARD", value_name = "DIR")]
    pub tensorboard: Option<PathBuf>,
}

// `msmae run-stage`.
#[derive(Debug, Args)]
pub struct RunStageArgs {
    #[command(flatten)]
    pub common: Common,
    #[arg(long)]
    pub stage: String,
    /// The key the driver submitted the stage under.
    #[arg(long)]
    pub key: String,
    /// Where to write the outcome (JSON, atomically) for the driver.
    #[arg(long)]
    pub outcome: PathBuf,
    /// Re-execute even if cached (the driver's `--stage`, `--from`, `--force`).
    #[arg(long)]
    pub force: bool,
    /// Prove to the driver that the store's file locks reach across nodes (marker prefix).
    #[arg(long)]
    pub lock_check: Option<PathBuf>,
    /// The driver's `--tensorboard`.
    #[arg(long, env = "MSMAE_TENSORBOARD", value_name = "DIR")]
    pub tensorboard: Option<PathBuf>,
}

// `msmae gc`.
#[derive(Debug, Args)]
pub struct GcArgs {
    #[command(flatten)]
    pub common: Common,
    /// Keep only artifacts recorded in lock files (drop other cached configurations).
    #[arg(long)]
    pub prune: bool,
    #[arg(long)]
    pub dry_run: bool,
    /// Fail instead of waiting while a pipeline runs on this store.
    #[arg(long)]
    pub no_wait: bool,
    /// Forget a lock file registered with this store (one that was deleted on purpose),
    /// so that gc no longer keeps the artifacts it referenced; removes nothing itself.
    #[arg(long, value_name = "LOCK")]
    pub forget: Vec<PathBuf>,
}

// `msmae show`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    #[command(flatten)]
    pub common: Common,
    /// Only these stages (default: every stage that declares results).
    pub stages: Vec<String>,
    #[arg(long, value_enum, default_value = "text")]
    pub format: ShowFormat,
    /// Compare with another lock file, or with this pipeline's lock file at a git
    /// revision (`HEAD~1`, a tag, a commit): side by side, with deltas.
    #[arg(long, value_name = "LOCK|REV")]
    pub against: Option<String>,
}

// `msmae audit`.
#[derive(Debug, Args)]
pub struct AuditArgs {
    #[command(flatten)]
    pub common: Common,
    /// Stages to recompute (default: every stage the lock file records).
    pub stages: Vec<String>,
    /// CPU threads to compute with (default: the count recorded for each stage).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Largest absolute difference of a declared metric still counted as reproduced.
    #[arg(long, default_value_t = 0.0)]
    pub tolerance: f64,
    #[arg(long, value_enum, default_value = "text")]
    pub format: AuditFormat,
    /// Recompute here and keep the results (default: a temporary directory).
    #[arg(long)]
    pub scratch: Option<PathBuf>,
}

/// A command line that cannot be carried out as written (exit 2, like a clap error).
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// Parse arguments, run, and map errors to exit codes.
pub fn main_with(registry: Registry) -> ExitCode {
    let cli = Cli::parse();
    // A multi-process launch (mpirun, srun) is joined before anything else; MPI is
    // finalised when `_group` drops, after the command.
    let _group = match msmae_dist::init() {
        Ok(g) => g,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = msmae_dist::GradientTransport::current() {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    if let Err(e) = msmae_dist::nccl::timeout_from(|k| std::env::var(k).ok()) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let group = msmae_dist::group();
    // Ranks other than 0 log warnings and errors only (rank 0 speaks for the run).
    init_tracing(cli.verbose, cli.quiet || (group.rank() != 0 && cli.verbose == 0));
    match execute(cli, &registry) {
        Ok(code) => code,
        Err(e) => {
            let spec =
                e.downcast_ref::<msmae_pipeline::Error>().is_some_and(|e| matches!(e, msmae_pipeline::Error::Spec(_)))
                    || e.downcast_ref::<UsageError>().is_some();
            let code = if spec { 2 } else { 1 };
            if group.is_solo() {
                eprintln!("error: {}", msmae_core::error::chain(e.as_ref()));
                return ExitCode::from(code);
            }
            // The other ranks may be waiting on this one: end them all.
            eprintln!("error: rank {} of {}: {}", group.rank(), group.size(), msmae_core::error::chain(e.as_ref()));
            group.abort(i32::from(code))
        }
    }
}

fn init_tracing(verbose: u8, quiet: bool) {
    use tracing_subscriber::EnvFilter;
    let default = match (quiet, verbose) {
        (true, _) => "warn",
        (_, 0) => "warn,msmae=info,msmae_pipeline=info,msmae_cli=info,msmae_data=info,msmae_backend=info",
        (_, 1) => "info,msmae_pipeline=debug,msmae_cli=debug",
        _ => "debug",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(progress::LogWriter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .without_time()
        .try_init();
}

fn store_for(common: &Common) -> Result<Store> {
    let path =
        common.store.clone().unwrap_or_else(|| common.pipeline.parent().unwrap_or(Path::new(".")).join(".msmae"));
    Store::open(&path).with_context(|| format!("opening the artifact store {}", path.display()))
}

fn compute(common: &Common) -> Result<msmae_backend::Compute> {
    let mut devices: DeviceList = common.device.parse()?;
    // One process per GPU: under a multi-process launch, `auto` is the GPU of this
    // process's local rank rather than every GPU of the node.
    let gpus = msmae_backend::cuda_device_count();
    if devices.0 == [DeviceRequest::Auto] && !msmae_dist::group().is_solo() && gpus > 0 {
        devices = DeviceList(vec![DeviceRequest::Cuda(msmae_dist::local_rank() % gpus)]);
    }
    let backend: BackendRequest = common.backend.parse()?;
    let precision: Precision = common.precision.parse()?;
    Ok(msmae_backend::select_all(backend, &devices)?.with_precision(precision))
}

/// The environment the keys of `status` and `why` assume: this machine's resolution of
/// `--device`, or, where this machine does not have the device (a login node asked about
/// `--device cuda`), the environment as asked, as the Slurm driver keys it.
fn keyed_env(common: &Common) -> Result<ExecEnv> {
    match compute(common) {
        Ok(c) => Ok(c.env),
        Err(local) => cluster_compute(common, &Default::default()).map(|c| c.env).map_err(|_| local),
    }
}

/// The environment Slurm jobs compute in, as asked (`--device cpu|cuda…`; `auto` is CUDA
/// when the profile gives training stages GPUs): not checked against this machine, which
/// is the login node.
fn cluster_compute(common: &Common, profile: &msmae_pipeline::slurm::Profile) -> Result<msmae_backend::Compute> {
    let devices: DeviceList = common.device.parse()?;
    let precision: Precision = common.precision.parse()?;
    let backend: BackendRequest = common.backend.parse()?;
    // The CPU form of the request resolves the backend and checks flags here.
    let mut c = msmae_backend::select(backend, DeviceRequest::Cpu)?.with_precision(precision);
    let cuda = devices.0.iter().any(|d| matches!(d, DeviceRequest::Cuda(_)));
    let auto = devices.0 == [DeviceRequest::Auto] && profile.training.gpus.unwrap_or(0) > 0;
    if cuda || auto {
        c.env.device = if auto { "auto".into() } else { devices.to_string() };
        c.env.device_kind = "cuda".into();
    }
    Ok(c)
}

fn slurm_options(
    common: &Common,
    store: &Store,
    env: &ExecEnv,
    profile: msmae_pipeline::slurm::Profile,
    retries: usize,
    tensorboard: Option<&Path>,
) -> Result<msmae_pipeline::slurm::SlurmOptions> {
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let mut args: Vec<String> = vec![
        abs(&common.pipeline).to_string_lossy().into_owned(),
        "--store".into(),
        abs(store.root()).to_string_lossy().into_owned(),
    ];
    for s in &common.set {
        args.extend(["--set".into(), format!("{}={}", s.path, s.value)]);
    }
    let device =
        if env.device_kind == "cuda" && env.device == "auto" { "cuda".to_string() } else { env.device.clone() };
    args.extend([
        "--device".into(),
        device,
        "--backend".into(),
        env.backend.clone(),
        "--precision".into(),
        env.precision.clone(),
    ]);
    if let Some(tb) = tensorboard {
        args.extend(["--tensorboard".into(), abs(tb).to_string_lossy().into_owned()]);
    }
    let secs = |var: &str, default: f64| std::env::var(var).ok().and_then(|v| v.parse::<f64>().ok()).unwrap_or(default);
    Ok(msmae_pipeline::slurm::SlurmOptions {
        profile,
        exe: std::env::current_exe().context("locating the msmae binary for the jobs")?,
        args,
        run_id: format!("{}-{}", msmae_pipeline::store::now_rfc3339().replace([':', '+'], ""), std::process::id()),
        poll: std::time::Duration::from_secs_f64(secs("MSMAE_SLURM_POLL", 2.0)),
        grace: std::time::Duration::from_secs_f64(secs("MSMAE_SLURM_GRACE", 30.0)),
        retries,
        locks_checked: Default::default(),
    })
}

/// What the inspecting commands read: the plan, the store, the lock file and its path.
struct Recorded {
    plan: msmae_pipeline::Plan,
    store: Store,
    lock_path: PathBuf,
    lock: LockFile,
}

fn recorded(common: &Common, registry: &Registry) -> Result<Recorded> {
    let plan = msmae_pipeline::load_plan(&common.pipeline, &common.set, registry)?;
    let store = store_for(common)?;
    let lock_path = lock_path(common);
    let lock = LockFile::read(&lock_path, &plan.spec.name)?;
    lock.check_owner(&lock_path, &plan.spec.file, &plan.spec.name)?;
    Ok(Recorded { plan, store, lock_path, lock })
}

/// The most job slots `--jobs` takes: far more than any machine's cores, small enough that
/// a typo cannot become a hundred thousand threads.
pub const MAX_JOBS: usize = 1024;

/// The marker msmae writes into every report page; only such a page is ever overwritten.
const REPORT_MARKER: &str = "<meta name=\"generator\" content=\"msmae report\">";

/// Refuse to write a report over anything msmae did not write as a report: the pipeline
/// file, a lock file, anything inside the store, or any existing file that is not an msmae
/// report page.
fn check_report_target(out: &Path, common: &Common, store: &Store, lock: &Path) -> Result<()> {
    let resolve = msmae_pipeline::store::resolved_path;
    let target = resolve(out);
    let refuse = |what: String| {
        Err(anyhow::anyhow!("refusing to write the report to {}: {what}; choose another file with -o", out.display()))
    };
    if target == resolve(&common.pipeline) {
        return refuse("it is the pipeline file".into());
    }
    if target == resolve(lock) {
        return refuse("it is the pipeline's lock file".into());
    }
    if target.starts_with(store.root()) {
        return refuse(format!("it is inside the artifact store {}", store.root().display()));
    }
    if let Ok(md) = std::fs::metadata(&target) {
        if !md.is_file() {
            return refuse("it exists and is not a plain file".into());
        }
        let mut head = vec![0u8; 4096];
        let n = std::fs::File::open(&target).and_then(|mut f| std::io::Read::read(&mut f, &mut head)).unwrap_or(0);
        if !String::from_utf8_lossy(&head[..n]).contains(REPORT_MARKER) {
            return refuse("it exists and is not a report msmae wrote (only those are replaced)".into());
        }
    }
    Ok(())
}

fn lock_path(common: &Common) -> PathBuf {
    common.lock.clone().unwrap_or_else(|| lockfile::default_path(&common.pipeline))
}

/// `msmae env`: one line per fact, each saying where it came from.
fn environment_report() -> String {
    use msmae_dist::GradientTransport;
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:14}{v}\n"));
    line("msmae", format!("{} (burn {})", env!("CARGO_PKG_VERSION"), msmae_backend::BURN_VERSION));
    let backends: Vec<String> = msmae_backend::compiled_backends()
        .iter()
        .map(|b| match b {
            msmae_backend::BackendKind::Tch => format!("tch (libtorch {})", msmae_backend::LIBTORCH_VERSION),
            other => other.to_string(),
        })
        .collect();
    line("backends", backends.join(", "));
    let gpus = msmae_backend::cuda_device_count();
    line(
        "CUDA devices",
        if gpus == 0 { "none (libtorch sees no GPU)".into() } else { format!("{gpus} (cuda:0 … cuda:{})", gpus - 1) },
    );
    line(
        "MPI",
        if msmae_dist::HAS_MPI {
            "compiled in".into()
        } else {
            "not compiled in (a multi-process launch is refused)".into()
        },
    );
    let g = msmae_dist::group();
    line(
        "process",
        format!("rank {} of {} ({}), local rank {}", g.rank(), g.size(), g.name(), msmae_dist::local_rank()),
    );
    let nccl = msmae_dist::nccl::library_version(&msmae_dist::nccl::nccl_candidates(|k| std::env::var(k).ok()));
    match &nccl {
        Ok((v, path)) => line("NCCL", format!("{v} ({path})")),
        Err(e) => line("NCCL", format!("not available: {e}")),
    }
    if let Ok(t) = msmae_dist::nccl::timeout_from(|k| std::env::var(k).ok()) {
        line("NCCL timeout", format!("{} s per call ({})", t.as_secs_f64(), msmae_dist::nccl::NCCL_TIMEOUT_VAR));
    }
    let driver = msmae_dist::nccl::driver_status();
    match &driver {
        Ok(path) => line("CUDA driver", format!("initialised ({path})")),
        Err(e) => line("CUDA driver", format!("not available: {e}")),
    }
    let transport = GradientTransport::current().unwrap_or_default();
    let usable = nccl.is_ok() && driver.is_ok() && gpus > 0;
    let how = match transport {
        GradientTransport::Mpi => "MPI on host memory (CUDA gradients copied to the host)".to_string(),
        GradientTransport::Nccl if usable => "NCCL on CUDA memory, also at world size 1".to_string(),
        GradientTransport::Nccl => {
            "NCCL required but not usable here: training would fail at its first step".to_string()
        }
        GradientTransport::Auto if usable => {
            "NCCL on CUDA devices (if every rank has it), MPI on host memory for CPU training".to_string()
        }
        GradientTransport::Auto => "MPI on host memory (NCCL needs a GPU, its driver and libnccl)".to_string(),
    };
    line("gradients", format!("{}={transport}: {how}", GradientTransport::VAR));
    out
}

fn execute(cli: Cli, registry: &Registry) -> Result<ExitCode> {
    match cli.command {
        Command::Env => Ok(commands::env()),
        Command::Stages => Ok(commands::stages(registry)),
        Command::Run(args) => commands::run(registry, args),
        Command::RunStage(args) => commands::run_stage(registry, args),
        Command::Status { common } => commands::status(registry, &common),
        Command::Why { common, stage } => commands::why(registry, &common, &stage),
        Command::Dag { common, format } => commands::dag(registry, &common, format),
        Command::Verify { common } => commands::verify(&common),
        Command::Show(args) => commands::show(registry, args),
        Command::Path { common, stage } => commands::path(registry, &common, &stage),
        Command::Report { common, output } => commands::report(registry, &common, output),
        Command::Audit(args) => commands::audit(registry, args),
        Command::Gc(args) => commands::gc(args),
    }
}

/// A cancellation token that the first Ctrl-C sets (stages stop at their next check, nothing
/// partial is committed); a second Ctrl-C exits at once.
fn cancel_on_ctrl_c() -> CancelToken {
    let cancel = CancelToken::new();
    let c2 = cancel.clone();
    let _ = ctrlc::set_handler(move || {
        if c2.is_cancelled() {
            eprintln!("interrupted twice: exiting now (committed artifacts are intact)");
            std::process::exit(130);
        }
        eprintln!("interrupt: finishing nothing new; press Ctrl-C again to exit at once");
        c2.cancel();
    });
    cancel
}

fn print_status(rows: &[inspect::StatusRow]) {
    let w = rows.iter().map(|r| r.name.len()).max().unwrap_or(0);
    for r in rows {
        let detail = r.state.detail();
        println!("{:w$}  {:28} {:10}  {detail}", r.name, r.kind, r.state.label());
    }
}

fn print_report(r: &msmae_pipeline::RunReport) {
    let w = r.stages.iter().map(|s| s.name.len()).max().unwrap_or(5).max(5);
    println!("{:w$}  {:28} {:22} {:>9}  artifact", "stage", "kind", "outcome", "seconds");
    for s in &r.stages {
        let secs = match &s.outcome {
            Outcome::Ran { seconds, .. } => format!("{seconds:.2}"),
            _ => String::new(),
        };
        println!(
            "{:w$}  {:28} {:22} {:>9}  {}",
            s.name,
            s.kind,
            s.outcome.label(),
            secs,
            s.artifact.as_deref().map(|a| &a[..12]).unwrap_or("-")
        );
        match &s.outcome {
            Outcome::Failed { error } => println!("{:w$}    error: {error}", ""),
            Outcome::WouldRun { reasons } => reasons.iter().for_each(|x| println!("{:w$}    - {x}", "")),
            Outcome::Blocked { upstream } => println!("{:w$}    blocked by `{upstream}`", ""),
            _ => {}
        }
    }
    println!(
        "{}: {} ran, {} cached, {} failed in {:.2}s; lock file {}",
        r.pipeline,
        r.count("ran") + r.count("ran (output unchanged)"),
        r.count("cached"),
        r.count("FAILED"),
        r.seconds,
        r.lock_file.display()
    );
}
