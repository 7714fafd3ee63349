//! Read-only views of a pipeline and its store: `status` (what is stale and why), `why`,
//! `dag` (text, DOT, Mermaid), `verify` (re-hash artifacts against the lock file) and
//! `gc` (remove what nothing refers to).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;

use msmae_core::ExecEnv;

use crate::error::Result;
use crate::exec::key_parts;
use crate::key::KeyParts;
use crate::lockfile::LockFile;
use crate::plan::Plan;
use crate::store::Store;

/// The state of one stage as `status` sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum State {
    /// Cached and what the lock file records.
    UpToDate,
    /// Cached, but the lock file records another result (e.g. a config was changed back):
    /// the next run restores it from the cache without executing.
    Restorable {
        reasons: Vec<String>,
    },
    /// Must execute; `reasons` compare with the lock file.
    Stale {
        reasons: Vec<String>,
    },
    /// Never run with this pipeline.
    New,
    /// Its inputs are not computed yet.
    Waiting {
        upstream: String,
    },
    Error {
        message: String,
    },
}

impl State {
    /// Why a stage is in this state (empty when it is up to date or new).
    pub fn detail(&self) -> String {
        match self {
            State::Stale { reasons } | State::Restorable { reasons } => reasons.join("; "),
            State::Waiting { upstream } => format!("after `{upstream}`"),
            State::Error { message } => message.clone(),
            _ => String::new(),
        }
    }

    pub fn label(&self) -> &'static str {
        match self {
            State::UpToDate => "up to date",
            State::Restorable { .. } => "cached",
            State::Stale { .. } => "stale",
            State::New => "new",
            State::Waiting { .. } => "waiting",
            State::Error { .. } => "error",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct StatusRow {
    pub name: String,
    pub kind: String,
    pub state: State,
    pub key: Option<String>,
    pub parts: Option<KeyParts>,
}

/// Status of every stage, in pipeline order.
pub fn status(plan: &Plan, store: &Store, lock: &LockFile, env: &ExecEnv) -> Vec<StatusRow> {
    let mut digests: BTreeMap<usize, String> = BTreeMap::new();
    let mut rows: Vec<StatusRow> = Vec::new();
    for (i, node) in plan.nodes.iter().enumerate() {
        let kind = node.kind.kind().to_string();
        if let Some(&d) = node.deps.iter().find(|d| !digests.contains_key(d)) {
            rows.push(StatusRow {
                name: node.name.clone(),
                kind,
                state: State::Waiting { upstream: plan.nodes[d].name.clone() },
                key: None,
                parts: None,
            });
            continue;
        }
        let parts = match key_parts(plan, node, &digests, store, env) {
            Ok(p) => p,
            Err(e) => {
                rows.push(StatusRow {
                    name: node.name.clone(),
                    kind,
                    state: State::Error { message: msmae_core::error::chain(&e) },
                    key: None,
                    parts: None,
                });
                continue;
            }
        };
        let key = parts.key();
        let locked = lock.stage(&node.name);
        let state = match store.lookup(&key) {
            Ok(Some(entry)) => {
                digests.insert(i, entry.artifact.clone());
                match locked {
                    Some(l) if l.key == key => State::UpToDate,
                    Some(l) => State::Restorable { reasons: parts.diff(&l.parts) },
                    None => State::Restorable { reasons: vec!["not in the lock file".into()] },
                }
            }
            Ok(None) => match locked {
                Some(l) if l.key == key => State::Stale {
                    reasons: vec![
                        "recorded in the lock file but missing from the store (gc'd or another machine)".into(),
                    ],
                },
                Some(l) => State::Stale { reasons: parts.diff(&l.parts) },
                None => State::New,
            },
            Err(e) => State::Error { message: msmae_core::error::chain(&e) },
        };
        rows.push(StatusRow { name: node.name.clone(), kind, state, key: Some(key), parts: Some(parts) });
    }
    let _ = store.memo().save();
    rows
}

/// Text of `msmae why STAGE`.
pub fn why(plan: &Plan, store: &Store, lock: &LockFile, env: &ExecEnv, stage: &str) -> Result<String> {
    let rows = status(plan, store, lock, env);
    let Some(row) = rows.iter().find(|r| r.name == stage) else {
        return Err(crate::Error::UnknownStage {
            name: stage.into(),
            known: rows.iter().map(|r| r.name.as_str()).collect::<Vec<_>>().join(", "),
        });
    };
    let mut out = String::new();
    let _ = writeln!(out, "{} ({}): {}", row.name, row.kind, row.state.label());
    match &row.state {
        State::UpToDate => {
            let _ = writeln!(out, "  nothing changed since the recorded run: a run serves it from the cache");
        }
        State::Restorable { reasons } => {
            let _ = writeln!(out, "  differs from the lock file, but this exact result is in the cache:");
            reasons.iter().for_each(|r| {
                let _ = writeln!(out, "  - {r}");
            });
        }
        State::Stale { reasons } => {
            let _ = writeln!(out, "  will run because:");
            reasons.iter().for_each(|r| {
                let _ = writeln!(out, "  - {r}");
            });
        }
        State::New => {
            let _ = writeln!(out, "  never run for this pipeline (not in the lock file, not in the cache)");
        }
        State::Waiting { upstream } => {
            let _ = writeln!(out, "  waits on upstream `{upstream}`, which must run first; `msmae why {upstream}`");
        }
        State::Error { message } => {
            let _ = writeln!(out, "  cannot compute its key: {message}");
        }
    }
    if let Some(p) = &row.parts {
        let _ = writeln!(out, "key {}", row.key.as_deref().unwrap_or("-"));
        let _ = writeln!(out, "  kind {} v{}, code {}, seed {}", p.kind, p.version, p.code, p.seed);
        if !p.crates.is_empty() {
            let crates: Vec<String> = p.crates.iter().map(|(k, v)| format!("{k} {v}")).collect();
            let _ = writeln!(out, "  code of {}", crates.join(", "));
        }
        if !p.deps.is_empty() {
            let deps: Vec<String> = p.deps.iter().map(|(k, v)| format!("{k} {v}")).collect();
            let _ = writeln!(out, "  dependencies {}", deps.join(", "));
        }
        let _ = writeln!(out, "  config {}", crate::key::canonical_json(&p.config));
        for (slot, ins) in &p.inputs {
            for i in ins {
                let _ = writeln!(out, "  input {slot} ← {} @ {}", i.stage, i.digest);
            }
        }
        for e in &p.external {
            let _ = writeln!(out, "  external {} ({} files, {} bytes) @ {}", e.path, e.files, e.bytes, e.digest);
        }
        if let Some(e) = &p.env {
            let lib = if e.library.is_empty() { String::new() } else { format!(" ({})", e.library) };
            let _ = writeln!(out, "  environment {}{lib} / {} / {}", e.backend, e.device_kind, e.precision);
            // Which devices, and how many data-parallel replicas, change numbers only by float
            // reduction order (tested to 1e-5): run-only, like `checkpoint_every`.
            let _ = writeln!(
                out,
                "  devices {} (run-only, not in the key: replicas agree up to float reduction order)",
                env.device
            );
            let transport =
                msmae_dist::GradientTransport::current().map(|t| t.to_string()).unwrap_or_else(|e| e.to_string());
            let _ = writeln!(
                out,
                "  gradients across processes: {}={transport} (run-only, likewise)",
                msmae_dist::GradientTransport::VAR
            );
        }
    }
    Ok(out)
}

/// Graph formats for `msmae dag`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DagFormat {
    Text,
    Dot,
    Mermaid,
}

/// Render the DAG.
pub fn dag(plan: &Plan, format: DagFormat) -> String {
    let mut out = String::new();
    match format {
        DagFormat::Text => {
            let w = plan.nodes.iter().map(|n| n.name.len()).max().unwrap_or(0);
            for n in &plan.nodes {
                let needs: Vec<String> = n
                    .bindings
                    .iter()
                    .flat_map(|(slot, ups)| ups.iter().map(move |&j| format!("{slot}={}", plan.nodes[j].name)))
                    .collect();
                let needs = if needs.is_empty() { String::new() } else { format!("  ← {}", needs.join(", ")) };
                let _ = writeln!(out, "{:w$}  {} → {}{needs}", n.name, n.kind.kind(), n.output.kind);
            }
        }
        DagFormat::Dot => {
            let _ = writeln!(
                out,
                "digraph \"{}\" {{\n  rankdir=LR;\n  node [shape=box, fontname=\"Helvetica\"];",
                plan.spec.name
            );
            for n in &plan.nodes {
                let _ = writeln!(out, "  \"{}\" [label=\"{}\\n{}\"];", n.name, n.name, n.kind.kind());
            }
            for n in &plan.nodes {
                for (slot, ups) in &n.bindings {
                    for &j in ups {
                        let _ = writeln!(out, "  \"{}\" -> \"{}\" [label=\"{slot}\"];", plan.nodes[j].name, n.name);
                    }
                }
            }
            out.push_str("}\n");
        }
        DagFormat::Mermaid => {
            out.push_str("flowchart LR\n");
            let id = |i: usize| format!("s{i}");
            for (i, n) in plan.nodes.iter().enumerate() {
                let _ = writeln!(out, "  {}[\"{}<br/><small>{}</small>\"]", id(i), n.name, n.kind.kind());
            }
            for (i, n) in plan.nodes.iter().enumerate() {
                for (slot, ups) in &n.bindings {
                    for &j in ups {
                        let _ = writeln!(out, "  {} -->|{slot}| {}", id(j), id(i));
                    }
                }
            }
        }
    }
    out
}

/// One problem found by `verify`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub stage: String,
    pub problem: String,
}

/// Re-hash every artifact recorded in the lock file and check the index agrees.
pub fn verify(store: &Store, lock: &LockFile) -> Result<(usize, Vec<Mismatch>)> {
    let mut bad = Vec::new();
    let mut checked = 0;
    for s in &lock.stages {
        let mut push = |problem: String| bad.push(Mismatch { stage: s.name.clone(), problem });
        if s.parts.key() != s.key {
            push(format!("recorded key {} does not match its recorded components (lock file edited?)", s.key));
        }
        if !store.has_object(&s.output.digest) {
            push(format!("artifact {} is missing from the store", s.output.digest));
            continue;
        }
        checked += 1;
        for p in store.verify_object(&s.output.digest)? {
            push(format!("artifact {}: {p}", &s.output.digest[..12]));
        }
        match store.manifest(&s.output.digest) {
            Ok(m) if m.bytes != s.output.bytes || m.files.len() as u64 != s.output.files => push(format!(
                "artifact has {} files/{} bytes, lock records {}/{}",
                m.files.len(),
                m.bytes,
                s.output.files,
                s.output.bytes
            )),
            _ => {}
        }
        match store.index_entry(&s.key)? {
            Some(e) if e.artifact != s.output.digest => {
                push(format!("cache index maps key to {}, lock records {}", e.artifact, s.output.digest))
            }
            None => push("cache index has no entry for the recorded key".into()),
            _ => {}
        }
    }
    Ok((checked, bad))
}

/// What `gc` removed (or would remove).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    pub tmp_dirs: usize,
    /// Checkpoint directories of finished keys (and, with `prune`, of interrupted runs).
    pub resume_dirs: usize,
    pub objects: usize,
    pub index_entries: usize,
    pub bytes: u64,
    pub kept_objects: usize,
    /// Registered lock files that are missing, with how many artifacts each kept.
    pub missing_roots: Vec<(std::path::PathBuf, usize)>,
}

/// Remove staging leftovers, stale checkpoints and unreferenced objects. By default an object is kept if any
/// cache index entry refers to it (alternative configs stay cached); with `prune`, only
/// artifacts recorded in the lock files written with this store (and `extra_roots`) are
/// kept, and index entries for anything else are dropped.
pub fn gc(store: &Store, prune: bool, dry_run: bool, extra_roots: &[&Path], wait: bool) -> Result<GcReport> {
    let _exclusive = store.run_lock(true, wait, "msmae gc")?;
    // Every root must be read before anything is deleted: an unreadable lock file (merge
    // conflict markers, truncation) may reference anything, so it stops gc.
    // A registered lock file that is missing (moved, being restored, on an unmounted disk)
    // keeps what it referenced when last registered: only `gc --forget` drops it.
    let mut roots: BTreeSet<String> = BTreeSet::new();
    let mut report = GcReport::default();
    let mut lock_files: Vec<std::path::PathBuf> = extra_roots.iter().map(|p| p.to_path_buf()).collect();
    for r in store.roots()? {
        if r.lock_file.is_file() {
            lock_files.push(r.lock_file);
        } else {
            roots.extend(r.artifacts.iter().cloned());
            report.missing_roots.push((r.lock_file, r.artifacts.len()));
        }
    }
    for lf in lock_files {
        let l = LockFile::read(&lf, "").map_err(|e| crate::Error::LockFile {
            path: lf.clone(),
            message: format!("gc reads every lock file written with this store, and this one is unreadable ({e}); fix or restore it (it may reference artifacts), then run gc again. Nothing was removed"),
        })?;
        roots.extend(l.stages.iter().map(|s| s.output.digest.clone()));
    }
    if !dry_run {
        report.tmp_dirs = store.clean_stale_tmp()?.len();
    }
    report.resume_dirs = store.clean_resume(prune, dry_run)?.len();
    let mut keep = roots.clone();
    for e in store.index_entries()? {
        if prune && !roots.contains(&e.artifact) {
            report.index_entries += 1;
            if !dry_run {
                store.remove_index(&e.key)?;
            }
        } else {
            keep.insert(e.artifact.clone());
        }
    }
    for o in store.objects()? {
        if keep.contains(&o) {
            report.kept_objects += 1;
            continue;
        }
        report.objects += 1;
        report.bytes +=
            if dry_run { store.manifest(&o).map(|m| m.bytes).unwrap_or(0) } else { store.remove_object(&o)? };
    }
    Ok(report)
}
