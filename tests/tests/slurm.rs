//! The Slurm executor against a real Slurm: Debian's slurmctld, slurmd and munge, started
//! here as a one-node cluster (no systemd: the daemons run in the foreground as children of
//! the test, with a generated `slurm.conf`) and stopped afterwards. One test runs every
//! scenario on the one cluster, in turn.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use msmae_tests::lock_digests as digests;

/// A one-node Slurm cluster for the life of the value.
struct Cluster {
    dir: tempfile::TempDir,
    conf: PathBuf,
    daemons: Vec<Child>,
    munged: Option<u32>,
}

impl Cluster {
    fn start() -> Cluster {
        let dir = tempfile::Builder::new().prefix("msmae-slurm").tempdir().expect("tmp");
        let root = dir.path();
        for d in ["state", "spool", "log"] {
            fs::create_dir_all(root.join(d)).expect("dir");
        }
        let munged = start_munge();
        let host = String::from_utf8_lossy(&Command::new("hostname").arg("-s").output().expect("hostname").stdout)
            .trim()
            .to_string();
        let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let mem_mb = fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            })
            .map(|kb| kb / 1024 - 1024)
            .unwrap_or(2048);
        // Ports away from the defaults, varied by process so two test runs do not collide.
        let port = 20000 + (std::process::id() % 20000) as u16;
        let conf = root.join("slurm.conf");
        let r = root.display();
        fs::write(
            &conf,
            format!(
                "ClusterName=msmaetest\nSlurmctldHost={host}(127.0.0.1)\nSlurmUser=root\nSlurmdUser=root\nAuthType=auth/munge\n\
                 SelectType=select/cons_tres\nSelectTypeParameters=CR_Core_Memory\nProctrackType=proctrack/pgid\nTaskPlugin=task/none\n\
                 AccountingStorageType=accounting_storage/none\nJobAcctGatherType=jobacct_gather/none\nMpiDefault=none\n\
                 StateSaveLocation={r}/state\nSlurmdSpoolDir={r}/spool\nSlurmctldPidFile={r}/slurmctld.pid\nSlurmdPidFile={r}/slurmd.pid\n\
                 SlurmctldLogFile={r}/log/slurmctld.log\nSlurmdLogFile={r}/log/slurmd.log\nSlurmctldPort={port}\nSlurmdPort={}\n\
                 ReturnToService=2\nSchedulerType=sched/backfill\nInactiveLimit=0\nKillWait=5\nMinJobAge=5\nOverTimeLimit=0\n\
                 NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN\n\
                 PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP\n",
                port + 1
            ),
        )
        .expect("slurm.conf");
        let spawn = |prog: &str, args: &[&str]| {
            Command::new(prog)
                .args(args)
                .arg("-f")
                .arg(&conf)
                .env("SLURM_CONF", &conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("{prog}: {e}"))
        };
        let ctld = spawn("slurmctld", &["-D", "-i"]);
        std::thread::sleep(Duration::from_millis(500));
        let slurmd = spawn("slurmd", &["-D", "-N", &host]);
        let cluster = Cluster { dir, conf, daemons: vec![slurmd, ctld], munged };
        // Ready when the node is idle.
        let t = Instant::now();
        loop {
            let o = cluster.cmd("sinfo").args(["-h", "-o", "%T"]).output().expect("sinfo");
            if String::from_utf8_lossy(&o.stdout).trim() == "idle" {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(60), "Slurm did not come up: {}", cluster.logs());
            std::thread::sleep(Duration::from_millis(200));
        }
        cluster
    }

    /// A Slurm client command against this cluster.
    fn cmd(&self, prog: &str) -> Command {
        let mut c = Command::new(prog);
        c.env("SLURM_CONF", &self.conf);
        c
    }

    /// `msmae ARGS` in `dir`, as a driver of this cluster (poll often: tests are short).
    fn msmae(&self, dir: &Path) -> Command {
        let mut c = self.cmd(msmae_tests::msmae_bin().to_str().expect("utf-8 path"));
        c.current_dir(dir)
            .env_remove("MSMAE_STORE")
            .env_remove("MSMAE_DEVICE")
            .env("MSMAE_SLURM_POLL", "0.2")
            .env("MSMAE_SLURM_GRACE", "5");
        c
    }

    fn queue(&self) -> String {
        String::from_utf8_lossy(&self.cmd("squeue").args(["-h", "-o", "%i %j %T"]).output().expect("squeue").stdout)
            .trim()
            .to_string()
    }

    fn logs(&self) -> String {
        let read = |f: &str| fs::read_to_string(self.dir.path().join("log").join(f)).unwrap_or_default();
        format!("slurmctld.log:\n{}\nslurmd.log:\n{}", read("slurmctld.log"), read("slurmd.log"))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for d in &mut self.daemons {
            let _ = Command::new("kill").arg(d.id().to_string()).status();
            let _ = d.wait();
        }
        if let Some(pid) = self.munged {
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
    }
}

/// munged as the `munge` user with the packaged key (generated at install), unless one
/// already answers; the pid of the one started here.
fn start_munge() -> Option<u32> {
    if Command::new("munge").arg("-n").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success()) {
        return None;
    }
    for d in ["/run/munge", "/var/log/munge", "/var/lib/munge"] {
        fs::create_dir_all(d).expect("munge dir");
        assert!(Command::new("chown").args(["munge:munge", d]).status().expect("chown").success());
    }
    if !Path::new("/etc/munge/munge.key").exists() {
        assert!(
            Command::new("runuser")
                .args(["-u", "munge", "--", "mungekey", "--create"])
                .status()
                .expect("mungekey")
                .success()
        );
    }
    let ok = Command::new("runuser").args(["-u", "munge", "--", "munged"]).status().expect("munged");
    assert!(ok.success(), "munged did not start");
    let t = Instant::now();
    while !Command::new("munge")
        .arg("-n")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        assert!(t.elapsed() < Duration::from_secs(20), "munged does not answer");
        std::thread::sleep(Duration::from_millis(100));
    }
    fs::read_to_string("/run/munge/munged.pid").ok().and_then(|p| p.trim().parse().ok())
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn ok(o: Output) -> String {
    assert!(o.status.success(), "{}", text(&o));
    text(&o)
}

#[test]
#[cfg_attr(
    not(feature = "slurm"),
    ignore = "needs Slurm and munge and root to start them: `cargo xtask setup --system` installs them (as root)"
)]
fn stages_run_as_slurm_jobs() {
    let cluster = Cluster::start();
    the_tiny_study_gives_the_local_digests(&cluster);
    a_failing_stage_names_its_job_and_log(&cluster);
    a_job_without_the_device_it_was_keyed_for_fails(&cluster);
    two_drivers_on_one_store_compute_each_stage_once(&cluster);
    interrupting_the_driver_cancels_its_jobs(&cluster);
    a_job_over_its_time_limit_is_retried_from_its_checkpoint(&cluster);
    assert_eq!(cluster.queue(), "", "the queue is empty at the end");
}

fn the_tiny_study_gives_the_local_digests(cluster: &Cluster) {
    let t = Instant::now();
    let local = tempfile::tempdir().expect("tmp");
    let slurm = tempfile::tempdir().expect("tmp");
    for d in [&local, &slurm] {
        fs::write(d.path().join("tinystudy.yaml"), msmae_tests::tiny_study()).expect("write");
    }
    ok(cluster.msmae(local.path()).args(["run", "tinystudy.yaml", "--device", "cpu"]).output().expect("run"));
    let log = ok(cluster
        .msmae(slurm.path())
        .args(["run", "tinystudy.yaml", "--device", "cpu", "--executor", "slurm"])
        .output()
        .expect("run"));
    assert!(log.contains("tinystudy: 18 ran, 0 cached, 0 failed"), "{log}");
    assert!(log.contains("Slurm job"), "{log}");
    assert_eq!(
        digests(&slurm.path().join("tinystudy.lock")),
        digests(&local.path().join("tinystudy.lock")),
        "Slurm and local runs differ"
    );
    // The jobs' scripts and logs are kept under the store.
    let runs = fs::read_dir(slurm.path().join(".msmae/slurm")).expect("slurm dir").count();
    assert_eq!(runs, 1);
    // A second driver run: everything cached, no job submitted.
    let again = ok(cluster
        .msmae(slurm.path())
        .args(["run", "tinystudy.yaml", "--device", "cpu", "--executor", "slurm"])
        .output()
        .expect("run"));
    assert!(again.contains("0 ran, 18 cached") && !again.contains("Slurm job"), "{again}");
    // --stage re-executes one stage as a job even though it is cached; same output
    let one = ok(cluster
        .msmae(slurm.path())
        .args(["run", "tinystudy.yaml", "--device", "cpu", "--executor", "slurm", "--stage", "masks"])
        .output()
        .expect("run"));
    assert!(
        one.contains("ran (output unchanged)") && one.contains("1 ran, 3 cached") && one.contains("Slurm job"),
        "{one}"
    );
    // --from re-executes a stage and what its output changes (nothing: early cut-off)
    let from = ok(cluster
        .msmae(slurm.path())
        .args(["run", "tinystudy.yaml", "--device", "cpu", "--executor", "slurm", "--from", "eval-mae"])
        .output()
        .expect("run"));
    assert!(from.contains("ran (output unchanged)"), "{from}");
    assert_eq!(digests(&slurm.path().join("tinystudy.lock")), digests(&local.path().join("tinystudy.lock")));
    let verify = ok(cluster.msmae(slurm.path()).args(["verify", "tinystudy.yaml"]).output().expect("verify"));
    assert!(verify.contains("18"), "{verify}");
    // --until stops where asked; everything up to it is cached
    let until = ok(cluster
        .msmae(slurm.path())
        .args(["run", "tinystudy.yaml", "--device", "cpu", "--executor", "slurm", "--until", "pretrain"])
        .output()
        .expect("run"));
    assert!(until.contains("0 ran, 5 cached"), "{until}");
    // why: the job's environment and the run-only devices beside the key
    let why = ok(cluster
        .msmae(slurm.path())
        .args(["why", "tinystudy.yaml", "pretrain", "--device", "cpu"])
        .output()
        .expect("why"));
    assert!(why.contains("up to date") || why.contains("nothing changed"), "{why}");
    // status and why read the same store and lock file
    let status =
        ok(cluster.msmae(slurm.path()).args(["status", "tinystudy.yaml", "--device", "cpu"]).output().expect("status"));
    assert!(!status.contains("stale") && !status.contains("new"), "{status}");
    eprintln!("tiny study under Slurm and locally: {:.0} s", t.elapsed().as_secs_f64());
}

fn a_failing_stage_names_its_job_and_log(cluster: &Cluster) {
    let d = tempfile::tempdir().expect("tmp");
    fs::create_dir_all(d.path().join("empty")).expect("dir");
    fs::write(
        d.path().join("bad.yaml"),
        "name: bad\nstages:\n  data: { uses: ingest/imagefolder, with: { root: empty } }\n",
    )
    .expect("write");
    let o = cluster
        .msmae(d.path())
        .args(["run", "bad.yaml", "--device", "cpu", "--executor", "slurm"])
        .output()
        .expect("run");
    let said = text(&o);
    assert!(!o.status.success(), "{said}");
    let job = said.split("Slurm job ").nth(1).and_then(|r| r.split_whitespace().next()).unwrap_or_default().to_string();
    assert!(job.chars().all(|c| c.is_ascii_digit()) && !job.is_empty(), "the error names the job: {said}");
    let log =
        said.split("log ").last().and_then(|r| r.split_whitespace().next()).map(PathBuf::from).expect("a log path");
    assert!(log.is_file(), "the log it names exists: {} ({said})", log.display());
    assert!(
        fs::read_to_string(&log).unwrap_or_default().contains("no class folders"),
        "the log holds the stage's error: {}",
        fs::read_to_string(&log).unwrap_or_default()
    );
}

fn two_drivers_on_one_store_compute_each_stage_once(cluster: &Cluster) {
    let d = tempfile::tempdir().expect("tmp");
    let yaml = format!(
        "name: twice\nseed: 2\nstages:\n  data: {{ uses: ingest/synthetic, with: {{ images: 64, size: 32, previews: 1 }} }}\n  ft: {{ uses: finetune/full, needs: [data], with: {{ model: {}, epochs: 2, batch_size: 16, warmup_epochs: 0 }} }}\n",
        msmae_tests::TINY_MODEL
    );
    fs::write(d.path().join("twice.yaml"), yaml).expect("write");
    let spawn = |lock: &str| {
        cluster
            .msmae(d.path())
            .args(["run", "twice.yaml", "--device", "cpu", "--executor", "slurm", "--lock", lock])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("driver")
    };
    let (a, b) = (spawn("a.lock"), spawn("b.lock"));
    let (a, b) = (text(&a.wait_with_output().expect("a")), text(&b.wait_with_output().expect("b")));
    let ran = |s: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix("twice: "))
            .and_then(|l| l.split(" ran").next()?.trim().parse::<usize>().ok())
            .unwrap_or(99)
    };
    assert_eq!(ran(&a) + ran(&b), 2, "each of the 2 stages ran once over both drivers:\n{a}\n{b}");
    assert_eq!(digests(&d.path().join("a.lock")), digests(&d.path().join("b.lock")));
}

fn interrupting_the_driver_cancels_its_jobs(cluster: &Cluster) {
    let d = tempfile::tempdir().expect("tmp");
    let yaml = format!(
        "name: long\nseed: 2\nstages:\n  data: {{ uses: ingest/synthetic, with: {{ images: 256, size: 32, previews: 1 }} }}\n  pre: {{ uses: mae/pretrain, needs: [data], with: {{ model: {}, epochs: 500, batch_size: 16, warmup_epochs: 1, figure_images: 1 }} }}\n",
        msmae_tests::TINY_MODEL
    );
    fs::write(d.path().join("long.yaml"), yaml).expect("write");
    let mut driver = cluster
        .msmae(d.path())
        .args(["run", "long.yaml", "--device", "cpu", "--executor", "slurm"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("driver");
    let t = Instant::now();
    while !cluster.queue().contains("msmae-long-pre RUNNING") {
        assert!(t.elapsed() < Duration::from_secs(120), "the training job never ran: {}", cluster.queue());
        assert!(driver.try_wait().expect("wait").is_none(), "the driver ended early");
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(2));
    assert!(Command::new("kill").args(["-INT", &driver.id().to_string()]).status().expect("kill").success());
    let out = driver.wait_with_output().expect("driver ends");
    let t = Instant::now();
    while !cluster.queue().is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "jobs left in the queue a minute after Ctrl-C: {}",
            cluster.queue()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let said = text(&out);
    assert!(said.contains("cancelled"), "{said}");
    let lock = fs::read_to_string(d.path().join("long.lock")).unwrap_or_default();
    assert!(lock.contains("data") && !lock.contains("name: pre"), "nothing of the cancelled stage is recorded: {lock}");
    let tmp = d.path().join(".msmae/tmp");
    let left: Vec<_> = fs::read_dir(&tmp).map(|r| r.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "the cancelled job removed its staging: {left:?}");
}

/// A training job ended by its time limit (Slurm's minimum, a minute) is resubmitted and
/// resumes from its checkpoint; when the retries run out, the run fails naming the time
/// limit and the log. (A million epochs: never finished within the two jobs of a minute.)
fn a_job_over_its_time_limit_is_retried_from_its_checkpoint(cluster: &Cluster) {
    let t = Instant::now();
    let d = tempfile::tempdir().expect("tmp");
    let yaml = format!(
        "name: slow\nseed: 2\nstages:\n  data: {{ uses: ingest/synthetic, with: {{ images: 256, size: 32, previews: 1 }} }}\n  pre:\n    uses: mae/pretrain\n    needs: [data]\n    with: {{ model: {}, epochs: 1000000, batch_size: 16, warmup_epochs: 1, figure_images: 1, checkpoint_every: 1 }}\n    resources: {{ time: \"00:01:00\" }}\n",
        msmae_tests::TINY_MODEL
    );
    fs::write(d.path().join("slow.yaml"), yaml).expect("write");
    let o = cluster
        .msmae(d.path())
        .args(["run", "slow.yaml", "--device", "cpu", "--executor", "slurm", "--retries", "1"])
        .output()
        .expect("run");
    let said = text(&o);
    assert!(!o.status.success(), "{said}");
    assert!(said.contains("ended by time limit; resubmitting from its checkpoint (1 of 1 retries)"), "{said}");
    assert!(said.contains("ended by time limit (a timeout: raise `resources: time`), after 1 retries; log "), "{said}");
    // The second job continued from the first one's checkpoint.
    let logs: Vec<String> = fs::read_dir(d.path().join(".msmae/slurm"))
        .expect("slurm dir")
        .flatten()
        .flat_map(|run| fs::read_dir(run.path()).into_iter().flatten().flatten())
        .filter(|e| {
            e.file_name().to_string_lossy().starts_with("pre-") && e.file_name().to_string_lossy().ends_with(".log")
        })
        .map(|e| fs::read_to_string(e.path()).unwrap_or_default())
        .collect();
    assert_eq!(logs.len(), 2, "two attempts, two logs");
    assert!(logs.iter().any(|l| l.contains("resuming after epoch")), "the resubmitted job resumed: {logs:?}");
    assert!(logs.iter().all(|l| l.contains("DUE TO TIME LIMIT")), "{logs:?}");
    eprintln!("time-limit scenario: {:.0} s", t.elapsed().as_secs_f64());
}

/// `--device cuda` keys the training stage for CUDA (the GPU nodes'), wherever the driver
/// runs; on this GPU-less node the job fails rather than train on the CPU under a CUDA key.
/// The ingestion job, whose key has no device, runs.
fn a_job_without_the_device_it_was_keyed_for_fails(cluster: &Cluster) {
    let d = tempfile::tempdir().expect("tmp");
    let yaml = format!(
        "name: gpu\nseed: 2\nstages:\n  data: {{ uses: ingest/synthetic, with: {{ images: 64, size: 32, previews: 1 }} }}\n  ft: {{ uses: finetune/full, needs: [data], with: {{ model: {}, epochs: 1, batch_size: 16, warmup_epochs: 0 }} }}\n",
        msmae_tests::TINY_MODEL
    );
    fs::write(d.path().join("gpu.yaml"), yaml).expect("write");
    let o = cluster
        .msmae(d.path())
        .args(["run", "gpu.yaml", "--device", "cuda", "--executor", "slurm"])
        .output()
        .expect("run");
    let said = text(&o);
    assert!(!o.status.success(), "{said}");
    assert!(said.contains("gpu: 1 ran, 0 cached, 1 failed"), "the ingestion job ran, the training job failed: {said}");
    assert!(said.contains("cannot compute on the device it was keyed for") && said.contains("CUDA"), "{said}");
    let lock = fs::read_to_string(d.path().join("gpu.lock")).unwrap_or_default();
    assert!(lock.contains("name: data") && !lock.contains("name: ft"), "{lock}");
}
