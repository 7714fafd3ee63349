//! Data-parallel training through the real binary. `--device cpu,cpu` replicates the model
//! on two devices (two CPU replicas: the code path of `cuda:0,cuda:1`), each taking half of
//! every global batch; the result must be what one device computes on the same global batch.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const MODEL: &str =
    "{ patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2, decoder_dim: 16, decoder_depth: 1, decoder_heads: 2 }";

/// A classifier (the supervised attention model, with stochastic depth) and an MAE (with the
/// MSMAE CLS term), one epoch each at global batch `params.bs`.
fn pipeline() -> String {
    format!(
        r#"name: dp
seed: 5
params: {{ bs: 8 }}
stages:
  data: {{ uses: ingest/synthetic, with: {{ images: 96, size: 32, previews: 1 }} }}
  supervised: {{ uses: attention/train-supervised, needs: [data], with: {{ model: {MODEL}, epochs: 1, batch_size: "${{params.bs}}", warmup_epochs: 0, drop_path: 0.2 }} }}
  mae: {{ uses: mae/pretrain, needs: [data], with: {{ model: {MODEL}, epochs: 1, batch_size: "${{params.bs}}", warmup_epochs: 0, cls_weight: 0.1, figure_images: 1 }} }}
"#
    )
}

fn msmae(dir: &Path, args: &[&str]) -> Output {
    Command::new(msmae_tests::msmae_bin())
        .current_dir(dir)
        .args(args)
        .env_remove("MSMAE_STORE")
        .env_remove("MSMAE_DEVICE")
        .output()
        .expect("run msmae")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn ok(o: Output) -> String {
    assert!(o.status.success(), "{}", text(&o));
    text(&o)
}

/// The committed directory of `stage`'s artifact (from the lock file `dp.lock`).
fn artifact(dir: &Path, stage: &str) -> PathBuf {
    msmae_tests::artifact_dir(&dir.join(".msmae"), &dir.join("dp.lock"), stage)
}

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).expect("json")
}

/// Every float32 tensor of a safetensors file.
fn weights(p: &Path) -> BTreeMap<String, Vec<f32>> {
    let bytes = fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    st.tensors()
        .into_iter()
        .filter(|(_, t)| t.dtype() == safetensors::Dtype::F32)
        .map(|(name, t)| {
            (name, t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
        })
        .collect()
}

/// The largest absolute difference between two models' parameters (same names, shapes).
fn max_diff(a: &BTreeMap<String, Vec<f32>>, b: &BTreeMap<String, Vec<f32>>) -> f32 {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "the same tensors");
    a.iter().map(|(k, x)| x.iter().zip(&b[k]).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max)).fold(0f32, f32::max)
}

/// An even global batch that gives exactly three optimiser steps in one epoch of `train`
/// images (full batches only).
fn three_step_batch(train: usize) -> usize {
    (2..)
        .step_by(2)
        .find(|b| train / b == 3)
        .unwrap_or_else(|| panic!("no even batch gives 3 steps over {train} images"))
}

#[test]
fn two_replicas_give_the_one_device_parameters_after_three_adamw_steps() {
    let one = tempfile::tempdir().expect("tmp");
    let two = tempfile::tempdir().expect("tmp");
    for d in [&one, &two] {
        fs::write(d.path().join("dp.yaml"), pipeline()).expect("write");
    }
    ok(msmae(one.path(), &["run", "dp.yaml", "--until", "data"]));
    let train = json(&artifact(one.path(), "data").join("split_report.json"))["splits"]["train"]["images"]
        .as_u64()
        .expect("train images") as usize;
    let bs = three_step_batch(train);
    let set = format!("params.bs={bs}");
    ok(msmae(one.path(), &["run", "dp.yaml", "--device", "cpu", "--set", &set]));
    let log = ok(msmae(two.path(), &["run", "dp.yaml", "--device", "cpu,cpu", "--set", &set]));
    assert!(log.contains("cpu,cpu"), "the run names its replicas: {log}");
    for stage in ["supervised", "mae"] {
        let (a, b) = (artifact(one.path(), stage), artifact(two.path(), stage));
        let init_moved = weights(&a.join("model.safetensors"));
        let d = max_diff(&init_moved, &weights(&b.join("model.safetensors")));
        eprintln!("{stage}: 1 vs 2 replicas, largest parameter difference {d:e}");
        assert!(d < 1e-5, "{stage}: parameters differ by {d} between 1 and 2 replicas (global batch {bs})");
        let (ha, hb) = (json(&a.join("history.json")), json(&b.join("history.json")));
        let loss = |h: &serde_json::Value| h["epochs"][0]["train_loss"].as_f64().expect("train_loss");
        assert!((loss(&ha) - loss(&hb)).abs() < 1e-5, "{stage}: training loss {} vs {}", loss(&ha), loss(&hb));
    }
}

#[test]
fn the_replica_count_is_run_only_and_a_batch_that_does_not_split_is_refused() {
    let d = tempfile::tempdir().expect("tmp");
    fs::write(d.path().join("dp.yaml"), pipeline()).expect("write");
    let first = ok(msmae(d.path(), &["run", "dp.yaml", "--device", "cpu"]));
    assert!(first.contains("dp: 3 ran, 0 cached"), "{first}");
    // Results agree up to float reduction order (the test above), so the replica count is
    // not part of the key: the same artifacts serve a run on two devices.
    let again = ok(msmae(d.path(), &["run", "dp.yaml", "--device", "cpu,cpu"]));
    assert!(again.contains("dp: 0 ran, 3 cached"), "{again}");
    let why = ok(msmae(d.path(), &["why", "dp.yaml", "supervised", "--device", "cpu,cpu"]));
    assert!(why.contains("devices cpu,cpu") && why.contains("not in the key"), "{why}");
    // a global batch of 9 over 2 devices: refused, naming the field, before any training
    let odd =
        msmae(d.path(), &["run", "dp.yaml", "--device", "cpu,cpu", "--set", "params.bs=9", "--stage", "supervised"]);
    assert!(!odd.status.success(), "{}", text(&odd));
    assert!(
        text(&odd).contains("stages.supervised.with.batch_size")
            && text(&odd).contains("does not split evenly over 2 devices"),
        "{}",
        text(&odd)
    );
    assert_eq!(odd.status.code(), Some(2), "refused like an invalid pipeline file");
    assert!(!text(&odd).contains("running `supervised`"), "refused before anything ran: {}", text(&odd));
    let mixed = msmae(d.path(), &["run", "dp.yaml", "--device", "auto,cpu"]);
    assert!(!mixed.status.success() && text(&mixed).contains("`auto` stands alone"), "{}", text(&mixed));
}

/// The gradient transport (`MSMAE_COLLECTIVE`): a value that is not one is refused before
/// anything runs; `nccl` where there is no CUDA memory to sum in fails the training stage
/// with what to do, and leaves nothing committed; `mpi` on one process trains as usual.
#[test]
fn the_gradient_transport_is_checked_and_nccl_needs_cuda_memory() {
    let dir = tempfile::tempdir().expect("tmp");
    fs::write(dir.path().join("dp.yaml"), pipeline()).expect("write");
    let with = |value: &str, args: &[&str]| {
        let mut c = Command::new(msmae_tests::msmae_bin());
        c.current_dir(dir.path())
            .args(args)
            .env_remove("MSMAE_STORE")
            .env_remove("MSMAE_DEVICE")
            .env("MSMAE_COLLECTIVE", value);
        c.output().expect("run msmae")
    };
    let timeout = Command::new(msmae_tests::msmae_bin())
        .current_dir(dir.path())
        .args(["run", "dp.yaml"])
        .env("MSMAE_NCCL_TIMEOUT", "soon")
        .output()
        .expect("msmae");
    assert_eq!(timeout.status.code(), Some(2), "{}", text(&timeout));
    assert!(
        text(&timeout).contains("MSMAE_NCCL_TIMEOUT=`soon` is not a positive number of seconds"),
        "{}",
        text(&timeout)
    );
    let bad = with("gloo", &["run", "dp.yaml"]);
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad));
    assert!(text(&bad).contains("MSMAE_COLLECTIVE=`gloo` is not one of auto, mpi, nccl"), "{}", text(&bad));
    assert!(!dir.path().join(".msmae").exists(), "nothing ran");

    let nccl = with("nccl", &["run", "dp.yaml", "--device", "cpu", "--until", "supervised"]);
    let said = text(&nccl);
    assert!(!nccl.status.success(), "{said}");
    assert!(
        said.contains("MSMAE_COLLECTIVE=nccl sums gradients in CUDA memory, but this stage trains on the CPU"),
        "{said}"
    );
    assert!(said.contains("--device cuda"), "says what to do: {said}");
    let lock = dir.path().join("dp.lock");
    let locked: Vec<String> = if lock.is_file() {
        msmae_tests::lock_digests(&lock).into_iter().map(|(s, _)| s).collect()
    } else {
        Vec::new()
    };
    assert!(!locked.iter().any(|s| s == "supervised"), "the failed stage is not in the lock file: {locked:?}");

    ok(with("mpi", &["run", "dp.yaml", "--device", "cpu", "--until", "supervised"]));
    assert!(artifact(dir.path(), "supervised").join("model.safetensors").is_file());
    // run-only: the transport is shown beside the key, and another one serves the cache
    let why = ok(with("nccl", &["why", "dp.yaml", "supervised", "--device", "cpu"]));
    assert!(
        why.contains("up to date")
            && why.contains("gradients across processes: MSMAE_COLLECTIVE=nccl (run-only, likewise)"),
        "{why}"
    );
}

/// `msmae env` says what a node offers: no NCCL and no driver here, PyTorch's NCCL when
/// `MSMAE_NCCL_LIBRARY` points at it (the version torch reports), what `MSMAE_COLLECTIVE`
/// would do, and each rank of a launch.
#[test]
fn msmae_env_reports_nccl_the_driver_and_the_gradient_transport() {
    let dir = tempfile::tempdir().expect("tmp");
    let env = |vars: &[(&str, &str)]| {
        let mut c = Command::new(msmae_tests::msmae_bin());
        c.current_dir(dir.path()).arg("env").env_remove("MSMAE_NCCL_LIBRARY").env_remove("MSMAE_COLLECTIVE");
        for (k, v) in vars {
            c.env(k, v);
        }
        ok(c.output().expect("msmae env"))
    };
    let plain = env(&[]);
    for want in [
        "process       rank 0 of 1 (solo), local rank 0",
        "NCCL          not available: NCCL could not be loaded (tried libnccl.so.2, libnccl.so)",
        "CUDA driver   not available",
        "NCCL timeout  1800 s per call (MSMAE_NCCL_TIMEOUT)",
        "CUDA devices  none",
        "gradients     MSMAE_COLLECTIVE=auto: MPI on host memory (NCCL needs a GPU, its driver and libnccl)",
    ] {
        assert!(plain.contains(want), "`{want}` in:\n{plain}");
    }
    let py = std::env::var_os("MSMAE_PYTHON")
        .unwrap_or_else(|| panic!("MSMAE_PYTHON is not set: run the suite with `cargo xtask test`"));
    let script = "import os, torch, nvidia.nccl as n\nprint(os.path.join(list(n.__path__)[0], 'lib', 'libnccl.so.2'))\nprint('.'.join(map(str, torch.cuda.nccl.version())))";
    let out = Command::new(py).args(["-c", script]).output().expect("python");
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = said.lines();
    let (lib, version) = (lines.next().unwrap_or_default(), lines.next().unwrap_or_default());
    let found = env(&[("MSMAE_NCCL_LIBRARY", lib), ("MSMAE_COLLECTIVE", "nccl")]);
    assert!(found.contains(&format!("NCCL          {version} ({lib})")), "{found}");
    assert!(found.contains("MSMAE_COLLECTIVE=nccl: NCCL required but not usable here"), "no driver, no GPU: {found}");
    if cfg!(feature = "mpi") {
        let both = ok(mpirun(dir.path(), 2, &["env"]).output().expect("mpirun"));
        for rank in ["rank 0 of 2 (mpi)", "rank 1 of 2 (mpi)"] {
            assert!(both.contains(rank), "{rank}: {both}");
        }
    }
}

/// `mpirun -np N msmae ARGS` in `dir`, as CI runs it: as root (the two variables Open MPI
/// asks for), more processes than cores allowed, no process binding (libtorch threads), and
/// no single-copy shared memory (containers forbid the cross-process reads it uses).
fn mpirun(dir: &Path, n: usize, args: &[&str]) -> Command {
    let mut c = Command::new("mpirun");
    c.current_dir(dir)
        .args(["-np", &n.to_string(), "--oversubscribe", "--bind-to", "none"])
        .arg(msmae_tests::msmae_bin())
        .args(args)
        .env_remove("MSMAE_STORE")
        .env_remove("MSMAE_DEVICE")
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none");
    c
}

#[test]
#[cfg_attr(
    not(feature = "mpi"),
    ignore = "this build has no MPI: `cargo xtask setup --system` installs Open MPI and libclang (as root), then `cargo xtask test`"
)]
fn two_mpi_processes_give_the_one_process_parameters() {
    let one = tempfile::tempdir().expect("tmp");
    let two = tempfile::tempdir().expect("tmp");
    for d in [&one, &two] {
        fs::write(d.path().join("dp.yaml"), pipeline()).expect("write");
    }
    ok(msmae(one.path(), &["run", "dp.yaml", "--until", "data"]));
    let train = json(&artifact(one.path(), "data").join("split_report.json"))["splits"]["train"]["images"]
        .as_u64()
        .expect("train images") as usize;
    let set = format!("params.bs={}", three_step_batch(train));
    ok(msmae(one.path(), &["run", "dp.yaml", "--device", "cpu", "--set", &set]));
    let log =
        ok(mpirun(two.path(), 2, &["run", "dp.yaml", "--device", "cpu", "--set", &set]).output().expect("mpirun"));
    assert!(log.contains("× 2 processes (mpi)"), "the run says it is one of two processes: {log}");
    assert_eq!(log.matches("dp: 3 ran, 0 cached, 0 failed").count(), 1, "rank 0 alone reports: {log}");
    for stage in ["supervised", "mae"] {
        let (a, b) = (artifact(one.path(), stage), artifact(two.path(), stage));
        let d = max_diff(&weights(&a.join("model.safetensors")), &weights(&b.join("model.safetensors")));
        eprintln!("{stage}: 1 vs 2 processes, largest parameter difference {d:e}");
        assert!(d < 1e-5, "{stage}: parameters differ by {d} between 1 and 2 processes");
        let loss = |p: &Path| json(&p.join("history.json"))["epochs"][0]["train_loss"].as_f64().expect("train_loss");
        assert!((loss(&a) - loss(&b)).abs() < 1e-5, "{stage}: training loss {} vs {}", loss(&a), loss(&b));
    }
    // Two ranks × two replicas each: four shares of every global batch.
    let four = tempfile::tempdir().expect("tmp");
    fs::write(four.path().join("dp.yaml"), pipeline()).expect("write");
    let set4 =
        format!("params.bs={}", (4..).step_by(4).find(|b| train / b == 3).expect("a batch of 4k with three steps"));
    ok(msmae(four.path(), &["run", "dp.yaml", "--device", "cpu", "--set", &set4, "--until", "supervised"]));
    let single = weights(&artifact(four.path(), "supervised").join("model.safetensors"));
    fs::remove_dir_all(four.path().join(".msmae")).expect("fresh store");
    ok(mpirun(four.path(), 2, &["run", "dp.yaml", "--device", "cpu,cpu", "--set", &set4, "--until", "supervised"])
        .output()
        .expect("mpirun"));
    let d = max_diff(&single, &weights(&artifact(four.path(), "supervised").join("model.safetensors")));
    eprintln!("supervised: 1 device vs 2 processes × 2 replicas, largest parameter difference {d:e}");
    assert!(d < 1e-5, "2 processes × 2 replicas differ from one device by {d}");
}

/// Ranks whose gradients lie in different kinds of memory (here one on libtorch, one on
/// burn-flex; on a cluster, one rank that found no GPU) would make different collective
/// calls and hang: they agree before the first sum and fail together, saying why.
#[test]
#[cfg_attr(
    not(feature = "mpi"),
    ignore = "this build has no MPI: `cargo xtask setup --system` installs Open MPI and libclang (as root), then `cargo xtask test`"
)]
fn ranks_on_different_kinds_of_device_fail_together_by_name() {
    let dir = tempfile::tempdir().expect("tmp");
    fs::write(dir.path().join("dp.yaml"), pipeline()).expect("write");
    let bin = msmae_tests::msmae_bin();
    let mut c = mpirun(dir.path(), 1, &["run", "dp.yaml", "--backend", "tch", "--until", "supervised"]);
    // Open MPI's MPMD form: `-np 1 A : -np 1 B`
    c.args([":", "-np", "1"]).arg(&bin).args(["run", "dp.yaml", "--backend", "flex", "--until", "supervised"]);
    let out = c.output().expect("mpirun");
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    let why = "the ranks train on different kinds of device (gradients in host memory on 1, CUDA memory on 0, backend memory on 1 of 2 ranks)";
    for rank in ["rank 0 of 2", "rank 1 of 2"] {
        assert!(
            said.contains(&format!("{rank}: stage `supervised` failed: summing gradients over the ranks: {why}")),
            "{rank}: {said}"
        );
    }
}

/// A rank killed in the middle of data-parallel training ends the job with a message naming
/// it; the re-run resumes from rank 0's last checkpoint and commits what an uninterrupted
/// run commits.
#[test]
#[cfg_attr(
    not(feature = "mpi"),
    ignore = "this build has no MPI: `cargo xtask setup --system` installs Open MPI and libclang (as root), then `cargo xtask test`"
)]
fn a_killed_rank_ends_the_job_by_name_and_the_rerun_resumes() {
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    let yaml = format!(
        "name: dp\nseed: 6\nstages:\n  data: {{ uses: ingest/synthetic, with: {{ images: 128, size: 32, previews: 1 }} }}\n  mae: {{ uses: mae/pretrain, needs: [data], with: {{ model: {MODEL}, epochs: 30, batch_size: 16, warmup_epochs: 1, figure_images: 1, checkpoint_every: 1 }} }}\n"
    );
    let whole = tempfile::tempdir().expect("tmp");
    let cut = tempfile::tempdir().expect("tmp");
    for d in [&whole, &cut] {
        fs::write(d.path().join("dp.yaml"), &yaml).expect("write");
    }
    ok(mpirun(whole.path(), 2, &["run", "dp.yaml", "--device", "cpu"]).output().expect("mpirun"));
    let want = weights(&artifact(whole.path(), "mae").join("model.safetensors"));

    ok(msmae(cut.path(), &["run", "dp.yaml", "--until", "data"]));
    let mut job = mpirun(cut.path(), 2, &["run", "dp.yaml", "--device", "cpu"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mpirun");
    let resume = cut.path().join(".msmae/resume");
    let t = Instant::now();
    loop {
        let state = fs::read_dir(&resume)
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| e.ok())
            .map(|e| e.path().join("state.json"));
        let done = state
            .and_then(|p| fs::read(p).ok())
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["epochs_done"].as_u64());
        if done.is_some_and(|n| n >= 2) {
            break;
        }
        assert!(
            job.try_wait().expect("wait").is_none(),
            "training finished before a rank could be killed; make it longer"
        );
        assert!(t.elapsed() < Duration::from_secs(300), "no checkpoint appeared");
        std::thread::sleep(Duration::from_millis(10));
    }
    let rank1 = rank_pid(1).expect("the process of rank 1");
    assert!(Command::new("kill").args(["-KILL", &rank1.to_string()]).status().expect("kill").success());
    let out = job.wait_with_output().expect("mpirun ends");
    let said = text(&out);
    assert!(!out.status.success(), "the job must fail when a rank dies: {said}");
    eprintln!("the job said: {}", said.lines().filter(|l| l.contains("rank")).collect::<Vec<_>>().join(" / "));
    assert!(said.contains("rank 1"), "the message names the rank that died: {said}");
    let again = ok(mpirun(cut.path(), 2, &["run", "dp.yaml", "--device", "cpu"]).output().expect("mpirun"));
    assert!(again.contains("resuming after epoch"), "{again}");
    let d = max_diff(&want, &weights(&artifact(cut.path(), "mae").join("model.safetensors")));
    eprintln!("mae: resumed after a killed rank vs uninterrupted, largest parameter difference {d:e}");
    assert!(d < 1e-5, "the resumed run differs from the uninterrupted one by {d}");
}

/// The PID of the `msmae` process that Open MPI started as rank `rank` (from /proc).
fn rank_pid(rank: usize) -> Option<u32> {
    let want = format!("OMPI_COMM_WORLD_RANK={rank}");
    fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let exe = fs::read_link(e.path().join("exe")).ok()?;
        let env = fs::read(e.path().join("environ")).ok()?;
        let ours = exe.file_name()? == "msmae" && env.split(|b| *b == 0).any(|v| v == want.as_bytes());
        ours.then_some(pid)
    })
}

/// The whole tiny study (every stage kind, a `repeat:` group) as two MPI processes against
/// one process: the runner's protocol carries every stage (rank 0 alone for ingestion,
/// maps, masks, evaluation; both ranks for the five training stages), and the results agree
/// within what float reduction order can move after a few epochs of training.
#[test]
#[cfg_attr(
    not(feature = "mpi"),
    ignore = "this build has no MPI: `cargo xtask setup --system` installs Open MPI and libclang (as root), then `cargo xtask test`"
)]
fn the_tiny_study_on_two_processes_matches_one_process() {
    let one = tempfile::tempdir().expect("tmp");
    let two = tempfile::tempdir().expect("tmp");
    for d in [&one, &two] {
        fs::write(d.path().join("tinystudy.yaml"), msmae_tests::tiny_study()).expect("write");
    }
    let a = ok(msmae(one.path(), &["run", "tinystudy.yaml", "--device", "cpu"]));
    let b = ok(mpirun(two.path(), 2, &["run", "tinystudy.yaml", "--device", "cpu"]).output().expect("mpirun"));
    for log in [&a, &b] {
        assert!(log.contains("tinystudy: 18 ran, 0 cached, 0 failed"), "{log}");
    }
    let lock = |d: &Path| -> BTreeMap<String, String> {
        msmae_tests::lock_digests(&d.join("tinystudy.lock")).into_iter().collect()
    };
    let (la, lb) = (lock(one.path()), lock(two.path()));
    assert_eq!(la["data"], lb["data"], "ingestion is the same bytes on any process count");
    let metrics = |d: &Path, l: &BTreeMap<String, String>, stage: &str| {
        json(&d.join(".msmae/objects").join(&l[stage][..2]).join(&l[stage]).join("data/metrics.json"))
    };
    // Tolerance: a classifier's test accuracy may move by a few of its 24+ test images when
    // reduction order flips near-tied predictions or mask choices over several epochs.
    for stage in ["eval-msmae", "eval-mae"] {
        let (x, y) = (
            metrics(one.path(), &la, stage)["accuracy"].as_f64().expect("accuracy"),
            metrics(two.path(), &lb, stage)["accuracy"].as_f64().expect("accuracy"),
        );
        eprintln!("{stage}: test accuracy {x:.4} on 1 process, {y:.4} on 2");
        assert!((x - y).abs() <= 0.1, "{stage}: accuracy {x} on 1 process vs {y} on 2");
    }
    let (x, y) = (
        metrics(one.path(), &la, "seg")["dice"].as_f64().expect("dice"),
        metrics(two.path(), &lb, "seg")["dice"].as_f64().expect("dice"),
    );
    eprintln!("seg: test Dice {x:.4} on 1 process, {y:.4} on 2");
    assert!((x - y).abs() <= 0.05, "seg: Dice {x} on 1 process vs {y} on 2");
}

/// Gradient accumulation (`accum_steps`): each device computes its share of the global batch
/// in micro-batches and sums their gradients before the optimiser step. After three AdamW
/// steps at global batch 32, the parameters equal those without accumulation (up to float
/// rounding), on one device and on two, and the setting is not part of the cache key.
#[test]
fn accumulated_micro_batches_give_the_one_batch_parameters_after_three_adamw_steps() {
    let pipeline = |accum: usize| {
        format!(
            r#"name: dp
seed: 5
stages:
  data: {{ uses: ingest/synthetic, with: {{ images: 150, size: 32, previews: 1 }} }}
  supervised: {{ uses: attention/train-supervised, needs: [data], with: {{ model: {MODEL}, epochs: 1, batch_size: 32, warmup_epochs: 0, drop_path: 0.2, accum_steps: {accum} }} }}
  mae: {{ uses: mae/pretrain, needs: [data], with: {{ model: {MODEL}, epochs: 1, batch_size: 32, warmup_epochs: 0, cls_weight: 0.1, figure_images: 1, accum_steps: {accum} }} }}
"#
        )
    };
    let runs: Vec<(usize, &str, tempfile::TempDir)> = [(1, "cpu"), (4, "cpu"), (4, "cpu,cpu")]
        .into_iter()
        .map(|(a, dev)| (a, dev, tempfile::tempdir().expect("tmp")))
        .collect();
    for (accum, device, d) in &runs {
        fs::write(d.path().join("dp.yaml"), pipeline(*accum)).expect("write");
        ok(msmae(d.path(), &["run", "dp.yaml", "--device", device]));
    }
    let train = json(&artifact(runs[0].2.path(), "data").join("split_report.json"))["splits"]["train"]["images"]
        .as_u64()
        .expect("train images") as usize;
    assert_eq!(train / 32, 3, "{train} training images: three full batches of 32");
    for stage in ["supervised", "mae"] {
        let base = weights(&artifact(runs[0].2.path(), stage).join("model.safetensors"));
        for (accum, device, d) in &runs[1..] {
            let diff = max_diff(&base, &weights(&artifact(d.path(), stage).join("model.safetensors")));
            eprintln!("{stage}: accumulation {accum} on {device} vs none, largest parameter difference {diff:e}");
            assert!(diff <= 1e-5, "{stage}: accum_steps {accum} on {device} differs by {diff}");
        }
    }
    // Run-only: the one-step artifacts serve a run that asks for accumulation.
    fs::write(runs[0].2.path().join("dp.yaml"), pipeline(4)).expect("write");
    let again = ok(msmae(runs[0].2.path(), &["run", "dp.yaml"]));
    assert!(again.contains("dp: 0 ran, 3 cached"), "{again}");
    // A batch that does not split into the micro-batches is refused, naming the field.
    fs::write(runs[0].2.path().join("dp.yaml"), pipeline(5)).expect("write");
    let bad = msmae(runs[0].2.path(), &["run", "dp.yaml"]);
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad));
    assert!(text(&bad).contains("accum_steps") && text(&bad).contains("does not split into 5"), "{}", text(&bad));
}
