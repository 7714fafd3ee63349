//! The results of a pipeline as its lock file records them, read from the store without
//! running anything: each stage's headline numbers and tables (what its
//! [`msmae_core::OutputDecl`] declares), its state (a stale stage's numbers are not
//! current, and say so), and the comparison with another lock file (`--against`).
//! Behind `msmae show`, `msmae path` and `msmae report`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use msmae_core::ExecEnv;
use msmae_core::artifact::json_at;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::inspect::{self, State};
use crate::lockfile::LockFile;
use crate::plan::Plan;
use crate::store::Store;

/// One stage's results.
#[derive(Debug, Clone, Serialize)]
pub struct StageResults {
    pub name: String,
    pub kind: String,
    /// `up to date`, `stale`, `new`, … (see [`State::label`]).
    pub state: String,
    /// Why it is not current (empty when it is).
    pub detail: String,
    /// The artifact the lock file records (none: never run).
    pub artifact: Option<String>,
    /// Its directory in the store, when the store has it.
    pub path: Option<PathBuf>,
    /// Declared headline numbers, in declaration order (absent values left out).
    pub metrics: Vec<(String, f64)>,
    /// Declared tables: rows of (column, value).
    pub tables: Vec<Table>,
    /// A problem reading the results (artifact not in the store, unreadable file).
    pub note: Option<String>,
}

/// A table of an artifact.
#[derive(Debug, Clone, Serialize)]
pub struct Table {
    pub name: String,
    pub columns: Vec<String>,
    pub rows: Vec<Vec<serde_json::Value>>,
}

impl StageResults {
    pub fn is_current(&self) -> bool {
        self.state == State::UpToDate.label()
    }
    pub fn metric(&self, name: &str) -> Option<f64> {
        self.metrics.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
    }
}

/// The results of every stage of `plan` (or of `only`, in the order given) as `lock`
/// records them, with each stage's state against the pipeline as it is now.
pub fn collect(
    plan: &Plan,
    store: &Store,
    lock: &LockFile,
    env: &ExecEnv,
    only: &[String],
) -> Result<Vec<StageResults>> {
    let names: Vec<String> = plan.nodes.iter().map(|n| n.name.clone()).collect();
    for s in only {
        if !names.contains(s) {
            return Err(Error::UnknownStage { name: s.clone(), known: names.join(", ") });
        }
    }
    let states: BTreeMap<String, State> =
        inspect::status(plan, store, lock, env).into_iter().map(|r| (r.name, r.state)).collect();
    let order: Vec<&String> = if only.is_empty() { names.iter().collect() } else { only.iter().collect() };
    let mut out = Vec::new();
    for name in order {
        let Some(node) = plan.nodes.iter().find(|n| &n.name == name) else { continue };
        // Without a filter, only stages that declare results (the rest are data).
        if only.is_empty() && node.output.metrics.is_empty() && node.output.tables.is_empty() {
            continue;
        }
        let state = states.get(name).cloned().unwrap_or(State::New);
        let detail = state.detail();
        let mut r = read(store, lock, &node.name, node.kind.kind(), &node.output);
        r.state = state.label().to_string();
        r.detail = detail;
        out.push(r);
    }
    Ok(out)
}

/// The declared metrics of `decl` read from an artifact's directory (absent or unreadable
/// values left out).
pub fn metric_values(dir: &std::path::Path, decl: &msmae_core::OutputDecl) -> BTreeMap<String, f64> {
    let mut files: BTreeMap<&str, Option<serde_json::Value>> = BTreeMap::new();
    let mut out = BTreeMap::new();
    for d in &decl.metrics {
        let v = files
            .entry(d.file.as_str())
            .or_insert_with(|| std::fs::read(dir.join(&d.file)).ok().and_then(|b| serde_json::from_slice(&b).ok()));
        if let Some(x) = v.as_ref().and_then(|v| json_at(v, &d.pointer)).as_ref().and_then(serde_json::Value::as_f64) {
            out.insert(d.name.clone(), x);
        }
    }
    out
}

/// One stage's results from the artifact `lock` records for it (state left empty).
pub fn read(store: &Store, lock: &LockFile, name: &str, kind: &str, decl: &msmae_core::OutputDecl) -> StageResults {
    let mut r = StageResults {
        name: name.to_string(),
        kind: kind.to_string(),
        state: String::new(),
        detail: String::new(),
        artifact: None,
        path: None,
        metrics: Vec::new(),
        tables: Vec::new(),
        note: None,
    };
    let Some(l) = lock.stage(name) else { return r };
    r.artifact = Some(l.output.digest.clone());
    if !store.has_object(&l.output.digest) {
        r.note = Some(format!("artifact {} is not in the store {}", &l.output.digest[..12], store.root().display()));
        return r;
    }
    let dir = store.object_dir(&l.output.digest);
    let mut files: BTreeMap<&str, std::result::Result<serde_json::Value, String>> = BTreeMap::new();
    let mut problems = Vec::new();
    for d in decl.metrics.iter().chain(&decl.tables) {
        files.entry(d.file.as_str()).or_insert_with(|| {
            let p = dir.join(&d.file);
            std::fs::read(&p)
                .map_err(|e| format!("{}: {e}", d.file))
                .and_then(|b| serde_json::from_slice(&b).map_err(|e| format!("{}: {e}", d.file)))
        });
    }
    problems.extend(files.values().filter_map(|v| v.as_ref().err().cloned()));
    for d in &decl.metrics {
        if let Some(Ok(v)) = files.get(d.file.as_str())
            && let Some(x) = json_at(v, &d.pointer).as_ref().and_then(serde_json::Value::as_f64)
        {
            r.metrics.push((d.name.clone(), x));
        }
    }
    for d in &decl.tables {
        if let Some(Ok(v)) = files.get(d.file.as_str())
            && let Some(rows) = json_at(v, &d.pointer).as_ref().and_then(serde_json::Value::as_array)
        {
            r.tables.push(table(&d.name, rows));
        }
    }
    if !problems.is_empty() {
        r.note = Some(problems.join("; "));
    }
    r.path = Some(dir);
    r
}

/// Rows of flat objects as a table; columns in first-seen order.
fn table(name: &str, rows: &[serde_json::Value]) -> Table {
    let mut columns: Vec<String> = Vec::new();
    for row in rows {
        if let Some(o) = row.as_object() {
            for k in o.keys() {
                if !columns.contains(k) {
                    columns.push(k.clone());
                }
            }
        }
    }
    let rows = rows
        .iter()
        .map(|row| columns.iter().map(|c| row.get(c).cloned().unwrap_or(serde_json::Value::Null)).collect())
        .collect();
    Table { name: name.to_string(), columns, rows }
}

/// The lock file to compare against: a file, or `REV` (a git revision) meaning the
/// pipeline's lock file as committed there (`git show REV:<lock>`).
pub fn against_lock(spec: &str, lock_path: &Path) -> Result<(String, LockFile)> {
    let as_file = Path::new(spec);
    if as_file.is_file() {
        return Ok((spec.to_string(), LockFile::read(as_file, "")?));
    }
    let dir = lock_path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let file = lock_path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    // `./NAME` is relative to the current directory of `git -C DIR`, i.e. to DIR.
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["show", &format!("{spec}:./{file}")])
        .output()
        .map_err(|e| Error::LockFile {
            path: PathBuf::from(spec),
            message: format!("neither a file nor a git revision (running git: {e})"),
        })?;
    if !out.status.success() {
        return Err(Error::LockFile {
            path: PathBuf::from(format!("{spec}:{file}")),
            message: format!(
                "neither a lock file nor a git revision holding one: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    let label = format!("{spec}:{file}");
    let lock = LockFile::parse(&String::from_utf8_lossy(&out.stdout), Path::new(&label))?;
    Ok((label, lock))
}

/// One row of a comparison: a metric of a stage in the other lock file and in this one.
#[derive(Debug, Clone, Serialize)]
pub struct Delta {
    pub stage: String,
    pub metric: String,
    pub against: Option<f64>,
    pub current: Option<f64>,
    pub delta: Option<f64>,
    /// Whether this lock file's side is current (not stale).
    pub current_is_current: bool,
}

/// Metric by metric, `other` (results read from another lock file) against `this`.
pub fn deltas(this: &[StageResults], other: &[StageResults]) -> Vec<Delta> {
    let mut out = Vec::new();
    for t in this {
        let o = other.iter().find(|o| o.name == t.name);
        let mut names: Vec<&String> = t.metrics.iter().map(|(n, _)| n).collect();
        if let Some(o) = o {
            names.extend(o.metrics.iter().map(|(n, _)| n).filter(|n| t.metric(n).is_none()));
        }
        for n in names {
            let (a, c) = (o.and_then(|o| o.metric(n)), t.metric(n));
            out.push(Delta {
                stage: t.name.clone(),
                metric: n.clone(),
                against: a,
                current: c,
                delta: a.zip(c).map(|(a, c)| c - a),
                current_is_current: t.is_current(),
            });
        }
    }
    out
}

/// How `msmae show` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShowFormat {
    Text,
    Json,
    Csv,
    Md,
}

/// A number as shown: integers as such, other values to 4 decimals.
pub fn num(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 { format!("{}", x as i64) } else { format!("{x:.4}") }
}

fn cell(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "-".into(),
        serde_json::Value::Number(n) => n.as_f64().map(num).unwrap_or_else(|| n.to_string()),
        serde_json::Value::String(s) => s.clone(),
        // a summary over seeds ({mean, sd}) or a difference with its interval ({mean, lo, hi})
        serde_json::Value::Object(o) if o.get("mean").is_some_and(serde_json::Value::is_number) => {
            let f = |k: &str| o.get(k).and_then(serde_json::Value::as_f64);
            match (f("mean"), f("sd"), f("lo"), f("hi")) {
                (Some(m), Some(sd), _, _) if o.len() == 2 => format!("{} ± {}", num(m), num(sd)),
                (Some(m), _, Some(lo), Some(hi)) if o.len() == 3 => format!("{} [{}, {}]", num(m), num(lo), num(hi)),
                _ => v.to_string(),
            }
        }
        other => other.to_string(),
    }
}

fn state_mark(r: &StageResults) -> String {
    if r.is_current() {
        r.state.clone()
    } else if r.artifact.is_some() {
        format!("{} (recorded results shown)", r.state.to_uppercase())
    } else {
        r.state.to_uppercase()
    }
}

/// Render results (and, given, the comparison against `against`'s label).
pub fn render(results: &[StageResults], against: Option<(&str, &[Delta])>, format: ShowFormat) -> String {
    match format {
        ShowFormat::Json => {
            let v = serde_json::json!({
                "stages": results,
                "against": against.map(|(label, d)| serde_json::json!({ "lock": label, "deltas": d })),
            });
            serde_json::to_string_pretty(&v).unwrap_or_default() + "\n"
        }
        ShowFormat::Csv => csv(results, against),
        ShowFormat::Text | ShowFormat::Md => text(results, against, format == ShowFormat::Md),
    }
}

fn csv(results: &[StageResults], against: Option<(&str, &[Delta])>) -> String {
    let q =
        |s: &str| if s.contains([',', '"', '\n']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.to_string() };
    let mut out = String::new();
    match against {
        None => {
            out.push_str("stage,kind,state,metric,value\n");
            for r in results {
                for (n, v) in &r.metrics {
                    let _ = writeln!(out, "{},{},{},{},{v}", q(&r.name), q(&r.kind), q(&r.state), q(n));
                }
            }
        }
        Some((label, deltas)) => {
            let _ = writeln!(out, "stage,metric,{},current,delta", q(label));
            let f = |x: Option<f64>| x.map(|x| x.to_string()).unwrap_or_default();
            for d in deltas {
                let _ =
                    writeln!(out, "{},{},{},{},{}", q(&d.stage), q(&d.metric), f(d.against), f(d.current), f(d.delta));
            }
        }
    }
    out
}

/// A plain or Markdown table.
pub fn grid(header: &[String], rows: &[Vec<String>], md: bool) -> String {
    let cols = header.len();
    let w: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                .max()
                .unwrap_or(0)
                .max(header[c].chars().count())
        })
        .collect();
    let line = |cells: &[String]| -> String {
        let padded: Vec<String> =
            (0..cols).map(|c| format!("{:w$}", cells.get(c).map(String::as_str).unwrap_or(""), w = w[c])).collect();
        if md { format!("| {} |", padded.join(" | ")) } else { padded.join("  ").trim_end().to_string() }
    };
    let mut out = line(header) + "\n";
    if md {
        out += &format!("|{}|\n", w.iter().map(|n| "-".repeat(n + 2)).collect::<Vec<_>>().join("|"));
    }
    for r in rows {
        out += &(line(r) + "\n");
    }
    out
}

fn text(results: &[StageResults], against: Option<(&str, &[Delta])>, md: bool) -> String {
    let mut out = String::new();
    let h = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    if let Some((label, deltas)) = against {
        let rows: Vec<Vec<String>> = deltas
            .iter()
            .map(|d| {
                let f = |x: Option<f64>| x.map(num).unwrap_or_else(|| "-".into());
                let cur = if d.current_is_current || d.current.is_none() {
                    f(d.current)
                } else {
                    format!("{} (stale)", f(d.current))
                };
                vec![
                    d.stage.clone(),
                    d.metric.clone(),
                    f(d.against),
                    cur,
                    d.delta.map(|x| format!("{x:+.4}")).unwrap_or_else(|| "-".into()),
                ]
            })
            .collect();
        out += &grid(&h(&["stage", "metric", label, "current", "delta"]), &rows, md);
        return out;
    }
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            let mut m: Vec<String> = r.metrics.iter().map(|(n, v)| format!("{n} {}", num(*v))).collect();
            if let Some(n) = &r.note {
                m.push(format!("({n})"));
            }
            if r.artifact.is_none() {
                m.push("(no results: never run)".into());
            }
            vec![r.name.clone(), r.kind.clone(), state_mark(r), m.join("  ")]
        })
        .collect();
    out += &grid(&h(&["stage", "kind", "state", "results"]), &rows, md);
    for r in results {
        for t in &r.tables {
            let title = format!(
                "{} of `{}`{}",
                t.name,
                r.name,
                if r.is_current() { String::new() } else { format!(" ({})", r.state.to_uppercase()) }
            );
            out += &if md { format!("\n**{title}**\n\n") } else { format!("\n{title}:\n") };
            let rows: Vec<Vec<String>> = t.rows.iter().map(|row| row.iter().map(cell).collect()).collect();
            out += &grid(&t.columns, &rows, md);
        }
    }
    let stale: Vec<&StageResults> = results.iter().filter(|r| !r.is_current() && r.artifact.is_some()).collect();
    if !stale.is_empty() {
        out += "\nnot current (the pipeline changed since these results; `msmae run` recomputes them):\n";
        for r in stale {
            let _ = writeln!(
                out,
                "  {}: {}",
                r.name,
                if r.detail.is_empty() { r.state.as_str() } else { r.detail.as_str() }
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(name: &str, state: &str, metrics: &[(&str, f64)]) -> StageResults {
        StageResults {
            name: name.into(),
            kind: "eval/classify".into(),
            state: state.into(),
            detail: String::new(),
            artifact: Some("a".repeat(64)),
            path: None,
            metrics: metrics.iter().map(|(n, v)| (n.to_string(), *v)).collect(),
            tables: Vec::new(),
            note: None,
        }
    }

    #[test]
    fn deltas_pair_metrics_by_stage_and_name() {
        let now = [res("eval", "up to date", &[("accuracy", 0.75), ("auc", 0.9)])];
        let old = [res("eval", "", &[("accuracy", 0.5), ("macro_f1", 0.4)])];
        let d = deltas(&now, &old);
        assert_eq!(d.len(), 3);
        assert_eq!((d[0].metric.as_str(), d[0].delta), ("accuracy", Some(0.25)));
        assert_eq!((d[1].metric.as_str(), d[1].against, d[1].delta), ("auc", None, None));
        assert_eq!((d[2].metric.as_str(), d[2].current), ("macro_f1", None));
        let t = render(&now, Some(("HEAD~1:q.lock", &d)), ShowFormat::Text);
        assert!(t.contains("HEAD~1:q.lock") && t.contains("+0.2500"), "{t}");
        let c = render(&now, Some(("old.lock", &d)), ShowFormat::Csv);
        assert!(c.starts_with("stage,metric,old.lock,current,delta\neval,accuracy,0.5,0.75,0.25\n"), "{c}");
    }

    #[test]
    fn stale_results_are_marked_not_shown_as_current() {
        let r = [res("ft", "stale", &[("train_loss", 0.5)]), res("eval", "up to date", &[("accuracy", 1.0)])];
        let t = render(&r, None, ShowFormat::Text);
        assert!(t.contains("STALE (recorded results shown)"), "{t}");
        assert!(t.contains("not current") && t.contains("  ft: stale"), "{t}");
        let m = render(&r, None, ShowFormat::Md);
        assert!(m.lines().nth(1).is_some_and(|l| l.starts_with("|--")), "{m}");
        let j: serde_json::Value = serde_json::from_str(&render(&r, None, ShowFormat::Json)).unwrap_or_default();
        assert_eq!(j["stages"][0]["state"], "stale");
        assert_eq!(j["stages"][1]["metrics"][0][1], 1.0);
    }

    #[test]
    fn numbers_print_as_integers_or_to_four_decimals() {
        assert_eq!(num(400.0), "400");
        assert_eq!(num(0.123456), "0.1235");
    }
}
