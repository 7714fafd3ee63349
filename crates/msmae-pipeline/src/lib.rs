//! The msmae pipeline runner: YAML pipelines ([`spec`]) validated into a DAG ([`mod@plan`]),
//! executed with a content-addressed cache ([`store`], [`key`], [`exec`]), recorded in a
//! lock file ([`lockfile`]), and inspected ([`inspect`]). It knows stages only through
//! [`msmae_core::DynStage`], so it compiles without any ML dependency.

pub mod audit;
pub mod error;
pub mod exec;
pub mod hashing;
pub mod inspect;
pub mod key;
pub mod locate;
pub mod lockfile;
pub mod plan;
pub mod results;
pub mod slurm;
pub mod spec;
pub mod store;

pub use error::{Error, Result, SpecError, SpecErrors};
pub use exec::{Executor, Outcome, RunOptions, RunReport, StageReport, run};
pub use lockfile::LockFile;
pub use plan::{Plan, plan};
pub use spec::{Override, PipelineSpec, load, parse};
pub use store::Store;

/// Load, parse and validate a pipeline file.
pub fn load_plan(file: &std::path::Path, overrides: &[Override], registry: &msmae_core::Registry) -> Result<Plan> {
    let spec = spec::load(file, overrides)?;
    Ok(plan::plan(spec, registry)?)
}
