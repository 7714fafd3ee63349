//! The Slurm executor: the driver plans, looks up the cache and keeps the lock file; each
//! stage that must run becomes one Slurm job (`sbatch`) that executes `msmae run-stage`
//! against the shared store, which re-plans, checks the key it was submitted for, takes the
//! key's lock, runs and commits the stage, and writes its outcome where the driver polls.
//!
//! Resources come from the stage (a training stage asks for GPUs by default), the
//! pipeline's per-stage `resources:` block and a profile file (`--profile`,
//! `MSMAE_SLURM_PROFILE`): partition, account, QoS, extra `sbatch` flags, GPU flag style.
//! None of them enters the cache key. Waiting is `squeue` polling (no accounting needed);
//! a job that leaves the queue without an outcome fails after a grace period naming its log;
//! a time limit, node failure or preemption is retried up to `--retries` (the stage resumes
//! from its checkpoint); cancelling scancels every job and waits for the queue to let go.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Per-stage resources (`resources:` in the pipeline; defaults from the profile).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageResources {
    /// CPUs per task.
    pub cpus: Option<usize>,
    /// Memory per node, in `sbatch --mem` syntax (`16G`).
    pub mem: Option<String>,
    /// GPUs per node.
    pub gpus: Option<usize>,
    /// Time limit in `sbatch --time` syntax (`12:00:00`, `2-00:00:00`).
    pub time: Option<String>,
    /// Nodes (data-parallel stages: one task per GPU on each).
    pub nodes: Option<usize>,
}

impl StageResources {
    /// `self`, with what it leaves unset taken from `defaults`.
    pub fn or(&self, defaults: &StageResources) -> StageResources {
        StageResources {
            cpus: self.cpus.or(defaults.cpus),
            mem: self.mem.clone().or_else(|| defaults.mem.clone()),
            gpus: self.gpus.or(defaults.gpus),
            time: self.time.clone().or_else(|| defaults.time.clone()),
            nodes: self.nodes.or(defaults.nodes),
        }
    }
}

/// How GPUs are requested.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GpuFlag {
    /// `--gpus-per-node=N`
    #[default]
    GpusPerNode,
    /// `--gres=gpu:N` (older clusters)
    Gres,
}

/// A cluster profile (YAML): where jobs go and what a stage gets unless it says otherwise.
///
/// ```yaml
/// partition: gpu
/// account: radiology
/// qos: normal
/// gpu_flag: gpus-per-node      # or gres
/// mpi: pmix                    # srun --mpi for multi-task (data-parallel) jobs
/// extra: ["--constraint=a100"]
/// light: { cpus: 4, mem: 16G, time: "02:00:00" }
/// training: { cpus: 8, mem: 64G, gpus: 1, time: "2-00:00:00" }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub partition: Option<String>,
    pub account: Option<String>,
    pub qos: Option<String>,
    #[serde(default)]
    pub gpu_flag: GpuFlag,
    /// `srun --mpi=…` for jobs of several tasks (default `pmix`).
    pub mpi: Option<String>,
    /// More `sbatch` flags, verbatim.
    #[serde(default)]
    pub extra: Vec<String>,
    /// Defaults of stages that do not train.
    #[serde(default)]
    pub light: StageResources,
    /// Defaults of training (data-parallel) stages.
    #[serde(default)]
    pub training: StageResources,
}

impl Profile {
    pub fn load(path: &Path) -> Result<Profile> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Read { path: path.to_path_buf(), source: e })?;
        serde_yaml::from_str(&text).map_err(|e| Error::Slurm(format!("profile {}: {e}", path.display())))
    }
}

/// What the driver needs to submit jobs.
#[derive(Debug)]
pub struct SlurmOptions {
    pub profile: Profile,
    /// The `msmae` binary the jobs run (the driver's own).
    pub exe: PathBuf,
    /// Arguments every `run-stage` gets after the subcommand: the pipeline file, `--store`,
    /// `--set`s, `--device`, `--precision`, `--backend`.
    pub args: Vec<String>,
    /// Names this driver's jobs and its folder under `<store>/slurm/`.
    pub run_id: String,
    pub poll: Duration,
    /// How long a job that left the queue may take to show its outcome (shared file systems
    /// show files late).
    pub grace: Duration,
    /// Resubmissions after a time limit, node failure or preemption.
    pub retries: usize,
    /// Set once the run's first job has been given the lock check.
    pub locks_checked: std::sync::atomic::AtomicBool,
}

/// What `run-stage` writes for the driver (atomically).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobOutcome {
    pub stage: String,
    pub key: Option<String>,
    /// `ran`, `cached`, `failed` or `cancelled`.
    pub outcome: String,
    pub error: Option<String>,
    pub seconds: f64,
    pub host: String,
}

impl JobOutcome {
    pub fn write(&self, path: &Path) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| Error::Slurm(e.to_string()))?;
        crate::store::write_atomic(path, &bytes)
    }
}

/// One stage's job, as the driver sees it.
#[derive(Debug)]
pub struct Submission {
    pub job: String,
    pub log: PathBuf,
    pub outcome: PathBuf,
}

/// How a job ended.
#[derive(Debug)]
pub enum JobEnd {
    Outcome(JobOutcome),
    /// Ended by the scheduler in a way a resubmission may fix (time limit, node failure,
    /// preemption), with the reason.
    Retryable(String),
    Lost,
    Cancelled,
}

/// One stage's job: what it runs and what it asks for.
#[derive(Debug, Clone)]
pub struct JobSpec<'a> {
    pub pipeline: &'a str,
    pub stage: &'a str,
    pub key: &'a str,
    /// A training stage: one task per GPU.
    pub data_parallel: bool,
    pub resources: StageResources,
    /// `%j` stands for the job id.
    pub log: &'a Path,
    pub outcome: &'a Path,
    /// Re-execute even if cached (`--stage`, `--from`, `--force` on the driver); not on a
    /// resubmission, which resumes from the checkpoint instead.
    pub force: bool,
    /// Marker prefix of the shared-filesystem lock check (the run's first job).
    pub lock_check: Option<&'a Path>,
}

/// The `sbatch` script of one stage.
pub fn script(o: &SlurmOptions, j: &JobSpec<'_>) -> String {
    let (pipeline, stage, key, data_parallel, r, log, outcome) =
        (j.pipeline, j.stage, j.key, j.data_parallel, &j.resources, j.log, j.outcome);
    let mut s = String::from("#!/bin/sh\n");
    let mut opt = |k: &str, v: &str| s.push_str(&format!("#SBATCH --{k}={v}\n"));
    opt("job-name", &format!("msmae-{pipeline}-{stage}"));
    opt("output", &log.to_string_lossy());
    if let Some(c) = r.cpus {
        opt("cpus-per-task", &c.to_string());
    }
    if let Some(m) = &r.mem {
        opt("mem", m);
    }
    if let Some(t) = &r.time {
        opt("time", t);
    }
    let gpus = r.gpus.unwrap_or(0);
    let nodes = r.nodes.unwrap_or(1).max(1);
    // Data-parallel training: one task per GPU (the processes of one MPI job, started by
    // srun); never --ntasks-per-gpu, whose binding differs across Slurm versions.
    let tasks_per_node = if data_parallel && gpus > 0 { gpus } else { 1 };
    if nodes > 1 || tasks_per_node > 1 {
        opt("nodes", &nodes.to_string());
        opt("ntasks-per-node", &tasks_per_node.to_string());
    }
    if gpus > 0 {
        match o.profile.gpu_flag {
            GpuFlag::GpusPerNode => opt("gpus-per-node", &gpus.to_string()),
            GpuFlag::Gres => opt("gres", &format!("gpu:{gpus}")),
        }
    }
    for (k, v) in [("partition", &o.profile.partition), ("account", &o.profile.account), ("qos", &o.profile.qos)] {
        if let Some(v) = v {
            opt(k, v);
        }
    }
    for e in &o.profile.extra {
        s.push_str(&format!("#SBATCH {e}\n"));
    }
    let mut cmd = vec![quote(&o.exe.to_string_lossy()), "run-stage".into()];
    cmd.extend(o.args.iter().map(|a| quote(a)));
    cmd.extend([
        "--stage".into(),
        quote(stage),
        "--key".into(),
        quote(key),
        "--outcome".into(),
        quote(&outcome.to_string_lossy()),
    ]);
    if j.force {
        cmd.push("--force".into());
    }
    if let Some(c) = j.lock_check {
        cmd.extend(["--lock-check".into(), quote(&c.to_string_lossy())]);
    }
    let launch = if nodes * tasks_per_node > 1 {
        format!("srun --mpi={} ", o.profile.mpi.as_deref().unwrap_or("pmix"))
    } else {
        "exec ".into()
    };
    s.push_str(&format!("{launch}{}\n", cmd.join(" ")));
    s
}

/// Single-quote for `sh`.
fn quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Submit `script` (written to `dir/<stage>.sbatch`): the job id.
pub fn submit(dir: &Path, stage: &str, script: &str) -> Result<String> {
    std::fs::create_dir_all(dir).map_err(|e| Error::store("create", dir, e))?;
    let file = dir.join(format!("{stage}.sbatch"));
    std::fs::write(&file, script).map_err(|e| Error::store("write", &file, e))?;
    let out =
        Command::new("sbatch").arg("--parsable").arg(&file).output().map_err(|e| {
            Error::Slurm(format!("running sbatch: {e} (is Slurm's client installed and SLURM_CONF set?)"))
        })?;
    if !out.status.success() {
        return Err(Error::Slurm(format!(
            "sbatch {}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let id = text.trim().split(';').next().unwrap_or("").to_string();
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
        return Err(Error::Slurm(format!("sbatch printed `{}`, not a job id", text.trim())));
    }
    Ok(id)
}

/// Whether the job is still in the queue (`squeue -h -j ID`; a purged id is not).
fn queued(job: &str) -> Result<bool> {
    let out = Command::new("squeue")
        .args(["-h", "-j", job, "-o", "%T"])
        .output()
        .map_err(|e| Error::Slurm(format!("running squeue: {e}")))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("Invalid job id") {
            return Ok(false);
        }
        return Err(Error::Slurm(format!("squeue -j {job}: {}", err.trim())));
    }
    let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Ok(!state.is_empty()
        && !matches!(
            state.as_str(),
            "COMPLETED"
                | "FAILED"
                | "CANCELLED"
                | "TIMEOUT"
                | "NODE_FAIL"
                | "PREEMPTED"
                | "OUT_OF_MEMORY"
                | "BOOT_FAIL"
                | "DEADLINE"
        ))
}

/// `scancel` the job and wait (up to a minute) until the queue no longer runs it.
pub fn cancel(job: &str) {
    let _ = Command::new("scancel").arg(job).status();
    let t = Instant::now();
    while queued(job).unwrap_or(false) && t.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The job side of the lock check: the key lock is held; tell the driver and wait for its
/// verdict (`ok`, or why not), up to ten minutes.
pub fn await_lock_verdict(prefix: &Path, cancel: &msmae_core::CancelToken) -> Result<()> {
    let held = marker(prefix, "held");
    let ack = marker(prefix, "ack");
    write_atomic_str(&held, &crate::store::Host::current().hostname)?;
    let t = Instant::now();
    loop {
        if let Ok(v) = std::fs::read_to_string(&ack) {
            return if v.trim() == "ok" { Ok(()) } else { Err(Error::Slurm(v.trim().to_string())) };
        }
        if cancel.is_cancelled() {
            return Err(Error::Slurm("cancelled while the driver checked the store's locks".into()));
        }
        if t.elapsed() > Duration::from_secs(600) {
            return Err(Error::Slurm(format!(
                "no word from the driver on the lock check in ten minutes ({})",
                ack.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn marker(prefix: &Path, what: &str) -> PathBuf {
    PathBuf::from(format!("{}.{what}", prefix.display()))
}

fn write_atomic_str(p: &Path, s: &str) -> Result<()> {
    crate::store::write_atomic(p, s.as_bytes())
}

/// Wait for the job to leave the queue and say how it ended. With a lock check, answer the
/// job once it holds its key lock: `held_here(held marker)` says whether this host sees it
/// held; if not, the job is told to stop and the run fails with what to fix.
pub fn wait(
    o: &SlurmOptions,
    s: &Submission,
    lock_check: Option<&Path>,
    held_here: &dyn Fn(&Path) -> bool,
    cancelled: &dyn Fn() -> bool,
) -> Result<JobEnd> {
    let mut checked = lock_check.is_none();
    while queued(&s.job)? {
        if cancelled() {
            cancel(&s.job);
            return Ok(JobEnd::Cancelled);
        }
        if let (false, Some(prefix)) = (checked, lock_check) {
            let held = marker(prefix, "held");
            if let Ok(host) = std::fs::read_to_string(&held) {
                checked = true;
                if held_here(&held) {
                    write_atomic_str(&marker(prefix, "ack"), "ok")?;
                } else {
                    let why = format!(
                        "file locks on the store are not shared across nodes: Slurm job {} on {} holds a stage's lock, but {} could take it too. Two runners could then compute and commit the same stage at once: put the store on a filesystem whose locks reach every node (NFS without `local_lock`, Lustre mounted with `flock`)",
                        s.job,
                        host.trim(),
                        crate::store::Host::current().hostname
                    );
                    write_atomic_str(&marker(prefix, "ack"), &why)?;
                    return Err(Error::Slurm(why));
                }
            }
        }
        std::thread::sleep(o.poll);
    }
    let t = Instant::now();
    loop {
        // Slurm writes why it ended a job into its log; the stage itself, stopped by the
        // SIGTERM that comes first, says only "cancelled".
        let log = std::fs::read_to_string(log_path(s)).unwrap_or_default();
        for (marker, why) in [
            ("DUE TO TIME LIMIT", "time limit"),
            ("DUE TO NODE FAIL", "node failure"),
            ("DUE TO PREEMPTION", "preempted"),
        ] {
            if log.contains(marker) {
                return Ok(JobEnd::Retryable(why.into()));
            }
        }
        if let Ok(bytes) = std::fs::read(&s.outcome) {
            let out: JobOutcome =
                serde_json::from_slice(&bytes).map_err(|e| Error::Slurm(format!("{}: {e}", s.outcome.display())))?;
            return Ok(JobEnd::Outcome(out));
        }
        if t.elapsed() >= o.grace {
            return Ok(JobEnd::Lost);
        }
        std::thread::sleep(o.poll.min(Duration::from_millis(500)));
    }
}

/// The log of a submitted job (`%j` expanded).
pub fn log_path(s: &Submission) -> PathBuf {
    PathBuf::from(s.log.to_string_lossy().replace("%j", &s.job))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(profile: Profile) -> SlurmOptions {
        SlurmOptions {
            profile,
            exe: PathBuf::from("/opt/msmae bin/msmae"),
            args: vec!["/p/study.yaml".into(), "--set".into(), "params.note=it's".into()],
            run_id: "r1".into(),
            poll: Duration::from_secs(1),
            grace: Duration::from_secs(1),
            retries: 1,
            locks_checked: Default::default(),
        }
    }

    fn job(data_parallel: bool, resources: StageResources) -> String {
        let o = opts(Profile {
            partition: Some("gpu".into()),
            account: Some("rad".into()),
            extra: vec!["--constraint=a100".into()],
            ..Default::default()
        });
        let spec = JobSpec {
            pipeline: "study",
            stage: "pretrain",
            key: "abc",
            data_parallel,
            resources,
            log: Path::new("/s/slurm/r1/pretrain-%j.log"),
            outcome: Path::new("/s/o.json"),
            force: false,
            lock_check: None,
        };
        script(&o, &spec)
    }

    #[test]
    fn training_jobs_get_one_task_per_gpu_and_the_profile() {
        let s = job(
            true,
            StageResources {
                cpus: Some(8),
                mem: Some("64G".into()),
                gpus: Some(4),
                time: Some("12:00:00".into()),
                nodes: Some(2),
            },
        );
        for line in [
            "#SBATCH --job-name=msmae-study-pretrain",
            "#SBATCH --cpus-per-task=8",
            "#SBATCH --mem=64G",
            "#SBATCH --time=12:00:00",
            "#SBATCH --nodes=2",
            "#SBATCH --ntasks-per-node=4",
            "#SBATCH --gpus-per-node=4",
            "#SBATCH --partition=gpu",
            "#SBATCH --account=rad",
            "#SBATCH --constraint=a100",
            "#SBATCH --output=/s/slurm/r1/pretrain-%j.log",
        ] {
            assert!(s.contains(line), "{line} missing:\n{s}");
        }
        assert!(!s.contains("ntasks-per-gpu"), "{s}");
        assert!(
            s.contains(
                "srun --mpi=pmix '/opt/msmae bin/msmae' run-stage /p/study.yaml --set 'params.note=it'\\''s' --stage pretrain --key abc --outcome /s/o.json"
            ),
            "{s}"
        );
    }

    #[test]
    fn light_jobs_are_one_task_and_gres_is_a_profile_choice() {
        let s = job(false, StageResources { gpus: Some(1), ..Default::default() });
        assert!(
            !s.contains("--nodes") && !s.contains("ntasks") && s.contains("\nexec '/opt/msmae bin/msmae' run-stage"),
            "{s}"
        );
        let mut o = opts(Profile { gpu_flag: GpuFlag::Gres, ..Default::default() });
        o.args.clear();
        let spec = JobSpec {
            pipeline: "p",
            stage: "s",
            key: "k",
            data_parallel: true,
            resources: StageResources { gpus: Some(2), ..Default::default() },
            log: Path::new("l"),
            outcome: Path::new("o"),
            force: true,
            lock_check: Some(Path::new("/s/x")),
        };
        let s = script(&o, &spec);
        assert!(s.trim_end().ends_with("--force --lock-check /s/x"), "{s}");
        assert!(
            s.contains("#SBATCH --gres=gpu:2") && s.contains("--ntasks-per-node=2") && !s.contains("gpus-per-node"),
            "{s}"
        );
    }

    #[test]
    fn stage_resources_fill_in_from_defaults_and_profiles_parse() {
        let r = StageResources { gpus: Some(2), ..Default::default() }.or(&StageResources {
            cpus: Some(4),
            gpus: Some(1),
            ..Default::default()
        });
        assert_eq!((r.cpus, r.gpus), (Some(4), Some(2)));
        let p: Profile =
            serde_yaml::from_str("partition: gpu\ngpu_flag: gres\ntraining: { gpus: 1, time: '1-00:00:00' }\n")
                .expect("profile");
        assert_eq!((p.gpu_flag, p.training.gpus), (GpuFlag::Gres, Some(1)));
        let e = serde_yaml::from_str::<Profile>("partitoin: gpu\n").expect_err("typo");
        assert!(e.to_string().contains("partitoin"), "{e}");
    }
}
