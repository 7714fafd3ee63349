//! One function per subcommand: each takes its parsed arguments, does the work and says
//! how the process should exit. `lib.rs` parses, dispatches and maps errors to exit codes.

use super::*;

/// `msmae run`.
pub(crate) fn run(registry: &Registry, args: RunArgs) -> Result<ExitCode> {
    if let Some(j) = args.jobs
        && !(1..=MAX_JOBS).contains(&j)
    {
        return Err(UsageError(format!(
            "--jobs {j}: give between 1 and {MAX_JOBS} job slots (this machine has {})",
            RunOptions::default().jobs
        ))
        .into());
    }
    let plan = msmae_pipeline::load_plan(&args.common.pipeline, &args.common.set, registry)?;
    let store = store_for(&args.common)?;
    let (compute, executor) = run_compute(&args, &store)?;
    let g = msmae_dist::group();
    let ranks = if g.is_solo() { String::new() } else { format!(" × {} processes ({})", g.size(), g.name()) };
    tracing::info!(
        "pipeline `{}`: {} stages, backend {} on {}{ranks} ({}), store {}",
        plan.spec.name,
        plan.nodes.len(),
        compute.env.backend,
        compute.env.device,
        compute.env.precision,
        store.root().display()
    );
    let opts = run_options(args, &compute, executor);
    let bars = progress::bars();
    let report = msmae_pipeline::run(&plan, &store, &opts, bars.as_ref())?;
    if opts.group.rank() == 0 {
        print_report(&report);
    }
    Ok(if report.ok() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// Where `run`'s stages compute and who runs them. Under Slurm the jobs compute, on their
/// nodes: the key's environment is the one asked for, resolved there (a job that cannot get
/// it fails), not this machine's.
fn run_compute(args: &RunArgs, store: &Store) -> Result<(msmae_backend::Compute, msmae_pipeline::Executor)> {
    let common = &args.common;
    if args.executor == ExecutorArg::Local {
        return Ok((compute(common)?, msmae_pipeline::Executor::Local));
    }
    let profile = match &args.profile {
        Some(p) => msmae_pipeline::slurm::Profile::load(p)?,
        None => Default::default(),
    };
    let compute = cluster_compute(common, &profile)?;
    let slurm = slurm_options(common, store, &compute.env, profile, args.retries, args.tensorboard.as_deref())?;
    Ok((compute, msmae_pipeline::Executor::Slurm(std::sync::Arc::new(slurm))))
}

/// `run`'s flags as the runner's options.
fn run_options(args: RunArgs, compute: &msmae_backend::Compute, executor: msmae_pipeline::Executor) -> RunOptions {
    let mut tools: BTreeMap<String, String> = compute.tools().into_iter().collect();
    tools.insert("msmae".into(), env!("CARGO_PKG_VERSION").into());
    RunOptions {
        jobs: args.jobs.unwrap_or_else(|| RunOptions::default().jobs),
        force: args.force,
        stage: args.stage,
        from: args.from,
        until: args.until,
        dry_run: args.dry_run,
        wait: !args.no_wait,
        env: compute.env.clone(),
        tools,
        cancel: cancel_on_ctrl_c(),
        lock_file: Some(lock_path(&args.common)),
        group: msmae_dist::group(),
        executor,
        expect_key: None,
        update_lock: true,
        lock_check: None,
        verify_inputs: args.verify_inputs,
        run_log: args.tensorboard.map(|d| std::path::absolute(&d).unwrap_or(d)),
        compute_threads: msmae_backend::compute_threads(compute.backend),
    }
}

/// `msmae status`.
pub(crate) fn status(registry: &Registry, common: &Common) -> Result<ExitCode> {
    let Recorded { plan, store, lock, .. } = recorded(common, registry)?;
    print_status(&inspect::status(&plan, &store, &lock, &keyed_env(common)?));
    Ok(ExitCode::SUCCESS)
}

/// `msmae why`.
pub(crate) fn why(registry: &Registry, common: &Common, stage: &str) -> Result<ExitCode> {
    let Recorded { plan, store, lock, .. } = recorded(common, registry)?;
    print!("{}", inspect::why(&plan, &store, &lock, &keyed_env(common)?, stage)?);
    Ok(ExitCode::SUCCESS)
}

/// `msmae dag`.
pub(crate) fn dag(registry: &Registry, common: &Common, format: Format) -> Result<ExitCode> {
    let plan = msmae_pipeline::load_plan(&common.pipeline, &common.set, registry)?;
    let f = match format {
        Format::Text => DagFormat::Text,
        Format::Dot => DagFormat::Dot,
        Format::Mermaid => DagFormat::Mermaid,
    };
    print!("{}", inspect::dag(&plan, f));
    Ok(ExitCode::SUCCESS)
}

/// `msmae verify`.
pub(crate) fn verify(common: &Common) -> Result<ExitCode> {
    let store = store_for(common)?;
    let lp = lock_path(common);
    if !lp.exists() {
        anyhow::bail!("{}: no lock file (run the pipeline first)", lp.display());
    }
    let lock = LockFile::read(&lp, "")?;
    let (checked, bad) = inspect::verify(&store, &lock)?;
    for m in &bad {
        println!("MISMATCH {}: {}", m.stage, m.problem);
    }
    println!("verified {checked} of {} artifacts in {}: {} mismatches", lock.stages.len(), lp.display(), bad.len());
    Ok(if bad.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// `msmae show`.
pub(crate) fn show(registry: &Registry, args: ShowArgs) -> Result<ExitCode> {
    let ShowArgs { common, stages, format, against } = args;
    let Recorded { plan, store, lock_path: lp, lock } = recorded(&common, registry)?;
    let env = keyed_env(&common)?;
    let rows = results::collect(&plan, &store, &lock, &env, &stages)?;
    let format = match format {
        ShowFormat::Text => results::ShowFormat::Text,
        ShowFormat::Json => results::ShowFormat::Json,
        ShowFormat::Csv => results::ShowFormat::Csv,
        ShowFormat::Md => results::ShowFormat::Md,
    };
    if lock.stages.is_empty() && against.is_none() {
        eprintln!("note: {} records no results yet: run the pipeline first", lp.display());
    }
    let out = match against {
        None => results::render(&rows, None, format),
        Some(spec) => {
            let (label, other) = results::against_lock(&spec, &lp)?;
            let theirs: Vec<results::StageResults> =
                plan.nodes.iter().map(|n| results::read(&store, &other, &n.name, n.kind.kind(), &n.output)).collect();
            let d = results::deltas(&rows, &theirs);
            results::render(&rows, Some((&label, &d)), format)
        }
    };
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}

/// `msmae path`.
pub(crate) fn path(registry: &Registry, common: &Common, stage: &str) -> Result<ExitCode> {
    let Recorded { plan, store, lock_path: lp, lock } = recorded(common, registry)?;
    let rows = results::collect(&plan, &store, &lock, &keyed_env(common)?, &[stage.to_string()])?;
    let r = rows.first().context("no such stage")?;
    match (&r.artifact, &r.path) {
        (None, _) => {
            anyhow::bail!("stage `{stage}` has no artifact in {}: run the pipeline first", lp.display())
        }
        (Some(d), None) => {
            anyhow::bail!(
                "stage `{stage}`: artifact {} recorded in {} is not in the store {}",
                &d[..12],
                lp.display(),
                store.root().display()
            )
        }
        (Some(_), Some(p)) => {
            if !r.is_current() {
                eprintln!(
                    "note: `{stage}` is {} ({}): this is the artifact the lock file records, not what the pipeline would produce now",
                    r.state, r.detail
                );
            }
            println!("{}", p.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `msmae report`.
pub(crate) fn report(registry: &Registry, common: &Common, output: Option<PathBuf>) -> Result<ExitCode> {
    let Recorded { plan, store, lock_path: lp, lock } = recorded(common, registry)?;
    let env = keyed_env(common)?;
    let status = inspect::status(&plan, &store, &lock, &env);
    let all: Vec<String> = plan.nodes.iter().map(|n| n.name.clone()).collect();
    let rows = results::collect(&plan, &store, &lock, &env, &all)?;
    let page = report::html(&report::Inputs {
        plan: &plan,
        store: &store,
        lock: &lock,
        lock_label: lp.display().to_string(),
        status: &status,
        results: &rows,
        generated: msmae_pipeline::store::now_rfc3339(),
        version: env!("CARGO_PKG_VERSION"),
    });
    let out = output.unwrap_or_else(|| common.pipeline.with_extension("report.html"));
    check_report_target(&out, common, &store, &lp)?;
    msmae_pipeline::store::write_atomic(&out, page.as_bytes())?;
    println!("{} ({} KiB): open it in a browser", out.display(), page.len() / 1024);
    Ok(ExitCode::SUCCESS)
}

/// `msmae gc`.
pub(crate) fn gc(args: GcArgs) -> Result<ExitCode> {
    let GcArgs { common, prune, dry_run, no_wait, forget } = args;
    let store = store_for(&common)?;
    for f in &forget {
        if dry_run {
            println!("would forget {}", f.display());
        } else if store.forget_root(f)? {
            println!("forgot {}: gc no longer keeps what it referenced", f.display());
        } else {
            anyhow::bail!("{} is not a lock file registered with the store {}", f.display(), store.root().display());
        }
    }
    let lp = lock_path(&common);
    let extra: Vec<&Path> = if lp.exists() { vec![lp.as_path()] } else { vec![] };
    let r = inspect::gc(&store, prune, dry_run, &extra, !no_wait)?;
    for (lf, n) in &r.missing_roots {
        eprintln!(
            "note: kept {n} artifacts of {}, a lock file registered with this store that is missing now; if it was deleted on purpose: msmae gc {} --forget {}",
            lf.display(),
            common.pipeline.display(),
            lf.display()
        );
    }
    println!(
        "{}{} objects ({} bytes), {} index entries, {} staging dirs, {} checkpoint dirs; kept {} objects",
        if dry_run { "would remove " } else { "removed " },
        r.objects,
        r.bytes,
        r.index_entries,
        r.tmp_dirs,
        r.resume_dirs,
        r.kept_objects
    );
    Ok(ExitCode::SUCCESS)
}

/// `msmae env`.
pub(crate) fn env() -> ExitCode {
    print!("{}", environment_report());
    ExitCode::SUCCESS
}

/// `msmae stages`.
pub(crate) fn stages(registry: &Registry) -> ExitCode {
    for s in registry.iter() {
        println!("{:28} v{}  {}", s.kind(), s.version(), s.summary());
    }
    ExitCode::SUCCESS
}

/// `run-stage`: one stage in a Slurm job. Writes the outcome file in every case but a kill.
pub(crate) fn run_stage(registry: &Registry, args: RunStageArgs) -> Result<ExitCode> {
    let RunStageArgs { common, stage, key, outcome, force, lock_check, tensorboard } = args;
    let common = &common;
    let (stage, key, outcome) = (stage.as_str(), key.as_str(), outcome.as_path());
    let host = msmae_pipeline::store::Host::current().hostname;
    let t = std::time::Instant::now();
    let result = (|| -> Result<msmae_pipeline::RunReport> {
        let plan = msmae_pipeline::load_plan(&common.pipeline, &common.set, registry)?;
        let store = store_for(common)?;
        // The device this job was keyed for, resolved here: a node without it fails, where
        // the stage computes with a model (for the others the device is not in the key).
        let uses_backend = plan.nodes.iter().find(|n| n.name == stage).is_none_or(|n| n.kind.uses_backend());
        let compute = match compute(common) {
            Ok(c) => c,
            Err(e) if !uses_backend => cluster_compute(common, &Default::default()).map_err(|_| e)?,
            Err(e) => {
                return Err(e.context(format!(
                    "this job on {} cannot compute on the device it was keyed for",
                    msmae_pipeline::store::Host::current().hostname
                )));
            }
        };
        let mut tools: BTreeMap<String, String> = compute.tools().into_iter().collect();
        tools.insert("msmae".into(), env!("CARGO_PKG_VERSION").into());
        let opts = RunOptions {
            stage: Some(stage.to_string()),
            expect_key: Some(key.to_string()),
            force,
            update_lock: false,
            lock_check,
            env: compute.env.clone(),
            tools,
            cancel: cancel_on_ctrl_c(),
            lock_file: Some(lock_path(common)),
            group: msmae_dist::group(),
            run_log: tensorboard,
            compute_threads: msmae_backend::compute_threads(compute.backend),
            ..RunOptions::default()
        };
        Ok(msmae_pipeline::run(&plan, &store, &opts, &msmae_core::NoProgress)?)
    })();
    let out = match &result {
        Ok(r) => match r.stage(stage).map(|s| &s.outcome) {
            Some(Outcome::Ran { .. }) => ("ran", None),
            Some(Outcome::Cached) => ("cached", None),
            Some(Outcome::Cancelled) => ("cancelled", None),
            Some(Outcome::Failed { error }) => ("failed", Some(error.to_string())),
            Some(o) => ("failed", Some(format!("stage ended {}", o.label()))),
            None => ("failed", Some(format!("no stage `{stage}` in the report"))),
        },
        Err(e) => ("failed", Some(msmae_core::error::chain(e.as_ref()))),
    };
    if let Some(e) = &out.1 {
        eprintln!("error: stage `{stage}`: {e}");
    }
    let record = msmae_pipeline::slurm::JobOutcome {
        stage: stage.to_string(),
        key: Some(key.to_string()),
        outcome: out.0.to_string(),
        error: out.1.clone(),
        seconds: t.elapsed().as_secs_f64(),
        host,
    };
    if msmae_dist::group().rank() == 0 {
        record.write(outcome)?;
    }
    Ok(if out.0 == "ran" || out.0 == "cached" { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// `msmae audit`: recompute recorded stages in a scratch store and compare.
pub(crate) fn audit(registry: &Registry, args: AuditArgs) -> Result<ExitCode> {
    let AuditArgs { common, stages, threads, tolerance, format, scratch } = args;
    let common = &common;
    if threads == Some(0) || threads.is_some_and(|t| t > MAX_JOBS) {
        return Err(UsageError(format!("--threads: give between 1 and {MAX_JOBS}")).into());
    }
    if !(tolerance >= 0.0 && tolerance.is_finite()) {
        return Err(UsageError(format!("--tolerance {tolerance}: give a finite number ≥ 0")).into());
    }
    let Recorded { plan, store, lock_path, lock } = recorded(common, registry)?;
    if !lock_path.exists() {
        anyhow::bail!("{}: no lock file, so nothing to reproduce (run the pipeline first)", lock_path.display());
    }
    let compute = compute(common)?;
    let backend = compute.backend;
    let set_threads = move |n: usize| {
        msmae_backend::set_compute_threads(backend, n);
        msmae_backend::compute_threads(backend)
    };
    let opts = msmae_pipeline::audit::AuditOptions {
        stages,
        threads,
        tolerance,
        env: compute.env.clone(),
        set_threads: &set_threads,
        scratch,
        cancel: cancel_on_ctrl_c(),
    };
    let bars = progress::bars();
    let audits = msmae_pipeline::audit::audit(&plan, &store, &lock, &opts, bars.as_ref())?;
    match format {
        AuditFormat::Text => {
            print!("{}", msmae_pipeline::audit::render_text(&common.pipeline, &lock_path, &audits, tolerance))
        }
        AuditFormat::Json => println!("{}", serde_json::to_string_pretty(&audits)?),
    }
    Ok(if audits.iter().all(|a| a.verdict.reproduced()) { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
