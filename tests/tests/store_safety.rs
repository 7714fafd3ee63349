//! The store never deletes or overwrites what msmae did not create, and gc never deletes
//! what a lock file references: store identity, msmae-named entries only, gc roots that
//! survive a missing lock file (a model-based test over random run/gc/move sequences),
//! lock-file ownership, report targets, and the bounds on input that could hang or exhaust
//! the machine.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use msmae_pipeline::{Outcome, RunOptions, Store, inspect};
use msmae_tests::fixture::*;
use proptest::prelude::*;

fn msmae(dir: &Path, args: &[&str]) -> Output {
    Command::new(msmae_tests::msmae_bin())
        .current_dir(dir)
        .args(args)
        .env_remove("MSMAE_STORE")
        .env_remove("MSMAE_DEVICE")
        .env_remove("MSMAE_TENSORBOARD")
        .output()
        .expect("run msmae")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn files_under(p: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        msmae_pipeline::hashing::list_files(p).expect("list").into_iter().map(|(r, _)| r).collect();
    v.sort();
    v
}

const TINY: &str =
    "name: p\nstages:\n  data: { uses: ingest/synthetic, with: { images: 40, size: 32, previews: 1 } }\n";

#[test]
fn an_ordinary_directory_is_refused_as_a_store_and_keeps_its_files() {
    let d = tempfile::tempdir().expect("tmp");
    let home = d.path().join("home");
    fs::create_dir_all(home.join("tmp/notes")).expect("mkdir");
    fs::create_dir_all(home.join("resume/2026")).expect("mkdir");
    fs::write(home.join("tmp/notes/draft.txt"), "important").expect("write");
    fs::write(home.join("resume/2026/cv.pdf"), "cv").expect("write");
    fs::create_dir_all(d.path().join("proj")).expect("mkdir");
    fs::write(d.path().join("proj/p.yaml"), TINY).expect("write");
    let before = files_under(&home);
    for args in [
        vec!["run", "proj/p.yaml", "--store", "home"],
        vec!["gc", "proj/p.yaml", "--store", "home", "--prune"],
        vec!["status", "proj/p.yaml", "--store", "home"],
    ] {
        let o = msmae(d.path(), &args);
        assert!(!o.status.success(), "{args:?} must refuse the directory:\n{}", text(&o));
        let t = text(&o);
        assert!(t.contains("is not an msmae artifact store") && t.contains("--store"), "{args:?}: {t}");
        assert!(t.contains("`resume`") || t.contains("`tmp`"), "the error names what is there: {t}");
    }
    assert_eq!(files_under(&home), before, "nothing of the user's was touched");
    assert!(!home.join("MSMAE_STORE").exists() && !home.join("objects").exists(), "nothing was added either");
    // A new directory and an empty one become stores (with the marker); a store is reused.
    fs::create_dir_all(d.path().join("empty")).expect("mkdir");
    for store in ["fresh/nested", "empty"] {
        let o = msmae(
            d.path(),
            &["run", "proj/p.yaml", "--store", store, "--lock", &format!("{}.lock", store.replace('/', "-"))],
        );
        assert!(o.status.success(), "{store}: {}", text(&o));
        assert!(d.path().join(store).join("MSMAE_STORE").is_file(), "{store} is marked");
    }
    let o = msmae(d.path(), &["run", "proj/p.yaml", "--store", "empty", "--lock", "empty.lock"]);
    assert!(o.status.success() && text(&o).contains("cached"), "{}", text(&o));
    // A file is not a store either.
    fs::write(d.path().join("afile"), "x").expect("write");
    let o = msmae(d.path(), &["run", "proj/p.yaml", "--store", "afile"]);
    assert!(!o.status.success() && text(&o).contains("not a directory"), "{}", text(&o));
    assert_eq!(fs::read_to_string(d.path().join("afile")).expect("read"), "x");
}

#[test]
fn a_store_of_an_older_msmae_is_adopted_by_its_layout() {
    let d = tempfile::tempdir().expect("tmp");
    let old = d.path().join("old");
    for sub in ["objects", "index", "tmp", "locks", "roots"] {
        fs::create_dir_all(old.join(sub)).expect("mkdir");
    }
    fs::write(old.join("hashmemo.tsv"), "").expect("write");
    Store::open(&old).expect("an unmarked store of the known layout opens");
    assert!(old.join("MSMAE_STORE").is_file(), "and is marked");
    // The same layout with a foreign file beside it is not a store.
    let mixed = d.path().join("mixed");
    for sub in ["objects", "index"] {
        fs::create_dir_all(mixed.join(sub)).expect("mkdir");
    }
    fs::write(mixed.join("thesis.tex"), "x").expect("write");
    let e = Store::open(&mixed).expect_err("refused").to_string();
    assert!(e.contains("`thesis.tex`"), "{e}");
    // A marker from a newer format is refused rather than misread.
    let newer = d.path().join("newer");
    fs::create_dir_all(&newer).expect("mkdir");
    fs::write(newer.join("MSMAE_STORE"), "msmae store format 99\n").expect("write");
    assert!(Store::open(&newer).expect_err("refused").to_string().contains("format 99"));
}

#[test]
fn only_entries_msmae_names_are_removed_from_tmp_and_resume() {
    let f = Fixture::new("");
    f.write(&format!("name: p\nstages:\n  a: {{ uses: test/source, with: {{ value: x, marker: {} }} }}\n", f.marker()));
    assert!(f.run().ok());
    let store = f.path(".msmae");
    let key = "a".repeat(64);
    // A killed run's staging and checkpoints, named as msmae names them…
    fs::create_dir_all(store.join(format!("tmp/{key}.host.1.0/data"))).expect("mkdir");
    fs::create_dir_all(store.join(format!("resume/{key}"))).expect("mkdir");
    // …and things someone else put there: a folder, a plain file, a link.
    fs::create_dir_all(store.join("tmp/notes")).expect("mkdir");
    fs::write(store.join("tmp/notes/draft.txt"), "important").expect("write");
    fs::write(store.join("tmp/plain-file"), "x").expect("write");
    fs::create_dir_all(store.join("resume/2026")).expect("mkdir");
    fs::write(store.join("resume/2026/cv.pdf"), "cv").expect("write");
    std::os::unix::fs::symlink(f.path("p.yaml"), store.join(format!("tmp/{key}.link"))).expect("symlink");
    // A run and a pruning gc both succeed (a plain file in tmp/ is no error) …
    let r = f.run_with(&[], RunOptions { force: true, ..RunOptions::default() });
    assert!(r.ok(), "{:?}", r.stages);
    let g = inspect::gc(&f.store(), true, false, &[], true).expect("gc");
    assert_eq!((g.tmp_dirs, g.resume_dirs), (0, 1), "the run removed the staging, gc the checkpoints: {g:?}");
    // … and remove only msmae's own entries.
    assert!(!store.join(format!("tmp/{key}.host.1.0")).exists() && !store.join(format!("resume/{key}")).exists());
    assert_eq!(fs::read_to_string(store.join("tmp/notes/draft.txt")).expect("kept"), "important");
    assert_eq!(fs::read_to_string(store.join("resume/2026/cv.pdf")).expect("kept"), "cv");
    assert!(store.join("tmp/plain-file").is_file() && f.path("p.yaml").is_file());
}

fn source_pipeline(name: &str, value: &str) -> String {
    format!(
        "name: {name}\nstages:\n  a: {{ uses: test/source, with: {{ value: '{value}' }} }}\n  b: {{ uses: test/concat, needs: [a], with: {{ suffix: '-{name}' }} }}\n"
    )
}

fn run_pipeline(dir: &Path, file: &str, lock: Option<&Path>) -> msmae_pipeline::Result<msmae_pipeline::RunReport> {
    let plan = msmae_pipeline::load_plan(&dir.join(file), &[], &registry()).expect("plan");
    let store = Store::open(&dir.join(".msmae")).expect("store");
    let opts = RunOptions { lock_file: lock.map(Path::to_path_buf), ..RunOptions::default() };
    msmae_pipeline::run(&plan, &store, &opts, &msmae_core::NoProgress)
}

#[test]
fn gc_keeps_what_a_missing_lock_file_referenced_until_it_is_forgotten() {
    let d = tempfile::tempdir().expect("tmp");
    fs::write(d.path().join("one.yaml"), source_pipeline("one", "v1")).expect("write");
    fs::write(d.path().join("two.yaml"), source_pipeline("two", "v2")).expect("write");
    assert!(run_pipeline(d.path(), "one.yaml", None).expect("run").ok());
    assert!(run_pipeline(d.path(), "two.yaml", None).expect("run").ok());
    let store = Store::open(&d.path().join(".msmae")).expect("store");
    let one = msmae_tests::lock_digests(&d.path().join("one.lock"));
    // The lock file is briefly away (a checkout switching branches, a restore in progress).
    fs::rename(d.path().join("one.lock"), d.path().join("away")).expect("move");
    let dry = inspect::gc(&store, true, true, &[], true).expect("dry gc");
    assert_eq!((dry.objects, dry.index_entries), (0, 0), "{dry:?}");
    assert_eq!(dry.missing_roots.len(), 1, "the missing lock file is reported: {dry:?}");
    // The other pipeline's pruning gc leaves its artifacts alone.
    let real = inspect::gc(&store, true, false, &[&d.path().join("two.lock")], true).expect("gc");
    assert_eq!(real.objects, 0, "{real:?}");
    for (_, digest) in &one {
        assert!(store.has_object(digest), "{digest} was kept");
    }
    fs::rename(d.path().join("away"), d.path().join("one.lock")).expect("restore");
    let (checked, bad) =
        inspect::verify(&store, &msmae_pipeline::LockFile::read(&d.path().join("one.lock"), "one").expect("lock"))
            .expect("verify");
    assert!(bad.is_empty() && checked == 2, "{bad:?}");
    // A cached run registers its root again, even when the root record was lost.
    for r in store.roots().expect("roots") {
        fs::remove_file(&r.record).expect("rm");
    }
    assert!(run_pipeline(d.path(), "one.yaml", None).expect("run").stages.iter().all(|s| s.outcome == Outcome::Cached));
    assert_eq!(store.roots().expect("roots").len(), 1, "only the pipeline that ran registered itself");
    // Forgetting is explicit, and only then does a pruning gc remove what it referenced.
    fs::remove_file(d.path().join("one.lock")).expect("rm");
    assert!(store.forget_root(&d.path().join("one.lock")).expect("forget"));
    let after = inspect::gc(&store, true, false, &[], true).expect("gc");
    assert!(after.objects >= 2, "{after:?}");
    assert!(one.iter().all(|(_, dg)| !store.has_object(dg)));
}

#[test]
fn a_lock_file_belongs_to_one_pipeline_file() {
    let d = tempfile::tempdir().expect("tmp");
    fs::write(d.path().join("a.yaml"), source_pipeline("a", "first")).expect("write");
    fs::write(d.path().join("a.yml"), source_pipeline("a", "second")).expect("write");
    assert!(run_pipeline(d.path(), "a.yaml", None).expect("run").ok());
    let before = fs::read_to_string(d.path().join("a.lock")).expect("lock");
    assert!(before.contains("pipeline_file: a.yaml"), "{before}");
    // a.yml defaults to the same a.lock: refused, naming both and the fix.
    let e = run_pipeline(d.path(), "a.yml", None).expect_err("refused").to_string();
    assert!(
        e.contains("belongs to pipeline") && e.contains("a.yaml") && e.contains("a.yml") && e.contains("--lock"),
        "{e}"
    );
    assert_eq!(fs::read_to_string(d.path().join("a.lock")).expect("lock"), before, "the lock file is untouched");
    // A shared --lock likewise; its own lock file works.
    fs::create_dir_all(d.path().join("sub")).expect("mkdir");
    fs::write(d.path().join("sub/b.yaml"), source_pipeline("b", "third")).expect("write");
    assert!(run_pipeline(d.path(), "sub/b.yaml", Some(&d.path().join("a.lock"))).is_err());
    assert!(run_pipeline(d.path(), "a.yml", Some(&d.path().join("a.yml.lock"))).expect("run").ok());
    // A renamed pipeline file takes its lock file over (the recorded one no longer exists).
    fs::rename(d.path().join("a.yaml"), d.path().join("renamed.yaml")).expect("mv");
    assert!(run_pipeline(d.path(), "renamed.yaml", Some(&d.path().join("a.lock"))).expect("run").ok());
    assert!(fs::read_to_string(d.path().join("a.lock")).expect("lock").contains("pipeline_file: renamed.yaml"));
}

#[test]
fn report_never_overwrites_the_pipeline_a_lock_file_the_store_or_a_foreign_file() {
    let d = tempfile::tempdir().expect("tmp");
    fs::write(d.path().join("p.yaml"), TINY).expect("write");
    assert!(msmae(d.path(), &["run", "p.yaml"]).status.success());
    fs::write(d.path().join("notes.html"), "<html>mine</html>").expect("write");
    let object =
        msmae_tests::artifact_dir(&d.path().join(".msmae"), &d.path().join("p.lock"), "data").join("split_report.json");
    let object_s = object.to_string_lossy().into_owned();
    let guarded = [
        ("p.yaml", "pipeline file"),
        ("p.lock", "lock file"),
        ("notes.html", "not a report msmae wrote"),
        (object_s.as_str(), "inside the artifact store"),
    ];
    for (target, why) in guarded {
        let before = fs::read(d.path().join(target)).expect("read");
        let o = msmae(d.path(), &["report", "p.yaml", "-o", target]);
        assert!(!o.status.success() && text(&o).contains(why), "{target}: {}", text(&o));
        assert_eq!(fs::read(d.path().join(target)).expect("read"), before, "{target} unchanged");
    }
    // A new file, and then its own report again, are written.
    for _ in 0..2 {
        let o = msmae(d.path(), &["report", "p.yaml", "-o", "out.html"]);
        assert!(o.status.success(), "{}", text(&o));
    }
    // Another pipeline file that defaults to the same lock file: inspecting it is refused.
    fs::write(d.path().join("p.yml"), TINY.replace("images: 40", "images: 41")).expect("write");
    for cmd in ["status", "show", "report"] {
        let o = msmae(d.path(), &[cmd, "p.yml"]);
        assert!(
            !o.status.success() && text(&o).contains("belongs to pipeline") && text(&o).contains("--lock"),
            "{cmd}: {}",
            text(&o)
        );
    }
}

#[test]
fn bounds_on_jobs_nesting_names_params_counts_and_encodings() {
    let d = tempfile::tempdir().expect("tmp");
    fs::write(
        d.path().join("p.yaml"),
        "name: p\nparams: { size: 32 }\nstages:\n  data: { uses: ingest/synthetic, with: { images: 40, size: '${params.size}' } }\n",
    )
    .expect("write");
    let code = |o: &Output| o.status.code().unwrap_or(-1);
    let o = msmae(d.path(), &["run", "p.yaml", "--jobs", "100000"]);
    assert_eq!(code(&o), 2, "{}", text(&o));
    assert!(text(&o).contains("--jobs 100000"), "{}", text(&o));
    let o = msmae(d.path(), &["run", "p.yaml", "--set", "params.sise=64", "--dry-run"]);
    assert_eq!(code(&o), 2, "{}", text(&o));
    assert!(text(&o).contains("did you mean `params.size`"), "{}", text(&o));
    fs::write(d.path().join("deep.yaml"), format!("stages: {}{}\n", "[".repeat(100_000), "]".repeat(100_000)))
        .expect("write");
    let t = std::time::Instant::now();
    let o = msmae(d.path(), &["run", "deep.yaml", "--dry-run"]);
    assert_eq!(code(&o), 2, "{}", text(&o));
    assert!(text(&o).contains("levels deep"), "{}", text(&o));
    assert!(t.elapsed().as_secs() < 20, "refused before parsing");
    fs::write(d.path().join("latin1.yaml"), b"name: caf\xe9\nstages: {}\n").expect("write");
    let o = msmae(d.path(), &["run", "latin1.yaml"]);
    assert_eq!(code(&o), 2, "{}", text(&o));
    assert!(text(&o).contains("not UTF-8"), "{}", text(&o));
    fs::write(
        d.path().join("huge.yaml"),
        "name: h\nstages:\n  data: { uses: ingest/synthetic, with: { images: 1000000000 } }\n",
    )
    .expect("write");
    let o = msmae(d.path(), &["run", "huge.yaml"]);
    assert_eq!(code(&o), 2, "{}", text(&o));
    assert!(text(&o).contains("images"), "{}", text(&o));
    fs::write(
        d.path().join("abs.yaml"),
        "name: /tmp/escape\nstages:\n  data: { uses: ingest/synthetic, with: { images: 40 } }\n",
    )
    .expect("write");
    let o = msmae(d.path(), &["run", "abs.yaml", "--tensorboard", "tb"]);
    assert_eq!(code(&o), 2, "an absolute pipeline name is refused (it names folders): {}", text(&o));
}

/// A FIFO or a link to a device in an image folder is a reject naming the file, found before
/// anything reads it (a FIFO would block forever, /dev/zero never ends).
#[test]
fn non_regular_files_in_an_image_folder_are_rejects() {
    let d = tempfile::tempdir().expect("tmp");
    let root = d.path().join("imgs");
    for class in ["a", "b"] {
        fs::create_dir_all(root.join(class)).expect("mkdir");
        for i in 0..6 {
            image::GrayImage::from_fn(24, 24, |x, y| image::Luma([((x * 7 + y * 3 + i) % 255) as u8]))
                .save(root.join(class).join(format!("{i}.png")))
                .expect("png");
        }
    }
    let fifo = root.join("a/x.png");
    let status = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(status.success());
    std::os::unix::fs::symlink("/dev/zero", root.join("b/zero.png")).expect("symlink");
    fs::write(d.path().join("p.yaml"), "name: p\nstages:\n  data: { uses: ingest/imagefolder, with: { root: imgs, size: 16, channels: 1, on_error: skip } }\n")
        .expect("write");
    let t = std::time::Instant::now();
    let o = msmae(d.path(), &["run", "p.yaml"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(t.elapsed().as_secs() < 120);
    let rejects = fs::read_to_string(
        msmae_tests::artifact_dir(&d.path().join(".msmae"), &d.path().join("p.lock"), "data").join("rejects.json"),
    )
    .expect("rejects");
    assert!(rejects.contains("x.png") && rejects.contains("FIFO"), "{rejects}");
    assert!(rejects.contains("zero.png") && rejects.contains("device"), "{rejects}");
    // Without `skip` the run stops naming the file.
    fs::write(
        d.path().join("q.yaml"),
        "name: q\nstages:\n  data: { uses: ingest/imagefolder, with: { root: imgs, size: 16, channels: 1 } }\n",
    )
    .expect("write");
    let o = msmae(d.path(), &["run", "q.yaml"]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("x.png") || text(&o).contains("zero.png"), "{}", text(&o));
}

/// The operations of the model-based gc test.
#[derive(Debug, Clone)]
enum Op {
    /// Run pipeline 0 or 1 with one of three values (three different artifact sets).
    Run(usize, u8),
    Gc {
        prune: bool,
        dry_run: bool,
    },
    /// Move a pipeline's lock file away (as a branch switch or a restore would).
    Hide(usize),
    Restore(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..2usize, 0..3u8).prop_map(|(p, v)| Op::Run(p, v)),
        3 => (any::<bool>(), any::<bool>()).prop_map(|(prune, dry_run)| Op::Gc { prune, dry_run }),
        1 => (0..2usize).prop_map(Op::Hide),
        1 => (0..2usize).prop_map(Op::Restore),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// After every step of a random sequence, every artifact that any lock file references
    /// — in place or moved away and not yet superseded — is in the store.
    #[test]
    fn gc_never_deletes_what_a_lock_file_references(ops in prop::collection::vec(op(), 1..14)) {
        let d = tempfile::tempdir().expect("tmp");
        let names = ["one", "two"];
        let lock = |p: usize| d.path().join(format!("{}.lock", names[p]));
        let away = |p: usize| d.path().join(format!("{}.away", names[p]));
        let mut hidden: BTreeMap<usize, PathBuf> = BTreeMap::new();
        for op in &ops {
            match op {
                Op::Run(p, v) => {
                    fs::write(d.path().join(format!("{}.yaml", names[*p])), source_pipeline(names[*p], &format!("v{v}"))).expect("write");
                    let r = run_pipeline(d.path(), &format!("{}.yaml", names[*p]), None).expect("run");
                    prop_assert!(r.ok());
                    // A new lock file now stands where the hidden one was: that copy is superseded.
                    if hidden.remove(p).is_some() {
                        let _ = fs::remove_file(away(*p));
                    }
                }
                Op::Gc { prune, dry_run } => {
                    let store = Store::open(&d.path().join(".msmae")).expect("store");
                    inspect::gc(&store, *prune, *dry_run, &[], true).expect("gc");
                }
                Op::Hide(p) => {
                    if lock(*p).exists() && !hidden.contains_key(p) {
                        fs::rename(lock(*p), away(*p)).expect("hide");
                        hidden.insert(*p, away(*p));
                    }
                }
                Op::Restore(p) => {
                    if let Some(a) = hidden.remove(p) {
                        fs::rename(a, lock(*p)).expect("restore");
                    }
                }
            }
            let store = Store::open(&d.path().join(".msmae")).expect("store");
            let mut referencing: Vec<PathBuf> = (0..2).map(lock).filter(|p| p.exists()).collect();
            referencing.extend(hidden.values().cloned());
            for lf in referencing {
                for (stage, digest) in msmae_tests::lock_digests(&lf) {
                    prop_assert!(store.has_object(&digest), "after {:?}: {} references {stage}@{} which is gone", op, lf.display(), &digest[..12]);
                }
            }
        }
    }
}
