//! Read-only and full disks, for real: the store lives on a tmpfs mounted by the test (as
//! root), remounted read-only or too small. A fully cached run and the inspection commands
//! work on a read-only store, and computing there fails naming it; a stage that fills the
//! disk fails naming the store and what it had written, leaves no partial object, and the
//! next run with space completes.
//!
//! Where mounting is impossible (not root, no CAP_SYS_ADMIN) the tests say so on stderr
//! and pass without checking anything.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn msmae(dir: &Path, store: &Path) -> Command {
    let mut c = Command::new(msmae_tests::msmae_bin());
    c.current_dir(dir).env("MSMAE_STORE", store).env_remove("MSMAE_DEVICE");
    c
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// A tmpfs mounted for the test; unmounted on drop (also when the test fails).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Option<Self> {
        fs::create_dir_all(at).expect("mount point");
        let o = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(at).output();
        match o {
            Ok(o) if o.status.success() => Some(Self(at.to_path_buf())),
            Ok(o) => {
                eprintln!(
                    "SKIPPED: cannot mount a tmpfs here ({}); the read-only and full-disk tests need root with CAP_SYS_ADMIN",
                    text(&o).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("SKIPPED: no `mount` command ({e})");
                None
            }
        }
    }
    fn remount(&self, opts: &str) {
        let o = Command::new("mount").args(["-o", &format!("remount,{opts}")]).arg(&self.0).output().expect("mount");
        assert!(o.status.success(), "remount {opts}: {}", text(&o));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn pipeline(images: u32, size: u32) -> String {
    format!(
        "name: d\nseed: 3\nstages:\n  data: {{ uses: ingest/synthetic, with: {{ images: {images}, size: {size}, previews: 1 }} }}\n  train: {{ uses: finetune/full, needs: [data], with: {{ model: {}, batch_size: 16, epochs: 1, warmup_epochs: 0 }} }}\n",
        msmae_tests::TINY_MODEL
    )
}

fn entries(p: &Path) -> Vec<String> {
    fs::read_dir(p)
        .map(|r| r.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

#[test]
fn a_read_only_store_serves_cached_runs_and_inspection_and_refuses_to_compute() {
    let d = tempfile::tempdir().expect("tmp");
    let Some(mnt) = Tmpfs::mount(&d.path().join("store"), "64m") else { return };
    fs::write(d.path().join("d.yaml"), pipeline(128, 32)).expect("write");
    let first = msmae(d.path(), &mnt.0).args(["run", "d.yaml"]).output().expect("run");
    assert!(first.status.success(), "{}", text(&first));
    // Stored artifacts are read-only, directories included.
    let art = msmae_tests::artifact_dir(&mnt.0, &d.path().join("d.lock"), "train");
    let mode = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(p).expect("stat").permissions().mode() & 0o777
    };
    assert_eq!(mode(&art), 0o555, "{}", art.display());
    assert!(entries(&art).iter().all(|f| !art.join(f).is_file() || mode(&art.join(f)) == 0o444));

    mnt.remount("ro");
    let cached = msmae(d.path(), &mnt.0).args(["run", "d.yaml"]).output().expect("run");
    let said = text(&cached);
    assert!(cached.status.success(), "a fully cached run works on a read-only store: {said}");
    assert!(said.contains("0 ran, 2 cached"), "{said}");
    for args in [
        vec!["status", "d.yaml"],
        vec!["why", "d.yaml", "train"],
        vec!["dag", "d.yaml"],
        vec!["verify", "d.yaml"],
        vec!["show", "d.yaml"],
        vec!["report", "d.yaml"],
    ] {
        let o = msmae(d.path(), &mnt.0).args(&args).output().expect("inspect");
        assert!(o.status.success(), "`msmae {}` on a read-only store: {}", args.join(" "), text(&o));
    }
    let st = text(&msmae(d.path(), &mnt.0).args(["status", "d.yaml"]).output().expect("status"));
    assert!(st.lines().filter(|l| l.contains("up to date")).count() == 2, "{st}");

    // Computing needs the store writable, and says so naming it.
    let forced = msmae(d.path(), &mnt.0).args(["run", "d.yaml", "--stage", "train"]).output().expect("run");
    let said = text(&forced);
    assert_eq!(forced.status.code(), Some(1), "{said}");
    assert!(said.contains("is read-only") && said.contains(&*mnt.0.to_string_lossy()), "{said}");
    let gc = msmae(d.path(), &mnt.0).args(["gc", "d.yaml", "--no-wait"]).output().expect("gc");
    assert!(!gc.status.success() && text(&gc).contains("read-only"), "{}", text(&gc));

    // Writable again, the same store goes on as before.
    mnt.remount("rw");
    let again = msmae(d.path(), &mnt.0).args(["run", "d.yaml", "--stage", "train"]).output().expect("run");
    assert!(again.status.success(), "{}", text(&again));
}

#[test]
fn a_full_store_fails_the_stage_naming_the_store_and_the_next_run_completes() {
    let d = tempfile::tempdir().expect("tmp");
    let Some(mnt) = Tmpfs::mount(&d.path().join("store"), "768k") else { return };
    // ≈ 4000 × 64 × 64 × 3 bytes of pixels: far more than 768 KiB.
    fs::write(d.path().join("d.yaml"), pipeline(4000, 64)).expect("write");
    let full = msmae(d.path(), &mnt.0).args(["run", "d.yaml", "--until", "data"]).output().expect("run");
    let said = text(&full);
    assert_eq!(full.status.code(), Some(1), "{said}");
    assert!(
        said.contains("the artifact store") && said.contains("is full") && said.contains(&*mnt.0.to_string_lossy()),
        "{said}"
    );
    assert!(
        said.contains(" wrote ") && said.contains("KiB available there"),
        "names what it wrote and what was free: {said}"
    );
    assert!(entries(&mnt.0.join("tmp")).is_empty(), "no staging left: {:?}", entries(&mnt.0.join("tmp")));
    assert!(entries(&mnt.0.join("objects")).is_empty(), "no partial object: {:?}", entries(&mnt.0.join("objects")));
    assert!(!fs::read_to_string(d.path().join("d.lock")).unwrap_or_default().contains("name: data"));

    mnt.remount("size=256m");
    let ok = msmae(d.path(), &mnt.0).args(["run", "d.yaml", "--until", "data"]).output().expect("run");
    assert!(ok.status.success(), "with space the next run completes: {}", text(&ok));
    let v = msmae(d.path(), &mnt.0).args(["verify", "d.yaml"]).output().expect("verify");
    assert!(v.status.success(), "{}", text(&v));
}
