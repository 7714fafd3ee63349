//! `cargo xtask bench runner`: how fast the runner decides that nothing needs doing, and
//! how fast it hashes, on a generated dataset of many small files plus one large file.
//!
//! Flags: `--files N` (default 100000), `--big-mib M` (default 1024), `--dir PATH`
//! (default a temp dir), `--repeat R` (default 5).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use msmae_core::{InputSlot, NoProgress, OutputDecl, Registry, Stage, StageContext, StageError};
use msmae_pipeline::hashing::HashMemo;
use msmae_pipeline::{RunOptions, Store};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct IndexCfg {
    root: PathBuf,
}

/// Lists a dataset folder (its content is an external input of the stage).
struct IndexStage;
impl Stage for IndexStage {
    type Config = IndexCfg;
    const KIND: &'static str = "bench/index";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "counts the files of a dataset";
    fn code_fingerprint(&self) -> &'static str {
        "bench"
    }
    fn inputs(&self, _: &IndexCfg) -> Vec<InputSlot> {
        vec![]
    }
    fn output(&self, _: &IndexCfg) -> OutputDecl {
        OutputDecl::new("listing", &["count.txt"])
    }
    fn external_inputs(&self, c: &IndexCfg) -> Vec<PathBuf> {
        vec![c.root.clone()]
    }
    fn run(&self, c: &IndexCfg, ctx: &mut StageContext<'_>) -> Result<(), StageError> {
        let root = ctx.resolve(&c.root);
        let n = if root.is_file() {
            1
        } else {
            msmae_pipeline::hashing::list_files(&root).map_err(|e| StageError::other(e.to_string()))?.len()
        };
        let p = ctx.output_path("count.txt")?;
        fs::write(&p, n.to_string()).map_err(|e| StageError::io(&p, e))
    }
}

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned()).unwrap_or_else(|| default.to_string())
}

fn old(p: &Path) {
    // Datasets are old: files modified long ago are memoised (fresh ones are not, by design).
    if let Ok(f) = fs::File::options().write(true).open(p) {
        let _ = f.set_modified(SystemTime::now() - Duration::from_secs(3600));
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files: usize = arg("--files", "100000").parse()?;
    let big_mib: usize = arg("--big-mib", "1024").parse()?;
    let repeat: usize = arg("--repeat", "5").parse()?;
    let tmp = tempfile::tempdir()?;
    let root = match std::env::args().position(|a| a == "--dir") {
        Some(_) => PathBuf::from(arg("--dir", "")),
        None => tmp.path().to_path_buf(),
    };
    let data = root.join("dataset");
    eprintln!("generating {files} small files and a {big_mib} MiB file under {}", data.display());
    let t = Instant::now();
    for i in 0..files {
        let dir = data.join(format!("images_{:03}", i % 100));
        if i < 100 {
            fs::create_dir_all(&dir)?;
        }
        let p = dir.join(format!("{i:08}.png"));
        let mut f = fs::File::create(&p)?;
        // ~1 KiB of distinct content
        let line = format!("{i:016x}").repeat(64);
        f.write_all(line.as_bytes())?;
        drop(f);
        old(&p);
    }
    let big = root.join("big.bin");
    {
        let mut f = std::io::BufWriter::new(fs::File::create(&big)?);
        let mut block = vec![0u8; 1 << 20];
        for m in 0..big_mib {
            for (k, b) in block.iter_mut().enumerate() {
                *b = (k as u64).wrapping_mul(2654435761).wrapping_add(m as u64) as u8;
            }
            f.write_all(&block)?;
        }
    }
    old(&big);
    eprintln!("generated in {:.1}s", t.elapsed().as_secs_f64());

    let mut rows: Vec<(String, String)> = Vec::new();
    // 1. Hashing throughput: small files (cold memo), big file (cold memo).
    let memo = HashMemo::in_memory();
    let t = Instant::now();
    let d = memo.tree(&data)?;
    let s = t.elapsed().as_secs_f64();
    rows.push((
        format!("hash {files} small files, cold"),
        format!("{s:.2} s = {:.0} files/s, {:.0} MB/s", d.files as f64 / s, d.bytes as f64 / s / 1e6),
    ));
    let t = Instant::now();
    let d2 = memo.tree(&data)?;
    let s2 = t.elapsed().as_secs_f64();
    assert_eq!(d.hex, d2.hex);
    rows.push((
        format!("re-hash {files} small files, memo hit"),
        format!("{:.0} ms ({} bytes read)", s2 * 1e3, d2.hashed_bytes),
    ));
    let t = Instant::now();
    let b = memo.tree(&big)?;
    let s = t.elapsed().as_secs_f64();
    rows.push((format!("hash {big_mib} MiB file, cold"), format!("{s:.2} s = {:.2} GB/s", b.bytes as f64 / s / 1e9)));
    let t = Instant::now();
    memo.tree(&big)?;
    rows.push((format!("re-hash {big_mib} MiB file, memo hit"), format!("{:.2} ms", t.elapsed().as_secs_f64() * 1e3)));

    // 2. The runner: first run, then no-op re-runs (median of `repeat`).
    let pipeline = root.join("bench.yaml");
    fs::write(
        &pipeline,
        format!(
            "stages:\n  index: {{ uses: bench/index, with: {{ root: {} }} }}\n  big: {{ uses: bench/index, with: {{ root: {} }} }}\n",
            data.display(),
            big.display()
        ),
    )?;
    let mut reg = Registry::new();
    reg.register(IndexStage);
    let store_dir = root.join(".msmae");
    let run = || -> Result<(f64, usize), Box<dyn std::error::Error>> {
        let t = Instant::now();
        let plan = msmae_pipeline::load_plan(&pipeline, &[], &reg)?;
        let store = Store::open(&store_dir)?;
        let r = msmae_pipeline::run(&plan, &store, &RunOptions::default(), &NoProgress)?;
        assert!(r.ok(), "{r:?}");
        Ok((t.elapsed().as_secs_f64(), r.count("cached")))
    };
    let (first, cached) = run()?;
    assert_eq!(cached, 0);
    rows.push(("first run (hash all + run 2 stages)".into(), format!("{first:.2} s")));
    let mut noop = Vec::new();
    for _ in 0..repeat {
        let (s, cached) = run()?;
        assert_eq!(cached, 2, "a no-op re-run serves every stage from the cache");
        noop.push(s);
    }
    rows.push((
        format!("no-op re-run, {} files + {big_mib} MiB (median of {repeat})", files + 1),
        format!("{:.0} ms", median(noop) * 1e3),
    ));
    fs::remove_file(store_dir.join("hashmemo.tsv"))?;
    let (s, cached) = run()?;
    assert_eq!(cached, 2);
    rows.push(("no-op re-run without the hash memo".into(), format!("{s:.2} s")));

    let w = rows.iter().map(|r| r.0.len()).max().unwrap_or(10);
    println!("| {:w$} | result |", "runner benchmark");
    println!("|{}|--------|", "-".repeat(w + 2));
    for (k, v) in rows {
        println!("| {k:w$} | {v} |");
    }
    println!(
        "\nmachine: {} cpus; dataset at {}",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        root.display()
    );
    Ok(())
}
