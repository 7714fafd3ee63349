//! `cargo xtask bench study`: the quickstart study (synthetic lesion X-rays) under several
//! seeds — data, models and masks all change with the seed — and a table of what the study
//! is about: lesion coverage of the top-25 % supervised-attention patches, test accuracy
//! / macro-F1 / macro-AUC of no pre-training vs MAE vs MSMAE (mean ± sd over seeds), and
//! fine-tuning wall time per epoch, full-token vs MSMAE (25 % of the tokens); and for every
//! pair of methods the paired difference over the seeds with its 95 % Student-t interval
//! (`msmae_eval::stats`: the seeds are the pairs).
//!
//! Flags: `--seeds a,b,c` (default 1,2,3,4,5), `--pipeline PATH` (default
//! pipelines/quickstart.yaml), `--store DIR` (default a temp dir, kept between seeds),
//! `--set params.k=v` (repeatable, passed through).

#[path = "bench_common/mod.rs"]
mod common;

use common::{Args, Lock, mean_sd};

fn main() {
    let args = Args::parse("study", &[1, 2, 3, 4, 5], "pipelines/quickstart.yaml");
    let mut rows: Vec<Row> = Vec::new();
    for &seed in &args.seeds {
        let lock = args.run("study", seed);
        let row = Row::read(seed, &lock);
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

impl Row {
    fn read(seed: u64, lock: &Lock) -> Row {
        let attn = common::json(&lock.dir("attn").join("summary.json"));
        let evals = ["eval-scratch", "eval-mae", "eval-msmae-full", "eval-msmae"].map(|e| lock.scores(e));
        let per_epoch = |name: &str| {
            let epochs =
                common::json(&lock.dir(name).join("history.json"))["epochs"].as_array().map(Vec::len).unwrap_or(1);
            lock.seconds(name) / epochs as f64
        };
        Row {
            seed,
            coverage: attn["lesion_coverage"].as_f64().unwrap_or(f64::NAN),
            hit: attn["lesion_hit_rate"].as_f64().unwrap_or(f64::NAN),
            scores: evals.map(|e| e[0]),
            last: evals.map(|e| e[1]),
            epoch_seconds: [per_epoch("ft-mae"), per_epoch("ft-msmae")],
            dice: ["seg-msmae", "seg-scratch"].map(|n| {
                if lock.has(n) {
                    common::json(&lock.dir(n).join("metrics.json"))["dice"].as_f64().unwrap_or(f64::NAN)
                } else {
                    f64::NAN
                }
            }),
        }
    }
}

const METHODS: [&str; 4] = ["none", "MAE", "MSMAE-pt + full ft", "MSMAE"];

/// Every pair of methods: the paired difference over the seeds, 95 % interval, of the
/// best-validation models' test figures, or (`last`) the last epoch's models'.
fn print_paired(rows: &[Row], last: bool) {
    let which = if last { "last-epoch models" } else { "best-validation models" };
    println!(
        "\npaired test differences over {} seeds, {which} (mean [95 % t interval]; * = interval excludes 0)",
        rows.len()
    );
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
        let p = msmae_eval::stats::paired(
            &rows.iter().map(|r| r.dice[0]).collect::<Vec<_>>(),
            &rows.iter().map(|r| r.dice[1]).collect::<Vec<_>>(),
        );
        println!("segmentation Dice, MSMAE-pre-trained − random encoder: {:+.3} [{:+.3}, {:+.3}]", p.mean, p.lo, p.hi);
    }
}

fn print_table(rows: &[Row]) {
    println!("\nper seed (test split)");
    println!(
        "| seed | lesion coverage (top 25 %) | hit rate | acc none | acc MAE | acc MSMAE-pt + full ft | acc MSMAE | s/epoch full | s/epoch MSMAE |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.2} | {:.2} |",
            r.seed,
            r.coverage,
            r.hit,
            r.scores[0].0,
            r.scores[1].0,
            r.scores[2].0,
            r.scores[3].0,
            r.epoch_seconds[0],
            r.epoch_seconds[1]
        );
    }
    let col = |f: &dyn Fn(&Row) -> f64| mean_sd(&rows.iter().map(f).collect::<Vec<_>>());
    println!("\nover {} seeds (mean ± sd)", rows.len());
    println!("| method | accuracy | macro-F1 | macro AUC |");
    println!("|---|---|---|---|");
    for (i, name) in [
        "no pre-training (finetune/full)",
        "MAE (random 0.75) + finetune/full",
        "MSMAE pre-training + finetune/full",
        "MSMAE (pre-training + finetune/msmae)",
    ]
    .iter()
    .enumerate()
    {
        println!(
            "| {name} | {} | {} | {} |",
            col(&|r| r.scores[i].0),
            col(&|r| r.scores[i].1),
            col(&|r| r.scores[i].2)
        );
    }
    println!(
        "\nlesion coverage of the top-25 % attention patches: {} (uniform attention: 0.250)",
        col(&|r| r.coverage)
    );
    println!(
        "fine-tuning wall time per epoch (stage time / epochs, incl. validation): full {} s, MSMAE {} s",
        col(&|r| r.epoch_seconds[0]),
        col(&|r| r.epoch_seconds[1])
    );
    if rows.iter().all(|r| r.dice[0].is_finite()) {
        println!(
            "segmentation Dice (test images with lesions): MSMAE-pre-trained encoder {}, random encoder {}",
            col(&|r| r.dice[0]),
            col(&|r| r.dice[1])
        );
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
