//! Seeing the results of a run through the real binary: `msmae show` (every format, stale
//! stages marked, `--against` a lock file and a git revision), `msmae path`, `msmae
//! report` opened in a real headless browser (Debian's chromium: no console errors, no
//! broken images, every section present, a screenshot), and the TensorBoard event files of
//! `--tensorboard` read back by the `tensorboard` package's own reader.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn msmae(dir: &Path) -> Command {
    let mut c = Command::new(msmae_tests::msmae_bin());
    c.current_dir(dir).env_remove("MSMAE_STORE").env_remove("MSMAE_DEVICE").env_remove("MSMAE_TENSORBOARD");
    c
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn ok(c: &mut Command) -> String {
    let o = c.output().expect("spawn msmae");
    assert!(o.status.success(), "{c:?} failed: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn json_file(p: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A run of the tiny study with TensorBoard logging on (per step too).
fn study(d: &Path) {
    fs::write(d.join("tinystudy.yaml"), msmae_tests::tiny_study()).expect("write");
    ok(msmae(d).args(["run", "tinystudy.yaml", "--tensorboard", "tb"]).env("MSMAE_TENSORBOARD_STEPS", "1"));
}

#[test]
fn show_and_path_read_results_from_the_lock_file_without_running() {
    let d = tempfile::tempdir().expect("tmp");
    study(d.path());
    let store = d.path().join(".msmae");
    let lock = d.path().join("tinystudy.lock");

    // Text: the comparison table, every stage that declares results, all current.
    let t = ok(msmae(d.path()).args(["show", "tinystudy.yaml"]));
    for s in [
        "comparison of `report`",
        "eval-msmae",
        "eval-mae",
        "lesion_coverage",
        "dice",
        "reconstruction_loss",
        "accuracy",
    ] {
        assert!(t.contains(s), "`{s}` in:\n{t}");
    }
    assert!(!t.contains("STALE") && !t.contains("not current"), "{t}");
    assert!(!t.contains("\ndata "), "stages that declare no results are left out without a filter:\n{t}");

    // JSON: the numbers are the artifacts' own.
    let j: serde_json::Value =
        serde_json::from_str(&ok(msmae(d.path()).args(["show", "tinystudy.yaml", "--format", "json"]))).expect("json");
    let stages = j["stages"].as_array().expect("stages");
    let eval = stages.iter().find(|s| s["name"] == "eval-msmae").expect("eval-msmae");
    let metrics = json_file(&msmae_tests::artifact_dir(&store, &lock, "eval-msmae").join("metrics.json"));
    let acc = eval["metrics"].as_array().and_then(|m| m.iter().find(|x| x[0] == "accuracy")).map(|x| x[1].clone());
    assert_eq!(acc, Some(metrics["accuracy"].clone()));
    assert_eq!(eval["state"], "up to date");
    let seg = stages.iter().find(|s| s["name"] == "seg").expect("seg");
    let seg_metrics = json_file(&msmae_tests::artifact_dir(&store, &lock, "seg").join("metrics.json"));
    assert!(
        seg["metrics"].as_array().is_some_and(|m| m.iter().any(|x| x[0] == "dice" && x[1] == seg_metrics["dice"])),
        "{seg}"
    );
    let attn = stages.iter().find(|s| s["name"] == "attn").expect("attn");
    assert!(attn["metrics"].as_array().is_some_and(|m| m.iter().any(|x| x[0] == "lesion_coverage")), "{attn}");

    // Named stages only, in CSV and Markdown.
    let c = ok(msmae(d.path()).args(["show", "tinystudy.yaml", "eval-mae", "seg", "--format", "csv"]));
    assert!(
        c.starts_with("stage,kind,state,metric,value\n") && c.contains("eval-mae,eval/classify,up to date,accuracy,"),
        "{c}"
    );
    assert!(!c.contains("eval-msmae"), "{c}");
    let m = ok(msmae(d.path()).args(["show", "tinystudy.yaml", "report", "--format", "md"]));
    assert!(m.contains("| stage") && m.contains("|--") && m.contains("| eval-msmae"), "{m}");
    let bad = msmae(d.path()).args(["show", "tinystudy.yaml", "nope"]).output().expect("show");
    assert!(!bad.status.success() && text(&bad).contains("unknown stage `nope`"), "{}", text(&bad));

    // `path`: the artifact directory, for scripts.
    let p = PathBuf::from(ok(msmae(d.path()).args(["path", "tinystudy.yaml", "attn"])).trim());
    assert_eq!(p, msmae_tests::artifact_dir(&store, &lock, "attn").canonicalize().expect("canonical"));
    assert!(fs::read_dir(p.join("overlays")).expect("overlays").count() > 0);

    // The lock file as it is now, kept and committed for `--against`.
    fs::copy(&lock, d.path().join("before.lock")).expect("copy");
    let git = |args: &[&str]| {
        let o = Command::new("git").current_dir(d.path()).args(args).output().expect("git");
        assert!(o.status.success(), "git {args:?}: {}", text(&o));
    };
    git(&["init", "-q"]);
    git(&["-c", "user.email=t@example.org", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "empty"]);
    git(&["add", "tinystudy.lock"]);
    git(&["-c", "user.email=t@example.org", "-c", "user.name=t", "commit", "-q", "-m", "results"]);

    // A changed pipeline: ft-msmae and what follows it are stale, and shown as such.
    let changed = msmae_tests::tiny_study().replace(
        "ft-msmae: { uses: finetune/msmae, needs: [pretrain, data], with: { epochs: 2,",
        "ft-msmae: { uses: finetune/msmae, needs: [pretrain, data], with: { epochs: 3,",
    );
    assert_ne!(changed, msmae_tests::tiny_study());
    fs::write(d.path().join("tinystudy.yaml"), &changed).expect("write");
    let t = ok(msmae(d.path()).args(["show", "tinystudy.yaml"]));
    let line = |name: &str| t.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_default().to_string();
    assert!(line("ft-msmae").contains("STALE (recorded results shown)"), "{t}");
    assert!(line("eval-msmae").contains("WAITING"), "{t}");
    assert!(line("eval-mae").contains("up to date"), "{t}");
    assert!(t.contains("not current") && t.contains("ft-msmae: "), "{t}");
    let note = msmae(d.path()).args(["path", "tinystudy.yaml", "ft-msmae"]).output().expect("path");
    assert!(note.status.success() && text(&note).contains("note: `ft-msmae` is stale"), "{}", text(&note));

    // Re-run, then compare with the kept lock file and with the committed one.
    ok(msmae(d.path()).args(["run", "tinystudy.yaml"]));
    for against in ["before.lock", "HEAD"] {
        let t = ok(msmae(d.path()).args(["show", "tinystudy.yaml", "--against", against]));
        assert!(
            t.lines().next().is_some_and(|h| h.contains("stage") && h.contains("current") && h.contains("delta")),
            "{t}"
        );
        let epochs = t.lines().find(|l| l.starts_with("ft-msmae ") && l.contains(" epochs ")).unwrap_or_default();
        assert!(
            epochs.contains(" 2 ") && epochs.contains(" 3 ") && epochs.contains("+1.0000"),
            "ft-msmae trained one epoch more ({against}):\n{t}"
        );
        let same = t.lines().find(|l| l.starts_with("ft-mae ") && l.contains("train_loss")).unwrap_or_default();
        assert!(same.contains("+0.0000"), "ft-mae did not change ({against}):\n{t}");
    }
    let c = ok(msmae(d.path()).args(["show", "tinystudy.yaml", "--against", "HEAD", "--format", "csv"]));
    assert!(c.starts_with("stage,metric,HEAD:tinystudy.lock,current,delta\n"), "{c}");
    let bad = msmae(d.path()).args(["show", "tinystudy.yaml", "--against", "no-such-rev"]).output().expect("show");
    assert!(!bad.status.success() && text(&bad).contains("neither a lock file nor a git revision"), "{}", text(&bad));
}

fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser", "google-chrome"].iter().find_map(|b| {
        std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join(b)).find(|f| f.is_file()))
    })
}

fn headless(chrome: &Path) -> Command {
    let mut c = Command::new(chrome);
    c.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--hide-scrollbars",
    ]);
    c
}

#[test]
#[cfg_attr(
    not(feature = "browser"),
    ignore = "needs Debian's chromium, which was not on the PATH when the suite was built: `cargo xtask setup --system` installs it (as root)"
)]
fn the_report_page_loads_in_a_headless_browser_without_errors_or_broken_images() {
    let d = tempfile::tempdir().expect("tmp");
    study(d.path());
    let page = d.path().join("out/report.html");
    fs::create_dir_all(page.parent().expect("dir")).expect("mkdir");
    let said = ok(msmae(d.path()).args(["report", "tinystudy.yaml", "-o", "out/report.html"]));
    assert!(said.contains("report.html"), "{said}");
    let html = fs::read_to_string(&page).expect("page");
    for id in ["summary", "dag", "stages", "figures", "provenance"] {
        assert!(html.contains(&format!("<section id=\"{id}\">")), "section {id}");
    }
    // Self-contained: nothing is fetched from anywhere.
    assert!(
        !html.contains("http://")
            || html.matches("http://").all(|_| html.contains("xmlns=\"http://www.w3.org/2000/svg\""))
    );
    assert!(
        !html.contains("https://") && !html.contains("src=\"/") && !html.contains("src=\"file:"),
        "only embedded resources"
    );
    // Every declared figure kind is embedded.
    for caption in [
        "ROC curves",
        "confusion matrix",
        "attention overlays",
        "reconstructions",
        "loss per epoch",
        "test predictions",
        "accuracy per epoch",
    ] {
        assert!(html.contains(caption), "figure `{caption}` in the report");
    }

    let Some(chrome) = chromium() else {
        panic!("no chromium on PATH although the suite was built with it: `cargo xtask setup --system` installs it");
    };
    let url = format!("file://{}", page.display());
    let dom = headless(&chrome).args(["--virtual-time-budget=5000", "--dump-dom", &url]).output().expect("chromium");
    let dom_text = String::from_utf8_lossy(&dom.stdout).into_owned();
    assert!(dom.status.success(), "chromium failed: {}", text(&dom));
    let attr = |name: &str| -> String {
        let key = format!("{name}=\"");
        dom_text
            .split_once(&key)
            .and_then(|(_, rest)| rest.split_once('"'))
            .map(|(v, _)| v.to_string())
            .unwrap_or_default()
    };
    assert_eq!(attr("data-ready"), "1", "the page's load handler ran:\n{}", &dom_text[..dom_text.len().min(2000)]);
    assert_eq!(attr("data-errors"), "0", "script errors: {}", attr("data-error-text"));
    assert_eq!(attr("data-broken-images"), "0", "broken images");
    let images: usize = attr("data-images").parse().expect("image count");
    assert!(images >= 10, "{images} images");
    assert!(!text(&dom).contains("Uncaught"), "console: {}", text(&dom));

    // A screenshot of the top of the page: it renders (not blank) at the asked size.
    let shot = d.path().join("out/report.png");
    let o = headless(&chrome)
        .args(["--window-size=1280,1800", &format!("--screenshot={}", shot.display()), &url])
        .output()
        .expect("chromium");
    assert!(o.status.success() && shot.is_file(), "screenshot: {}", text(&o));
    let img = image::open(&shot).expect("a PNG").to_rgb8();
    assert_eq!((img.width(), img.height()), (1280, 1800));
    let distinct: std::collections::BTreeSet<[u8; 3]> = img.pixels().step_by(97).map(|p| p.0).collect();
    assert!(distinct.len() > 20, "the screenshot shows content ({} distinct colours sampled)", distinct.len());
}

#[test]
fn tensorboard_reads_back_the_scalars_of_every_training_stage() {
    let d = tempfile::tempdir().expect("tmp");
    study(d.path());
    let py = std::env::var_os("MSMAE_PYTHON").expect("MSMAE_PYTHON (run the suite with `cargo xtask test`)");
    let script = r#"
import json, sys, os
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
out = {}
root = sys.argv[1]
for run in sorted(os.listdir(root)):
    ea = EventAccumulator(os.path.join(root, run), size_guidance={"scalars": 0})
    ea.Reload()
    out[run] = {t: [[e.step, e.value] for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}
print(json.dumps(out))
"#;
    let o = Command::new(py).args(["-c", script]).arg(d.path().join("tb/tinystudy")).output().expect("python");
    assert!(o.status.success(), "tensorboard reader: {}", text(&o));
    let runs: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let store = d.path().join(".msmae");
    let lock = d.path().join("tinystudy.lock");
    for stage in ["supervised", "pretrain", "mae", "ft-msmae", "ft-mae", "seg", "rounds.1.pretrain"] {
        let r = &runs[stage];
        assert!(r.is_object(), "a run directory for `{stage}`: {runs}");
        let history = json_file(&msmae_tests::artifact_dir(&store, &lock, stage).join("history.json"));
        let epochs = history["epochs"].as_array().expect("epochs");
        let loss = r["loss/train"].as_array().unwrap_or_else(|| panic!("{stage}: loss/train in {r}"));
        assert_eq!(loss.len(), epochs.len(), "{stage}: one point per epoch");
        for (p, e) in loss.iter().zip(epochs) {
            let (step, v, want) = (
                p[0].as_i64().unwrap_or(-1),
                p[1].as_f64().unwrap_or(f64::NAN),
                e["train_loss"].as_f64().unwrap_or(f64::NAN),
            );
            assert_eq!(step, e["epoch"].as_i64().unwrap_or(-2) + 1, "{stage}: epochs counted from 1");
            assert!((v - want).abs() <= 1e-6 * want.abs().max(1.0), "{stage}: {v} vs history {want}");
        }
        assert!(
            r["lr"].is_array() && r["step/loss"].as_array().is_some_and(|s| s.len() >= epochs.len()),
            "{stage}: lr and per-step loss: {r}"
        );
    }
    assert!(runs["supervised"]["val/accuracy"].is_array(), "{}", runs["supervised"]);
    assert!(runs["pretrain"]["loss/reconstruction"].is_array(), "{}", runs["pretrain"]);
    // Logs live outside the artifacts: re-running a stage without them reproduces its
    // artifact bit for bit.
    let again = ok(msmae(d.path()).args(["run", "tinystudy.yaml", "--stage", "supervised"]));
    assert!(again.contains("ran (output unchanged)"), "{again}");
}

/// The shipped pipelines that need no data folder plan as they stand (every `with:` block
/// checked against its stage's typed config, every `needs` bound): the quickstart, the
/// attention study (setting × method × smoothing), the ablations, whose report takes the
/// three seeds of its seven evals through `seeds.*.…`, and the guided-masking study (five
/// seeds of five evals).
#[test]
fn the_self_contained_shipped_pipelines_plan() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for name in ["quickstart", "attention", "ablation", "guided"] {
        let o = Command::new(msmae_tests::msmae_bin())
            .arg("dag")
            .arg(root.join("pipelines").join(format!("{name}.yaml")))
            .output()
            .expect("run msmae");
        let t = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        assert!(o.status.success(), "{name}: {t}");
        if name == "ablation" {
            let report = t.lines().find(|l| l.starts_with("report ")).unwrap_or_else(|| panic!("no report stage: {t}"));
            assert_eq!(report.matches("metrics=").count(), 21, "{report}");
            assert!(report.contains("metrics=seeds.3.eval-vis-highest"), "{report}");
        }
        if name == "guided" {
            let report = t.lines().find(|l| l.starts_with("report ")).unwrap_or_else(|| panic!("no report stage: {t}"));
            assert_eq!(report.matches("metrics=").count(), 25, "{report}");
            assert!(report.contains("metrics=seeds.5.eval-msmae-highest"), "{report}");
        }
        if name == "attention" {
            assert_eq!(t.lines().filter(|l| l.contains("attention/extract")).count(), 63, "{t}");
        }
    }
}
