//! Progress without a terminal: a stage's loops write log lines (position, rate, the
//! training step's loss, learning rate and images/s, ETA) at the intervals
//! `MSMAE_PROGRESS_STEPS` / `MSMAE_PROGRESS_SECONDS` set, so Slurm jobs and CI logs show how
//! far a long stage is.

use std::fs;
use std::process::Command;

#[test]
fn stages_log_progress_lines_when_stderr_is_not_a_terminal() {
    let d = tempfile::tempdir().expect("tmp");
    let yaml = format!(
        "name: p\nseed: 2\nstages:\n  data: {{ uses: ingest/synthetic, with: {{ images: 200, size: 32, previews: 1, row_group: 16 }} }}\n  sup: {{ uses: attention/train-supervised, needs: [data], with: {{ model: {}, epochs: 2, batch_size: 8 }} }}\n  attn: {{ uses: attention/extract, needs: [sup, data], with: {{ batch_size: 8, overlays: 1 }} }}\n",
        msmae_tests::TINY_MODEL
    );
    fs::write(d.path().join("p.yaml"), yaml).expect("write");
    let o = Command::new(msmae_tests::msmae_bin())
        .current_dir(d.path())
        .args(["run", "p.yaml"])
        .env_remove("MSMAE_STORE")
        .env_remove("MSMAE_DEVICE")
        .env("MSMAE_PROGRESS_STEPS", "1")
        .env("MSMAE_PROGRESS_SECONDS", "0.06")
        .output()
        .expect("run msmae");
    let log = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{log}");
    let lines = |prefix: &str| log.lines().filter(|l| l.contains(prefix)).map(str::to_string).collect::<Vec<_>>();
    let steps = lines("sup: epoch 1/2: ");
    assert!(!steps.is_empty(), "training steps are logged:\n{log}");
    let s = &steps[0];
    for part in ["/", "%", "/s", "loss ", "lr ", "images/s", "ETA "] {
        assert!(s.contains(part), "`{part}` in a training progress line: {s}");
    }
    assert!(
        !lines("data: ").iter().filter(|l| l.contains("/200")).collect::<Vec<_>>().is_empty(),
        "ingestion is logged:\n{log}"
    );
    assert!(!lines("attn: attention maps: ").is_empty(), "attention extraction is logged:\n{log}");
    // Quiet by default: the same run at the default intervals logs no step lines (it is
    // over in seconds).
    let o = Command::new(msmae_tests::msmae_bin())
        .current_dir(d.path())
        .args(["run", "p.yaml", "--force"])
        .env_remove("MSMAE_STORE")
        .env_remove("MSMAE_DEVICE")
        .env_remove("MSMAE_PROGRESS_STEPS")
        .env_remove("MSMAE_PROGRESS_SECONDS")
        .output()
        .expect("run msmae");
    let quiet = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success() && !quiet.contains("images/s"), "{quiet}");
}
