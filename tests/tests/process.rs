//! Runners as separate processes: a SIGKILL in the middle of a stage, and two runners on
//! one store at once. The test binary re-executes itself as the child (filtered to the
//! same test, with `MSMAE_TEST_CHILD` naming the fixture directory).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use msmae_tests::fixture::*;

const CHILD: &str = "MSMAE_TEST_CHILD";

/// In a child: run the fixture's pipeline, print the outcomes, and exit.
fn child_main() -> bool {
    let Some(dir) = std::env::var_os(CHILD) else { return false };
    let f = Fixture::at(Path::new(&dir));
    let sets: Vec<String> = std::env::var("MSMAE_TEST_SET")
        .map(|s| s.split(',').filter(|x| !x.is_empty()).map(str::to_string).collect())
        .unwrap_or_default();
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let r = f.run_with(&sets, msmae_pipeline::RunOptions::default());
    println!("\nOUTCOMES {}", outcomes(&r).iter().map(|(n, o)| format!("{n}={o}")).collect::<Vec<_>>().join(","));
    std::process::exit(if r.ok() { 0 } else { 1 });
}

fn spawn(test: &str, dir: &Path, sets: &str) -> Child {
    Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(CHILD, dir)
        .env("MSMAE_TEST_SET", sets)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn child runner")
}

fn wait_for(p: &Path, what: &str) {
    let t0 = Instant::now();
    while !p.exists() {
        assert!(t0.elapsed() < Duration::from_secs(60), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn child_outcomes(c: Child) -> (bool, String) {
    let out = c.wait_with_output().expect("child output");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text.lines().find(|l| l.starts_with("OUTCOMES ")).map(str::to_string).unwrap_or_default();
    assert!(
        !line.is_empty(),
        "child printed no outcome ({:?}); stdout: {text} stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), line)
}

fn pipeline(f: &Fixture) -> String {
    let m = f.marker();
    let (s, r) = (f.path("started"), f.path("release"));
    format!(
        "params: {{ v: one }}\nstages:\n  a: {{ uses: test/source, with: {{ value: a, marker: {m} }} }}\n  slow: {{ uses: test/slow, needs: [a], with: {{ value: '${{params.v}}', started: {s}, release: {r}, marker: {m} }} }}\n  c: {{ uses: test/concat, needs: [slow], with: {{ marker: {m} }} }}\n  d: {{ uses: test/source, with: {{ value: d, marker: {m} }} }}\n",
        s = s.display(),
        r = r.display()
    )
}

fn snapshot_objects(f: &Fixture) -> Vec<(PathBuf, Vec<u8>)> {
    let root = f.path(".msmae/objects");
    let mut out: Vec<(PathBuf, Vec<u8>)> = msmae_pipeline::hashing::list_files(&root)
        .expect("list")
        .into_iter()
        .map(|(_, p)| {
            let b = fs::read(&p).expect("read");
            (p, b)
        })
        .collect();
    out.sort();
    out
}

#[test]
fn sigkill_mid_stage_keeps_previous_results_and_resumes_only_what_is_missing() {
    if child_main() {
        return;
    }
    let f = Fixture::new("");
    f.write(&pipeline(&f));
    fs::write(f.path("release"), "").expect("release");
    assert!(f.run().ok());
    let lock_before = f.lock_text();
    let objects_before = snapshot_objects(&f);
    fs::remove_file(f.path("release")).expect("rm");
    fs::remove_file(f.path("started")).expect("rm");
    f.clear_marks();

    // v=two re-runs `slow`; kill the runner while it is inside the stage.
    let mut child =
        spawn("sigkill_mid_stage_keeps_previous_results_and_resumes_only_what_is_missing", &f.path(""), "params.v=two");
    wait_for(&f.path("started"), "the child to enter the slow stage");
    child.kill().expect("SIGKILL");
    let status = child.wait().expect("wait");
    assert!(!status.success());

    assert_eq!(f.lock_text(), lock_before, "the lock file is untouched");
    assert_eq!(snapshot_objects(&f), objects_before, "committed artifacts are untouched");
    let store = f.store();
    let lock = msmae_pipeline::LockFile::read(&f.path("p.lock"), "p").expect("lock parses");
    let (checked, bad) = msmae_pipeline::inspect::verify(&store, &lock).expect("verify");
    assert_eq!((checked, bad.len()), (4, 0), "{bad:?}");
    let leftovers: Vec<_> = fs::read_dir(store.root().join("tmp")).expect("tmp").collect();
    assert_eq!(leftovers.len(), 1, "the killed stage's staging dir is left behind");
    assert_eq!(f.marks(), ["slow"]);

    // The next run redoes only what is missing, and cleans the leftover.
    fs::write(f.path("release"), "").expect("release");
    let r = f.run_with(&["params.v=two"], msmae_pipeline::RunOptions::default());
    assert_eq!(outcomes(&r).iter().map(|x| x.1).collect::<Vec<_>>(), ["cached", "ran", "ran", "cached"]);
    assert!(fs::read_dir(store.root().join("tmp")).expect("tmp").next().is_none());
    let d = r.stage("slow").expect("slow").artifact.clone().expect("digest");
    assert_eq!(fs::read_to_string(store.object_dir(&d).join("out.txt")).expect("out"), "complete two");
}

#[test]
fn two_runners_on_one_store_compute_each_stage_once() {
    if child_main() {
        return;
    }
    let f = Fixture::new("");
    f.write(&pipeline(&f));
    let name = "two_runners_on_one_store_compute_each_stage_once";
    let first = spawn(name, &f.path(""), "");
    wait_for(&f.path("started"), "the first runner to enter the slow stage");
    let second = spawn(name, &f.path(""), "");
    // The second runner must block on the lock the first one holds for `slow`: Linux lists
    // a blocked flock waiter in /proc/locks as `N: -> FLOCK ADVISORY WRITE <pid> ...`.
    let pid = second.id().to_string();
    let t0 = Instant::now();
    loop {
        let locks = fs::read_to_string("/proc/locks").unwrap_or_default();
        if locks.lines().any(|l| l.contains("->") && l.split_whitespace().nth(5) == Some(pid.as_str())) {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "the second runner never waited on the lock:\n{locks}");
        std::thread::sleep(Duration::from_millis(10));
    }
    fs::write(f.path("release"), "").expect("release");
    let (ok1, o1) = child_outcomes(first);
    let (ok2, o2) = child_outcomes(second);
    assert!(ok1 && ok2, "{o1} / {o2}");
    let mut marks = f.marks();
    marks.sort();
    assert_eq!(marks, ["a", "c", "d", "slow"], "each stage executed exactly once across both runners");
    assert!(o1.contains("slow=ran") && o2.contains("slow=cached"), "{o1} / {o2}");
    let store = f.store();
    let lock = msmae_pipeline::LockFile::read(&f.path("p.lock"), "p").expect("lock parses");
    assert_eq!(lock.stages.len(), 4);
    let (_, bad) = msmae_pipeline::inspect::verify(&store, &lock).expect("verify");
    assert!(bad.is_empty(), "{bad:?}");
}

/// gc and a running pipeline exclude each other: gc with `no_wait` refuses while a run holds
/// the store, gc that waits starts after it, and nothing the run made is deleted.
#[test]
fn gc_waits_for_a_running_pipeline_and_removes_nothing_it_made() {
    if child_main() {
        return;
    }
    let f = Fixture::new("");
    f.write(&pipeline(&f));
    fs::write(f.path("release"), "").expect("release");
    assert!(f.run().ok());
    fs::remove_file(f.path("release")).expect("rm");
    fs::remove_file(f.path("started")).expect("rm");
    let name = "gc_waits_for_a_running_pipeline_and_removes_nothing_it_made";
    let child = spawn(name, &f.path(""), "params.v=two");
    wait_for(&f.path("started"), "the runner to enter the slow stage");
    let store = f.store();
    let lock = f.path("p.lock");
    let busy =
        msmae_pipeline::inspect::gc(&store, true, false, &[lock.as_path()], false).expect_err("the store is in use");
    assert!(busy.to_string().contains("a running pipeline"), "{busy}");
    let gc = std::thread::spawn({
        let (root, lock) = (store.root().to_path_buf(), lock.clone());
        move || {
            let t = Instant::now();
            let store = msmae_pipeline::Store::open(&root).expect("store");
            let r =
                msmae_pipeline::inspect::gc(&store, true, false, &[lock.as_path()], true).expect("gc after the run");
            (t.elapsed(), r)
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(!gc.is_finished(), "gc ran while the pipeline was running");
    fs::write(f.path("release"), "").expect("release");
    let (ok, line) = child_outcomes(child);
    assert!(ok, "{line}");
    let (waited, r) = gc.join().expect("gc thread");
    assert!(waited >= Duration::from_millis(500), "gc did not wait ({waited:?})");
    assert_eq!(r.index_entries, 2, "only the superseded v=one keys of slow and c go: {r:?}");
    assert!(r.objects >= 1, "{r:?}");
    let lock = msmae_pipeline::LockFile::read(&f.path("p.lock"), "p").expect("lock parses");
    let (checked, bad) = msmae_pipeline::inspect::verify(&store, &lock).expect("verify");
    assert_eq!((checked, bad.len()), (4, 0), "everything the run recorded survives: {bad:?}");
}
