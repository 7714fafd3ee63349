//! `cargo xtask bench study`: the quickstart study (synthetic lesion X-rays) under several
//! seeds — data, models and masks all change with the seed — and a table of what the issue
//! asks to see: lesion coverage of the top-25 % supervised-attention patches, test accuracy
//! / macro-F1 / macro-AUC of no pre-training vs MAE vs MSMAE (mean ± sd over seeds), and
//! fine-tuning wall time per epoch, full-token vs MSMAE (25 % of the tokens); and for every
//! pair of methods the paired difference over the seeds with its 95 % Student-t interval
//! (`msmae_eval::stats`: the seeds are the pairs).
//!
//! Flags: `--seeds a,b,c` (default 1,2,3,4,5), `--pipeline PATH` (default
//! pipelines/quickstart.yaml), `--store DIR` (default a temp dir, kept between seeds),
//! `--set params.k=v` (repeatable, passed through).

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let mut seeds: Vec<u64> = vec![1, 2, 3, 4, 5];
    let mut pipeline = PathBuf::from("pipelines/quickstart.yaml");
    let mut store: Option<PathBuf> = None;
    let mut sets: Vec<String> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--seeds" => seeds = args.next().unwrap_or_default().split(',').filter_map(|s| s.trim().parse().ok()).collect(),
            "--pipeline" => pipeline = args.next().map(PathBuf::from).unwrap_or(pipeline),
            "--store" => store = args.next().map(PathBuf::from),
            "--set" => sets.extend(args.next()),
            other => {
                eprintln!("unknown flag `{other}` (use --seeds, --pipeline, --store, --set)");
                std::process::exit(2);
            }
        }
    }
    let tmp = std::env::temp_dir().join(format!("msmae-bench-study-{}", std::process::id()));
    let store = store.unwrap_or(tmp);
    let exe = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().and_then(Path::parent).map(|d| d.join("msmae")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("msmae"));
    let lock = store.join("bench.lock");
    let mut rows: Vec<Row> = Vec::new();
    for &seed in &seeds {
        eprintln!("[bench study] seed {seed}: running {} …", pipeline.display());
        let mut c = Command::new(&exe);
        c.args(["run"]).arg(&pipeline).arg("--store").arg(&store).arg("--lock").arg(&lock).args(["--set", &format!("seed={seed}"), "-q"]);
        for s in &sets {
            c.args(["--set", s]);
        }
        let status = c.status().expect("run msmae");
        if !status.success() {
            eprintln!("[bench study] seed {seed} failed");
            std::process::exit(1);
        }
        let row = Row::read(seed, &store, &lock);
        // Each seed as it finishes (a long study that is stopped keeps what it measured).
        eprintln!("[bench study] seed {seed} done: {row:?}");
        rows.push(row);
    }
    print_table(&rows);
}

#[derive(Debug, Default)]
struct Row {
    seed: u64,
    coverage: f64,
    hit: f64,
    /// (accuracy, macro-F1, macro-AUC) of scratch, mae, msmae pre-training + full fine-tuning, msmae
    scores: [(f64, f64, f64); 4],
    /// the same, of the last epoch's model (where validation picked another, else equal)
    last: [(f64, f64, f64); 4],
    /// seconds per fine-tuning epoch (stage wall time / epochs): full, msmae
    epoch_seconds: [f64; 2],
    /// segmentation Dice (test images with lesions): MSMAE-pre-trained, random encoder;
    /// NaN when the pipeline has no segmentation branch
    dice: [f64; 2],
}

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

impl Row {
    fn read(seed: u64, store: &Path, lock: &Path) -> Row {
        let l: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(lock).expect("lock file")).expect("lock yaml");
        let stages = l.get("stages").and_then(|s| s.as_sequence()).cloned().unwrap_or_default();
        let stage = |name: &str| {
            stages
                .iter()
                .find(|s| s.get("name").and_then(|n| n.as_str()) == Some(name))
                .cloned()
                .unwrap_or_else(|| panic!("stage `{name}` not in the lock file"))
        };
        let dir = |name: &str| {
            let d = stage(name).get("output").and_then(|o| o.get("digest")).and_then(|d| d.as_str()).map(str::to_string).expect("digest");
            store.join("objects").join(&d[..2]).join(&d).join("data")
        };
        let attn = json(&dir("attn").join("summary.json"));
        let score = |name: &str| {
            let m = json(&dir(name).join("metrics.json"));
            let f = |k: &str| m[k].as_f64().unwrap_or(f64::NAN);
            (f("accuracy"), f("macro_f1"), f("macro_auc"))
        };
        let last = |name: &str| {
            let m = json(&dir(name).join("metrics.json"));
            let f = |k: &str| m["last_epoch"][k].as_f64().unwrap_or(f64::NAN);
            (f("accuracy"), f("macro_f1"), f("auc"))
        };
        let per_epoch = |name: &str| {
            let s = stage(name);
            let secs = s.get("run").and_then(|r| r.get("seconds")).and_then(|v| v.as_f64()).unwrap_or(f64::NAN);
            let epochs = json(&dir(name).join("history.json"))["epochs"].as_array().map(Vec::len).unwrap_or(1);
            secs / epochs as f64
        };
        Row {
            seed,
            coverage: attn["lesion_coverage"].as_f64().unwrap_or(f64::NAN),
            hit: attn["lesion_hit_rate"].as_f64().unwrap_or(f64::NAN),
            scores: [score("eval-scratch"), score("eval-mae"), score("eval-msmae-full"), score("eval-msmae")],
            last: [last("eval-scratch"), last("eval-mae"), last("eval-msmae-full"), last("eval-msmae")],
            epoch_seconds: [per_epoch("ft-mae"), per_epoch("ft-msmae")],
            dice: ["seg-msmae", "seg-scratch"].map(|n| {
                if stages.iter().any(|s| s.get("name").and_then(|x| x.as_str()) == Some(n)) {
                    json(&dir(n).join("metrics.json"))["dice"].as_f64().unwrap_or(f64::NAN)
                } else {
                    f64::NAN
                }
            }),
        }
    }
}

fn mean_sd(v: &[f64]) -> String {
    let (m, sd) = msmae_eval::stats::mean_sd(v);
    format!("{m:.3} ± {sd:.3}")
}

const METHODS: [&str; 4] = ["none", "MAE", "MSMAE-pt + full ft", "MSMAE"];

/// Every pair of methods: the paired difference over the seeds, 95 % interval, of the
/// best-validation models' test figures, or (`last`) the last epoch's models'.
fn print_paired(rows: &[Row], last: bool) {
    let which = if last { "last-epoch models" } else { "best-validation models" };
    println!("\npaired test differences over {} seeds, {which} (mean [95 % t interval]; * = interval excludes 0)", rows.len());
    println!("| A − B | accuracy | macro-F1 | macro AUC |");
    println!("|---|---|---|---|");
    let pairs = (0..METHODS.len()).flat_map(|i| (i + 1..METHODS.len()).map(move |j| (i, j)));
    for (i, j) in pairs {
        let cell = |f: &dyn Fn(&(f64, f64, f64)) -> f64| {
            let pick = |r: &Row, k: usize| if last { r.last[k] } else { r.scores[k] };
            let a: Vec<f64> = rows.iter().map(|r| f(&pick(r, j))).collect();
            let b: Vec<f64> = rows.iter().map(|r| f(&pick(r, i))).collect();
            let p = msmae_eval::stats::paired(&a, &b);
            format!("{:+.3} [{:+.3}, {:+.3}]{}", p.mean, p.lo, p.hi, if p.excludes_zero() { " *" } else { "" })
        };
        println!("| {} − {} | {} | {} | {} |", METHODS[j], METHODS[i], cell(&|s| s.0), cell(&|s| s.1), cell(&|s| s.2));
    }
    if !last && rows.iter().all(|r| r.dice[0].is_finite()) {
        let p = msmae_eval::stats::paired(&rows.iter().map(|r| r.dice[0]).collect::<Vec<_>>(), &rows.iter().map(|r| r.dice[1]).collect::<Vec<_>>());
        println!("segmentation Dice, MSMAE-pre-trained − random encoder: {:+.3} [{:+.3}, {:+.3}]", p.mean, p.lo, p.hi);
    }
}

fn print_table(rows: &[Row]) {
    println!("\nper seed (test split)");
    println!("| seed | lesion coverage (top 25 %) | hit rate | acc none | acc MAE | acc MSMAE-pt + full ft | acc MSMAE | s/epoch full | s/epoch MSMAE |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.2} | {:.2} |",
            r.seed, r.coverage, r.hit, r.scores[0].0, r.scores[1].0, r.scores[2].0, r.scores[3].0, r.epoch_seconds[0], r.epoch_seconds[1]
        );
    }
    let col = |f: &dyn Fn(&Row) -> f64| mean_sd(&rows.iter().map(f).collect::<Vec<_>>());
    println!("\nover {} seeds (mean ± sd)", rows.len());
    println!("| method | accuracy | macro-F1 | macro AUC |");
    println!("|---|---|---|---|");
    for (i, name) in
        ["no pre-training (finetune/full)", "MAE (random 0.75) + finetune/full", "MSMAE pre-training + finetune/full", "MSMAE (pre-training + finetune/msmae)"]
            .iter()
            .enumerate()
    {
        println!("| {name} | {} | {} | {} |", col(&|r| r.scores[i].0), col(&|r| r.scores[i].1), col(&|r| r.scores[i].2));
    }
    println!("\nlesion coverage of the top-25 % attention patches: {} (uniform attention: 0.250)", col(&|r| r.coverage));
    println!(
        "fine-tuning wall time per epoch (stage time / epochs, incl. validation): full {} s, MSMAE {} s",
        col(&|r| r.epoch_seconds[0]),
        col(&|r| r.epoch_seconds[1])
    );
    if rows.iter().all(|r| r.dice[0].is_finite()) {
        println!("segmentation Dice (test images with lesions): MSMAE-pre-trained encoder {}, random encoder {}", col(&|r| r.dice[0]), col(&|r| r.dice[1]));
    }
    println!("\ntest accuracy of the last epoch's model (mean ± sd; the best-validation model's above)");
    println!("| method | accuracy | macro-F1 | macro AUC |");
    println!("|---|---|---|---|");
    for (i, name) in METHODS.iter().enumerate() {
        println!("| {name} | {} | {} | {} |", col(&|r| r.last[i].0), col(&|r| r.last[i].1), col(&|r| r.last[i].2));
    }
    print_paired(rows, false);
    print_paired(rows, true);
}
