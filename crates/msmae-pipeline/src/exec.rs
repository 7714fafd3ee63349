//! The executor: walks the DAG, computes each stage's cache key from its inputs' content,
//! serves cached stages from the store, runs the rest in parallel within a slot budget,
//! commits their outputs atomically, and keeps the lock file up to date.
//!
//! Selection flags:
//! - `--stage S`: run only S (re-executed even if cached); its inputs must be cached.
//! - `--from S`: re-execute S, then everything downstream that its new output changes.
//! - `--until S`: S and what it needs, nothing after it (normal caching).
//! - `--force`: re-execute every selected stage.
//!
//! Early cut-off falls out of content addressing: a re-executed stage whose output is
//! byte-identical has the same digest, so downstream keys do not change.
//!
//! Under a multi-process launch (`mpirun -np N msmae run …`, `srun`; [`msmae_dist`]) every
//! rank walks the same DAG one stage at a time. Rank 0 leads: it decides each stage (cached,
//! run, failed), runs the stages that are not data-parallel alone, commits every artifact
//! and writes the lock file, and tells the other ranks each outcome, which they adopt. A
//! data-parallel stage (a training stage) runs on every rank at once: rank 0 announces it,
//! the others run it into a private staging directory that is discarded, reading rank 0's
//! checkpoints to resume. The store must be on a filesystem every rank sees. A rank whose
//! part of a data-parallel stage fails ends the whole job (the others may be waiting in a
//! collective), naming itself; a re-run resumes from rank 0's last checkpoint.

use std::collections::{BTreeMap, BTreeSet};
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::{Arc, mpsc};
use std::time::Instant;

use msmae_core::{CancelToken, ExecEnv, InputArtifact, Progress, StageContext};
use msmae_dist::Collective;
use serde::{Deserialize, Serialize};

use msmae_core::error::chain;

use crate::error::{Error, Failure, Result};
use crate::key::{EnvKey, ExternalRef, InputRef, KeyParts};
use crate::lockfile::{self, LockFile};
use crate::plan::{Node, Plan};
use crate::store::{self, Host, IndexEntry, RunInfo, Store, now_rfc3339};

/// How to run a pipeline.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Job slots: how many light stages run at once; heavy stages take several.
    pub jobs: usize,
    pub force: bool,
    pub stage: Option<String>,
    pub from: Option<String>,
    pub until: Option<String>,
    pub dry_run: bool,
    /// Wait for other runners holding a stage (else fail with who holds it).
    pub wait: bool,
    pub env: ExecEnv,
    /// Tool versions recorded with every artifact produced (msmae, burn, libtorch…).
    pub tools: BTreeMap<String, String>,
    pub cancel: CancelToken,
    /// Lock file; default `NAME.lock` beside the pipeline file.
    pub lock_file: Option<PathBuf>,
    /// The processes of a multi-process launch ([`msmae_dist::Solo`]: this one alone).
    pub group: Arc<dyn Collective>,
    /// Where stages execute: threads of this process, or Slurm jobs.
    pub executor: Executor,
    /// `run-stage` (what a Slurm job runs): the key the `--stage` was submitted for. The
    /// stage is refused if its key differs now (code, config, inputs or environment changed
    /// since), and served from the cache if another runner produced it meanwhile.
    pub expect_key: Option<String>,
    /// Whether this run records its stages in the lock file (a Slurm job does not: its
    /// driver is the lock file's one writer).
    pub update_lock: bool,
    /// Re-hash the input artifacts of every stage that runs before running it (a cache hit
    /// checks files and sizes only); a damaged input fails the stage, naming it.
    pub verify_inputs: bool,
    /// `run-stage --lock-check PREFIX`: once the stage's key lock is taken, say so in
    /// `PREFIX.held` and wait for the driver's verdict in `PREFIX.ack` (`ok`: it sees the
    /// lock held from its host) before producing anything.
    pub lock_check: Option<PathBuf>,
    /// TensorBoard log root (`--tensorboard`): each training stage writes scalar event
    /// files into `<run_log>/<pipeline>/<stage>/`, outside the store (never part of a
    /// digest).
    pub run_log: Option<PathBuf>,
    /// The CPU threads the backend computes with (recorded with every artifact; 0: unknown).
    pub compute_threads: usize,
}

/// Where the stages that must run execute.
#[derive(Debug, Clone, Default)]
pub enum Executor {
    /// Threads of this process, within the `jobs` slot budget.
    #[default]
    Local,
    /// One Slurm job per stage ([`crate::slurm`]).
    Slurm(Arc<crate::slurm::SlurmOptions>),
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            jobs: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            force: false,
            stage: None,
            from: None,
            until: None,
            dry_run: false,
            wait: true,
            env: ExecEnv::cpu_flex(),
            tools: BTreeMap::new(),
            cancel: CancelToken::new(),
            lock_file: None,
            group: Arc::new(msmae_dist::Solo),
            executor: Executor::Local,
            expect_key: None,
            update_lock: true,
            lock_check: None,
            verify_inputs: false,
            run_log: None,
            compute_threads: 0,
        }
    }
}

/// What happened to one stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Outcome {
    /// Served from the store.
    Cached,
    /// Executed; `unchanged` when the output equals what the lock file had (early cut-off).
    Ran {
        seconds: f64,
        unchanged: bool,
    },
    /// Dry run: would execute, with the reasons.
    WouldRun {
        reasons: Vec<String>,
    },
    /// Not part of the selection.
    Skipped,
    Failed {
        error: Failure,
    },
    /// An upstream stage failed or was cancelled.
    Blocked {
        upstream: String,
    },
    Cancelled,
}

impl Outcome {
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Cached => "cached",
            Outcome::Ran { unchanged: true, .. } => "ran (output unchanged)",
            Outcome::Ran { .. } => "ran",
            Outcome::WouldRun { .. } => "would run",
            Outcome::Skipped => "skipped",
            Outcome::Failed { .. } => "FAILED",
            Outcome::Blocked { .. } => "blocked",
            Outcome::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct StageReport {
    pub name: String,
    pub kind: String,
    pub outcome: Outcome,
    pub key: Option<String>,
    pub artifact: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RunReport {
    pub pipeline: String,
    pub stages: Vec<StageReport>,
    pub seconds: f64,
    pub lock_file: PathBuf,
}

impl RunReport {
    /// No stage failed, was blocked or cancelled.
    pub fn ok(&self) -> bool {
        self.stages
            .iter()
            .all(|s| !matches!(s.outcome, Outcome::Failed { .. } | Outcome::Blocked { .. } | Outcome::Cancelled))
    }
    pub fn count(&self, label: &str) -> usize {
        self.stages.iter().filter(|s| s.outcome.label() == label).count()
    }
    pub fn stage(&self, name: &str) -> Option<&StageReport> {
        self.stages.iter().find(|s| s.name == name)
    }
}

/// Which stages to run, which to (re)execute.
struct Selection {
    needed: BTreeSet<usize>,
    selected: BTreeSet<usize>,
    forced: BTreeSet<usize>,
}

fn node_index(plan: &Plan, name: &str) -> Result<usize> {
    plan.index_of(name).ok_or_else(|| Error::UnknownStage {
        name: name.into(),
        known: plan.nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>().join(", "),
    })
}

fn select(plan: &Plan, o: &RunOptions) -> Result<Selection> {
    let all: BTreeSet<usize> = (0..plan.nodes.len()).collect();
    let mut selected = all.clone();
    let mut forced = BTreeSet::new();
    if let Some(s) = &o.stage {
        let i = node_index(plan, s)?;
        selected = BTreeSet::from([i]);
        // A submitted job (`expect_key`) serves what another runner produced meanwhile.
        if o.expect_key.is_none() {
            forced.insert(i);
        }
    }
    if let Some(s) = &o.from {
        let i = node_index(plan, s)?;
        selected = selected.intersection(&plan.downstream(i)).copied().collect();
        forced.insert(i);
    }
    if let Some(s) = &o.until {
        let i = node_index(plan, s)?;
        selected = selected.intersection(&plan.upstream(i)).copied().collect();
    }
    if o.force {
        forced.extend(selected.iter().copied());
    }
    let mut needed = selected.clone();
    for &i in &selected {
        needed.extend(plan.upstream(i));
    }
    Ok(Selection { needed, selected, forced })
}

/// The key parts of `node`, given the artifact digests of its upstream nodes.
pub fn key_parts(
    plan: &Plan,
    node: &Node,
    digests: &BTreeMap<usize, String>,
    store: &Store,
    env: &ExecEnv,
) -> Result<KeyParts> {
    let inputs = node
        .bindings
        .iter()
        .map(|(slot, ups)| {
            let refs = ups
                .iter()
                .map(|&j| InputRef {
                    stage: plan.nodes[j].name.clone(),
                    digest: digests.get(&j).cloned().unwrap_or_default(),
                })
                .collect();
            (slot.clone(), refs)
        })
        .collect();
    // The files a list names are read now, with the list file's digest below: a list
    // edited since the plan was made is keyed as it will run.
    let listed = node
        .prepared
        .listed_inputs(&plan.spec.base_dir)
        .map_err(|e| Error::Output { stage: node.name.clone(), message: format!("reading the files it lists: {e}") })?;
    let external = node
        .external
        .iter()
        .map(|p| {
            let d = store.memo().tree(p)?;
            let shown = p.strip_prefix(&plan.spec.base_dir).unwrap_or(p).to_string_lossy().into_owned();
            Ok(ExternalRef { path: shown, digest: d.hex, files: d.files, bytes: d.bytes })
        })
        .chain(listed.iter().map(|l| {
            let d = store.memo().listed(&l.files)?;
            let list = l.list.strip_prefix(&plan.spec.base_dir).unwrap_or(&l.list).display();
            Ok(ExternalRef { path: format!("files listed in {list}"), digest: d.hex, files: d.files, bytes: d.bytes })
        }))
        .collect::<Result<Vec<_>>>()?;
    let code = crate::key::Code::parse(node.kind.code_fingerprint());
    Ok(KeyParts {
        scheme: crate::key::KEY_SCHEME,
        kind: node.kind.kind().to_string(),
        version: node.kind.version(),
        code: code.digest,
        crates: code.crates,
        deps: code.deps,
        seed: node.seed,
        config: node.config.clone(),
        inputs,
        external,
        env: node.kind.uses_backend().then(|| EnvKey {
            backend: env.backend.clone(),
            library: env.library.clone(),
            device_kind: env.device_kind.clone(),
            precision: env.precision.clone(),
        }),
    })
}

enum Msg {
    Done { i: usize, outcome: Outcome, entry: Option<Box<IndexEntry>>, key: Option<String> },
}

/// Run (or dry-run) a planned pipeline against a store.
pub fn run(plan: &Plan, store: &Store, opts: &RunOptions, progress: &dyn Progress) -> Result<RunReport> {
    let t0 = Instant::now();
    let sel = select(plan, opts)?;
    check_global_batches(plan, &sel, opts)?;
    let (lock_path, lock) = read_lock(plan, opts)?;
    let leader = opts.group.rank() == 0;
    // gc waits until this run ends (and this run until a gc ends): shared among runners.
    let _run_lock = if opts.dry_run { None } else { Some(store.run_lock(false, opts.wait, "msmae run")?) };
    if !opts.dry_run && leader {
        for p in store.clean_stale_tmp()? {
            tracing::info!("removed staging directory of an interrupted run: {}", p.display());
        }
    }
    let owner = lockfile::Owner { name: &plan.spec.name, file: &plan.spec.file };
    let order: Vec<String> = plan.nodes.iter().map(|n| n.name.clone()).collect();
    let records = !opts.dry_run && leader && opts.update_lock;
    // Each artifact enters the lock file as soon as its stage ends.
    let record = |name: &str, entry: IndexEntry| -> Result<()> {
        if records {
            lockfile::update(store, &lock_path, &owner, &order, &[(name.to_string(), entry)])?;
        }
        Ok(())
    };
    let done = schedule(plan, store, opts, progress, &sel, &lock, record)?;
    if records {
        register_root(store, &lock_path, &plan.spec.name);
    }
    if leader
        && let Err(e) = store.memo().save()
        && !store::is_read_only(&e)
    {
        tracing::warn!("could not save the hash memo: {e}");
    }
    Ok(done.report(plan, t0.elapsed().as_secs_f64(), lock_path))
}

/// The pipeline's lock file (empty when there is none yet), refused when it belongs to
/// another pipeline; a warning when it was written under an older key scheme.
fn read_lock(plan: &Plan, opts: &RunOptions) -> Result<(PathBuf, LockFile)> {
    let lock_path = opts.lock_file.clone().unwrap_or_else(|| lockfile::default_path(&plan.spec.file));
    let lock = LockFile::read(&lock_path, &plan.spec.name)?;
    lock.check_owner(&lock_path, &plan.spec.file, &plan.spec.name)?;
    if opts.group.rank() == 0 && lock.stages.iter().any(|s| s.parts.scheme != crate::key::KEY_SCHEME) {
        tracing::warn!(
            "{} was written with an older cache-key scheme: its stages are computed once again under this msmae's keys (code hashed without comments or layout, numeric dependency versions included; see CHANGELOG.md). The old artifacts stay in the store until `msmae gc --prune`",
            lock_path.display()
        );
    }
    Ok((lock_path, lock))
}

/// What the scheduler knows of every stage: its outcome once settled, its key and its
/// artifact once it has one.
struct Progressed {
    outcome: Vec<Option<Outcome>>,
    keys: Vec<Option<String>>,
    digests: BTreeMap<usize, String>,
}

impl Progressed {
    fn report(self, plan: &Plan, seconds: f64, lock_file: PathBuf) -> RunReport {
        let Progressed { outcome, keys, digests } = self;
        let stages = plan
            .nodes
            .iter()
            .zip(outcome.into_iter().zip(keys))
            .enumerate()
            .map(|(i, (node, (outcome, key)))| StageReport {
                name: node.name.clone(),
                kind: node.kind.kind().to_string(),
                outcome: outcome.unwrap_or(Outcome::Cancelled),
                key,
                artifact: digests.get(&i).cloned(),
            })
            .collect();
        RunReport { pipeline: plan.spec.name.clone(), stages, seconds, lock_file }
    }
}

/// Walk the DAG: launch every stage whose inputs are ready while job slots allow, settle
/// what an upstream failure or a cancellation decides, hand each new artifact to `record`
/// (an error there cancels the run and is returned once the running stages end).
fn schedule(
    plan: &Plan,
    store: &Store,
    opts: &RunOptions,
    progress: &dyn Progress,
    sel: &Selection,
    lock: &LockFile,
    record: impl Fn(&str, IndexEntry) -> Result<()>,
) -> Result<Progressed> {
    let n = plan.nodes.len();
    let mut st = Progressed { outcome: vec![None; n], keys: vec![None; n], digests: BTreeMap::new() };
    for (i, o) in st.outcome.iter_mut().enumerate() {
        if !sel.needed.contains(&i) {
            *o = Some(Outcome::Skipped);
        }
    }
    let mut running: BTreeMap<usize, usize> = BTreeMap::new(); // node → slots
    // The ranks of a multi-process run walk the DAG in lockstep: one stage at a time. Under
    // Slurm every ready stage is submitted at once (the scheduler shares the cluster out).
    let slurm = matches!(opts.executor, Executor::Slurm(_));
    let budget = if slurm {
        n.max(1)
    } else if opts.group.is_solo() {
        opts.jobs.max(1)
    } else {
        1
    };
    let (tx, rx) = mpsc::channel::<Msg>();
    let mut result: Result<()> = Ok(());
    std::thread::scope(|scope| {
        loop {
            // Propagate failures and launch what is ready.
            for i in 0..n {
                if st.outcome[i].is_some() || running.contains_key(&i) {
                    continue;
                }
                let node = &plan.nodes[i];
                if let Some(o) = inherited_outcome(plan, i, &st.outcome) {
                    st.outcome[i] = Some(o);
                    continue;
                }
                if !node.deps.iter().all(|d| st.digests.contains_key(d)) {
                    continue;
                }
                if opts.cancel.is_cancelled() {
                    st.outcome[i] = Some(Outcome::Cancelled);
                    continue;
                }
                let slots = if slurm { 1 } else { node.resources.slots(budget) };
                let used: usize = running.values().sum();
                if used > 0 && used + slots > budget {
                    continue;
                }
                running.insert(i, slots);
                let tx = tx.clone();
                let job = Job {
                    plan,
                    store,
                    opts,
                    progress,
                    i,
                    digests: st.digests.clone(),
                    forced: sel.forced.contains(&i),
                    selected: sel.selected.contains(&i),
                    threads: slots,
                    previous: lock.stage(&node.name).map(|s| (s.parts.clone(), s.output.digest.clone())),
                };
                scope.spawn(move || {
                    let _ = tx.send(job.execute_caught());
                });
            }
            if running.is_empty() {
                break;
            }
            let Ok(Msg::Done { i, outcome: o, entry, key }) = rx.recv() else { break };
            running.remove(&i);
            st.keys[i] = key;
            let name = &plan.nodes[i].name;
            match &o {
                Outcome::Failed { error } => tracing::error!("{name}: {error}"),
                other => tracing::info!("{name}: {}", other.label()),
            }
            if let Some(e) = entry {
                st.digests.insert(i, e.artifact.clone());
                if let Err(err) = record(name, *e) {
                    result = Err(err);
                    opts.cancel.cancel();
                }
            }
            st.outcome[i] = Some(o);
        }
    });
    result.map(|()| st)
}

/// Register the lock file as a gc root with the artifacts it references, after every run,
/// cached or not: a root lost while the file was briefly missing comes back. Best effort on
/// a read-only store (which gc cannot change either).
fn register_root(store: &Store, lock_path: &std::path::Path, name: &str) {
    let Ok(lock) = LockFile::read(lock_path, name) else { return };
    if !lock_path.exists() {
        return;
    }
    match store.add_root(lock_path, &lock.artifacts()) {
        Ok(()) => {}
        Err(Error::Store { source, .. }) if store::is_read_only(&source) => {}
        Err(e) => tracing::warn!("could not register {} with the store for gc: {e}", lock_path.display()),
    }
}

/// Every data-parallel stage about to run splits its global batch (`batch_size`) evenly over
/// the devices of every process: refused before anything runs rather than silently changed.
fn check_global_batches(plan: &Plan, sel: &Selection, opts: &RunOptions) -> Result<()> {
    let shares = opts.env.device.split(',').count() * opts.group.size();
    if shares <= 1 {
        return Ok(());
    }
    let errors: Vec<crate::error::SpecError> = sel
        .needed
        .iter()
        .map(|&i| &plan.nodes[i])
        .filter(|n| n.kind.data_parallel())
        .filter_map(|n| Some((n, n.prepared.config_json().get("batch_size")?.as_u64()? as usize)))
        .filter(|(_, b)| !b.is_multiple_of(shares))
        .map(|(n, b)| crate::error::SpecError {
            file: plan.spec.file.clone(),
            line: 0,
            column: 0,
            key: format!("stages.{}.with.batch_size", n.name),
            message: format!(
                "the global batch of {b} does not split evenly over {shares} devices ({} per process × {} processes); use a multiple of {shares} (the batch is never changed silently)",
                shares / opts.group.size(),
                opts.group.size()
            ),
        })
        .collect();
    if errors.is_empty() { Ok(()) } else { Err(Error::Spec(crate::error::SpecErrors(errors))) }
}

/// The outcome node `i` takes from a dependency that failed, was blocked or cancelled, or
/// (in a dry run) would run; `None` while its dependencies are fine.
fn inherited_outcome(plan: &Plan, i: usize, outcome: &[Option<Outcome>]) -> Option<Outcome> {
    let bad = *plan.nodes[i].deps.iter().find(|&&d| {
        matches!(
            outcome[d],
            Some(Outcome::Failed { .. } | Outcome::Blocked { .. } | Outcome::Cancelled | Outcome::WouldRun { .. })
        )
    })?;
    Some(match &outcome[bad] {
        Some(Outcome::WouldRun { .. }) => {
            Outcome::WouldRun { reasons: vec![format!("after `{}`", plan.nodes[bad].name)] }
        }
        Some(Outcome::Cancelled) => Outcome::Cancelled,
        _ => Outcome::Blocked { upstream: plan.nodes[bad].name.clone() },
    })
}

struct Job<'a> {
    plan: &'a Plan,
    store: &'a Store,
    opts: &'a RunOptions,
    progress: &'a dyn Progress,
    i: usize,
    digests: BTreeMap<usize, String>,
    forced: bool,
    selected: bool,
    threads: usize,
    previous: Option<(KeyParts, String)>,
}

impl Job<'_> {
    /// [`Self::execute`] in the stage's tracing span, a panic becoming the stage's failure.
    /// In a multi-process run, rank 0 then tells the others the outcome, and they wait for it.
    fn execute_caught(&self) -> Msg {
        let span = tracing::info_span!("stage", name = %self.plan.nodes[self.i].name);
        let _g = span.enter();
        let g = &*self.opts.group;
        if g.rank() != 0 {
            return self.follow();
        }
        let msg = match std::panic::catch_unwind(AssertUnwindSafe(|| self.execute())) {
            Ok(m) => m,
            Err(p) => Msg::Done {
                i: self.i,
                outcome: Outcome::Failed { error: Error::Panicked { message: panic_text(&p) }.into() },
                entry: None,
                key: None,
            },
        };
        if !g.is_solo() {
            let Msg::Done { outcome, entry, key, .. } = &msg;
            tell(g, &Word::Done { outcome: outcome.clone(), entry: entry.clone(), key: key.clone() });
        }
        msg
    }

    /// Run the stage as a Slurm job: submit, wait, adopt what the job committed; resubmit
    /// after a time limit, node failure or preemption while `--retries` allows.
    fn on_slurm(&self, s: &crate::slurm::SlurmOptions, node: &Node, key: &str) -> Msg {
        use crate::slurm::{JobEnd, Submission};
        let fail = |error: Error| Msg::Done {
            i: self.i,
            outcome: Outcome::Failed { error: error.into() },
            entry: None,
            key: Some(key.to_string()),
        };
        let dir = self.store.root().join("slurm").join(&s.run_id);
        let outcome = dir.join(format!("{}.outcome.json", node.name));
        let log = dir.join(format!("{}-%j.log", node.name));
        let defaults = if node.kind.uses_backend() { &s.profile.training } else { &s.profile.light };
        let mut spec = crate::slurm::JobSpec {
            pipeline: &self.plan.spec.name,
            stage: &node.name,
            key,
            data_parallel: node.kind.data_parallel(),
            resources: node.cluster.or(defaults),
            log: &log,
            outcome: &outcome,
            force: self.forced,
            lock_check: None,
        };
        // The run's first job proves that file locks on the store reach across nodes.
        let check = (!s.locks_checked.swap(true, std::sync::atomic::Ordering::SeqCst))
            .then(|| dir.join(format!("{}.lockcheck", node.name)));
        spec.lock_check = check.as_deref();
        for attempt in 0..=s.retries {
            let script = crate::slurm::script(s, &spec);
            spec.force = false; // a resubmission resumes from the checkpoint
            let _ = std::fs::remove_file(&outcome);
            let job = match crate::slurm::submit(&dir, &node.name, &script) {
                Ok(j) => j,
                Err(e) => return fail(e),
            };
            let sub = Submission { job, log: log.clone(), outcome: outcome.clone() };
            let log_file = crate::slurm::log_path(&sub);
            tracing::info!("`{}`: Slurm job {} (log {})", node.name, sub.job, log_file.display());
            let verdict = |_: &std::path::Path| self.store.key_lock_held(key).unwrap_or(false);
            let end = match crate::slurm::wait(s, &sub, spec.lock_check, &verdict, &|| self.opts.cancel.is_cancelled())
            {
                Ok(e) => e,
                Err(e) => {
                    crate::slurm::cancel(&sub.job);
                    return fail(e);
                }
            };
            match end {
                JobEnd::Outcome(o) if o.outcome == "ran" || o.outcome == "cached" => {
                    return match self.store.lookup(key) {
                        Ok(Some(entry)) => {
                            let unchanged = self.previous.as_ref().is_some_and(|(_, d)| d == &entry.artifact);
                            let outcome = if o.outcome == "ran" {
                                Outcome::Ran { seconds: o.seconds, unchanged }
                            } else {
                                Outcome::Cached
                            };
                            Msg::Done { i: self.i, outcome, entry: Some(Box::new(entry)), key: Some(key.to_string()) }
                        }
                        Ok(None) => fail(Error::Slurm(format!(
                            "job {} says `{}` {} but the store has no artifact for its key (is the store on a filesystem the nodes share?); log {}",
                            sub.job,
                            node.name,
                            o.outcome,
                            log_file.display()
                        ))),
                        Err(e) => fail(e),
                    };
                }
                JobEnd::Outcome(o) if o.outcome == "cancelled" => {
                    return Msg::Done {
                        i: self.i,
                        outcome: Outcome::Cancelled,
                        entry: None,
                        key: Some(key.to_string()),
                    };
                }
                JobEnd::Outcome(o) => {
                    return fail(Error::Slurm(format!(
                        "job {} on {} failed: {}; log {}",
                        sub.job,
                        o.host,
                        o.error.unwrap_or_else(|| o.outcome.clone()),
                        log_file.display()
                    )));
                }
                JobEnd::Cancelled => {
                    return Msg::Done {
                        i: self.i,
                        outcome: Outcome::Cancelled,
                        entry: None,
                        key: Some(key.to_string()),
                    };
                }
                JobEnd::Lost => {
                    return fail(Error::Slurm(format!(
                        "job {} left the queue without an outcome; log {}",
                        sub.job,
                        log_file.display()
                    )));
                }
                JobEnd::Retryable(why) if attempt < s.retries => {
                    tracing::warn!(
                        "`{}`: Slurm job {} ended by {why}; resubmitting from its checkpoint ({} of {} retries)",
                        node.name,
                        sub.job,
                        attempt + 1,
                        s.retries
                    );
                }
                JobEnd::Retryable(why) => {
                    return fail(Error::Slurm(format!(
                        "job {} ended by {why} (a timeout: raise `resources: time`), after {} retries; log {}",
                        sub.job,
                        s.retries,
                        log_file.display()
                    )));
                }
            }
        }
        fail(Error::Slurm("no attempt ran".into()))
    }

    /// A rank other than 0: adopt rank 0's outcome of this stage, after running its part of
    /// the stage when rank 0 announces a data-parallel run.
    fn follow(&self) -> Msg {
        let g = &*self.opts.group;
        loop {
            match hear(g) {
                Word::Start { resume } => self.join(&resume),
                Word::Done { outcome, entry, key } => return Msg::Done { i: self.i, outcome, entry, key },
            }
        }
    }

    /// This rank's part of a data-parallel stage, into a private staging directory that is
    /// discarded (rank 0 commits the artifact), resuming from rank 0's checkpoints.
    fn join(&self, resume: &std::path::Path) {
        let g = &*self.opts.group;
        let node = &self.plan.nodes[self.i];
        let key = resume.file_name().map(|k| k.to_string_lossy().into_owned()).unwrap_or_default();
        let out = self.store.root().join("tmp").join(format!("{key}.rank{}", g.rank()));
        let res = std::fs::create_dir_all(out.join("data"))
            .map_err(|e| format!("creating {}: {e}", out.display()))
            .and_then(|()| {
                let mut ctx = self
                    .context(node, out.join("data"))
                    .with_resume_dir(resume.to_path_buf())
                    .with_group(self.opts.group.clone());
                std::panic::catch_unwind(AssertUnwindSafe(|| node.prepared.run(&mut ctx)))
                    .map_err(|p| format!("panicked: {}", panic_text(&p)))?
                    .map_err(|e| chain(&e))
            });
        let _ = crate::store::remove_tree(&out);
        if let Err(e) = res {
            abort_job(g, &node.name, &e);
        }
    }

    /// The context a stage runs in, writing into `out`.
    fn context(&self, node: &Node, out: PathBuf) -> StageContext<'_> {
        let mut inputs: BTreeMap<String, Vec<InputArtifact>> = BTreeMap::new();
        for (slot, ups) in &node.bindings {
            for &j in ups {
                let digest = self.digests.get(&j).cloned().unwrap_or_default();
                inputs.entry(slot.clone()).or_default().push(InputArtifact {
                    stage: self.plan.nodes[j].name.clone(),
                    kind: self.plan.nodes[j].output.kind.clone(),
                    dir: self.store.object_dir(&digest),
                    digest,
                });
            }
        }
        let ctx = StageContext::new(
            node.name.clone(),
            node.seed,
            self.opts.env.clone(),
            self.threads,
            self.opts.cancel.clone(),
            self.progress,
            out,
            self.plan.spec.base_dir.clone(),
            node.output.clone(),
            inputs,
        );
        match &self.opts.run_log {
            Some(root) => ctx.with_run_log(root.join(&self.plan.spec.name).join(&node.name)),
            None => ctx,
        }
    }

    fn execute(&self) -> Msg {
        let fail = |error: Error, key: Option<String>| Msg::Done {
            i: self.i,
            outcome: Outcome::Failed { error: error.into() },
            entry: None,
            key,
        };
        let node = &self.plan.nodes[self.i];
        let parts = match key_parts(self.plan, node, &self.digests, self.store, &self.opts.env) {
            Ok(p) => p,
            Err(e) => return fail(e, None),
        };
        let key = parts.key();
        if let Some(want) = &self.opts.expect_key
            && self.selected
            && want != &key
        {
            let env = show_env(parts.env.as_ref());
            return fail(Error::KeyMismatch { key: key.clone(), submitted: want.clone(), env }, Some(key));
        }
        let cached = match self.store.lookup(&key) {
            Ok(c) => c,
            Err(e) => return fail(e, Some(key)),
        };
        let done = |outcome, entry: IndexEntry| Msg::Done {
            i: self.i,
            outcome,
            entry: Some(Box::new(entry)),
            key: Some(key.clone()),
        };
        if let Some(entry) = &cached
            && !self.forced
        {
            return done(Outcome::Cached, entry.clone());
        }
        if !self.selected && !self.forced {
            let upstream = node.name.clone();
            let stage =
                self.plan.nodes.iter().find(|n| n.deps.contains(&self.i)).map(|n| n.name.clone()).unwrap_or_default();
            return fail(Error::NotCached { stage, upstream }, Some(key));
        }
        if self.opts.dry_run {
            let reasons = match (&self.previous, self.forced) {
                (_, true) => vec!["forced".to_string()],
                (Some((old, _)), _) => parts.diff(old),
                (None, _) => vec!["never run".to_string()],
            };
            return Msg::Done { i: self.i, outcome: Outcome::WouldRun { reasons }, entry: None, key: Some(key) };
        }
        if self.opts.verify_inputs {
            for &j in &node.deps {
                let Some(d) = self.digests.get(&j) else { continue };
                match self.store.verify_object(d) {
                    Ok(problems) if problems.is_empty() => {}
                    Ok(problems) => {
                        let up = &self.plan.nodes[j].name;
                        let damaged = Error::DamagedInput {
                            upstream: up.clone(),
                            artifact: d[..12].to_string(),
                            problems: problems.join("; "),
                        };
                        return fail(damaged, Some(key));
                    }
                    Err(e) => return fail(e, Some(key)),
                }
            }
        }
        if let Executor::Slurm(s) = &self.opts.executor {
            return self.on_slurm(s, node, &key);
        }
        let _lock = match self.store.lock_key(
            &key,
            &format!("stage `{}` of {}", node.name, self.plan.spec.name),
            self.opts.wait,
        ) {
            Ok(l) => l,
            Err(e) => return fail(e, Some(key)),
        };
        if let Some(check) = &self.opts.lock_check
            && let Err(e) = crate::slurm::await_lock_verdict(check, &self.opts.cancel)
        {
            return fail(e, Some(key));
        }
        if !self.forced {
            // Another runner may have produced it while we waited for the lock.
            if let Ok(Some(entry)) = self.store.lookup(&key) {
                return done(Outcome::Cached, entry);
            }
        }
        match self.produce(node, parts, &key) {
            Ok((entry, seconds)) => {
                let unchanged = self.previous.as_ref().is_some_and(|(_, d)| d == &entry.artifact);
                done(Outcome::Ran { seconds, unchanged }, entry)
            }
            Err(Error::Cancelled { .. }) => {
                Msg::Done { i: self.i, outcome: Outcome::Cancelled, entry: None, key: Some(key) }
            }
            Err(e) => fail(e, Some(key)),
        }
    }

    fn produce(&self, node: &Node, parts: KeyParts, key: &str) -> Result<(IndexEntry, f64)> {
        let staging = self.store.begin(key)?;
        let resume = self.store.resume_dir(key, self.opts.force)?;
        let mut ctx = self.context(node, staging.data_dir()).with_resume_dir(resume.clone());
        let started = now_rfc3339();
        let t = Instant::now();
        tracing::info!("running `{}` ({})", node.name, node.kind.kind());
        let g = &*self.opts.group;
        let res = if g.is_solo() || !node.kind.data_parallel() {
            // A panic is caught here, while the staging directory still exists to be measured
            // (a full disk makes some writers panic) and then removed.
            match std::panic::catch_unwind(AssertUnwindSafe(|| node.prepared.run(&mut ctx))) {
                Ok(r) => r.map_err(|source| Error::Stage { stage: node.name.clone(), source }),
                Err(p) => Err(Error::Panicked { message: panic_text(&p) }),
            }
        } else {
            // Every rank runs it; a failure here while others wait in a collective ends the job.
            tell(g, &Word::Start { resume });
            ctx = ctx.with_group(self.opts.group.clone());
            match std::panic::catch_unwind(AssertUnwindSafe(|| node.prepared.run(&mut ctx))) {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => abort_job(g, &node.name, &chain(&e)),
                Err(p) => abort_job(g, &node.name, &format!("panicked: {}", panic_text(&p))),
            }
        };
        let seconds = t.elapsed().as_secs_f64();
        if let Err(e) = res {
            let cancelled = matches!(&e, Error::Stage { source: msmae_core::StageError::Cancelled, .. });
            if cancelled || self.opts.cancel.is_cancelled() {
                return Err(Error::Cancelled { stage: node.name.clone() });
            }
            if e.is_out_of_space() {
                return Err(self.out_of_space(node, staging.bytes(), e));
            }
            return Err(e);
        }
        let written = staging.bytes();
        let full = |e: Error| if e.is_out_of_space() { self.out_of_space(node, written, e) } else { e };
        let manifest = self.store.commit(staging, &node.name, &node.output).map_err(full)?;
        self.store.drop_resume_dir(key);
        let entry = IndexEntry {
            key: key.to_string(),
            artifact: manifest.digest.clone(),
            kind: manifest.kind.clone(),
            bytes: manifest.bytes,
            files: manifest.files.len() as u64,
            stage: node.name.clone(),
            parts,
            run: RunInfo {
                started,
                seconds: (seconds * 1000.0).round() / 1000.0,
                host: Host::current(),
                tools: self.opts.tools.clone(),
                threads: (node.kind.uses_backend() && self.opts.compute_threads > 0)
                    .then_some(self.opts.compute_threads),
            },
        };
        self.store.record(&entry).map_err(full)?;
        Ok((entry, seconds))
    }

    /// The error of a stage that ran out of disk: which store, how much it had written, how
    /// much is free (its staging directory is removed when the error returns).
    fn out_of_space(&self, node: &Node, written: u64, cause: Error) -> Error {
        let root = self.store.root();
        Error::OutOfSpace {
            stage: node.name.clone(),
            store: root.to_path_buf(),
            written: store::human_bytes(written),
            // What was free when the stage started: what it wrote plus what is left.
            available: store::free_bytes(root).map_or_else(|| "space".into(), |f| store::human_bytes(f + written)),
            source: Box::new(cause),
        }
    }
}

/// Rank 0's word to the other ranks of a multi-process run, for the stage at hand.
#[derive(Debug, Serialize, Deserialize)]
enum Word {
    /// A data-parallel stage starts: run your part (checkpoints in `resume`).
    Start { resume: PathBuf },
    /// The stage's outcome, to adopt.
    Done { outcome: Outcome, entry: Option<Box<IndexEntry>>, key: Option<String> },
}

fn tell(g: &dyn Collective, w: &Word) {
    let mut bytes = serde_json::to_vec(w).unwrap_or_default();
    g.broadcast_bytes(&mut bytes, 0);
}

fn hear(g: &dyn Collective) -> Word {
    let mut bytes = Vec::new();
    g.broadcast_bytes(&mut bytes, 0);
    serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        abort_job(g, "-", &format!("could not read rank 0's message ({e}): are all ranks the same msmae build?"))
    })
}

/// End every rank of a multi-process run after this rank failed in `stage`.
fn abort_job(g: &dyn Collective, stage: &str, error: &str) -> ! {
    let msg = format!(
        "msmae: rank {} of {}: stage `{stage}` failed: {error}\nmsmae: ending every rank of the job; a re-run resumes from the last checkpoint",
        g.rank(),
        g.size()
    );
    tracing::error!("{msg}");
    eprintln!("{msg}");
    g.abort(1)
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}

fn show_env(e: Option<&EnvKey>) -> String {
    e.map(|e| format!("{}/{}/{}", e.backend, e.device_kind, e.precision)).unwrap_or_else(|| "-".into())
}
