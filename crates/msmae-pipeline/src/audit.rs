//! `msmae audit`: does a recorded result reproduce? Each named stage is recomputed from
//! what its lock-file block records — its config, seed and input artifacts, read from the
//! store — into a scratch store, and its output compared with the recorded artifact: bit for
//! bit, then by its declared metrics (recorded vs recomputed, with the delta). Neither the
//! lock file nor the store is written. Each stage is audited on its recorded inputs, so one
//! stage's difference does not cascade into the next.
//!
//! What an audit can and cannot expect: data stages reproduce bit for bit everywhere; CPU
//! training reproduces bit for bit with the same thread count on the same CPU model (float
//! reductions are ordered by the thread split and the instruction set); GPU kernels may
//! differ between runs. The report puts every environment difference beside each result.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use msmae_core::{CancelToken, ExecEnv, InputArtifact, Progress, StageContext};

use crate::error::{Error, Result};
use crate::key::Code;
use crate::lockfile::{LockFile, StageLock};
use crate::plan::Plan;
use crate::store::{Host, Store};

/// How to audit.
pub struct AuditOptions<'a> {
    /// Stages to recompute (empty: every stage the lock file records, in pipeline order).
    pub stages: Vec<String>,
    /// CPU threads to compute with (default: each stage's recorded count).
    pub threads: Option<usize>,
    /// Largest absolute metric difference still counted as reproduced.
    pub tolerance: f64,
    /// The environment this machine computes in.
    pub env: ExecEnv,
    /// Sets the backend's CPU threads; returns the count in force.
    pub set_threads: &'a dyn Fn(usize) -> usize,
    /// Where to recompute (default: a temporary directory removed afterwards).
    pub scratch: Option<PathBuf>,
    pub cancel: CancelToken,
}

impl std::fmt::Debug for AuditOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditOptions")
            .field("stages", &self.stages)
            .field("threads", &self.threads)
            .field("tolerance", &self.tolerance)
            .finish_non_exhaustive()
    }
}

/// One metric, recorded and recomputed.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MetricDelta {
    pub name: String,
    pub recorded: Option<f64>,
    pub recomputed: Option<f64>,
    pub delta: Option<f64>,
}

/// The verdict on one stage.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    BitIdentical,
    WithinTolerance,
    Differs,
    Failed,
}

impl Verdict {
    pub fn label(self) -> &'static str {
        match self {
            Verdict::BitIdentical => "bit-identical",
            Verdict::WithinTolerance => "within tolerance",
            Verdict::Differs => "DIFFERS",
            Verdict::Failed => "FAILED",
        }
    }
    pub fn reproduced(self) -> bool {
        matches!(self, Verdict::BitIdentical | Verdict::WithinTolerance)
    }
}

/// What the audit found for one stage.
#[derive(Debug, Clone, Serialize)]
pub struct StageAudit {
    pub stage: String,
    pub kind: String,
    pub verdict: Verdict,
    pub recorded: String,
    pub recomputed: Option<String>,
    pub metrics: Vec<MetricDelta>,
    /// The recorded run's environment against this one (host, CPU, threads, backend, …),
    /// and changes of code or data since the record: what a difference may come from.
    pub differences: Vec<String>,
    pub threads: usize,
    pub seconds: f64,
    pub error: Option<String>,
}

/// Recompute `opts.stages` of `plan` as `lock` records them, reading inputs from `store`.
pub fn audit(
    plan: &Plan,
    store: &Store,
    lock: &LockFile,
    opts: &AuditOptions<'_>,
    progress: &dyn Progress,
) -> Result<Vec<StageAudit>> {
    let names: Vec<String> = if opts.stages.is_empty() {
        plan.nodes.iter().filter(|n| lock.stage(&n.name).is_some()).map(|n| n.name.clone()).collect()
    } else {
        opts.stages.clone()
    };
    // Every problem with the request is reported before anything is computed.
    let mut todo = Vec::new();
    for name in &names {
        let Some(node) = plan.nodes.iter().find(|n| &n.name == name) else {
            return Err(Error::UnknownStage {
                name: name.clone(),
                known: plan.nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>().join(", "),
            });
        };
        let Some(rec) = lock.stage(name) else {
            return Err(Error::Audit(format!(
                "stage `{name}` has no record in the lock file: there is nothing to reproduce yet (run the pipeline first)"
            )));
        };
        for (slot, ins) in &rec.parts.inputs {
            for i in ins {
                if !store.has_object(&i.digest) {
                    return Err(Error::Audit(format!(
                        "input `{slot}` of stage `{name}` (artifact {} of `{}`) is not in the store {}: audit recomputes from the recorded inputs, so it needs the store the pipeline ran with",
                        &i.digest[..12.min(i.digest.len())],
                        i.stage,
                        store.root().display()
                    )));
                }
            }
        }
        todo.push((node, rec));
    }
    if todo.is_empty() {
        return Err(Error::Audit("the lock file records no stage of this pipeline: run it first".into()));
    }
    let tmp;
    let scratch_root = match &opts.scratch {
        Some(p) => p.clone(),
        None => {
            tmp = tempfile::Builder::new()
                .prefix("msmae-audit-")
                .tempdir()
                .map_err(|e| Error::store("create", std::env::temp_dir(), e))?;
            tmp.path().join("store")
        }
    };
    let scratch = Store::open(&scratch_root)?;
    let mut out = Vec::new();
    for (node, rec) in todo {
        if opts.cancel.is_cancelled() {
            break;
        }
        out.push(audit_stage(plan, store, &scratch, node, rec, opts, progress));
    }
    Ok(out)
}

fn audit_stage(
    plan: &Plan,
    store: &Store,
    scratch: &Store,
    node: &crate::plan::Node,
    rec: &StageLock,
    opts: &AuditOptions<'_>,
    progress: &dyn Progress,
) -> StageAudit {
    let wanted = opts.threads.or(rec.run.threads).unwrap_or(rec.run.host.cpus).max(1);
    let threads = if node.kind.uses_backend() { (opts.set_threads)(wanted) } else { wanted };
    let mut a = StageAudit {
        stage: node.name.clone(),
        kind: node.kind.kind().to_string(),
        verdict: Verdict::Failed,
        recorded: rec.output.digest.clone(),
        recomputed: None,
        metrics: Vec::new(),
        differences: differences(plan, store, node, rec, &opts.env, threads),
        threads,
        seconds: 0.0,
        error: None,
    };
    let t = Instant::now();
    match recompute(plan, store, scratch, node, rec, opts, threads, progress) {
        Ok((digest, decl)) => {
            let before = crate::results::metric_values(&store.object_dir(&rec.output.digest), &decl);
            let after = crate::results::metric_values(&scratch.object_dir(&digest), &decl);
            a.metrics = decl
                .metrics
                .iter()
                .map(|m| {
                    let (r, c) = (before.get(&m.name).copied(), after.get(&m.name).copied());
                    MetricDelta {
                        name: m.name.clone(),
                        recorded: r,
                        recomputed: c,
                        delta: r.zip(c).map(|(r, c)| c - r),
                    }
                })
                .collect();
            a.verdict = if digest == rec.output.digest {
                Verdict::BitIdentical
            } else if !a.metrics.is_empty()
                && a.metrics.iter().all(|m| m.delta.is_some_and(|d| d.abs() <= opts.tolerance))
            {
                Verdict::WithinTolerance
            } else {
                Verdict::Differs
            };
            a.recomputed = Some(digest);
        }
        Err(e) => a.error = Some(msmae_core::error::chain(&e)),
    }
    a.seconds = (t.elapsed().as_secs_f64() * 100.0).round() / 100.0;
    a
}

/// Recompute `node` as `rec` records it; the artifact's digest in `scratch` and the output
/// declaration of the recorded config (whose metrics the caller compares).
#[allow(clippy::too_many_arguments)]
fn recompute(
    plan: &Plan,
    store: &Store,
    scratch: &Store,
    node: &crate::plan::Node,
    rec: &StageLock,
    opts: &AuditOptions<'_>,
    threads: usize,
    progress: &dyn Progress,
) -> Result<(String, msmae_core::OutputDecl)> {
    let prepared = node.kind.prepare(&rec.parts.config).map_err(|e| {
        Error::Audit(format!(
            "the recorded config of `{}` is not valid for this msmae's `{}`: {e}",
            node.name,
            node.kind.kind()
        ))
    })?;
    let decl = prepared.output();
    let mut inputs: BTreeMap<String, Vec<InputArtifact>> = BTreeMap::new();
    for (slot, ins) in &rec.parts.inputs {
        for i in ins {
            let kind = store.manifest(&i.digest)?.kind;
            inputs.entry(slot.clone()).or_default().push(InputArtifact {
                stage: i.stage.clone(),
                kind: msmae_core::ArtifactKind::new(&kind),
                dir: store.object_dir(&i.digest),
                digest: i.digest.clone(),
            });
        }
    }
    let staging = scratch.begin(&rec.key)?;
    let resume = scratch.resume_dir(&rec.key, true)?;
    let mut ctx = StageContext::new(
        node.name.clone(),
        rec.parts.seed,
        opts.env.clone(),
        threads,
        opts.cancel.clone(),
        progress,
        staging.data_dir(),
        plan.spec.base_dir.clone(),
        decl.clone(),
        inputs,
    )
    .with_resume_dir(resume);
    tracing::info!("recomputing `{}` ({}) with {threads} threads", node.name, node.kind.kind());
    prepared.run(&mut ctx).map_err(|e| Error::Stage { stage: node.name.clone(), source: e })?;
    let manifest = scratch.commit(staging, &node.name, &decl)?;
    Ok((manifest.digest, decl))
}

/// The recorded run's circumstances against this machine's, and what changed since.
fn differences(
    plan: &Plan,
    store: &Store,
    node: &crate::plan::Node,
    rec: &StageLock,
    env: &ExecEnv,
    threads: usize,
) -> Vec<String> {
    let mut d = Vec::new();
    let here = Host::current();
    let was = &rec.run.host;
    if was.hostname != here.hostname {
        d.push(format!("host {} → {}", was.hostname, here.hostname));
    }
    if !was.cpu_model.is_empty() && was.cpu_model != here.cpu_model {
        d.push(format!("CPU {} → {}", was.cpu_model, here.cpu_model));
    } else if was.cpu_model.is_empty() {
        d.push(format!("CPU not recorded → {}", here.cpu_model));
    }
    if node.kind.uses_backend() {
        match rec.run.threads {
            Some(t) if t != threads => d.push(format!("threads {t} → {threads}")),
            None => d.push(format!("threads not recorded ({} CPUs) → {threads}", was.cpus)),
            _ => {}
        }
        if let Some(e) = &rec.parts.env {
            if e.backend != env.backend {
                d.push(format!("backend {} → {}", e.backend, env.backend));
            }
            if e.library != env.library {
                d.push(format!("library {} → {}", show(&e.library), show(&env.library)));
            }
            if e.device_kind != env.device_kind {
                d.push(format!("device {} → {}", e.device_kind, env.device_kind));
            }
            if e.precision != env.precision {
                d.push(format!("precision {} → {}", e.precision, env.precision));
            }
        }
    }
    let code = Code::parse(node.kind.code_fingerprint());
    if code.digest != rec.parts.code {
        let changed: Vec<&String> =
            code.crates.iter().filter(|(k, v)| rec.parts.crates.get(*k) != Some(v)).map(|(k, _)| k).collect();
        let which = if changed.is_empty() {
            String::new()
        } else {
            format!(" ({})", changed.iter().map(|c| format!("`{c}`")).collect::<Vec<_>>().join(", "))
        };
        d.push(format!("code changed since the record{which}"));
    }
    for (name, v) in &code.deps {
        match rec.parts.deps.get(name) {
            Some(r) if r != v => d.push(format!("dependency {name} {r} → {v}")),
            _ => {}
        }
    }
    // Data folders the stage reads: their content now against the record.
    for ext in &rec.parts.external {
        if let Some(p) = node
            .external
            .iter()
            .find(|p| p.strip_prefix(&plan.spec.base_dir).unwrap_or(p).to_string_lossy() == ext.path)
            && let Ok(now) = store.memo().tree(p)
            && now.hex != ext.digest
        {
            d.push(format!("external `{}` changed since the record", ext.path));
        }
    }
    d
}

fn show(l: &str) -> &str {
    if l.is_empty() { "none" } else { l }
}

/// The audit as text: one line per stage, its metric deltas and differences below it.
pub fn render_text(pipeline: &Path, lock: &Path, audits: &[StageAudit], tolerance: f64) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(s, "audit of {} against {}", pipeline.display(), lock.display());
    let w = audits.iter().map(|a| a.stage.len()).max().unwrap_or(5).max(5);
    let _ = writeln!(
        s,
        "{:w$}  {:24} {:17} {:>7} {:>9}  artifact recorded → recomputed",
        "stage", "kind", "result", "threads", "seconds"
    );
    for a in audits {
        let rec = &a.recorded[..12.min(a.recorded.len())];
        let got = a.recomputed.as_deref().map_or("-", |d| &d[..12.min(d.len())]);
        let _ = writeln!(
            s,
            "{:w$}  {:24} {:17} {:>7} {:>9.2}  {rec} → {got}",
            a.stage,
            a.kind,
            a.verdict.label(),
            a.threads,
            a.seconds
        );
        if let Some(e) = &a.error {
            let _ = writeln!(s, "{:w$}    error: {e}", "");
        }
        if a.verdict != Verdict::BitIdentical {
            for m in &a.metrics {
                let f = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.4}"));
                let delta = m.delta.map_or_else(String::new, |d| format!(" (Δ {d:+.4})"));
                let _ = writeln!(s, "{:w$}    {}: {} → {}{delta}", "", m.name, f(m.recorded), f(m.recomputed));
            }
        }
        for d in &a.differences {
            let _ = writeln!(s, "{:w$}    {d}", "");
        }
    }
    let count = |v: Verdict| audits.iter().filter(|a| a.verdict == v).count();
    let _ = writeln!(
        s,
        "{} stages: {} bit-identical, {} within tolerance {tolerance}, {} differ, {} failed",
        audits.len(),
        count(Verdict::BitIdentical),
        count(Verdict::WithinTolerance),
        count(Verdict::Differs),
        count(Verdict::Failed)
    );
    s
}
