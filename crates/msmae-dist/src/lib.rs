//! The process group of a data-parallel run: which rank this process is, how many there
//! are, and the collectives training needs (sum all-reduce, broadcast, barrier, abort).
//!
//! A run is multi-process when a launcher says so: Open MPI's `mpirun`
//! (`OMPI_COMM_WORLD_RANK`/`_SIZE`/`_LOCAL_RANK`), MPICH/Hydra (`PMI_RANK`/`PMI_SIZE`),
//! a Slurm step started by `srun` (`SLURM_PROCID`/`SLURM_NTASKS`/`SLURM_LOCALID`, read only
//! inside a step, where `SLURM_STEP_ID` is set: a batch script itself is one process even
//! under `-n 4`), or torchrun-style variables (`RANK`/`WORLD_SIZE`/`LOCAL_RANK`). The
//! collectives are MPI's (rsmpi over the system's Open MPI or MPICH, the `mpi` feature), so
//! every launcher must start the processes as one MPI job: `mpirun`, or `srun` with the
//! cluster's PMI. Without a launcher the group is [`Solo`]: rank 0 of 1, every collective
//! the identity.
//!
//! Gradients on CUDA devices are summed with NCCL instead ([`nccl`]), bootstrapped over
//! this group; [`GradientTransport`] (`MSMAE_COLLECTIVE`) chooses.
//!
//! [`init`] sets the process-wide group once, in `main`; [`group`] hands it to the training
//! loop. MPI's default error handler is fatal, so a failed collective ends the whole job
//! rather than returning; a rank that fails on its own calls [`Collective::abort`], which
//! ends every rank (the launcher names the rank that exited first).

use std::fmt;
use std::sync::{Arc, OnceLock};

#[cfg(feature = "mpi")]
mod mpi_group;
pub mod nccl;

/// Where this process stands in a multi-process launch, read from the launcher's variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorldEnv {
    pub rank: usize,
    pub size: usize,
    /// Rank among the processes of this node (which GPU a process takes by default).
    pub local_rank: usize,
    /// The launcher the variables came from (`mpirun`, `srun`, …), for messages.
    pub launcher: &'static str,
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum DistError {
    #[error("{var}=`{value}` is not a process count or rank")]
    BadVar { var: String, value: String },
    #[error("rank {rank} is not below the world size {size} ({launcher})")]
    RankOutOfRange { rank: usize, size: usize, launcher: &'static str },
    #[error(
        "launched as rank {rank} of {size} by {launcher}, but this msmae was built without MPI: install an MPI (Debian: `apt-get install libopenmpi-dev libclang-dev`) and rebuild (`cargo xtask` enables MPI when `mpicc` is on the PATH)"
    )]
    NoMpi { rank: usize, size: usize, launcher: &'static str },
    #[error(
        "{launcher} says rank {rank} of {size}, but MPI sees rank {mpi_rank} of {mpi_size}: start every process through one MPI launch (`mpirun -np N …`, or `srun` with the cluster's PMI), not as separate programs"
    )]
    Mismatch { launcher: &'static str, rank: usize, size: usize, mpi_rank: usize, mpi_size: usize },
    #[error("MPI could not be initialised ({0})")]
    Init(String),
    #[error("{var}=`{value}` is not one of auto, mpi, nccl")]
    BadTransport { var: &'static str, value: String },
}

/// What sums the gradients of a multi-process step (`MSMAE_COLLECTIVE`; run-only, like the
/// device count: the sums agree up to float reduction order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GradientTransport {
    /// NCCL on the GPU when training on CUDA and every rank can load NCCL; else the process
    /// group (MPI) on host memory.
    #[default]
    Auto,
    /// Always the process group on host memory (CUDA gradients are copied to the host).
    Mpi,
    /// NCCL on the GPU, or an error. Also at world size 1, where the sum is the identity but
    /// every step still goes through NCCL: the check that a one-GPU machine can run.
    Nccl,
}

impl fmt::Display for GradientTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Mpi => "mpi",
            Self::Nccl => "nccl",
        })
    }
}

impl GradientTransport {
    pub const VAR: &'static str = "MSMAE_COLLECTIVE";

    /// From `MSMAE_COLLECTIVE` as `var` reads it (unset or empty: [`Self::Auto`]).
    pub fn from_var(var: impl Fn(&str) -> Option<String>) -> Result<Self, DistError> {
        match var(Self::VAR).map(|v| v.trim().to_ascii_lowercase()).as_deref() {
            None | Some("" | "auto") => Ok(Self::Auto),
            Some("mpi") => Ok(Self::Mpi),
            Some("nccl") => Ok(Self::Nccl),
            Some(_) => Err(DistError::BadTransport { var: Self::VAR, value: var(Self::VAR).unwrap_or_default() }),
        }
    }

    /// This process's choice (read once).
    pub fn current() -> Result<Self, DistError> {
        static CHOICE: OnceLock<Result<GradientTransport, DistError>> = OnceLock::new();
        CHOICE.get_or_init(|| Self::from_var(|k| std::env::var(k).ok())).clone()
    }
}

impl WorldEnv {
    /// The launch this process is part of, from `var` (the environment in production); `None`
    /// when no launcher variable is set or the world has one process.
    pub fn detect(var: impl Fn(&str) -> Option<String>) -> Result<Option<WorldEnv>, DistError> {
        let num = |name: &str| -> Result<Option<usize>, DistError> {
            match var(name) {
                None => Ok(None),
                Some(v) => v.trim().parse().map(Some).map_err(|_| DistError::BadVar { var: name.into(), value: v }),
            }
        };
        let slurm_step = var("SLURM_STEP_ID").is_some();
        let sources: [(&'static str, &str, &str, &str, bool); 4] = [
            ("mpirun", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", true),
            ("an MPICH/Hydra launcher", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", true),
            ("srun", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", slurm_step),
            ("torchrun-style RANK/WORLD_SIZE", "RANK", "WORLD_SIZE", "LOCAL_RANK", true),
        ];
        for (launcher, rank, size, local, applies) in sources {
            if !applies {
                continue;
            }
            let (Some(rank), Some(size)) = (num(rank)?, num(size)?) else { continue };
            if size <= 1 {
                return Ok(None);
            }
            if rank >= size {
                return Err(DistError::RankOutOfRange { rank, size, launcher });
            }
            return Ok(Some(WorldEnv { rank, size, local_rank: num(local)?.unwrap_or(0), launcher }));
        }
        Ok(None)
    }
}

// The collective interface lives in msmae-core (a stage's context holds one); this crate
// provides the implementations and the process group.
pub use msmae_core::collective::{Collective, Solo};

static GROUP: OnceLock<Arc<dyn Collective>> = OnceLock::new();
static LOCAL_RANK: OnceLock<usize> = OnceLock::new();

/// This process's rank among those of its node (0 alone): the GPU a process takes when it
/// is told `--device auto` in a multi-process launch.
pub fn local_rank() -> usize {
    LOCAL_RANK.get().copied().unwrap_or(0)
}

/// The process group set by [`init`] ([`Solo`] before, and in programs that never call it).
pub fn group() -> Arc<dyn Collective> {
    GROUP.get().cloned().unwrap_or_else(|| Arc::new(Solo))
}

/// Held by `main` for the life of the process: MPI is finalised when it drops (a rank that
/// exits without finalising makes `mpirun` report the job as failed).
#[must_use = "MPI is finalised when the guard drops"]
#[derive(Debug)]
pub struct Guard {
    #[cfg(feature = "mpi")]
    mpi: bool,
}

impl Drop for Guard {
    fn drop(&mut self) {
        #[cfg(feature = "mpi")]
        if self.mpi {
            mpi_group::finalize();
        }
    }
}

/// Whether this build has MPI collectives.
pub const HAS_MPI: bool = cfg!(feature = "mpi");

/// Join the launch this process is part of (if any) and make it the process-wide group.
/// Call once, early in `main`, from the main thread.
pub fn init() -> Result<Guard, DistError> {
    init_from(WorldEnv::detect(|k| std::env::var(k).ok())?)
}

fn init_from(world: Option<WorldEnv>) -> Result<Guard, DistError> {
    let Some(w) = world else {
        let _ = GROUP.set(Arc::new(Solo));
        return Ok(Guard {
            #[cfg(feature = "mpi")]
            mpi: false,
        });
    };
    #[cfg(feature = "mpi")]
    {
        let g = mpi_group::MpiGroup::init()?;
        if (g.rank(), g.size()) != (w.rank, w.size) {
            return Err(DistError::Mismatch {
                launcher: w.launcher,
                rank: w.rank,
                size: w.size,
                mpi_rank: g.rank(),
                mpi_size: g.size(),
            });
        }
        tracing::debug!("rank {} of {} ({}), local rank {}", w.rank, w.size, w.launcher, w.local_rank);
        let _ = LOCAL_RANK.set(w.local_rank);
        let _ = GROUP.set(Arc::new(g));
        Ok(Guard { mpi: true })
    }
    #[cfg(not(feature = "mpi"))]
    Err(DistError::NoMpi { rank: w.rank, size: w.size, launcher: w.launcher })
}

/// `[start, end)` of part `index` when `n` items are cut into `parts` consecutive parts of
/// equal size, the first `n % parts` one larger: how a global batch is shared out over
/// ranks and devices.
pub fn share(n: usize, parts: usize, index: usize) -> std::ops::Range<usize> {
    let parts = parts.max(1);
    let (q, r) = (n / parts, n % parts);
    let start = index * q + index.min(r);
    start..(start + q + usize::from(index < r)).min(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn launchers_are_read_in_order_and_one_process_is_no_world() {
        let w = WorldEnv::detect(env(&[
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
            ("RANK", "0"),
        ]));
        assert_eq!(w, Ok(Some(WorldEnv { rank: 1, size: 2, local_rank: 1, launcher: "mpirun" })));
        let t =
            WorldEnv::detect(env(&[("RANK", "3"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "1"), ("MASTER_ADDR", "n1")]));
        assert_eq!(t.map(|w| w.map(|w| (w.rank, w.size, w.local_rank))), Ok(Some((3, 4, 1))));
        assert_eq!(WorldEnv::detect(env(&[("RANK", "0"), ("WORLD_SIZE", "1")])), Ok(None));
        assert_eq!(WorldEnv::detect(env(&[])), Ok(None));
    }

    #[test]
    fn slurm_counts_only_inside_an_srun_step() {
        // `sbatch -n 4` sets SLURM_NTASKS=4 for the batch script, which is still one process
        let batch = [("SLURM_PROCID", "0"), ("SLURM_NTASKS", "4"), ("SLURM_LOCALID", "0")];
        assert_eq!(WorldEnv::detect(env(&batch)), Ok(None));
        let step = [("SLURM_PROCID", "2"), ("SLURM_NTASKS", "4"), ("SLURM_LOCALID", "0"), ("SLURM_STEP_ID", "0")];
        assert_eq!(WorldEnv::detect(env(&step)).map(|w| w.map(|w| (w.rank, w.launcher))), Ok(Some((2, "srun"))));
    }

    #[test]
    fn bad_variables_are_named() {
        assert_eq!(
            WorldEnv::detect(env(&[("RANK", "x"), ("WORLD_SIZE", "2")])),
            Err(DistError::BadVar { var: "RANK".into(), value: "x".into() })
        );
        let e = WorldEnv::detect(env(&[("PMI_RANK", "2"), ("PMI_SIZE", "2")])).expect_err("rank 2 of 2");
        assert!(e.to_string().contains("rank 2 is not below the world size 2"), "{e}");
    }

    #[test]
    fn without_mpi_a_launch_is_a_clear_error_and_no_launch_is_solo() {
        if !HAS_MPI {
            let e =
                init_from(Some(WorldEnv { rank: 1, size: 2, local_rank: 1, launcher: "mpirun" })).expect_err("no MPI");
            assert!(e.to_string().contains("built without MPI") && e.to_string().contains("rank 1 of 2"), "{e}");
        }
        let solo = Solo;
        let mut v = vec![1.0f32, 2.0];
        solo.all_reduce_sum(&mut v);
        solo.broadcast(&mut v, 0);
        assert_eq!((solo.rank(), solo.size(), v), (0, 1, vec![1.0, 2.0]));
    }

    #[test]
    fn the_gradient_transport_is_read_from_its_variable() {
        let one = |v: &'static str| move |k: &str| (k == GradientTransport::VAR).then(|| v.to_string());
        assert_eq!(GradientTransport::from_var(|_| None), Ok(GradientTransport::Auto));
        assert_eq!(GradientTransport::from_var(one("NCCL")), Ok(GradientTransport::Nccl));
        assert_eq!(GradientTransport::from_var(one(" mpi ")), Ok(GradientTransport::Mpi));
        let e = GradientTransport::from_var(one("gloo")).expect_err("not a transport");
        assert_eq!(e.to_string(), "MSMAE_COLLECTIVE=`gloo` is not one of auto, mpi, nccl");
    }

    #[test]
    fn shares_cover_the_batch_in_order() {
        for (n, parts) in [(16, 2), (16, 4), (7, 3), (2, 4)] {
            let r: Vec<_> = (0..parts).map(|i| share(n, parts, i)).collect();
            assert_eq!(r.first().map(|r| r.start), Some(0));
            assert_eq!(r.last().map(|r| r.end), Some(n));
            assert!(r.windows(2).all(|w| w[0].end == w[1].start), "{r:?}");
            let lens: Vec<usize> = r.iter().map(ExactSizeIterator::len).collect();
            assert!(lens.iter().max().unwrap_or(&0) - lens.iter().min().unwrap_or(&0) <= 1, "{lens:?}");
        }
    }
}
