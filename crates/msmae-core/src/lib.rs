//! Core vocabulary shared by every msmae crate: the [`Stage`] plugin trait and its
//! type-erased form [`DynStage`], the [`StageContext`] a stage runs in, artifact
//! declarations, errors, and the seeded RNG every random draw comes from.
//!
//! This crate has no ML dependencies: the runner (`msmae-pipeline`) talks to stages only
//! through [`DynStage`], so it compiles and is tested without burn.

pub mod artifact;
pub mod collective;
pub mod context;
pub mod error;
pub mod progress;
pub mod rng;
pub mod stage;

pub use artifact::{Arity, ArtifactKind, InputArtifact, InputSlot, OutputDecl};
pub use collective::{Collective, Solo};
pub use context::{CancelToken, ExecEnv, StageContext};
pub use error::{ConfigError, StageError};
pub use progress::{NoProgress, Progress, ProgressBar};
pub use rng::{SeedPath, derive_seed, seeded_rng};
pub use stage::{DynStage, ListedFiles, PreparedStage, Registry, Resources, Stage};

/// The build-time fingerprint of the crate that expands this macro (see
/// `msmae-fingerprint`), or its name and version when its build script does not emit one.
#[macro_export]
macro_rules! code_fingerprint {
    () => {
        match option_env!("MSMAE_CODE_FINGERPRINT") {
            Some(fp) => fp,
            None => concat!(env!("CARGO_PKG_NAME"), "@", env!("CARGO_PKG_VERSION")),
        }
    };
}
