//! Training failures through the real binary: a diverging loss stops the stage naming the
//! epoch and step, commits nothing and keeps the last checkpoint; SIGINT in the middle of a
//! stage commits nothing, removes the staging and exits with code 1.

use std::fs;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn msmae(dir: &Path) -> Command {
    let mut c = Command::new(msmae_tests::msmae_bin());
    c.current_dir(dir).env_remove("MSMAE_STORE").env_remove("MSMAE_DEVICE");
    c
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn pipeline(stage: &str) -> String {
    format!(
        "name: f\nseed: 4\nstages:\n  data: {{ uses: ingest/synthetic, with: {{ images: 256, size: 32, previews: 1 }} }}\n  train: {{ uses: finetune/full, needs: [data], with: {{ model: {}, batch_size: 16, warmup_epochs: 0, checkpoint_every: 1, {stage} }} }}\n",
        msmae_tests::TINY_MODEL
    )
}

fn staging_left(dir: &Path) -> Vec<String> {
    fs::read_dir(dir.join(".msmae/tmp"))
        .map(|r| r.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

#[test]
fn a_diverging_loss_stops_the_stage_by_epoch_and_step_and_commits_nothing() {
    let d = tempfile::tempdir().expect("tmp");
    // A learning rate of 1e7 (blr · 16 / 256) sends the loss to infinity within a few steps.
    fs::write(d.path().join("f.yaml"), pipeline("epochs: 5, blr: 1.6e8")).expect("write");
    let o = msmae(d.path()).args(["run", "f.yaml"]).output().expect("run");
    let said = text(&o);
    assert_eq!(o.status.code(), Some(1), "{said}");
    assert!(
        said.contains("training diverged at epoch")
            && said.contains(", step ")
            && said.contains("lower the learning rate"),
        "{said}"
    );
    let lock = fs::read_to_string(d.path().join("f.lock")).unwrap_or_default();
    assert!(
        lock.contains("name: data") && !lock.contains("name: train"),
        "nothing of the diverged stage is recorded: {lock}"
    );
    assert!(staging_left(d.path()).is_empty(), "{:?}", staging_left(d.path()));
}

#[test]
fn sigint_mid_stage_commits_nothing_and_exits_1() {
    let d = tempfile::tempdir().expect("tmp");
    fs::write(d.path().join("f.yaml"), pipeline("epochs: 500")).expect("write");
    let mut child =
        msmae(d.path()).args(["run", "f.yaml"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    // Interrupt once training has checkpointed an epoch.
    let resume = d.path().join(".msmae/resume");
    let t = Instant::now();
    while !fs::read_dir(&resume)
        .ok()
        .and_then(|mut r| r.next())
        .and_then(Result::ok)
        .is_some_and(|e| e.path().join("state.json").is_file())
    {
        assert!(t.elapsed() < Duration::from_secs(120), "no checkpoint appeared");
        assert!(child.try_wait().expect("wait").is_none(), "the run ended early");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(Command::new("kill").args(["-INT", &child.id().to_string()]).status().expect("kill").success());
    let out = child.wait_with_output().expect("ends");
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("interrupt") && said.contains("cancelled"), "{said}");
    let lock = fs::read_to_string(d.path().join("f.lock")).unwrap_or_default();
    assert!(lock.contains("name: data") && !lock.contains("name: train"), "{lock}");
    assert!(staging_left(d.path()).is_empty(), "the stage's staging is removed: {:?}", staging_left(d.path()));
    assert!(fs::read_dir(&resume).map(|r| r.count()).unwrap_or(0) == 1, "the checkpoint to resume from is kept");
}
