//! `cargo xtask bench ingest`: ingestion throughput and peak memory of msmae
//! (`ingest/manifest`, the shared decode → resize → Parquet writer) against a
//! straightforward Python script (Pillow + pyarrow, one process:
//! `crates/msmae-data/tests/python/ingest_bench.py`) on the same files, same output.
//!
//! Data: `--images N` (default 5000) generated 1024×1024 X-ray-like 8-bit grey PNGs and the
//! same number of RGB JPEGs (quality 90), cached under `--dir` (default
//! `$MSMAE_CACHE_DIR/bench-ingest`, else `~/.cache/msmae/bench-ingest`). Every run is its
//! own process (peak RSS is per process), and msmae and Python alternate.
//!
//! Then the flat-memory check: msmae on manifests of `--scale` rows (default 10000,50000)
//! cycling over the PNGs under distinct ids, peak RSS reported per size.
//!
//! Flags: `--images N`, `--size S` (default 224), `--scale A,B`, `--dir PATH`,
//! `--threads T` (default: all cores), `--no-python`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use msmae_core::{ExecEnv, NoProgress, Stage, StageContext};
use msmae_data::manifest::{Manifest, ManifestConfig};
use rayon::prelude::*;

#[path = "bench_common/mod.rs"]
mod common;

use common::field;

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned()).unwrap_or_else(|| default.to_string())
}

fn peak_rss_mib() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn generate(dir: &Path, n: usize) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let png_dir = dir.join("png");
    let jpg_dir = dir.join("jpg");
    std::fs::create_dir_all(&png_dir).expect("mkdir");
    std::fs::create_dir_all(&jpg_dir).expect("mkdir");
    let t = Instant::now();
    let made: usize = (0..n)
        .into_par_iter()
        .map(|i| {
            let (p, j) = (png_dir.join(format!("{i:06}.png")), jpg_dir.join(format!("{i:06}.jpg")));
            if p.is_file() && j.is_file() {
                return 0;
            }
            let f = field(i as u64);
            let grey = image::GrayImage::from_fn(1024, 1024, |x, y| {
                image::Luma([f[(y * 1024 + x) as usize].clamp(0.0, 255.0) as u8])
            });
            grey.save(&p).expect("png");
            let rgb = image::RgbImage::from_fn(1024, 1024, |x, y| {
                let v = f[(y * 1024 + x) as usize];
                image::Rgb([
                    (v * 1.1).clamp(0.0, 255.0) as u8,
                    (v * 0.6).clamp(0.0, 255.0) as u8,
                    (v * 0.3).clamp(0.0, 255.0) as u8,
                ])
            });
            let mut w = std::io::BufWriter::new(std::fs::File::create(&j).expect("jpg"));
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut w, 90).encode_image(&rgb).expect("jpeg");
            1
        })
        .sum();
    if made > 0 {
        eprintln!("generated {made} PNG+JPEG pairs in {:.0} s", t.elapsed().as_secs_f64());
    }
    let list = |d: &Path, ext: &str| (0..n).map(|i| d.join(format!("{i:06}.{ext}"))).collect::<Vec<_>>();
    (list(&png_dir, "png"), list(&jpg_dir, "jpg"))
}

/// A manifest CSV of `rows` rows cycling over `files` (distinct ids), and the same list
/// as one path per line for the Python script.
fn manifests(dir: &Path, name: &str, files: &[PathBuf], rows: usize) -> (PathBuf, PathBuf) {
    let csv = dir.join(format!("{name}.csv"));
    let txt = dir.join(format!("{name}.txt"));
    let mut c = String::from("path,id\n");
    let mut t = String::new();
    for r in 0..rows {
        let f = files[r % files.len()].display().to_string();
        c.push_str(&format!("{f},{r:07}\n"));
        t.push_str(&f);
        t.push('\n');
    }
    std::fs::write(&csv, c).expect("csv");
    std::fs::write(&txt, t).expect("txt");
    (csv, txt)
}

/// `--worker MANIFEST OUT SIZE CHANNELS THREADS`: one msmae ingest, one JSON line.
fn worker(args: &[String]) {
    let (manifest, out, size, channels, threads) = (
        PathBuf::from(&args[0]),
        PathBuf::from(&args[1]),
        &args[2],
        &args[3],
        args[4].parse::<usize>().expect("threads"),
    );
    let c: ManifestConfig = serde_json::from_value(serde_json::json!({ "manifest": manifest, "id_column": "id", "size": size.parse::<u32>().expect("size"), "channels": channels.parse::<u32>().expect("channels"), "previews": 0, "split": { "train": 1.0, "val": 0.0, "test": 0.0 } })).expect("config");
    std::fs::create_dir_all(&out).expect("mkdir");
    let t = Instant::now();
    let mut ctx = StageContext::new(
        "bench".into(),
        1,
        ExecEnv::cpu_flex(),
        threads,
        Default::default(),
        &NoProgress,
        out.clone(),
        out.clone(),
        Manifest.output(&c),
        BTreeMap::new(),
    );
    Manifest.run(&c, &mut ctx).expect("ingest");
    let s = t.elapsed().as_secs_f64();
    let rows = std::fs::read_to_string(out.join("split_report.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["total_images"].as_u64())
        .unwrap_or(0);
    println!(
        "{}",
        serde_json::json!({ "images": rows, "seconds": s, "images_per_s": rows as f64 / s, "peak_rss_mib": peak_rss_mib() })
    );
}

fn run_json(cmd: &mut Command) -> serde_json::Value {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().unwrap_or("")).unwrap_or_else(|e| panic!("{cmd:?} printed {text}: {e}"))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--worker") {
        return worker(&args[i + 1..]);
    }
    let n: usize = arg("--images", "5000").parse().expect("--images");
    let size = arg("--size", "224");
    let threads = arg("--threads", &std::thread::available_parallelism().map_or(2, |n| n.get()).to_string());
    let cache = std::env::var("MSMAE_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/msmae"));
    let dir = PathBuf::from(arg("--dir", &cache.join("bench-ingest").display().to_string()));
    let scales: Vec<usize> = arg("--scale", "10000,50000")
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().expect("--scale"))
        .collect();
    let (pngs, jpgs) = generate(&dir, n);
    let work = tempfile::tempdir_in(&dir).expect("tmp");
    let me = std::env::current_exe().expect("exe");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../msmae-data/tests/python/ingest_bench.py");
    let python = std::env::var_os("MSMAE_PYTHON").filter(|_| !args.iter().any(|a| a == "--no-python"));
    let bytes = |fs: &[PathBuf]| {
        fs.iter().map(|f| std::fs::metadata(f).map_or(0, |m| m.len())).sum::<u64>() as f64 / fs.len() as f64 / 1024.0
    };
    println!(
        "ingest benchmark: {n} images 1024×1024 per format → {size}×{size}, msmae with {threads} threads, Python one process (Pillow + pyarrow)"
    );
    println!("average file: PNG {:.0} KiB, JPEG {:.0} KiB\n", bytes(&pngs), bytes(&jpgs));
    println!("| input | Python img/s | msmae img/s | speed-up | Python peak RSS MiB | msmae peak RSS MiB |");
    println!("|---|---|---|---|---|---|");
    for (name, files, channels) in [("PNG 8-bit grey → grey", &pngs, "1"), ("JPEG RGB q90 → RGB", &jpgs, "3")] {
        let (csv, txt) = manifests(work.path(), if channels == "1" { "png" } else { "jpg" }, files, files.len());
        // warm the page cache so both read from memory
        for f in files.iter() {
            let _ = std::fs::read(f);
        }
        let ours = run_json(
            Command::new(&me)
                .arg("--worker")
                .arg(&csv)
                .arg(work.path().join(format!("ours-{channels}")))
                .args([&size, channels, &threads]),
        );
        let py =
            python.as_ref().map(|p| {
                run_json(
                    Command::new(p)
                        .arg(&script)
                        .arg(&txt)
                        .arg(work.path().join(format!("py-{channels}.parquet")))
                        .args(["--size", &size, "--channels", channels, "--row-group", "256"]),
                )
            });
        let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        match py {
            Some(py) => println!(
                "| {name} | {:.0} | {:.0} | {:.2}× | {:.0} | {:.0} |",
                f(&py, "images_per_s"),
                f(&ours, "images_per_s"),
                f(&ours, "images_per_s") / f(&py, "images_per_s"),
                f(&py, "peak_rss_mib"),
                f(&ours, "peak_rss_mib")
            ),
            None => {
                println!("| {name} | – | {:.0} | – | – | {:.0} |", f(&ours, "images_per_s"), f(&ours, "peak_rss_mib"))
            }
        }
    }
    if !scales.is_empty() {
        println!(
            "\nmemory is bounded by the row groups in flight, not by the dataset: msmae on manifests cycling over the PNGs\n"
        );
        println!("| rows | seconds | img/s | peak RSS MiB |");
        println!("|---|---|---|---|");
        for rows in scales {
            let (csv, _) = manifests(work.path(), &format!("scale-{rows}"), &pngs, rows);
            let out = work.path().join(format!("scale-{rows}"));
            let v = run_json(Command::new(&me).arg("--worker").arg(&csv).arg(&out).args([&size, "1", &threads]));
            println!(
                "| {rows} | {:.1} | {:.0} | {:.0} |",
                v["seconds"].as_f64().unwrap_or(f64::NAN),
                v["images_per_s"].as_f64().unwrap_or(f64::NAN),
                v["peak_rss_mib"].as_f64().unwrap_or(f64::NAN)
            );
            let _ = std::fs::remove_dir_all(&out);
        }
    }
}
