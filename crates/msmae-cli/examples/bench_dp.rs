//! `cargo xtask bench dp`: data-parallel scaling on this machine's CPU. One training stage
//! (the supervised ViT classifier, all tokens) on synthetic images, run as one process with
//! one thread, one process with T threads, and N processes with one thread each under
//! `mpirun`: images/s over the training steps, seconds per step, and the time per step
//! spent summing gradients across processes (what the timings of `MSMAE_TIMINGS` record).
//!
//! Flags: `--processes N` (default 2), `--epochs E` (default 3; the first is a warm-up and
//! not counted), `--images K` (default 512), `--batch B` (global, default 32), `--size S`
//! (default 64), `--dim D` `--depth L` (default 96, 4).

use std::path::{Path, PathBuf};
use std::process::Command;

struct Args {
    processes: usize,
    epochs: usize,
    images: usize,
    batch: usize,
    size: usize,
    dim: usize,
    depth: usize,
}

fn main() {
    let mut a = Args { processes: 2, epochs: 3, images: 512, batch: 32, size: 64, dim: 96, depth: 4 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v: usize = it.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| usage(&flag));
        match flag.as_str() {
            "--processes" => a.processes = v,
            "--epochs" => a.epochs = v.max(2),
            "--images" => a.images = v,
            "--batch" => a.batch = v,
            "--size" => a.size = v,
            "--dim" => a.dim = v,
            "--depth" => a.depth = v,
            _ => usage(&flag),
        }
    }
    let exe = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().and_then(Path::parent).map(|d| d.join("msmae")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("msmae"));
    let dir = std::env::temp_dir().join(format!("msmae-bench-dp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("bench dir");
    let heads = (a.dim / 32).max(1);
    let yaml = format!(
        "name: dp\nseed: 1\nstages:\n  data: {{ uses: ingest/synthetic, with: {{ images: {}, size: {}, previews: 1 }} }}\n  train: {{ uses: attention/train-supervised, needs: [data], with: {{ model: {{ patch_size: 8, embed_dim: {}, depth: {}, num_heads: {heads} }}, epochs: {}, batch_size: {}, warmup_epochs: 0 }} }}\n",
        a.images, a.size, a.dim, a.depth, a.epochs, a.batch
    );
    std::fs::write(dir.join("dp.yaml"), yaml).expect("pipeline");
    run(Command::new(&exe).current_dir(&dir).args(["run", "dp.yaml", "--until", "data", "-q"]), "ingest");
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let configs = [(1usize, 1usize), (1, cores), (a.processes, 1)];
    let mut rows = Vec::new();
    for (procs, threads) in configs {
        let timings = dir.join(format!("timings-{procs}x{threads}.jsonl"));
        let _ = std::fs::remove_file(&timings);
        let args = ["run", "dp.yaml", "--stage", "train", "--device", "cpu", "-q"];
        let mut c = if procs == 1 {
            let mut c = Command::new(&exe);
            c.args(args);
            c
        } else {
            let mut c = Command::new("mpirun");
            c.args(["-np", &procs.to_string(), "--oversubscribe", "--bind-to", "none"]).arg(&exe).args(args);
            c.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
                .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
                .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none");
            c
        };
        c.current_dir(&dir)
            .env("MSMAE_TIMINGS", &timings)
            .env("OMP_NUM_THREADS", threads.to_string())
            .env("MKL_NUM_THREADS", threads.to_string());
        eprintln!("[bench dp] {procs} process(es) × {threads} thread(s) …");
        run(&mut c, &format!("{procs}×{threads}"));
        rows.push(Row::read(procs, threads, &timings));
    }
    let base = rows[0].images_per_s();
    println!(
        "\ndata-parallel scaling: ViT dim {} depth {}, {}×{} images, global batch {}, {} epochs timed (after one warm-up), {cores} cores",
        a.dim,
        a.depth,
        a.size,
        a.size,
        a.batch,
        a.epochs - 1
    );
    println!("| processes × threads | images/s | s/step | collectives ms/step | vs 1×1 |");
    println!("|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} × {} | {:.1} | {:.3} | {:.1} | {:.2}× |",
            r.procs,
            r.threads,
            r.images_per_s(),
            r.seconds / r.steps.max(1) as f64,
            1000.0 * r.comm / r.steps.max(1) as f64,
            r.images_per_s() / base
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn usage(flag: &str) -> ! {
    eprintln!("bad flag `{flag}`: use --processes N --epochs E --images K --batch B --size S --dim D --depth L");
    std::process::exit(2)
}

fn run(c: &mut Command, what: &str) {
    match c.status() {
        Ok(s) if s.success() => {}
        other => {
            eprintln!("[bench dp] {what} failed: {other:?}");
            std::process::exit(1)
        }
    }
}

/// The timed epochs (all but the first) of one configuration.
struct Row {
    procs: usize,
    threads: usize,
    images: f64,
    seconds: f64,
    comm: f64,
    steps: usize,
}

impl Row {
    fn read(procs: usize, threads: usize, timings: &Path) -> Row {
        let text = std::fs::read_to_string(timings)
            .unwrap_or_else(|e| panic!("{}: {e} (no timings recorded)", timings.display()));
        let mut r = Row { procs, threads, images: 0.0, seconds: 0.0, comm: 0.0, steps: 0 };
        for v in text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["epoch"].as_u64() != Some(0))
        {
            r.images += v["images"].as_f64().unwrap_or(0.0);
            r.seconds += v["seconds"].as_f64().unwrap_or(0.0);
            r.comm += v["comm_seconds"].as_f64().unwrap_or(0.0);
            r.steps += v["steps"].as_u64().unwrap_or(0) as usize;
        }
        r
    }
    fn images_per_s(&self) -> f64 {
        self.images / self.seconds.max(1e-9)
    }
}
