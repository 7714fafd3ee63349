//! `cargo xtask bench loader`: images/s of the training loader, per thread count, beside a
//! torchvision `DataLoader` doing the same work over the same table
//! (tests/python/bench_loader.py).
//!
//! The work, per image, on both sides: read its row group from the Parquet image table
//! (zstd-compressed raw pixels, as ingestion stores them), RandomResizedCrop (scale
//! 0.2–1, ratio 3/4–4/3, bilinear, back to the stored size) and horizontal flip,
//! normalise to float32 CHW, and draw an MSMAE mask plan (multinomial over a 14×14 weight
//! map, 45 % masked, 30 % thrown; msmae also moves the map through the crop); then
//! collate batches. Shuffled, full batches, one epoch. Both sides are timed from the first
//! batch to the last (worker start-up excluded), each thread count in its own process:
//! msmae with `RAYON_NUM_THREADS=T`, torchvision with `num_workers=T` (each worker one
//! torch thread).
//!
//! Flags: `--images N` (default 1536), `--size S` (stored side, default 224), `--channels
//! C` (default 3), `--batch B` (default 64), `--threads 1,2,…` (default 1 and every
//! core), `--no-torch`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use msmae_data::table::{ImageRow, ImageTableWriter, SCHEMA_VERSION, Split, TableMeta};
use msmae_mask::MaskPolicy;
use msmae_train::data::{ImageTable, LoaderSpec, MaskSpec, Normalizer, stream};
use rand::{Rng, SeedableRng};

const GRID: usize = 14;

fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).map(String::as_str)
}

/// A table of `n` smooth random images (a few soft blobs over noise: content that zstd does
/// not shrink to nothing, like radiographs).
///
/// Also writes the pixels raw (`<table>.raw`, n × H × W × C bytes) for a torchvision side
/// without pyarrow (the GPU machine's Python has PyTorch and timm, perhaps not pyarrow).
fn make_table(path: &Path, n: usize, size: usize, channels: usize) {
    let mut raw =
        std::io::BufWriter::new(std::fs::File::create(path.with_extension("raw")).expect("create the raw sidecar"));
    let meta = TableMeta {
        schema_version: SCHEMA_VERSION,
        label_names: vec!["a".into(), "b".into()],
        multi_label: false,
        height: size as u32,
        width: size as u32,
        channels: channels as u32,
        has_masks: false,
        bit_depth: 8,
        mask_classes: Vec::new(),
        provenance: serde_json::Value::Null,
    };
    let mut w = ImageTableWriter::create(path, meta, 256).expect("create the table");
    for i in 0..n {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(i as u64);
        let blobs: Vec<(f32, f32, f32, f32)> = (0..4)
            .map(|_| {
                (
                    rng.random_range(0.0..size as f32),
                    rng.random_range(0.0..size as f32),
                    rng.random_range(8.0..48.0),
                    rng.random_range(40.0..160.0),
                )
            })
            .collect();
        let mut pixels = Vec::with_capacity(size * size * channels);
        for y in 0..size {
            for x in 0..size {
                let v: f32 = blobs
                    .iter()
                    .map(|&(cy, cx, r, a)| {
                        a * (-((y as f32 - cy).powi(2) + (x as f32 - cx).powi(2)) / (2.0 * r * r)).exp()
                    })
                    .sum();
                let noise: f32 = rng.random_range(-12.0..12.0);
                let v = (40.0 + v + noise).clamp(0.0, 255.0) as u8;
                pixels.extend(std::iter::repeat_n(v, channels));
            }
        }
        std::io::Write::write_all(&mut raw, &pixels).expect("write the raw sidecar");
        w.push(ImageRow {
            id: format!("img{i:06}"),
            patient_id: format!("p{i}"),
            split: Split::Train,
            label: Some((i % 2) as i32),
            labels: None,
            width: size as i32,
            height: size as i32,
            channels: channels as i32,
            pixels,
            mask: None,
            source_path: String::new(),
            source_sha256: String::new(),
        })
        .expect("push");
    }
    w.finish().expect("finish the table");
    std::io::Write::flush(&mut raw).expect("write the raw sidecar");
}

/// The per-image weight map (what attention extraction gives the loader).
fn weights(n: usize) -> HashMap<usize, Vec<f32>> {
    (0..n)
        .map(|r| {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1_000_000 + r as u64);
            (r, (0..GRID * GRID).map(|_| rng.random_range(0.0..1.0f32)).collect())
        })
        .collect()
}

/// One epoch in this process; prints `RESULT images_per_s`.
fn run_one(table: &Path, batch: usize) {
    let t = Arc::new(ImageTable::open(table).expect("open the table"));
    let rows = t.rows_of(Split::Train);
    let mut spec = LoaderSpec::train(batch, (0.2, 1.0));
    spec.masks = Some(MaskSpec {
        policy: MaskPolicy::Msmae { mask_ratio: 0.45, throw_ratio: 0.30 },
        weights: Some(Arc::new(weights(rows.len()))),
        grid: [GRID, GRID],
    });
    let norm = Normalizer { mean: vec![0.45; t.channels()], std: vec![0.25; t.channels()] };
    let mut first: Option<Instant> = None;
    let mut images = 0usize;
    for b in stream(t, &rows, spec, norm, 0, 0) {
        let b = b.expect("batch");
        match first {
            None => first = Some(Instant::now()),
            Some(_) => images += b.len(),
        }
    }
    let secs = first.map(|f| f.elapsed().as_secs_f64()).unwrap_or(f64::NAN);
    println!("RESULT {}", images as f64 / secs);
}

fn parse_result(out: &[u8]) -> Option<f64> {
    String::from_utf8_lossy(out).lines().find_map(|l| l.strip_prefix("RESULT ")?.trim().parse().ok())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let batch: usize = flag(&args, "--batch").and_then(|b| b.parse().ok()).unwrap_or(64);
    if let Some(table) = flag(&args, "--one") {
        run_one(Path::new(table), batch);
        return;
    }
    let n: usize = flag(&args, "--images").and_then(|b| b.parse().ok()).unwrap_or(1536);
    let size: usize = flag(&args, "--size").and_then(|b| b.parse().ok()).unwrap_or(224);
    let channels: usize = flag(&args, "--channels").and_then(|b| b.parse().ok()).unwrap_or(3);
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let threads: Vec<usize> = match flag(&args, "--threads") {
        Some(list) => list.split(',').filter_map(|t| t.trim().parse().ok()).collect(),
        None if cores > 1 => vec![1, cores],
        None => vec![1],
    };
    let dir = std::env::temp_dir().join(format!("msmae-bench-loader-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let table = dir.join("images.parquet");
    let t0 = Instant::now();
    make_table(&table, n, size, channels);
    let bytes = std::fs::metadata(&table).map(|m| m.len()).unwrap_or(0);
    println!(
        "table: {n} images {size}×{size}×{channels}, {:.0} MiB on disk (zstd), made in {:.1} s; batch {batch}; {cores} cpus",
        bytes as f64 / 1048576.0,
        t0.elapsed().as_secs_f64()
    );
    let python = std::env::var_os("MSMAE_PYTHON").filter(|_| !args.iter().any(|a| a == "--no-torch"));
    let script: PathBuf = match std::env::var_os("MSMAE_REPO") {
        Some(r) => Path::new(&r).join("crates/msmae-train/tests/python/bench_loader.py"),
        None => PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/bench_loader.py")),
    };
    let exe = std::env::current_exe().expect("exe");
    println!("| threads | msmae images/s | per thread | torchvision images/s | per worker | msmae / torchvision |");
    println!("|---|---|---|---|---|---|");
    let mut raw_fallback = false;
    for &t in &threads {
        let o = Command::new(&exe)
            .args(["--one", &table.to_string_lossy(), "--batch", &batch.to_string()])
            .env("RAYON_NUM_THREADS", t.to_string())
            .output()
            .expect("child bench");
        let ours = parse_result(&o.stdout);
        if ours.is_none() {
            eprintln!("msmae loader failed at {t} threads: {}", String::from_utf8_lossy(&o.stderr));
        }
        let theirs = python.as_ref().and_then(|py| {
            let o = Command::new(py)
                .arg(&script)
                .args([&table.to_string_lossy().into_owned(), &t.to_string(), &batch.to_string(), &GRID.to_string()])
                .args([n, size, channels].map(|v| v.to_string()))
                .output()
                .ok()?;
            if !o.status.success() {
                eprintln!("torchvision loader failed at {t} workers: {}", String::from_utf8_lossy(&o.stderr));
            }
            raw_fallback |= String::from_utf8_lossy(&o.stdout).lines().any(|l| l == "SOURCE raw");
            parse_result(&o.stdout)
        });
        let cell = |v: Option<f64>, d: f64| v.map(|v| format!("{:.0}", v / d)).unwrap_or_else(|| "-".into());
        let ratio = match (ours, theirs) {
            (Some(a), Some(b)) => format!("{:.2}×", a / b),
            _ => "-".into(),
        };
        println!(
            "| {t} | {} | {} | {} | {} | {ratio} |",
            cell(ours, 1.0),
            cell(ours, t as f64),
            cell(theirs, 1.0),
            cell(theirs, t as f64)
        );
    }
    if raw_fallback {
        println!(
            "(no pyarrow in that Python: torchvision read the raw pixels, not the Parquet table: less work than msmae's read)"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
