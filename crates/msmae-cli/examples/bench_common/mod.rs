//! What the study benchmarks share: their flags, running a pipeline once per seed with
//! the `msmae` binary built beside them, and reading a lock file and its artifacts.

#![allow(dead_code)] // each benchmark uses its part

use std::path::{Path, PathBuf};
use std::process::Command;

/// `--seeds a,b,c`, `--pipeline PATH`, `--store DIR` (default a temp dir, kept between
/// seeds), `--set params.k=v` (repeatable, passed through).
pub struct Args {
    pub seeds: Vec<u64>,
    pub pipeline: PathBuf,
    pub store: PathBuf,
    pub sets: Vec<String>,
}

impl Args {
    pub fn parse(name: &str, seeds: &[u64], pipeline: &str) -> Args {
        Self::parse_from(name, seeds, pipeline, std::env::args().skip(1).collect())
    }

    /// [`Args::parse`] of the given arguments (a benchmark took its own flags out first).
    pub fn parse_from(name: &str, seeds: &[u64], pipeline: &str, argv: Vec<String>) -> Args {
        let mut a =
            Args { seeds: seeds.to_vec(), pipeline: PathBuf::from(pipeline), store: PathBuf::new(), sets: Vec::new() };
        let mut store = None;
        let mut it = argv.into_iter();
        while let Some(x) = it.next() {
            match x.as_str() {
                "--seeds" => {
                    a.seeds = it.next().unwrap_or_default().split(',').filter_map(|s| s.trim().parse().ok()).collect()
                }
                "--pipeline" => a.pipeline = it.next().map(PathBuf::from).unwrap_or(a.pipeline),
                "--store" => store = it.next().map(PathBuf::from),
                "--set" => a.sets.extend(it.next()),
                other => {
                    eprintln!("unknown flag `{other}` (use --seeds, --pipeline, --store, --set)");
                    std::process::exit(2);
                }
            }
        }
        if a.seeds.is_empty() {
            eprintln!("--seeds needs at least one seed, e.g. --seeds 1,2,3");
            std::process::exit(2);
        }
        a.store =
            store.unwrap_or_else(|| std::env::temp_dir().join(format!("msmae-bench-{name}-{}", std::process::id())));
        a
    }

    /// The lock file the runs of this pipeline write in the store.
    pub fn lock(&self) -> PathBuf {
        let stem =
            self.pipeline.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "bench".into());
        if stem == "quickstart" { self.store.join("bench.lock") } else { self.store.join(format!("{stem}.lock")) }
    }

    /// Run the pipeline under `seed` (stages already in the store are reused); exits the
    /// benchmark when the run fails.
    pub fn run(&self, tag: &str, seed: u64) -> Lock {
        self.run_with(tag, seed, &[])
    }

    /// [`Args::run`] with more `--set` overrides (a benchmark condition).
    pub fn run_with(&self, tag: &str, seed: u64, extra: &[&str]) -> Lock {
        eprintln!(
            "[bench {tag}] seed {seed}: running {} {} …",
            self.pipeline.display(),
            extra.iter().map(|s| format!("--set {s}")).collect::<Vec<_>>().join(" ")
        );
        let lock = self.lock();
        let mut c = Command::new(msmae_exe());
        c.args(["run"]).arg(&self.pipeline).arg("--store").arg(&self.store).arg("--lock").arg(&lock).args([
            "--set",
            &format!("seed={seed}"),
            "-q",
        ]);
        for s in self.sets.iter().map(String::as_str).chain(extra.iter().copied()) {
            c.args(["--set", s]);
        }
        let status = c.status().unwrap_or_else(|e| panic!("running msmae: {e}"));
        if !status.success() {
            eprintln!("[bench {tag}] seed {seed} failed");
            std::process::exit(1);
        }
        Lock::read(&self.store, &lock)
    }
}

/// The `msmae` binary built beside this example (target/release/msmae), else from PATH.
pub fn msmae_exe() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().and_then(Path::parent).map(|d| d.join("msmae")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("msmae"))
}

pub fn json(p: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A lock file's stages and where their artifacts are.
pub struct Lock {
    pub store: PathBuf,
    pub stages: Vec<serde_yaml::Value>,
}

impl Lock {
    pub fn read(store: &Path, lock: &Path) -> Lock {
        let l: serde_yaml::Value =
            serde_yaml::from_str(&std::fs::read_to_string(lock).unwrap_or_else(|e| panic!("{}: {e}", lock.display())))
                .unwrap_or_else(|e| panic!("{}: {e}", lock.display()));
        Lock {
            store: store.to_path_buf(),
            stages: l.get("stages").and_then(|s| s.as_sequence()).cloned().unwrap_or_default(),
        }
    }

    pub fn has(&self, name: &str) -> bool {
        self.stages.iter().any(|s| s.get("name").and_then(|n| n.as_str()) == Some(name))
    }

    pub fn stage(&self, name: &str) -> &serde_yaml::Value {
        self.stages
            .iter()
            .find(|s| s.get("name").and_then(|n| n.as_str()) == Some(name))
            .unwrap_or_else(|| panic!("stage `{name}` not in the lock file"))
    }

    /// Names of the stages of one kind, in lock order.
    pub fn of_kind(&self, kind: &str) -> Vec<String> {
        self.stages
            .iter()
            .filter(|s| s.get("kind").and_then(|k| k.as_str()) == Some(kind))
            .filter_map(|s| s.get("name").and_then(|n| n.as_str()).map(str::to_string))
            .collect()
    }

    /// The stage bound to `slot` of stage `name`.
    pub fn input(&self, name: &str, slot: &str) -> String {
        let s = self.stage(name);
        s.get("inputs")
            .and_then(|i| i.get(slot))
            .and_then(|v| v.get(0))
            .and_then(|v| v.get("stage"))
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .unwrap_or_default()
    }

    /// The artifact directory of stage `name`.
    pub fn dir(&self, name: &str) -> PathBuf {
        let d = self
            .stage(name)
            .get("output")
            .and_then(|o| o.get("digest"))
            .and_then(|d| d.as_str())
            .map(str::to_string)
            .expect("digest");
        self.store.join("objects").join(&d[..2]).join(&d).join("data")
    }

    /// Wall seconds of the stage's run.
    pub fn seconds(&self, name: &str) -> f64 {
        self.stage(name).get("run").and_then(|r| r.get("seconds")).and_then(|v| v.as_f64()).unwrap_or(f64::NAN)
    }

    /// `metrics.json` of an `eval/classify` stage: (accuracy, macro-F1, macro AUC) of the
    /// best-validation model, and of the last epoch's.
    pub fn scores(&self, name: &str) -> [(f64, f64, f64); 2] {
        let m = json(&self.dir(name).join("metrics.json"));
        let f = |k: &str| m[k].as_f64().unwrap_or(f64::NAN);
        let l = |k: &str| m["last_epoch"][k].as_f64().unwrap_or(f64::NAN);
        [(f("accuracy"), f("macro_f1"), f("macro_auc")), (l("accuracy"), l("macro_f1"), l("auc"))]
    }
}

pub fn mean_sd(v: &[f64]) -> String {
    let (m, sd) = msmae_eval::stats::mean_sd(v);
    if v.len() > 1 { format!("{m:.3} ± {sd:.3}") } else { format!("{m:.3}") }
}

/// A small deterministic generator (splitmix64).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// X-ray-like 1024² field: gradient + 24 soft blobs (computed on a 128² grid and
/// upsampled bilinearly) + noise (σ ≈ 3), so PNG compression is realistic.
pub fn field(seed: u64) -> Vec<f32> {
    const N: usize = 1024;
    const G: usize = 128;
    let mut rng = Rng(seed * 7919 + 1);
    let blobs: Vec<(f32, f32, f32, f32)> = (0..24)
        .map(|_| (rng.unit() * G as f32, rng.unit() * G as f32, 5.0 + rng.unit() * 20.0, (rng.unit() - 0.5) * 120.0))
        .collect();
    let mut grid = vec![0f32; G * G];
    for (i, g) in grid.iter_mut().enumerate() {
        let (y, x) = ((i / G) as f32, (i % G) as f32);
        *g =
            blobs.iter().map(|(bx, by, s, a)| a * (-((x - bx).powi(2) + (y - by).powi(2)) / (2.0 * s * s)).exp()).sum();
    }
    let mut out = vec![0f32; N * N];
    for y in 0..N {
        let gy = (y as f32 + 0.5) / 8.0 - 0.5;
        let (y0, fy) = (gy.floor().clamp(0.0, (G - 1) as f32) as usize, gy - gy.floor());
        let y1 = (y0 + 1).min(G - 1);
        for x in 0..N {
            let gx = (x as f32 + 0.5) / 8.0 - 0.5;
            let (x0, fx) = (gx.floor().clamp(0.0, (G - 1) as f32) as usize, gx - gx.floor());
            let x1 = (x0 + 1).min(G - 1);
            let b = grid[y0 * G + x0] * (1.0 - fx) * (1.0 - fy)
                + grid[y0 * G + x1] * fx * (1.0 - fy)
                + grid[y1 * G + x0] * (1.0 - fx) * fy
                + grid[y1 * G + x1] * fx * fy;
            let noise = (rng.unit() + rng.unit() + rng.unit() - 1.5) * 6.0;
            out[y * N + x] = 60.0 + 80.0 * y as f32 / N as f32 + 30.0 * x as f32 / N as f32 + b + noise;
        }
    }
    out
}

/// Run `cmd` (its standard output discarded), sampling the child's peak resident memory
/// (`VmHWM`) until it exits: (exit success, wall seconds, peak RSS in MiB).
pub fn run_measured(cmd: &mut Command) -> (bool, f64, f64) {
    cmd.stdout(std::process::Stdio::null());
    let t = std::time::Instant::now();
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let status_file = PathBuf::from(format!("/proc/{}/status", child.id()));
    let mut peak_kib = 0f64;
    loop {
        if let Ok(s) = std::fs::read_to_string(&status_file)
            && let Some(kib) = s
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        {
            peak_kib = peak_kib.max(kib);
        }
        match child.try_wait() {
            Ok(Some(status)) => return (status.success(), t.elapsed().as_secs_f64(), peak_kib / 1024.0),
            Ok(None) => std::thread::sleep(std::time::Duration::from_millis(20)),
            Err(e) => panic!("waiting for {cmd:?}: {e}"),
        }
    }
}
