//! Test-only stage plugins exercising every runner semantic, and helpers.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use msmae_core::{
    ConfigError, InputSlot, ListedFiles, OutputDecl, Registry, Resources, Stage, StageContext, StageError,
};
use msmae_pipeline::{Plan, RunOptions, RunReport, Store};
use serde::{Deserialize, Serialize};

/// Append a line to a marker file (how tests count executions; the path is part of the
/// config, so it is declared like everything else). The line goes out in one `write` on
/// an `O_APPEND` file, so stages marking at the same time (parallel stages, two runner
/// processes) never interleave: `writeln!` on a `File` may issue the text and the newline
/// as two writes, which once produced a line "ad" and an empty one in CI.
fn mark(marker: &Option<String>, what: &str) {
    if let Some(m) = marker {
        let mut f = fs::OpenOptions::new().create(true).append(true).open(m).expect("marker");
        f.write_all(format!("{what}\n").as_bytes()).expect("marker write");
    }
}

pub fn marks(path: &Path) -> Vec<String> {
    fs::read_to_string(path).unwrap_or_default().lines().map(str::to_string).collect()
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceCfg {
    pub value: String,
    /// Does not influence the output: changing it re-runs the stage but not downstream.
    #[serde(default)]
    pub note: String,
    #[serde(default)]
    pub fail: bool,
    #[serde(default)]
    pub marker: Option<String>,
    /// Wait until this file exists before finishing (for parallelism tests).
    #[serde(default)]
    pub wait_for: Option<String>,
    /// Create this file when starting.
    #[serde(default)]
    pub touch: Option<String>,
    #[serde(default)]
    pub exclusive: bool,
}

/// Writes `value` to out.txt.
#[derive(Debug)]
pub struct Source;
impl Stage for Source {
    type Config = SourceCfg;
    const KIND: &'static str = "test/source";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "writes a value";
    fn code_fingerprint(&self) -> &'static str {
        "test-source"
    }
    fn validate(&self, c: &SourceCfg) -> Result<(), ConfigError> {
        if c.value.len() > 1000 {
            return Err(ConfigError { path: "value".into(), message: "too long".into() });
        }
        Ok(())
    }
    fn inputs(&self, _: &SourceCfg) -> Vec<InputSlot> {
        vec![]
    }
    fn output(&self, _: &SourceCfg) -> OutputDecl {
        OutputDecl::new("blob", &["out.txt"])
    }
    fn resources(&self, c: &SourceCfg) -> Resources {
        if c.exclusive { Resources::Exclusive } else { Resources::Light }
    }
    fn run(&self, c: &SourceCfg, ctx: &mut StageContext<'_>) -> Result<(), StageError> {
        if let Some(t) = &c.touch {
            fs::write(t, b"").map_err(|e| StageError::io(t, e))?;
        }
        if let Some(w) = &c.wait_for {
            let t0 = Instant::now();
            while !Path::new(w).exists() {
                if t0.elapsed() > Duration::from_secs(120) {
                    return Err(StageError::other(format!("timed out waiting for {w}")));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        mark(&c.marker, &ctx.name);
        if c.fail {
            return Err(StageError::other("asked to fail"));
        }
        let p = ctx.output_path("out.txt")?;
        fs::write(&p, &c.value).map_err(|e| StageError::io(&p, e))
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConcatCfg {
    #[serde(default)]
    pub suffix: String,
    #[serde(default)]
    pub marker: Option<String>,
}

/// Concatenates its `parts` inputs and a suffix.
#[derive(Debug)]
pub struct Concat;
impl Stage for Concat {
    type Config = ConcatCfg;
    const KIND: &'static str = "test/concat";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "concatenates blobs";
    fn code_fingerprint(&self) -> &'static str {
        "test-concat"
    }
    fn inputs(&self, _: &ConcatCfg) -> Vec<InputSlot> {
        vec![InputSlot::many("parts", "blob", "blobs to join")]
    }
    fn output(&self, _: &ConcatCfg) -> OutputDecl {
        OutputDecl::new("blob", &["out.txt"])
    }
    fn run(&self, c: &ConcatCfg, ctx: &mut StageContext<'_>) -> Result<(), StageError> {
        mark(&c.marker, &ctx.name);
        let mut s = String::new();
        for a in ctx.inputs("parts") {
            s.push_str(&fs::read_to_string(a.path("out.txt")).map_err(|e| StageError::io(a.path("out.txt"), e))?);
        }
        s.push_str(&c.suffix);
        let p = ctx.output_path("out.txt")?;
        fs::write(&p, s).map_err(|e| StageError::io(&p, e))
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PairCfg {}

/// Two single slots of the same kind: binding by kind is ambiguous without names.
#[derive(Debug)]
pub struct Pair;
impl Stage for Pair {
    type Config = PairCfg;
    const KIND: &'static str = "test/pair";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "diff of two blobs";
    fn code_fingerprint(&self) -> &'static str {
        "test-pair"
    }
    fn inputs(&self, _: &PairCfg) -> Vec<InputSlot> {
        vec![
            InputSlot::one("left", "blob", "left"),
            InputSlot::one("right", "blob", "right"),
            InputSlot::optional("table", "table", "optional table"),
        ]
    }
    fn output(&self, _: &PairCfg) -> OutputDecl {
        OutputDecl::new("blob", &["out.txt"])
    }
    fn run(&self, _: &PairCfg, ctx: &mut StageContext<'_>) -> Result<(), StageError> {
        let l = fs::read_to_string(ctx.input("left")?.path("out.txt")).map_err(|e| StageError::io("left", e))?;
        let r = fs::read_to_string(ctx.input("right")?.path("out.txt")).map_err(|e| StageError::io("right", e))?;
        let p = ctx.output_path("out.txt")?;
        fs::write(&p, format!("{l}|{r}")).map_err(|e| StageError::io(&p, e))
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtCfg {
    pub root: PathBuf,
    #[serde(default)]
    pub marker: Option<String>,
}

/// Reads an external folder (like a dataset) and lists it.
#[derive(Debug)]
pub struct Ext;
impl Stage for Ext {
    type Config = ExtCfg;
    const KIND: &'static str = "test/ingest";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "lists a folder";
    fn code_fingerprint(&self) -> &'static str {
        "test-ingest"
    }
    fn inputs(&self, _: &ExtCfg) -> Vec<InputSlot> {
        vec![]
    }
    fn output(&self, _: &ExtCfg) -> OutputDecl {
        OutputDecl::new("table", &["listing.txt", "previews/*.txt"])
    }
    fn external_inputs(&self, c: &ExtCfg) -> Vec<PathBuf> {
        vec![c.root.clone()]
    }
    fn run(&self, c: &ExtCfg, ctx: &mut StageContext<'_>) -> Result<(), StageError> {
        mark(&c.marker, &ctx.name);
        let root = ctx.resolve(&c.root);
        let mut names: Vec<String> = fs::read_dir(&root)
            .map_err(|e| StageError::io(&root, e))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let p = ctx.output_path("listing.txt")?;
        fs::write(&p, names.join("\n")).map_err(|e| StageError::io(&p, e))?;
        let pv = ctx.output_path("previews/first.txt")?;
        fs::write(&pv, names.first().cloned().unwrap_or_default()).map_err(|e| StageError::io(&pv, e))
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListCfg {
    /// A file naming one file per line, relative to its own folder or absolute.
    pub list: PathBuf,
    #[serde(default)]
    pub marker: Option<String>,
}

fn listed_paths(list: &Path) -> Result<Vec<PathBuf>, StageError> {
    let text = fs::read_to_string(list).map_err(|e| StageError::io(list, e))?;
    let dir = list.parent().unwrap_or(Path::new(""));
    Ok(text.lines().filter(|l| !l.is_empty()).map(|l| dir.join(l)).collect())
}

/// Concatenates the files a list names (like a manifest stage reads its images).
#[derive(Debug)]
pub struct Listed;
impl Stage for Listed {
    type Config = ListCfg;
    const KIND: &'static str = "test/listed";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "concatenates listed files";
    fn code_fingerprint(&self) -> &'static str {
        "test-listed"
    }
    fn inputs(&self, _: &ListCfg) -> Vec<InputSlot> {
        vec![]
    }
    fn output(&self, _: &ListCfg) -> OutputDecl {
        OutputDecl::new("text", &["out.txt"])
    }
    fn external_inputs(&self, c: &ListCfg) -> Vec<PathBuf> {
        vec![c.list.clone()]
    }
    fn listed_inputs(&self, c: &ListCfg, base: &Path) -> Result<Option<ListedFiles>, StageError> {
        let list = base.join(&c.list);
        Ok(Some(ListedFiles { files: listed_paths(&list)?, list }))
    }
    fn run(&self, c: &ListCfg, ctx: &mut StageContext<'_>) -> Result<(), StageError> {
        mark(&c.marker, &ctx.name);
        let parts: Vec<String> = listed_paths(&ctx.resolve(&c.list))?
            .iter()
            .map(|p| fs::read_to_string(p).unwrap_or_else(|_| "missing".into()))
            .collect();
        let p = ctx.output_path("out.txt")?;
        fs::write(&p, parts.join("+")).map_err(|e| StageError::io(&p, e))
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MisCfg {
    /// `undeclared` | `missing` | `symlink` | `panic` | `escape`
    pub how: String,
}

/// Misbehaves in the chosen way.
#[derive(Debug)]
pub struct Misbehave;
impl Stage for Misbehave {
    type Config = MisCfg;
    const KIND: &'static str = "test/misbehave";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "breaks the rules";
    fn code_fingerprint(&self) -> &'static str {
        "test-misbehave"
    }
    fn inputs(&self, _: &MisCfg) -> Vec<InputSlot> {
        vec![]
    }
    fn output(&self, _: &MisCfg) -> OutputDecl {
        OutputDecl::new("blob", &["out.txt"])
    }
    fn run(&self, c: &MisCfg, ctx: &mut StageContext<'_>) -> Result<(), StageError> {
        let out = ctx.out_dir().to_path_buf();
        match c.how.as_str() {
            "undeclared" => {
                fs::write(out.join("out.txt"), "x").map_err(|e| StageError::io("out", e))?;
                fs::write(out.join("secret.bin"), "x").map_err(|e| StageError::io("secret", e))
            }
            "missing" => Ok(()),
            "symlink" => {
                std::os::unix::fs::symlink("/etc/hostname", out.join("out.txt")).map_err(|e| StageError::io("link", e))
            }
            "panic" => panic!("stage bug"),
            "escape" => ctx.output_path("../escape.txt").map(|_| ()),
            other => Err(StageError::other(format!("unknown mode {other}"))),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlowCfg {
    /// Influences the output (so that changing it re-runs the stage).
    pub value: String,
    /// Write a partial file, announce it here, then wait until `release` exists.
    pub started: String,
    pub release: String,
    #[serde(default)]
    pub marker: Option<String>,
}

/// A long stage that is killed in the middle.
#[derive(Debug)]
pub struct Slow;
impl Stage for Slow {
    type Config = SlowCfg;
    const KIND: &'static str = "test/slow";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "takes its time";
    fn code_fingerprint(&self) -> &'static str {
        "test-slow"
    }
    fn inputs(&self, _: &SlowCfg) -> Vec<InputSlot> {
        vec![InputSlot::optional("after", "blob", "ordering only")]
    }
    fn output(&self, _: &SlowCfg) -> OutputDecl {
        OutputDecl::new("blob", &["out.txt"])
    }
    fn run(&self, c: &SlowCfg, ctx: &mut StageContext<'_>) -> Result<(), StageError> {
        mark(&c.marker, &ctx.name);
        let p = ctx.output_path("out.txt")?;
        fs::write(&p, "partial").map_err(|e| StageError::io(&p, e))?;
        fs::write(&c.started, std::process::id().to_string()).map_err(|e| StageError::io(&c.started, e))?;
        let t0 = Instant::now();
        while !Path::new(&c.release).exists() {
            ctx.cancel.check()?;
            if t0.elapsed() > Duration::from_secs(120) {
                return Err(StageError::other("never released"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        fs::write(&p, format!("complete {}", c.value)).map_err(|e| StageError::io(&p, e))
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelCfg {
    #[serde(default)]
    pub marker: Option<String>,
}

/// A stage whose numbers depend on the backend.
#[derive(Debug)]
pub struct Model;
impl Stage for Model {
    type Config = ModelCfg;
    const KIND: &'static str = "test/model";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "uses the backend";
    const USES_BACKEND: bool = true;
    fn code_fingerprint(&self) -> &'static str {
        "test-model"
    }
    fn inputs(&self, _: &ModelCfg) -> Vec<InputSlot> {
        vec![InputSlot::one("data", "blob", "training data")]
    }
    fn output(&self, _: &ModelCfg) -> OutputDecl {
        OutputDecl::new("checkpoint", &["model.txt"])
    }
    fn run(&self, c: &ModelCfg, ctx: &mut StageContext<'_>) -> Result<(), StageError> {
        mark(&c.marker, &ctx.name);
        let p = ctx.output_path("model.txt")?;
        fs::write(&p, format!("trained on {}", ctx.env.backend)).map_err(|e| StageError::io(&p, e))
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeasureCfg {
    /// A file whose number becomes the score: read at run time but not part of the key, as
    /// a thread-dependent float reduction would be (what `msmae audit` must catch).
    pub reading: String,
}

/// Writes `metrics.json` with a `score` metric read from a file outside the key.
#[derive(Debug)]
pub struct Measure;
impl Stage for Measure {
    type Config = MeasureCfg;
    const KIND: &'static str = "test/measure";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "a result the key does not determine";
    const USES_BACKEND: bool = true;
    fn code_fingerprint(&self) -> &'static str {
        "test-measure"
    }
    fn inputs(&self, _: &MeasureCfg) -> Vec<InputSlot> {
        vec![InputSlot::one("data", "blob", "what is measured")]
    }
    fn output(&self, _: &MeasureCfg) -> OutputDecl {
        OutputDecl::new("metrics", &["metrics.json"]).metric("score", "metrics.json", "/score")
    }
    fn run(&self, c: &MeasureCfg, ctx: &mut StageContext<'_>) -> Result<(), StageError> {
        let score: f64 = fs::read_to_string(&c.reading)
            .map_err(|e| StageError::io(&c.reading, e))?
            .trim()
            .parse()
            .map_err(|_| StageError::other("not a number"))?;
        let p = ctx.output_path("metrics.json")?;
        fs::write(&p, serde_json::json!({ "score": score }).to_string()).map_err(|e| StageError::io(&p, e))
    }
}

pub fn registry() -> Registry {
    let mut r = Registry::new();
    r.register(Source)
        .register(Concat)
        .register(Pair)
        .register(Ext)
        .register(Listed)
        .register(Misbehave)
        .register(Slow)
        .register(Model)
        .register(Measure);
    r
}

/// A pipeline file plus store in a temp dir.
#[derive(Debug)]
pub struct Fixture {
    root: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl Fixture {
    pub fn new(yaml: &str) -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let f = Fixture { root: tmp.path().to_path_buf(), _tmp: Some(tmp) };
        f.write(yaml);
        f
    }
    /// A fixture over an existing directory, not removed on drop (child processes).
    pub fn at(path: &Path) -> Self {
        Fixture { root: path.to_path_buf(), _tmp: None }
    }
    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }
    pub fn pipeline(&self) -> PathBuf {
        self.path("p.yaml")
    }
    pub fn write(&self, yaml: &str) {
        fs::write(self.pipeline(), yaml.replace("$DIR", &self.root.to_string_lossy())).expect("write pipeline");
    }
    pub fn store(&self) -> Store {
        Store::open(&self.path(".msmae")).expect("store")
    }
    pub fn plan(&self, sets: &[&str]) -> Plan {
        let o: Vec<_> = sets.iter().map(|s| s.parse().expect("override")).collect();
        msmae_pipeline::load_plan(&self.pipeline(), &o, &registry()).unwrap_or_else(|e| panic!("plan: {e}"))
    }
    pub fn run_with(&self, sets: &[&str], opts: RunOptions) -> RunReport {
        let plan = self.plan(sets);
        msmae_pipeline::run(&plan, &self.store(), &opts, &msmae_core::NoProgress).expect("run")
    }
    pub fn run(&self) -> RunReport {
        self.run_with(&[], RunOptions::default())
    }
    pub fn lock_text(&self) -> String {
        fs::read_to_string(self.path("p.lock")).unwrap_or_default()
    }
    pub fn marker(&self) -> String {
        self.path("marker").to_string_lossy().into_owned()
    }
    pub fn marks(&self) -> Vec<String> {
        marks(&self.path("marker"))
    }
    pub fn clear_marks(&self) {
        let _ = fs::remove_file(self.path("marker"));
    }
}

/// Outcome labels by stage, in order.
pub fn outcomes(r: &RunReport) -> Vec<(String, &'static str)> {
    r.stages.iter().map(|s| (s.name.clone(), s.outcome.label())).collect()
}

pub fn outcome<'a>(r: &'a RunReport, name: &str) -> &'a msmae_pipeline::Outcome {
    &r.stage(name).unwrap_or_else(|| panic!("no stage {name}")).outcome
}
