//! Runner semantics with test-only stage plugins: caching, invalidation, early cut-off,
//! selection flags, external inputs, output checks, failures, status/why, verify, gc.

use std::fs;

use msmae_pipeline::{Outcome, RunOptions};
use msmae_tests::fixture::*;

fn chain(f: &Fixture) -> String {
    let m = f.marker();
    format!(
        "name: chain\nseed: 3\nparams: {{ v: hello, note: n1 }}\nstages:\n  a: {{ uses: test/source, with: {{ value: '${{params.v}}', note: '${{params.note}}', marker: {m} }} }}\n  b: {{ uses: test/concat, needs: [a], with: {{ suffix: '-b', marker: {m} }} }}\n  c: {{ uses: test/concat, needs: [b], with: {{ suffix: '-c', marker: {m} }} }}\n  d: {{ uses: test/source, with: {{ value: independent, marker: {m} }} }}\n"
    )
}

#[test]
fn first_run_executes_all_and_noop_rerun_does_nothing() {
    let f = Fixture::new("");
    f.write(&chain(&f));
    let r1 = f.run();
    assert!(r1.ok());
    assert_eq!(outcomes(&r1).iter().map(|x| x.1).collect::<Vec<_>>(), ["ran"; 4]);
    assert_eq!(f.marks().len(), 4);
    let lock1 = f.lock_text();
    assert!(lock1.contains("name: c"), "{lock1}");
    f.clear_marks();
    let r2 = f.run();
    assert_eq!(outcomes(&r2).iter().map(|x| x.1).collect::<Vec<_>>(), ["cached"; 4]);
    assert!(f.marks().is_empty(), "nothing executed");
    assert_eq!(f.lock_text(), lock1, "a no-op run leaves the lock file byte-identical");
    // c's output is the chain's result
    let c = r2.stage("c").expect("c").artifact.clone().expect("digest");
    let out = fs::read_to_string(f.store().object_dir(&c).join("out.txt")).expect("read");
    assert_eq!(out, "hello-b-c");
}

#[test]
fn a_changed_param_reruns_exactly_that_stage_and_its_dependents() {
    let f = Fixture::new("");
    f.write(&chain(&f));
    f.run();
    f.clear_marks();
    let r = f.run_with(&["params.v=world"], RunOptions::default());
    assert_eq!(outcome(&r, "a").label(), "ran");
    assert_eq!(outcome(&r, "b").label(), "ran");
    assert_eq!(outcome(&r, "c").label(), "ran");
    assert_eq!(outcome(&r, "d").label(), "cached");
    assert_eq!(f.marks(), ["a", "b", "c"]);
    // Switching back is served from the cache: nothing executes.
    f.clear_marks();
    let r = f.run();
    assert_eq!(r.count("cached"), 4);
    assert!(f.marks().is_empty());
}

#[test]
fn identical_output_stops_the_cascade() {
    let f = Fixture::new("");
    f.write(&chain(&f));
    f.run();
    f.clear_marks();
    let r = f.run_with(&["params.note=n2"], RunOptions::default());
    assert_eq!(
        outcome(&r, "a"),
        &Outcome::Ran {
            seconds: match outcome(&r, "a") {
                Outcome::Ran { seconds, .. } => *seconds,
                _ => -1.0,
            },
            unchanged: true
        }
    );
    assert_eq!(outcome(&r, "b").label(), "cached");
    assert_eq!(outcome(&r, "c").label(), "cached");
    assert_eq!(f.marks(), ["a"]);
}

#[test]
fn stage_from_until_force_select_what_runs() {
    let f = Fixture::new("");
    f.write(&chain(&f));
    f.run();
    f.clear_marks();
    // --stage b: only b executes (even though cached)
    let r = f.run_with(&[], RunOptions { stage: Some("b".into()), ..Default::default() });
    assert_eq!(f.marks(), ["b"]);
    assert_eq!(outcome(&r, "c").label(), "skipped");
    assert_eq!(outcome(&r, "a").label(), "cached");
    f.clear_marks();
    // --until b: nothing to do, c and d skipped
    let r = f.run_with(&[], RunOptions { until: Some("b".into()), ..Default::default() });
    assert_eq!(outcomes(&r).iter().map(|x| x.1).collect::<Vec<_>>(), ["cached", "cached", "skipped", "skipped"]);
    // --from a: a re-executes; its output is identical, so b and c stay cached
    let r = f.run_with(&[], RunOptions { from: Some("a".into()), ..Default::default() });
    assert_eq!(outcome(&r, "a").label(), "ran (output unchanged)");
    assert_eq!(outcome(&r, "c").label(), "cached");
    assert_eq!(outcome(&r, "d").label(), "skipped");
    f.clear_marks();
    // --force: all re-execute
    let r = f.run_with(&[], RunOptions { force: true, ..Default::default() });
    assert_eq!(r.count("ran (output unchanged)"), 4);
    assert_eq!(f.marks().len(), 4);
    // unknown stage name
    let plan = f.plan(&[]);
    let e = msmae_pipeline::run(
        &plan,
        &f.store(),
        &RunOptions { stage: Some("zz".into()), ..Default::default() },
        &msmae_core::NoProgress,
    )
    .expect_err("unknown");
    assert!(e.to_string().contains("unknown stage `zz`; stages: a, b, c, d"), "{e}");
}

#[test]
fn running_one_stage_needs_its_inputs_cached() {
    let f = Fixture::new("");
    f.write(&chain(&f));
    let r = f.run_with(&[], RunOptions { stage: Some("c".into()), ..Default::default() });
    assert!(!r.ok());
    match outcome(&r, "a") {
        Outcome::Failed { error } => {
            let error = error.to_string();
            assert!(error.contains("`a`, which is not selected and has no cached output"), "{error}")
        }
        o => panic!("{o:?}"),
    }
    assert_eq!(outcome(&r, "c"), &Outcome::Blocked { upstream: "b".into() });
    assert!(f.marks().is_empty());
}

#[test]
fn dry_run_reports_reasons_and_changes_nothing() {
    let f = Fixture::new("");
    f.write(&chain(&f));
    let r = f.run_with(&[], RunOptions { dry_run: true, ..Default::default() });
    assert_eq!(outcome(&r, "a"), &Outcome::WouldRun { reasons: vec!["never run".into()] });
    assert_eq!(outcome(&r, "b"), &Outcome::WouldRun { reasons: vec!["after `a`".into()] });
    assert!(f.store().objects().expect("objects").is_empty());
    assert!(!f.path("p.lock").exists());
    f.run();
    let r = f.run_with(&["params.v=x"], RunOptions { dry_run: true, ..Default::default() });
    assert_eq!(outcome(&r, "a"), &Outcome::WouldRun { reasons: vec!["config.value: \"hello\" → \"x\"".into()] });
    assert_eq!(outcome(&r, "d").label(), "cached");
}

#[test]
fn external_inputs_are_hashed_into_the_key() {
    let f = Fixture::new("");
    fs::create_dir_all(f.path("dataset/images")).expect("mkdir");
    fs::write(f.path("dataset/images/1.png"), "one").expect("w");
    fs::write(f.path("dataset/labels.csv"), "1,a").expect("w");
    let m = f.marker();
    f.write(
        &format!(
            "stages:\n  ingest: {{ uses: test/ingest, with: {{ root: dataset, marker: {m} }} }}\n  use: {{ uses: test/concat, needs: {{ parts: [] }} }}\n"
        )
        .replace("  use: { uses: test/concat, needs: { parts: [] } }\n", ""),
    );
    assert_eq!(f.run().count("ran"), 1);
    assert_eq!(f.run().count("cached"), 1);
    fs::write(f.path("dataset/images/2.png"), "two").expect("w");
    f.clear_marks();
    let r = f.run();
    assert_eq!(
        outcome(&r, "ingest").label(),
        "ran (output unchanged)",
        "a new file re-runs ingestion; its top-level listing is the same"
    );
    assert_eq!(f.marks(), ["ingest"]);
    fs::write(f.path("dataset/extra.csv"), "x").expect("w");
    assert_eq!(outcome(&f.run(), "ingest").label(), "ran");
    let lock = msmae_pipeline::LockFile::read(&f.path("p.lock"), "p").expect("lock");
    let ext = &lock.stage("ingest").expect("ingest").parts.external;
    assert_eq!(ext.len(), 1);
    assert_eq!((ext[0].path.as_str(), ext[0].files), ("dataset", 4));
    let plan = f.plan(&[]);
    let why = msmae_pipeline::inspect::why(&plan, &f.store(), &lock, &msmae_core::ExecEnv::cpu_flex(), "ingest")
        .expect("why");
    assert!(why.contains("up to date"), "{why}");
    fs::write(f.path("dataset/labels.csv"), "1,b").expect("w");
    let why = msmae_pipeline::inspect::why(&plan, &f.store(), &lock, &msmae_core::ExecEnv::cpu_flex(), "ingest")
        .expect("why");
    assert!(why.contains("external `dataset` changed"), "{why}");
}

#[test]
fn listed_files_are_hashed_one_by_one_wherever_they_live() {
    let f = Fixture::new("");
    let elsewhere = tempfile::tempdir().expect("tmp");
    let far = elsewhere.path().join("far.png");
    fs::write(&far, "far").expect("w");
    fs::create_dir_all(f.path("data")).expect("mkdir");
    fs::write(f.path("data/near.png"), "near").expect("w");
    fs::write(f.path("data/list.txt"), format!("near.png\n{}\nnear.png\n", far.display())).expect("w");
    let m = f.marker();
    f.write(&format!("stages:\n  read: {{ uses: test/listed, with: {{ list: data/list.txt, marker: {m} }} }}\n"));
    let out = |r: &msmae_pipeline::RunReport| {
        let d = r.stage("read").expect("read").artifact.clone().expect("digest");
        fs::read_to_string(f.store().object_dir(&d).join("out.txt")).expect("out")
    };
    let r = f.run();
    assert_eq!(out(&r), "near+far+near");
    assert_eq!(f.run().count("cached"), 1);
    // An unrelated file beside the listed ones is not an input.
    fs::write(f.path("data/unrelated.png"), "x").expect("w");
    fs::write(elsewhere.path().join("other.png"), "x").expect("w");
    assert_eq!(f.run().count("cached"), 1, "files not in the list do not count");
    // A listed file outside the pipeline's folder is tracked.
    fs::write(&far, "FAR").expect("w");
    let r = f.run();
    assert_eq!((outcome(&r, "read").label(), out(&r).as_str()), ("ran", "near+FAR+near"));
    let lock = msmae_pipeline::LockFile::read(&f.path("p.lock"), "p").expect("lock");
    let ext = &lock.stage("read").expect("read").parts.external;
    assert_eq!(
        ext.iter().map(|e| (e.path.as_str(), e.files)).collect::<Vec<_>>(),
        [("data/list.txt", 1), ("files listed in data/list.txt", 2)],
        "duplicates count once"
    );
    // Two listed files swapping contents is a change, though sizes and the list are not.
    fs::write(&far, "near").expect("w");
    fs::write(f.path("data/near.png"), "FAR").expect("w");
    assert_eq!(out(&f.run()), "FAR+near+FAR");
    // A listed file that goes missing re-runs the stage (which decides what that means),
    // and so does its coming back.
    fs::remove_file(&far).expect("rm");
    let plan = f.plan(&[]);
    let lock = msmae_pipeline::LockFile::read(&f.path("p.lock"), "p").expect("lock");
    let why =
        msmae_pipeline::inspect::why(&plan, &f.store(), &lock, &msmae_core::ExecEnv::cpu_flex(), "read").expect("why");
    assert!(
        why.contains("external `files listed in data/list.txt` changed: 2 files/7 bytes → 1 files/3 bytes"),
        "{why}"
    );
    assert_eq!(out(&f.run()), "FAR+missing+FAR");
    fs::write(&far, "near").expect("w");
    assert_eq!(out(&f.run()), "FAR+near+FAR");
    // A list edited between planning and running: the key is of the list as run, so the
    // next run finds it cached.
    let plan = f.plan(&[]);
    fs::write(f.path("data/extra.png"), "extra").expect("w");
    fs::write(f.path("data/list.txt"), format!("near.png\n{}\nextra.png\n", far.display())).expect("w");
    let r = msmae_pipeline::run(&plan, &f.store(), &RunOptions::default(), &msmae_core::NoProgress).expect("run");
    assert_eq!((outcome(&r, "read").label(), out(&r).as_str()), ("ran", "FAR+near+extra"));
    assert_eq!(outcome(&f.run(), "read").label(), "cached", "keyed on the list it ran with");
    // A list that cannot be read stops the plan, naming the stage and the file.
    fs::write(f.path("data/list.txt"), [0xff, 0xfe, b'\n']).expect("w");
    let e = msmae_pipeline::load_plan(&f.pipeline(), &[], &registry()).expect_err("plan fails").to_string();
    assert!(e.contains("stage `read`") && e.contains("list.txt"), "{e}");
}

#[test]
fn outputs_are_checked_against_the_declaration() {
    let cases = [
        ("undeclared", "wrote undeclared files [\"secret.bin\"]"),
        ("missing", "did not write required files [\"out.txt\"]"),
        ("symlink", "is a symbolic link"),
        ("panic", "panicked: stage bug"),
        ("escape", "writes `../escape.txt`, which its output declaration"),
    ];
    for (how, msg) in cases {
        let f = Fixture::new(&format!(
            "stages:\n  bad: {{ uses: test/misbehave, with: {{ how: {how} }} }}\n  after: {{ uses: test/concat, needs: [bad] }}\n  other: {{ uses: test/source, with: {{ value: ok }} }}\n"
        ));
        let r = f.run();
        assert!(!r.ok());
        match outcome(&r, "bad") {
            Outcome::Failed { error } => assert!(error.to_string().contains(msg), "{how}: {error}"),
            o => panic!("{how}: {o:?}"),
        }
        assert_eq!(outcome(&r, "after"), &Outcome::Blocked { upstream: "bad".into() });
        assert_eq!(outcome(&r, "other").label(), "ran", "independent stages still run");
        let store = f.store();
        assert_eq!(store.objects().expect("objects").len(), 1, "{how}: only `other` is stored");
        assert!(fs::read_dir(store.root().join("tmp")).expect("tmp").next().is_none(), "{how}: staging cleaned");
        let lock = f.lock_text();
        assert!(lock.contains("name: other") && !lock.contains("name: bad"), "{lock}");
    }
}

#[test]
fn backend_is_part_of_the_key_only_for_stages_that_use_it() {
    let f = Fixture::new("");
    let m = f.marker();
    f.write(&format!(
        "stages:\n  data: {{ uses: test/source, with: {{ value: v, marker: {m} }} }}\n  train: {{ uses: test/model, needs: [data], with: {{ marker: {m} }} }}\n"
    ));
    f.run();
    f.clear_marks();
    let env = msmae_core::ExecEnv {
        backend: "tch".into(),
        device: "cpu".into(),
        device_kind: "cpu".into(),
        precision: "f32".into(),
        library: "libtorch 2.9.0".into(),
    };
    let r = f.run_with(&[], RunOptions { env: env.clone(), ..Default::default() });
    assert_eq!(outcome(&r, "data").label(), "cached");
    assert_eq!(outcome(&r, "train").label(), "ran");
    // cuda:0 vs cuda:1 is the same device kind: not a cache miss
    let r = f.run_with(
        &[],
        RunOptions { env: msmae_core::ExecEnv { device: "cuda:1".into(), ..env.clone() }, ..Default::default() },
    );
    assert_eq!(outcome(&r, "train").label(), "cached");
    // bf16 changes the numbers: its own key; back to f32 is a hit again
    let bf16 = msmae_core::ExecEnv { precision: "bf16".into(), ..env.clone() };
    let r = f.run_with(&[], RunOptions { env: bf16, ..Default::default() });
    assert_eq!(outcome(&r, "data").label(), "cached");
    assert!(outcome(&r, "train").label().starts_with("ran"), "{}", outcome(&r, "train").label());
    let r = f.run_with(&[], RunOptions { env: env.clone(), ..Default::default() });
    assert_eq!(outcome(&r, "train").label(), "cached");
    // Another libtorch: the stage that computes with it is stale and `why` names the
    // versions; the data stage is not.
    let newer = msmae_core::ExecEnv { library: "libtorch 2.11.0".into(), ..env };
    let lock = msmae_pipeline::LockFile::read(&f.path("p.lock"), "").expect("lock");
    let why = msmae_pipeline::inspect::why(&f.plan(&[]), &f.store(), &lock, &newer, "train").expect("why");
    assert!(why.contains("numeric library libtorch 2.9.0 → libtorch 2.11.0"), "{why}");
    let r = f.run_with(&[], RunOptions { env: newer, ..Default::default() });
    assert_eq!(outcome(&r, "data").label(), "cached");
    assert!(outcome(&r, "train").label().starts_with("ran"));
}

#[test]
fn status_and_why_explain_staleness() {
    let f = Fixture::new("");
    f.write(&chain(&f));
    let env = msmae_core::ExecEnv::cpu_flex();
    let lock = || msmae_pipeline::LockFile::read(&f.path("p.lock"), "chain").expect("lock");
    let rows = msmae_pipeline::inspect::status(&f.plan(&[]), &f.store(), &lock(), &env);
    assert_eq!(rows.iter().map(|r| r.state.label()).collect::<Vec<_>>(), ["new", "waiting", "waiting", "new"]);
    f.run();
    let rows = msmae_pipeline::inspect::status(&f.plan(&[]), &f.store(), &lock(), &env);
    assert!(rows.iter().all(|r| r.state.label() == "up to date"));
    let plan = f.plan(&["params.v=bye"]);
    let rows = msmae_pipeline::inspect::status(&plan, &f.store(), &lock(), &env);
    assert_eq!(rows.iter().map(|r| r.state.label()).collect::<Vec<_>>(), ["stale", "waiting", "waiting", "up to date"]);
    let why = msmae_pipeline::inspect::why(&plan, &f.store(), &lock(), &env, "a").expect("why");
    assert!(why.contains("config.value: \"hello\" → \"bye\""), "{why}");
    let why = msmae_pipeline::inspect::why(&plan, &f.store(), &lock(), &env, "b").expect("why");
    assert!(why.contains("waits on upstream `a`"), "{why}");
    assert!(msmae_pipeline::inspect::why(&plan, &f.store(), &lock(), &env, "nope").is_err());
}

#[test]
fn verify_detects_tampering_and_missing_artifacts() {
    let f = Fixture::new("");
    f.write(&chain(&f));
    f.run();
    let store = f.store();
    let lock = msmae_pipeline::LockFile::read(&f.path("p.lock"), "chain").expect("lock");
    let (checked, bad) = msmae_pipeline::inspect::verify(&store, &lock).expect("verify");
    assert_eq!((checked, bad.len()), (4, 0));
    let b = lock.stage("b").expect("b").output.digest.clone();
    let file = store.object_dir(&b).join("out.txt");
    let mut perm = fs::metadata(&file).expect("md").permissions();
    assert!(perm.readonly(), "stored artifacts are read-only");
    #[allow(clippy::permissions_set_readonly_false)]
    perm.set_readonly(false);
    fs::set_permissions(&file, perm).expect("chmod");
    fs::write(&file, "tampered").expect("w");
    let (_, bad) = msmae_pipeline::inspect::verify(&store, &lock).expect("verify");
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert_eq!(bad[0].stage, "b");
    assert!(
        bad[0].problem.contains("size 8 ≠ recorded 7") || bad[0].problem.contains("content differs"),
        "{:?}",
        bad[0]
    );
    fs::remove_dir_all(store.object_dir(&lock.stage("d").expect("d").output.digest).parent().expect("object root"))
        .expect("rm");
    let (_, bad) = msmae_pipeline::inspect::verify(&store, &lock).expect("verify");
    assert!(bad.iter().any(|m| m.stage == "d" && m.problem.contains("missing from the store")), "{bad:?}");
}

#[test]
fn gc_keeps_cached_alternatives_unless_pruning() {
    let f = Fixture::new("");
    f.write(&chain(&f));
    f.run_with(&["params.v=old"], RunOptions::default());
    f.run();
    let store = f.store();
    assert_eq!(store.objects().expect("objects").len(), 7, "3 old-chain artifacts + 4 current");
    let r = msmae_pipeline::inspect::gc(&store, false, false, &[], true).expect("gc");
    assert_eq!((r.objects, r.kept_objects), (0, 7));
    let r = msmae_pipeline::inspect::gc(&store, true, true, &[], true).expect("gc dry");
    assert_eq!((r.objects, r.index_entries), (3, 3));
    assert_eq!(store.objects().expect("objects").len(), 7, "dry run removes nothing");
    let r = msmae_pipeline::inspect::gc(&store, true, false, &[], true).expect("gc");
    assert_eq!(r.objects, 3);
    assert!(r.bytes > 0);
    assert_eq!(f.run().count("cached"), 4, "what the lock file records survives");
    assert_eq!(f.run_with(&["params.v=old"], RunOptions::default()).count("ran"), 3, "pruned alternatives recompute");
}

/// A lock file gc cannot read (git merge-conflict markers, truncation) may reference any
/// artifact: gc stops, naming it, and removes nothing; a run refuses it rather than
/// writing a fresh one over the audit trail.
#[test]
fn an_unreadable_lock_file_stops_gc_and_is_never_overwritten() {
    let f = Fixture::new("");
    f.write(&chain(&f));
    f.run_with(&["params.v=old"], RunOptions::default());
    f.run();
    let store = f.store();
    let before = store.objects().expect("objects").len();
    let good = f.lock_text();
    let conflicted =
        format!("<<<<<<< HEAD\n{good}=======\n{}>>>>>>> feature\n", good.replace("stages:", "stages:\n# theirs"));
    let truncated = good[..good.len() / 2].to_string();
    for (what, text) in [("conflict markers", conflicted), ("truncated", truncated)] {
        fs::write(f.path("p.lock"), &text).expect("write");
        let e = msmae_pipeline::inspect::gc(&store, true, false, &[], true).expect_err(what).to_string();
        assert!(e.contains("p.lock") && e.contains("Nothing was removed"), "{what}: {e}");
        assert_eq!(store.objects().expect("objects").len(), before, "{what}: gc removed objects");
        let r = f.plan(&[]);
        let err = msmae_pipeline::run(
            &r,
            &store,
            &RunOptions { lock_file: Some(f.path("p.lock")), ..RunOptions::default() },
            &msmae_core::NoProgress,
        )
        .expect_err(what)
        .to_string();
        assert!(err.contains("p.lock"), "{what}: {err}");
        assert_eq!(f.lock_text(), text, "{what}: the unreadable lock file was rewritten");
    }
    fs::write(f.path("p.lock"), &good).expect("restore");
    let r = msmae_pipeline::inspect::gc(&store, true, false, &[], true).expect("gc");
    assert_eq!(r.objects, 3, "with the lock readable again, gc prunes as before");
}

/// A cache hit checks the object against its manifest (files and sizes): a damaged one is
/// reported and recomputed, never fed downstream, and the recomputed artifact replaces it.
/// Digests read from a lock file must be digests before a path is built from them.
#[test]
fn damaged_objects_are_recomputed_and_foreign_digests_refused() {
    let f = Fixture::new("");
    f.write(&chain(&f));
    f.run();
    let store = f.store();
    let lock = msmae_pipeline::LockFile::read(&f.path("p.lock"), "p").expect("lock");
    let b = lock.stage("b").expect("b").output.digest.clone();
    let file = store.object_dir(&b).join("out.txt");
    let mut perms = fs::metadata(&file).expect("meta").permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    fs::set_permissions(&file, perms).expect("chmod");
    fs::write(&file, "truncated").expect("damage");
    let r = f.run();
    assert_eq!(
        r.stage("b").map(|s| s.outcome.label()),
        Some("ran (output unchanged)"),
        "the damaged artifact is recomputed"
    );
    assert_eq!(r.count("cached"), 3, "the others are served");
    assert!(store.object_intact(&b).is_ok(), "the recomputed artifact replaced the damaged one");
    let (_, bad) =
        msmae_pipeline::inspect::verify(&store, &msmae_pipeline::LockFile::read(&f.path("p.lock"), "p").expect("lock"))
            .expect("verify");
    assert!(bad.is_empty(), "{bad:?}");
    // a lock file whose digest would lead out of the store
    let text = f.lock_text().replace(&b, "../../../../etc");
    fs::write(f.path("p.lock"), text).expect("write");
    let e = msmae_pipeline::LockFile::read(&f.path("p.lock"), "p").expect_err("refused").to_string();
    assert!(e.contains("stage `b`") && e.contains("is not an artifact digest"), "{e}");
}

/// Damage that keeps a file's size passes the cache hit's cheap check; `--verify-inputs`
/// re-hashes what a running stage reads and refuses the damaged input by name.
#[test]
fn verify_inputs_rehashes_what_a_running_stage_reads() {
    let f = Fixture::new("");
    f.write(&chain(&f));
    f.run();
    let store = f.store();
    let lock = msmae_pipeline::LockFile::read(&f.path("p.lock"), "p").expect("lock");
    let file = store.object_dir(&lock.stage("b").expect("b").output.digest).join("out.txt");
    let text = fs::read_to_string(&file).expect("read");
    let mut perms = fs::metadata(&file).expect("meta").permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    fs::set_permissions(&file, perms).expect("chmod");
    fs::write(&file, text.to_uppercase()).expect("same size, other bytes");
    let opts = |verify_inputs| RunOptions {
        stage: Some("c".into()),
        verify_inputs,
        lock_file: Some(f.path("p.lock")),
        ..RunOptions::default()
    };
    let r = msmae_pipeline::run(&f.plan(&[]), &store, &opts(true), &msmae_core::NoProgress).expect("run");
    match &r.stage("c").expect("c").outcome {
        msmae_pipeline::Outcome::Failed { error } => {
            let error = error.to_string();
            assert!(
                error.contains("input `b`") && error.contains("is damaged") && error.contains("--stage b"),
                "{error}"
            )
        }
        other => panic!("c must fail on its damaged input, got {other:?}"),
    }
    let r = msmae_pipeline::run(&f.plan(&[]), &store, &opts(false), &msmae_core::NoProgress).expect("run");
    assert_eq!(r.stage("c").map(|s| s.outcome.label()), Some("ran"), "without the flag only sizes are checked");
}

#[test]
fn independent_stages_run_in_parallel_within_the_budget() {
    let f = Fixture::new("");
    let (a, b) = (f.path("a.started"), f.path("b.started"));
    // Each waits for the other to start: only finishes if both run at once.
    f.write(&format!(
        "stages:\n  x: {{ uses: test/source, with: {{ value: x, touch: {a}, wait_for: {b} }} }}\n  y: {{ uses: test/source, with: {{ value: y, touch: {b}, wait_for: {a} }} }}\n",
        a = a.display(),
        b = b.display()
    ));
    let r = f.run_with(&[], RunOptions { jobs: 2, ..Default::default() });
    assert!(r.ok(), "{r:?}");
}

#[test]
fn exclusive_stages_run_alone() {
    let f = Fixture::new("");
    let (a, b) = (f.path("a.started"), f.path("b.started"));
    // y waits for x to have started; x is exclusive and must finish before y starts,
    // so x must not wait for y.
    f.write(&format!(
        "stages:\n  x: {{ uses: test/source, with: {{ value: x, touch: {a}, exclusive: true }} }}\n  y: {{ uses: test/source, with: {{ value: y, touch: {b}, wait_for: {a} }} }}\n  z: {{ uses: test/source, with: {{ value: z, wait_for: {b}, exclusive: true }} }}\n",
        a = a.display(),
        b = b.display()
    ));
    let r = f.run_with(&[], RunOptions { jobs: 2, ..Default::default() });
    assert!(r.ok(), "{r:?}");
}

#[test]
fn cancelled_runs_start_nothing() {
    let f = Fixture::new("");
    f.write(&chain(&f));
    let opts = RunOptions::default();
    opts.cancel.cancel();
    let r = f.run_with(&[], opts);
    assert!(r.stages.iter().all(|s| s.outcome == Outcome::Cancelled), "{r:?}");
    assert!(f.marks().is_empty());
}

#[test]
fn rounds_chain_through_previous_round() {
    let f = Fixture::new(
        "stages:\n  seed: { uses: test/source, with: { value: s } }\n  r:\n    repeat: 3\n    init: { acc: seed }\n    stages:\n      acc: { uses: test/concat, needs: ['${prev.acc}'], with: { suffix: '+${round}' } }\n  final: { uses: test/concat, needs: [r.last.acc] }\n",
    );
    let r = f.run();
    assert!(r.ok());
    let d = r.stage("final").expect("final").artifact.clone().expect("digest");
    assert_eq!(fs::read_to_string(f.store().object_dir(&d).join("out.txt")).expect("read"), "s+1+2+3");
}

#[test]
fn cancelling_mid_stage_commits_nothing_and_leaves_no_staging() {
    let f = Fixture::new("");
    let (started, release) = (f.path("started"), f.path("release"));
    f.write(&format!(
        "stages:\n  a: {{ uses: test/source, with: {{ value: a }} }}\n  slow: {{ uses: test/slow, needs: [a], with: {{ value: v, started: {}, release: {} }} }}\n  after: {{ uses: test/concat, needs: [slow] }}\n",
        started.display(),
        release.display()
    ));
    let opts = RunOptions::default();
    let cancel = opts.cancel.clone();
    let watcher = std::thread::spawn(move || {
        let t0 = std::time::Instant::now();
        while !started.exists() && t0.elapsed() < std::time::Duration::from_secs(60) {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        cancel.cancel();
    });
    let r = f.run_with(&[], opts);
    watcher.join().expect("watcher");
    assert_eq!(outcome(&r, "a").label(), "ran");
    assert_eq!(outcome(&r, "slow"), &Outcome::Cancelled);
    assert_eq!(outcome(&r, "after"), &Outcome::Cancelled);
    assert!(!r.ok());
    let store = f.store();
    assert_eq!(store.objects().expect("objects").len(), 1, "only `a` is stored");
    assert!(fs::read_dir(store.root().join("tmp")).expect("tmp").next().is_none(), "staging removed");
    assert!(f.lock_text().contains("name: a") && !f.lock_text().contains("name: slow"));
}
