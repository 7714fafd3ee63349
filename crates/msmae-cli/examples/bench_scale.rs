//! `cargo xtask bench scale`: how each stage of the flagship pipeline grows with the size
//! of a ChestX-ray14 release. A generated release in NIH's layout (`images_001/images/…`
//! to `images_012/images/…`, `Data_Entry_2017_v2020.csv`, `train_val_list.txt`,
//! `test_list.txt`, patients of 1–7 images, findings drawn at the published frequencies)
//! at each row count, its images hard links to a pool of 1024² X-ray-like 8-bit PNGs; then
//! one process per stage — ingestion (`ingest/chestxray14`), one epoch of the supervised
//! ViT, attention extraction over every image, mask generation, evaluation — each timed and
//! its peak resident memory sampled from `/proc`.
//!
//! The model is deliberately small (one block, 32 wide, 16 px patches on 64 px images):
//! the question is how time and memory grow with rows, not how fast ViT-B trains on CPU.
//!
//! Flags: `--rows A,B,C` (default 10000,50000,112120), `--pool N` distinct images (default
//! 32), `--size S` ingested side (default 64), `--batch B` training batch (default 256),
//! `--dir PATH` (default
//! `$MSMAE_CACHE_DIR/bench-scale`, else `~/.cache/msmae/bench-scale`), `--keep` (keep the
//! stores), `--stages data,supervised,attn,masks,eval` (a subset), `--sample F` (ingest a
//! seeded patient sample: every row of the release is read and checked, only the sample
//! decoded and written — how a million-row label file weighs on ingestion, without an hour
//! of decoding).

#[path = "bench_common/mod.rs"]
mod common;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Rng, field, msmae_exe, run_measured};
use rayon::prelude::*;

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned()).unwrap_or_else(|| default.to_string())
}

/// The 14 findings with their image counts in the published release (No Finding: 60,361).
const FINDINGS: [(&str, u32); 14] = [
    ("Infiltration", 19894),
    ("Effusion", 13317),
    ("Atelectasis", 11559),
    ("Nodule", 6331),
    ("Mass", 5782),
    ("Pneumothorax", 5302),
    ("Consolidation", 4667),
    ("Pleural_Thickening", 3385),
    ("Cardiomegaly", 2776),
    ("Emphysema", 2516),
    ("Edema", 2303),
    ("Fibrosis", 1686),
    ("Pneumonia", 1431),
    ("Hernia", 227),
];

/// The pool of source PNGs (generated once, cached).
fn pool(dir: &Path, n: usize) -> Vec<PathBuf> {
    let d = dir.join("pool");
    std::fs::create_dir_all(&d).expect("mkdir pool");
    (0..n)
        .into_par_iter()
        .map(|i| {
            let p = d.join(format!("{i:04}.png"));
            if !p.is_file() {
                let f = field(1000 + i as u64);
                let img = image::GrayImage::from_fn(1024, 1024, |x, y| {
                    image::Luma([f[(y * 1024 + x) as usize].clamp(0.0, 255.0) as u8])
                });
                let tmp = p.with_extension("png.part");
                img.save_with_format(&tmp, image::ImageFormat::Png).expect("png");
                std::fs::rename(&tmp, &p).expect("rename");
            }
            p
        })
        .collect()
}

/// A release of `rows` images under `root` (rebuilt when absent): returns the number of
/// test images.
fn release(root: &Path, rows: usize, pool: &[PathBuf]) -> usize {
    let csv_path = root.join("Data_Entry_2017_v2020.csv");
    let mut rng = Rng(7);
    let total: f64 = FINDINGS.iter().map(|(_, n)| f64::from(*n)).sum();
    let mut csv = String::from(
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Sex,View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],\n",
    );
    let (mut train_val, mut test, mut tests) = (String::new(), String::new(), 0);
    let (mut patient, mut left, mut follow) = (0u32, 0u32, 0u32);
    let mut links = Vec::with_capacity(rows);
    for i in 0..rows {
        if left == 0 {
            patient += 1;
            left = 1 + (rng.next() % 7) as u32;
            follow = 0;
        }
        let name = format!("{patient:08}_{follow:03}.png");
        let labels = if rng.unit() < 0.54 {
            "No Finding".to_string()
        } else {
            let k = 1 + (rng.next() % 3) as usize;
            let mut picked: Vec<&str> = Vec::new();
            while picked.len() < k {
                let mut u = f64::from(rng.unit()) * total;
                let f = FINDINGS.iter().find(|(_, n)| {
                    u -= f64::from(*n);
                    u <= 0.0
                });
                let f = f.map_or("Hernia", |(name, _)| *name);
                if !picked.contains(&f) {
                    picked.push(f);
                }
            }
            picked.sort_unstable();
            picked.join("|")
        };
        let _ = writeln!(csv, "{name},{labels},{follow},{patient},{},M,PA,2500,2048,0.143,0.143,", 20 + patient % 60);
        if patient % 4 == 0 {
            test.push_str(&name);
            test.push('\n');
            tests += 1;
        } else {
            train_val.push_str(&name);
            train_val.push('\n');
        }
        links
            .push((root.join(format!("images_{:03}/images", 1 + i / 10_000)).join(name), pool[i % pool.len()].clone()));
        left -= 1;
        follow += 1;
    }
    if !csv_path.is_file() {
        links.par_iter().for_each(|(to, from)| {
            if let Some(d) = to.parent() {
                std::fs::create_dir_all(d).expect("mkdir images");
            }
            if !to.exists() {
                std::fs::hard_link(from, to).or_else(|_| std::fs::copy(from, to).map(|_| ())).expect("link image");
            }
        });
        std::fs::write(root.join("train_val_list.txt"), train_val).expect("list");
        std::fs::write(root.join("test_list.txt"), test).expect("list");
        std::fs::write(&csv_path, csv).expect("csv");
    }
    tests
}

const STAGES: [(&str, &str); 5] = [
    ("data", "ingestion (ingest/chestxray14)"),
    ("supervised", "one training epoch (attention/train-supervised)"),
    ("attn", "attention extraction, every image"),
    ("masks", "mask generation (mask/msmae)"),
    ("eval", "evaluation (eval/classify)"),
];

fn pipeline(root: &Path, size: &str, batch: &str, sample: &str) -> String {
    format!(
        "name: scale\nseed: 1\nstages:\n  data: {{ uses: ingest/chestxray14, with: {{ root: {root}, size: {size}, channels: 1, val_fraction: 0.1, previews: 0, sample: {sample} }} }}\n  supervised: {{ uses: attention/train-supervised, needs: [data], with: {{ model: {{ patch_size: 16, embed_dim: 32, depth: 1, num_heads: 2 }}, epochs: 1, batch_size: {batch}, warmup_epochs: 0 }} }}\n  attn: {{ uses: attention/extract, needs: [supervised, data], with: {{ overlays: 0, batch_size: 512 }} }}\n  masks: {{ uses: mask/msmae, needs: [attn] }}\n  eval: {{ uses: eval/classify, needs: [supervised] }}\n",
        root = root.display(),
    )
}

fn main() {
    let rows: Vec<usize> = arg("--rows", "10000,50000,112120")
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().expect("--rows"))
        .collect();
    let pool_n: usize = arg("--pool", "32").parse().expect("--pool");
    let size = arg("--size", "64");
    let batch = arg("--batch", "256");
    let keep = std::env::args().any(|a| a == "--keep");
    let sample = arg("--sample", "1.0");
    let only = arg("--stages", &STAGES.map(|(s, _)| s).join(","));
    let stages: Vec<(&str, &str)> = STAGES.iter().copied().filter(|(s, _)| only.split(',').any(|o| o == *s)).collect();
    assert!(!stages.is_empty(), "--stages: pick from data, supervised, attn, masks, eval");
    let cache = std::env::var("MSMAE_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/msmae"));
    let dir = PathBuf::from(arg("--dir", &cache.join("bench-scale").display().to_string()));
    let pool = pool(&dir, pool_n);
    let avg = pool.iter().map(|p| std::fs::metadata(p).map_or(0, |m| m.len())).sum::<u64>() as f64
        / pool.len() as f64
        / 1024.0;
    // (rows, per stage (seconds, peak RSS MiB))
    let mut results: Vec<(usize, Vec<(f64, f64)>)> = Vec::new();
    for &n in &rows {
        let root = dir.join(format!("release-{n}"));
        std::fs::create_dir_all(&root).expect("mkdir release");
        let tests = release(&root, n, &pool);
        eprintln!("[bench scale] {n} rows ({tests} in test_list.txt) at {}", root.display());
        let work = tempfile::tempdir_in(&dir).expect("tmp");
        let yaml = work.path().join("scale.yaml");
        std::fs::write(&yaml, pipeline(&root, &size, &batch, &sample)).expect("pipeline");
        let mut per = Vec::new();
        for (stage, _) in &stages {
            let mut c = Command::new(msmae_exe());
            c.arg("run").arg(&yaml).args(["--stage", stage, "-q"]).arg("--store").arg(work.path().join("store"));
            let (ok, secs, rss) = run_measured(&mut c);
            if !ok {
                eprintln!("[bench scale] {n} rows: stage `{stage}` failed");
                std::process::exit(1);
            }
            eprintln!("[bench scale] {n} rows: {stage} {secs:.1} s, peak RSS {rss:.0} MiB");
            per.push((secs, rss));
        }
        if keep {
            let kept = work.keep();
            eprintln!("[bench scale] kept {}", kept.display());
        }
        results.push((n, per));
    }
    println!(
        "\nscale benchmark: generated ChestX-ray14 releases (NIH layout, {pool_n} distinct 1024² PNGs of {avg:.0} KiB hard-linked), ingested at {size} px{}; one process per stage, wall seconds and peak RSS (MiB)\n",
        if sample == "1.0" { String::new() } else { format!(", a sample of {sample} of the patients") }
    );
    let head: Vec<String> = results.iter().map(|(n, _)| format!("{n} rows: s | MiB")).collect();
    println!("| stage | {} | s per 1k rows (largest) | MiB per 10k rows (first → last) |", head.join(" | "));
    println!("|---|{}---|---|", "---|".repeat(2 * results.len()));
    for (k, (_, label)) in stages.iter().enumerate() {
        let cells: Vec<String> = results.iter().map(|(_, per)| format!("{:.1} | {:.0}", per[k].0, per[k].1)).collect();
        let (first, last) = (results.first().expect("a size"), results.last().expect("a size"));
        let per_k = last.1[k].0 / last.0 as f64 * 1000.0;
        let growth = if last.0 > first.0 {
            (last.1[k].1 - first.1[k].1) / (last.0 - first.0) as f64 * 10_000.0
        } else {
            f64::NAN
        };
        println!("| {label} | {} | {per_k:.2} | {growth:+.1} |", cells.join(" | "));
    }
}
