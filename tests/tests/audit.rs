//! `msmae audit`: recorded stages recomputed from their recorded inputs in a scratch store,
//! compared bit for bit and by metric, with the environment differences; neither the store
//! nor the lock file is touched; bad requests are one-line errors. (Its real-stage test also
//! runs a 1-epoch training with the default warm-up, which is clipped to the run.)

use std::cell::RefCell;
use std::fs;
use std::path::Path;
use std::process::Command;

use msmae_pipeline::audit::{AuditOptions, Verdict, audit};
use msmae_pipeline::{LockFile, RunOptions, Store};
use msmae_tests::fixture::*;

fn pipeline(f: &Fixture) -> String {
    format!(
        "name: p\nstages:\n  a: {{ uses: test/source, with: {{ value: x }} }}\n  m: {{ uses: test/measure, needs: [a], with: {{ reading: '{}' }} }}\n",
        f.path("reading").display()
    )
}

fn listing(p: &Path) -> Vec<(String, u64)> {
    msmae_pipeline::hashing::list_files(p)
        .expect("list")
        .into_iter()
        .map(|(r, f)| (r, fs::metadata(f).map(|m| m.len()).unwrap_or(0)))
        .collect()
}

#[test]
fn recorded_stages_are_recomputed_and_compared_without_touching_store_or_lock() {
    let f = Fixture::new("");
    f.write(&pipeline(&f));
    fs::write(f.path("reading"), "0.5").expect("write");
    let r = f.run_with(&[], RunOptions { compute_threads: 2, ..RunOptions::default() });
    assert!(r.ok());
    let lock = LockFile::read(&f.path("p.lock"), "p").expect("lock");
    assert_eq!(
        lock.stage("m").and_then(|s| s.run.threads),
        Some(2),
        "the threads a backend stage computed with are recorded"
    );
    assert!(lock.stage("a").is_some_and(|s| s.run.threads.is_none()), "not for a stage without the backend");
    let (lock_before, store_before) = (f.lock_text(), listing(&f.path(".msmae")));
    let asked = RefCell::new(Vec::new());
    let set_threads = |n: usize| {
        asked.borrow_mut().push(n);
        n
    };
    let opts = |stages: &[&str], threads: Option<usize>, tolerance: f64| AuditOptions {
        stages: stages.iter().map(|s| s.to_string()).collect(),
        threads,
        tolerance,
        env: msmae_core::ExecEnv::cpu_flex(),
        set_threads: &set_threads,
        scratch: None,
        cancel: Default::default(),
    };
    let plan = f.plan(&[]);
    let store = f.store();
    let a = audit(&plan, &store, &lock, &opts(&[], None, 0.0), &msmae_core::NoProgress).expect("audit");
    assert_eq!(
        a.iter().map(|x| (x.stage.as_str(), x.verdict)).collect::<Vec<_>>(),
        [("a", Verdict::BitIdentical), ("m", Verdict::BitIdentical)]
    );
    assert_eq!(*asked.borrow(), [2], "the backend stage is recomputed with its recorded thread count");
    // The result changes (as a thread-dependent reduction would): the metric delta is shown.
    fs::write(f.path("reading"), "0.53").expect("write");
    let a = audit(&plan, &store, &lock, &opts(&["m"], Some(1), 0.0), &msmae_core::NoProgress).expect("audit");
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].verdict, Verdict::Differs);
    let d = a[0].metrics[0].delta.expect("delta");
    assert!((d - 0.03).abs() < 1e-9, "{:?}", a[0].metrics);
    assert!(a[0].differences.iter().any(|x| x == "threads 2 → 1"), "{:?}", a[0].differences);
    assert_eq!(asked.borrow().last(), Some(&1));
    let text = msmae_pipeline::audit::render_text(Path::new("p.yaml"), Path::new("p.lock"), &a, 0.0);
    assert!(text.contains("score: 0.5000 → 0.5300 (Δ +0.0300)") && text.contains("1 differ"), "{text}");
    let a = audit(&plan, &store, &lock, &opts(&["m"], None, 0.05), &msmae_core::NoProgress).expect("audit");
    assert_eq!(a[0].verdict, Verdict::WithinTolerance);
    // Nothing was written to the store or the lock file.
    assert_eq!(f.lock_text(), lock_before);
    assert_eq!(listing(&f.path(".msmae")), store_before);
    // Bad requests: an unknown stage, a store without the recorded inputs.
    let e = audit(&plan, &store, &lock, &opts(&["nosuch"], None, 0.0), &msmae_core::NoProgress)
        .expect_err("unknown")
        .to_string();
    assert!(e.contains("unknown stage `nosuch`") && !e.contains('\n'), "{e}");
    let empty = Store::open(&f.path("other-store")).expect("store");
    let e = audit(&plan, &empty, &lock, &opts(&["m"], None, 0.0), &msmae_core::NoProgress)
        .expect_err("no inputs")
        .to_string();
    assert!(e.contains("input `data` of stage `m`") && e.contains("other-store"), "{e}");
}

fn msmae(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(msmae_tests::msmae_bin())
        .current_dir(dir)
        .args(args)
        .env_remove("MSMAE_STORE")
        .env_remove("MSMAE_DEVICE")
        .output()
        .expect("run msmae")
}

/// Real stages through the binary: ingestion and a short training reproduce bit for bit on
/// the machine and thread count they ran with.
#[test]
fn the_binary_audits_real_stages_bit_for_bit() {
    let d = tempfile::tempdir().expect("tmp");
    let yaml = format!(
        "name: a\nseed: 4\nstages:\n  data: {{ uses: ingest/synthetic, with: {{ images: 48, size: 32, previews: 1 }} }}\n  sup: {{ uses: attention/train-supervised, needs: [data], with: {{ model: {}, epochs: 1, batch_size: 16 }} }}\n",
        msmae_tests::TINY_MODEL
    );
    fs::write(d.path().join("a.yaml"), yaml).expect("write");
    let o = msmae(d.path(), &["run", "a.yaml"]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("warmup_epochs: 5 is longer than this run allows; using 1"),
        "the default warm-up is clipped to a 1-epoch run, and said so:\n{err}"
    );
    let lock_before = fs::read(d.path().join("a.lock")).expect("lock");
    let o = msmae(d.path(), &["audit", "a.yaml"]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{out}{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("2 stages: 2 bit-identical"), "{out}");
    assert_eq!(fs::read(d.path().join("a.lock")).expect("lock"), lock_before);
    let o = msmae(d.path(), &["audit", "a.yaml", "data", "--format", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v[0]["verdict"], "bit-identical", "{v}");
    let o = msmae(d.path(), &["audit", "a.yaml", "nosuch"]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1));
    assert!(err.trim().lines().count() == 1 && err.contains("unknown stage `nosuch`"), "{err}");
}
